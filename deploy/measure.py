"""Measure latency table entries: one layer, one option, one precision, on the target runtime.

Each entry is a one-layer ONNX model (a Conv or a Linear, or the two factors
of a low-rank option), exported, quantized for int8 with ONNX Runtime's QDQ
tool, and timed with the profile's protocol. Beside it two reference models
on the same input are timed, so that the latency model can remove what a
one-layer model pays but a layer inside a whole model does not:

- ``call_ms``: an Identity model, the cost of one session call;
- ``boundary_ms`` (int8 only): QuantizeLinear then DequantizeLinear on the
  input, less ``call_ms``. An isolated int8 layer pays it, but consecutive
  int8 layers pass int8 tensors to each other.

``layout_ms`` is what the one-layer model spends in operators other than the
layer's own (``exporters.onnx.LAYER_OPS``), from ONNX Runtime's profiler:
NCHWc reorders around an fp32 conv, QuantizeLinear, transposes and
DequantizeLinear around an int8 one.

Each model is timed in ``SESSIONS`` fresh ONNX Runtime sessions and the
median of their medians is kept. One session of a model of a few
microseconds runs in one of two modes for its whole life, 3-5 us apart
(seen on an Intel Xeon with AVX-512 and ONNX Runtime 1.32), so a single
session's median is off by that much at random.

Energy is read around the timed loops when the profile names a readable
counter, and otherwise estimated from the declared active watts.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from deploy.passes.lowrank import factorize
from deploy.power import EnergyReader, energy_fields, measure_energy
from exporters.onnx import (
    LAYER_OPS,
    OnnxRunner,
    node_profile,
    onnx_from_torch,
    quantize_onnx,
)
from exporters.timing import Latency, TimingProtocol

SESSIONS = 3


def time_sessions(
    path: Path, feeds: dict[str, np.ndarray], protocol: TimingProtocol, sessions: int = SESSIONS
) -> Latency:
    """Return the medians of the p50 and p90 of ``path``, timed in ``sessions`` fresh sessions."""
    timed = [OnnxRunner(path, protocol.threads).time(feeds, protocol) for _ in range(sessions)]
    return Latency(
        p50=float(np.median([t.p50 for t in timed])),
        p90=float(np.median([t.p90 for t in timed])),
        runs=sum(t.runs for t in timed),
        cold_ms=timed[0].cold_ms,
    )


def profile_rounds(
    paths: list[Path],
    feeds: dict[str, np.ndarray],
    protocol: TimingProtocol,
    call_ms: float,
    rounds: int = SESSIONS,
    runs: int = 20,
    min_seconds: float = 0.0,
    max_rounds: int = 1000,
) -> tuple[float, list[list[tuple[str, str, float]]]]:
    """Time and profile every model, round-robin, each in fresh sessions.

    After ``rounds`` rounds, more follow until they have taken ``min_seconds``
    in all (at most ``max_rounds``), so that a burst of load on a shared
    machine meets a minority of them.

    Returns the first model's p50 (the median over ``rounds``) and each
    model's ``node_profile`` nodes, each node's time the median over the
    rounds. The profiler adds its own cost to every node it records (1-5 us
    on the CPUs measured so far), most of a small pool or reorder. In each
    round that cost per node is fitted over all the models at once: their
    profiled nodes add up to more than their p50 less ``call_ms``, by about
    that cost times their node count. It is taken off every node. Profiling
    the models in turn exposes them to the same load, so a burst of load
    shifts them alike instead of skewing one against another.
    """
    timing = dataclasses.replace(protocol, runs=min(protocol.runs, 50))
    p50s = []
    rounds_nodes: list[list[list[tuple[str, str, float]]]] = [[] for _ in paths]
    start = time.perf_counter()
    while len(p50s) < rounds or (
        time.perf_counter() - start < min_seconds and len(p50s) < max_rounds
    ):
        timed = [OnnxRunner(path, protocol.threads).time(feeds, timing).p50 for path in paths]
        profiles = [node_profile(path, feeds, protocol.threads, runs=runs) for path in paths]
        extra = sum(
            sum(ms for *_, ms in nodes) - max(p50 - call_ms, 0.0)
            for nodes, p50 in zip(profiles, timed, strict=True)
        )
        excess = max(extra, 0.0) / max(sum(len(nodes) for nodes in profiles), 1)
        p50s.append(timed[0])
        for k, nodes in enumerate(profiles):
            rounds_nodes[k].append([(name, op, max(ms - excess, 0.0)) for name, op, ms in nodes])
    merged = []
    for per_round in rounds_nodes:
        times: dict[tuple[str, str], list[float]] = {}
        for nodes in per_round:
            for name, op, ms in nodes:
                times.setdefault((name, op), []).append(ms)
        merged.append(
            [(name, op, float(np.median(times[(name, op)]))) for name, op, _ in per_round[0]]
        )
    return float(np.median(p50s)), merged


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

    @property
    def output_positions(self) -> int:
        """Output pixels of a conv, or tokens of a Linear, for batch 1."""
        if self.op == "conv2d":
            h, w = self.input_shape[2:]
            (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
            return ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
        return math.prod(self.input_shape[1:-1]) if len(self.input_shape) > 2 else 1

    @property
    def macs(self) -> int:
        """Multiply-adds of one batch-1 call, counting both factors of a low-rank option."""
        per_output = self.in_features // self.groups * self.kernel[0] * self.kernel[1]
        if self.option.startswith("lowrank:"):
            rank = int(self.option.split(":")[1])
            return self.output_positions * rank * (per_output + self.out_features)
        return self.output_positions * self.out_features * per_output

    def key_fields(self, precision: str, quantization: str = "static") -> dict:
        fields = {
            "op": self.op,
            "input_shape": list(self.input_shape),
            "weight_shape": list(self.weight_shape),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "groups": self.groups,
            "option": self.option,
            "precision": precision,
        }
        if precision == "int8" and quantization == "dynamic":
            fields["quantization"] = "dynamic"
        return fields

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


def _reference_model(input_shape: tuple[int, ...], quantize: bool) -> onnx.ModelProto:
    """Return an Identity model, or a QuantizeLinear -> DequantizeLinear model, on ``input_shape``."""
    dims = ["batch", *input_shape[1:]]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    if quantize:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
        ]
        constants = [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
            helper.make_tensor("zero", TensorProto.UINT8, [], [128]),
        ]
    else:
        nodes, constants = [helper.make_node("Identity", ["x"], ["y"])], []
    graph = helper.make_graph(nodes, "reference", [x], [y], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _time_reference(
    workdir: Path, input_shape: tuple[int, ...], quantize: bool, protocol: TimingProtocol
) -> float:
    path = workdir / ("qdq.onnx" if quantize else "identity.onnx")
    onnx.save(_reference_model(input_shape, quantize), str(path))
    feeds = {"x": np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)}
    return time_sessions(path, feeds, protocol).p50


def _conversions(nodes: list[tuple[str, str, float]], run_ms: float) -> tuple[float, float]:
    # What a one-layer model spends converting its input (nodes before its
    # first layer node) and its output (nodes after), with the profiler's
    # own cost per node taken off. Nodes between two layer nodes (the two
    # factors of a low-rank layer) are split evenly between the two sides.
    total = sum(ms for _, _, ms in nodes)
    excess = max(total - run_ms, 0.0) / len(nodes) if nodes else 0.0
    positions = [k for k, (_, op, _) in enumerate(nodes) if op in LAYER_OPS]
    if not positions:
        return 0.0, 0.0
    first, last = positions[0], positions[-1]
    before = after = 0.0
    for k, (_, op, ms) in enumerate(nodes):
        if op in LAYER_OPS:
            continue
        net = max(ms - excess, 0.0)
        if k < first:
            before += net
        elif k > last:
            after += net
        else:
            before += net / 2
            after += net / 2
    return before, after


def measure_spec(
    spec: LayerSpec,
    precision: str,
    protocol: TimingProtocol,
    power: dict | None = None,
    reader: EnergyReader | None = None,
    quantization: str = "static",
) -> dict:
    """Measure one latency table entry for ``spec`` at ``precision``; return it as a dict.

    Args:
        spec: the layer's shapes and option.
        precision: ``fp32`` or ``int8``.
        protocol: warm-up, runs and threads.
        power: the profile's ``power`` section; with it the entry gets
            ``energy_mj`` and ``energy_source``. Defaults to no energy.
        reader: an energy counter read around the timed loop, or None to
            estimate from ``power``'s declared watts. Defaults to None.
        quantization: for int8, ``static`` (QDQ, calibrated on random
            inputs) or ``dynamic`` (weights ahead of time, activations at
            run time), as the run quantizes. Defaults to ``static``.
    """
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
            path = quantize_onnx(
                path,
                Path(workdir) / "layer.int8.onnx",
                method=quantization,
                calibration_feeds=feeds if quantization == "static" else None,
            )
        elif precision != "fp32":
            raise ValueError(
                f"precision {precision!r} cannot be measured with ONNX Runtime on the CPU"
            )
        feeds = {"x": example.numpy()}
        timed = {}
        measured_mj, _ = measure_energy(
            reader,
            lambda: timed.setdefault("latency", time_sessions(path, feeds, protocol)),
            SESSIONS * (protocol.warmup + protocol.runs),
        )
        latency = timed["latency"]
        call_ms = _time_reference(Path(workdir), spec.input_shape, False, protocol)
        layout_in_ms, layout_out_ms = _conversions(
            node_profile(path, feeds, protocol.threads), max(latency.p50 - call_ms, 0.0)
        )
        boundary_ms = None
        if precision == "int8" and quantization == "static":
            qdq_ms = _time_reference(Path(workdir), spec.input_shape, True, protocol)
            boundary_ms = max(qdq_ms - call_ms, 0.0)
        elif precision == "int8":
            # Each dynamically quantized layer quantizes its own input at run
            # time: consecutive layers save nothing.
            boundary_ms = 0.0
    entry = {
        **spec.key_fields(precision, quantization),
        "rank": int(spec.option.split(":")[1]) if spec.option.startswith("lowrank:") else None,
        "kept_channels": spec.out_features,
        # Channel pruning removes channels, so every entry's weights are dense.
        "sparsity": "none",
        "p50_ms": latency.p50,
        "p90_ms": latency.p90,
        "runs": latency.runs,
        "call_ms": call_ms,
        "layout_ms": layout_in_ms + layout_out_ms,
        "layout_in_ms": layout_in_ms,
        "layout_out_ms": layout_out_ms,
    }
    if boundary_ms is not None:
        entry["boundary_ms"] = boundary_ms
    if power is not None:
        entry.update(energy_fields(power, latency.p50, None if reader is None else measured_mj))
    return entry
