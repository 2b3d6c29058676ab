"""Quantize one layer of EfficientNet-Lite0: every Add quantized, or only those inside int8 regions.

ONNX Runtime's static quantizer quantizes every operator type it knows
unless the node is excluded. Skipping only the float layers, as deploy did
before, left each residual Add quantized, with a QuantizeLinear and a
DequantizeLinear around every block, even in a variant whose only int8
layer is the classifier. ``exporters.onnx.float_region_nodes`` now skips
every node that touches a float layer too. This script quantizes the
classifier (``_fc``) alone both ways and the fp32 model not at all, and
times the three side by side (5 alternating rounds, fresh sessions, batch 1,
one thread). Run from the repository root, with the models installed::

    .venv/bin/python benchmarks/int8_regions.py

Prints each file's node counts and median p50, and each one's ratio to fp32.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.data import Dataset  # noqa: E402
from deploy.pipeline import QUANTIZED_OPS  # noqa: E402
from deploy.validate import time_side_by_side  # noqa: E402
from deploy.zoo.efficientnet import build_model, photo_inputs  # noqa: E402
from exporters.onnx import (  # noqa: E402
    float_region_nodes,
    nodes_of_module,
    onnx_from_torch,
    quantize_onnx,
)
from exporters.timing import TimingProtocol  # noqa: E402

LAYER = "_fc"


def main() -> None:
    torch.manual_seed(0)
    images = photo_inputs(32)
    with tempfile.TemporaryDirectory(prefix="int8-regions-") as folder:
        fp32 = Path(folder) / "fp32.onnx"
        onnx_from_torch(
            build_model(),
            (torch.from_numpy(images[:1]),),
            fp32,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
        proto = onnx.load(str(fp32))
        int8 = set(nodes_of_module(proto, LAYER, QUANTIZED_OPS))
        floats = [
            n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and n.name not in int8
        ]
        feeds = [{"input": images[k : k + 8]} for k in range(0, 32, 8)]
        files = {"fp32": fp32}
        for label, exclude in (
            ("float layers skipped", floats),
            ("float regions skipped", floats + float_region_nodes(proto, int8, QUANTIZED_OPS)),
        ):
            files[label] = quantize_onnx(
                fp32,
                Path(folder) / f"{len(files)}.onnx",
                calibration_feeds=feeds,
                nodes_to_exclude=exclude,
            )
        for label, path in files.items():
            ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
            kinds = ("QuantizeLinear", "DequantizeLinear", "Add")
            print(f"{label:24s} " + ", ".join(f"{op} {ops[op]}" for op in kinds))
        data = Dataset([images[:1].astype(np.float32)])
        timed = time_side_by_side(files, data, TimingProtocol(runs=100))
    base = timed["fp32"]["p50"]
    for label, figures in timed.items():
        print(f"{label:24s} p50 {figures['p50']:.3f} ms  {figures['p50'] / base:.3f}x fp32")


if __name__ == "__main__":
    main()
