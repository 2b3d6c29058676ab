"""Time one MatMul in fp32 and with ONNX Runtime's dynamic int8 weights, side by side.

This shows whether the CPU's int8 GEMM kernels are faster than its fp32
ones at all, before any model is involved. The shape is MiniLM's MLP
expansion at 128 tokens: (1, 128, 384) x (384, 1536). Run from the
repository root::

    .venv/bin/python benchmarks/int8_matmul.py

Prints the median latency of each model over alternating rounds, and the
ratio to fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402


def matmul_model(tokens: int, inputs: int, outputs: int) -> onnx.ModelProto:
    """Return a one-MatMul ONNX model with random fp32 weights."""
    weight = np.random.default_rng(0).standard_normal((inputs, outputs)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, outputs])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv: list[str] | None = None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--runs-per-round", type=int, default=100, help="runs per round")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="int8-matmul-") as folder:
        paths = {"fp32": Path(folder) / "fp32.onnx"}
        onnx.save(matmul_model(128, 384, 1536), str(paths["fp32"]))
        for name, weight_type in (
            ("int8 s8 weights", QuantType.QInt8),
            ("int8 u8 weights", QuantType.QUInt8),
        ):
            paths[name] = Path(folder) / f"{weight_type.name}.onnx"
            quantize_dynamic(str(paths["fp32"]), str(paths[name]), weight_type=weight_type)
        feed = {"x": np.random.default_rng(1).standard_normal((1, 128, 384)).astype(np.float32)}
        latency = harness.time_alternating(
            paths,
            feed,
            threads=1,
            rounds=args.rounds,
            runs_per_round=args.runs_per_round,
            log=lambda message: print(message, file=sys.stderr),
        )
    fp32 = latency["fp32"][0]
    for name, (p50, p90) in latency.items():
        print(f"{name:16s} p50 {p50:.3f} ms  p90 {p90:.3f} ms  {fp32 / p50:.2f}x fp32")


if __name__ == "__main__":
    main()
