"""Validation: run an exported variant on the target runtime and compare it with the original.

A ``Validation`` is truthy when the variant passed every check and serializes
to JSON for the manifest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import onnx
from onnx import numpy_helper

from deploy.data import Dataset
from deploy.errors import DeployError
from exporters.onnx import ExportError, OnnxRunner, first_nonfinite_node
from exporters.timing import TimingProtocol


@dataclasses.dataclass
class Validation:
    """Measured results of one exported variant against the original PyTorch model."""

    accuracy: float | None
    agreement: float
    max_abs_error: float
    latency_ms: dict
    size_bytes: int
    status: str
    reason: str | None = None
    zero_weight_fraction: float | None = None

    def __bool__(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _feeds(runner: OnnxRunner, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(runner.input_names, arrays, strict=True))


def run_batched(runner: OnnxRunner, arrays: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Run all samples through ``runner`` in batches; return its first output."""
    outputs = []
    for start in range(0, len(arrays[0]), batch_size):
        batch = [a[start : start + batch_size] for a in arrays]
        outputs.append(runner.run(_feeds(runner, batch))[0])
    return np.concatenate(outputs)


# Batch-versus-single tolerance for dynamic int8, relative to the output's max abs
# value: still far below what an export that froze its batch size gives.
DYNAMIC_INT8_ATOL = 0.25


def check_batch_sizes(
    runner: OnnxRunner, arrays: list[np.ndarray], sizes=(1, 3), atol: float = 1e-3
) -> None:
    """Check that the artifact runs at two batch sizes and that batching does not change outputs.

    Raises:
        ExportError: a batch size fails to run (the message names the node) or
            gives outputs that differ from running the samples one by one.
    """
    largest = max(sizes)
    if _has_dynamic_quantization(runner):
        # Dynamic int8 takes each activation's scale from the whole batch, so a
        # batch legitimately differs from its samples run alone: on
        # all-MiniLM-L6-v2 by 0.02 on outputs of magnitude 0.22 (cosine 0.994).
        atol = max(atol, DYNAMIC_INT8_ATOL)
    # The largest batch first: an export that froze its example batch size
    # fails there, and the message then names that size.
    batches = {
        size: _run_at_batch(runner, [a[:size] for a in arrays]) for size in sorted(sizes)[::-1]
    }
    singles = np.concatenate(
        [_run_at_batch(runner, [a[i : i + 1] for a in arrays]) for i in range(largest)]
    )
    for size in sizes:
        batch = batches[size]
        if batch.shape[0] != size:
            raise ExportError(
                f"{runner.path.name} returned batch dimension {batch.shape[0]} for an input batch "
                f"of {size}; axis 0 of the output is not dynamic"
            )
        scale = max(float(np.abs(singles[:size]).max()), 1.0)
        if float(np.abs(batch - singles[:size]).max()) > atol * scale:
            raise ExportError(
                f"{runner.path.name} gives different outputs at batch {size} than one sample at a "
                f"time; the exported graph bakes in the example batch size"
            )


def _has_dynamic_quantization(runner: OnnxRunner) -> bool:
    import onnx

    graph = onnx.load(str(runner.path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


def _run_at_batch(runner: OnnxRunner, arrays: list[np.ndarray]) -> np.ndarray:
    try:
        return runner.run(_feeds(runner, arrays))[0]
    except ExportError as exc:
        size = len(arrays[0])
        raise ExportError(
            f"{exc}; axis 0 (batch) of the inputs is declared dynamic but the graph fails at "
            f"batch {size}: a size read as a Python number during export (x.data.size(), "
            f"int(x.shape[0]), .item()) froze it, so compute shapes from tensors or use -1"
        ) from exc


def zero_weight_fraction(path: str | os.PathLike) -> float:
    """Return the fraction of zeros among the float weights of Conv, Gemm and MatMul nodes."""
    proto = onnx.load(str(path))
    initializers = {i.name: i for i in proto.graph.initializer}
    total = zeros = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        tensor = initializers.get(node.input[1])
        if tensor is None:
            continue
        weight = numpy_helper.to_array(tensor)
        if np.issubdtype(weight.dtype, np.floating):
            total += weight.size
            zeros += int((weight == 0).sum())
    return zeros / total if total else 0.0


def per_tensor_zeroed_channels(
    path: str | os.PathLike, node_names: list[str] | None = None
) -> list[str]:
    """Name the nodes whose per-tensor int8 weights round whole output channels to zero.

    Symmetric per-tensor int8 has one scale, ``max|w| / 127``, for the whole
    weight, so a channel whose largest weight is below half a step becomes all
    zeros. That happens when channel ranges span more than about 254x, as in
    depthwise convolutions after BatchNorm folding. Returns one description
    per affected node of the float ONNX file at ``path``, depthwise nodes
    marked, limited to ``node_names`` when given.
    """
    proto = onnx.load(str(path))
    initializers = {i.name: i for i in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        if node_names is not None and node.name not in node_names:
            continue
        tensor = initializers.get(node.input[1])
        if tensor is None:
            continue
        weight = np.abs(numpy_helper.to_array(tensor).astype(np.float64))
        transposed = node.op_type == "MatMul" or (
            node.op_type == "Gemm"
            and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        )
        per_channel = weight.max(axis=0) if transposed else weight.reshape(len(weight), -1).max(1)
        per_channel = per_channel.ravel()
        step = per_channel.max() / 127.0
        zeroed = int((per_channel < step / 2).sum())
        if not zeroed:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        depthwise = node.op_type == "Conv" and groups > 1 and groups == len(weight)
        kind = "depthwise node" if depthwise else "node"
        found.append(
            f"{kind} {node.name} ({zeroed} of {per_channel.size} channels, weight ranges "
            f"{per_channel.min():.2g} to {per_channel.max():.2g})"
        )
    return found


def validate_artifact(
    path: str | os.PathLike,
    data: Dataset,
    reference: np.ndarray,
    protocol: TimingProtocol,
    *,
    classification: bool,
) -> Validation:
    """Validate one ONNX artifact against the original model's outputs ``reference`` on ``data``."""
    size = os.path.getsize(path)
    sparsity = zero_weight_fraction(path)
    runner = OnnxRunner(path, protocol.threads)
    try:
        check_batch_sizes(runner, data.inputs)
        output = run_batched(runner, data.inputs)
    except ExportError as exc:
        return Validation(None, 0.0, float("inf"), {}, size, "rejected", str(exc), sparsity)
    if output.shape != reference.shape:
        raise DeployError(
            f"{path} returns shape {output.shape[1:]} per sample but the original model returns "
            f"{reference.shape[1:]}; the export changed the output"
        )
    finite = bool(np.isfinite(output).all())
    max_abs_error = float(np.abs(output - reference).max()) if finite else float("inf")
    if classification:
        agreement = float((output.argmax(-1) == reference.argmax(-1)).mean())
    else:
        # Embeddings: the fraction of samples whose cosine similarity to the original is >= 0.99.
        cos = np.sum(output * reference, -1) / (
            np.linalg.norm(output, axis=-1) * np.linalg.norm(reference, axis=-1) + 1e-12
        )
        agreement = float((cos >= 0.99).mean())
    accuracy = None
    if data.labels is not None and classification:
        accuracy = float((output.argmax(-1) == data.labels).mean())
    sample = [a[:1] for a in data.inputs]
    # Cold start: a fresh session's creation plus its first run, kept apart
    # from the warm p50/p90 that follow the protocol's warm-up.
    start = time.perf_counter()
    cold_runner = OnnxRunner(path, protocol.threads)
    cold_runner.run(_feeds(cold_runner, sample))
    cold_ms = (time.perf_counter() - start) * 1e3
    del cold_runner
    latency = {**runner.time(_feeds(runner, sample), protocol).to_dict(), "cold_ms": cold_ms}
    status, reason = "ok", None
    if not finite:
        status, reason = "rejected", "the output contains NaN or infinite values"
        bad = next((i for i in range(len(output)) if not np.isfinite(output[i]).all()), 0)
        first = first_nonfinite_node(path, _feeds(runner, [a[bad : bad + 1] for a in data.inputs]))
        if first is not None:
            reason += f"; the first node with a non-finite output is {first[0]} ({first[1]})"
    return Validation(accuracy, agreement, max_abs_error, latency, size, status, reason, sparsity)


# Side-by-side rounds go on until they span this long: on a shared VM a burst
# of load lasts seconds, and the digits CNN's 5 rounds took 1.3 s in all. In
# one such burst (digits run /tmp/a6 on a 2-core AMD EPYC) its baseline
# timed 1.42 ms side by side against 1.07 ms before and 1.03-1.18 ms after.
MIN_SIDE_BY_SIDE_S = 10.0
# A guard only: 10 s of rounds of the digits CNN's 11 models is about 50.
MAX_ROUNDS = 1000


def time_side_by_side(
    artifacts: dict[str, str | os.PathLike],
    data: Dataset,
    protocol: TimingProtocol,
    rounds: int = 5,
    min_seconds: float = 0.0,
) -> dict[str, dict]:
    """Time several artifacts in alternating rounds on the same batch-1 input.

    Each round times every artifact once with ``ceil(protocol.runs / rounds)``
    runs after its own warm-up, starting one artifact later than the round before,
    so that all of them see the same machine load. Every round opens a fresh
    session: a session of a small model keeps one of two speeds for its life
    (see ``deploy.measure``), and the median over rounds spans both. After
    ``rounds`` rounds, more follow until they have taken ``min_seconds`` in
    all (at most ``MAX_ROUNDS``), so that a burst of load meets a minority of
    them. Returns, per name, ``p50`` and ``p90`` (medians over the rounds),
    ``runs`` (timed runs in all) and ``rounds``.
    """
    per_round = dataclasses.replace(protocol, runs=max(math.ceil(protocol.runs / rounds), 1))
    sample = [a[:1] for a in data.inputs]
    names = list(artifacts)
    p50s: dict[str, list[float]] = {name: [] for name in names}
    p90s: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    done = 0
    while done < rounds or (
        time.perf_counter() - start < min_seconds and done < max(MAX_ROUNDS, rounds)
    ):
        shift = done % len(names)
        for name in names[shift:] + names[:shift]:
            runner = OnnxRunner(artifacts[name], protocol.threads)
            latency = runner.time(_feeds(runner, sample), per_round)
            p50s[name].append(latency.p50)
            p90s[name].append(latency.p90)
        done += 1
    return {
        name: {
            "p50": float(np.median(p50s[name])),
            "p90": float(np.median(p90s[name])),
            "runs": per_round.runs * done,
            "rounds": done,
        }
        for name in names
    }
