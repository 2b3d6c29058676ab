"""Measure latency table entries: one layer, one option, one precision, on the target runtime.

Each entry is a one-layer ONNX model (a Conv or a Linear, or the two factors
of a low-rank option), exported, quantized for int8 with ONNX Runtime's QDQ
tool, and timed with the profile's protocol.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy.passes.lowrank import factorize
from exporters.onnx import OnnxRunner, onnx_from_torch, quantize_onnx
from exporters.timing import TimingProtocol


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The shapes of one layer as it runs in a variant (after pruning of its input or output).

    ``input_shape`` is batch-1: (1, C, H, W) for a conv, (1, ..., features)
    for a Linear. ``option`` is ``dense`` or ``lowrank:R``.
    """

    op: str
    input_shape: tuple[int, ...]
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    option: str = "dense"

    @property
    def in_features(self) -> int:
        return self.input_shape[1] if self.op == "conv2d" else self.input_shape[-1]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.op == "conv2d":
            return (self.out_features, self.in_features // self.groups, *self.kernel)
        return (self.out_features, self.in_features)

    def key_fields(self, precision: str) -> dict:
        return {
            "op": self.op,
            "input_shape": list(self.input_shape),
            "weight_shape": list(self.weight_shape),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "groups": self.groups,
            "option": self.option,
            "precision": precision,
        }

    def build(self) -> nn.Module:
        """Return a randomly initialized module of this shape (latency does not depend on values)."""
        if self.op == "conv2d":
            layer = nn.Conv2d(
                self.in_features,
                self.out_features,
                self.kernel,
                self.stride,
                self.padding,
                groups=self.groups,
            )
        else:
            layer = nn.Linear(self.in_features, self.out_features)
        if self.option.startswith("lowrank:"):
            layer = factorize(layer, int(self.option.split(":")[1]))
        return layer.eval()


def measure_spec(spec: LayerSpec, precision: str, protocol: TimingProtocol) -> dict:
    """Measure one latency table entry for ``spec`` at ``precision``; return it as a dict."""
    torch.manual_seed(0)
    module = spec.build()
    example = torch.randn(*spec.input_shape)
    with tempfile.TemporaryDirectory(prefix="deploy-measure-") as workdir:
        path = Path(workdir) / "layer.onnx"
        onnx_from_torch(
            module,
            (example,),
            path,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            simplify=False,
        )
        if precision == "int8":
            rng = np.random.default_rng(0)
            feeds = [
                {"x": rng.standard_normal(spec.input_shape).astype(np.float32)} for _ in range(4)
            ]
            path = quantize_onnx(path, Path(workdir) / "layer.int8.onnx", calibration_feeds=feeds)
        elif precision != "fp32":
            raise ValueError(
                f"precision {precision!r} cannot be measured with ONNX Runtime on the CPU"
            )
        runner = OnnxRunner(path, protocol.threads)
        latency = runner.time({"x": example.numpy()}, protocol)
    return {
        **spec.key_fields(precision),
        "p50_ms": latency.p50,
        "p90_ms": latency.p90,
        "runs": latency.runs,
    }
