"""Validation: run an exported variant on the target runtime and compare it with the original.

A ``Validation`` is truthy when the variant passed every check and serializes
to JSON for the manifest.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from deploy.data import Dataset
from deploy.errors import DeployError
from exporters.onnx import ExportError, OnnxRunner
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


def check_batch_sizes(
    runner: OnnxRunner, arrays: list[np.ndarray], sizes=(1, 3), atol: float = 1e-3
) -> None:
    """Check that the artifact runs at two batch sizes and that batching does not change outputs.

    Raises:
        ExportError: a batch size fails to run (the message names the node) or
            gives outputs that differ from running the samples one by one.
    """
    largest = max(sizes)
    singles = np.concatenate(
        [runner.run(_feeds(runner, [a[i : i + 1] for a in arrays]))[0] for i in range(largest)]
    )
    for size in sizes:
        batch = runner.run(_feeds(runner, [a[:size] for a in arrays]))[0]
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
    runner = OnnxRunner(path, protocol.threads)
    try:
        check_batch_sizes(runner, data.inputs)
        output = run_batched(runner, data.inputs)
    except ExportError as exc:
        return Validation(None, 0.0, float("inf"), {}, size, "rejected", str(exc))
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
    latency = runner.time(_feeds(runner, [a[:1] for a in data.inputs]), protocol)
    status, reason = "ok", None
    if not finite:
        status, reason = "rejected", "the output contains NaN or infinite values"
    return Validation(accuracy, agreement, max_abs_error, latency.to_dict(), size, status, reason)
