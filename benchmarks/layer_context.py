"""Compare each layer of the digits CNN alone with the same layer inside the whole model.

A latency table entry times a one-layer ONNX model. This script shows what
that misses: ONNX Runtime's profiler times every operator of the whole fp32
model, and of each layer's one-layer model, so the layout changes
(``ReorderInput``, ``ReorderOutput``) and the cache effects appear side by
side. Run from the repository root::

    .venv/bin/python benchmarks/layer_context.py

Prints, per operator type, the median time per run in microseconds.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.analyze import analyze  # noqa: E402
from deploy.costs import layer_spec  # noqa: E402
from deploy.zoo.digits import build_model  # noqa: E402
from exporters.onnx import onnx_from_torch, op_times  # noqa: E402


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    onnx_from_torch(
        module,
        (example,),
        path,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )


def _row(label: str, times: dict[str, float]) -> str:
    cells = ", ".join(f"{op} {ms * 1000:.0f}" for op, ms in sorted(times.items()))
    return f"{label:44s} {cells}"


def main() -> None:
    torch.manual_seed(0)
    model = build_model()
    example = torch.randn(1, 1, 8, 8)
    with tempfile.TemporaryDirectory(prefix="layer-context-") as folder:
        whole = Path(folder) / "model.onnx"
        _export(model, example, whole)
        print(_row("whole model", op_times(whole, {"x": example.numpy()}, runs=200)))
        for info in analyze(model, (example,)):
            spec = layer_spec(info, 1.0, "dense", None, 8)
            alone = Path(folder) / "layer.onnx"
            layer_input = torch.randn(*spec.input_shape)
            _export(spec.build(), layer_input, alone)
            times = op_times(alone, {"x": layer_input.numpy()}, runs=200)
            print(_row(f"{info.name} alone {list(spec.input_shape)}", times))


if __name__ == "__main__":
    main()
