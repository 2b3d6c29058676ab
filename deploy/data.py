"""Measurement data: loading ``.npz`` files and splitting them.

A data file contains the model inputs under ``inputs`` (or ``x``) and, where
available, integer class labels under ``labels`` (or ``y``). A model with
several inputs (a transformer: token ids and attention mask) stores them as
``inputs_0``, ``inputs_1``, ... in the order of the model's forward arguments.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from deploy.errors import DeployError

INPUT_KEYS = ("inputs", "x")
LABEL_KEYS = ("labels", "y")


@dataclasses.dataclass
class Dataset:
    """Model inputs (one array per forward argument, batch first) and optional labels."""

    inputs: list[np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.inputs[0])

    def take(self, index: np.ndarray | slice) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset([a[index] for a in self.inputs], labels)

    def split(self, calibration_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split into (calibration, validation) with a seeded shuffle."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = int(round(len(self) * calibration_fraction))
        return self.take(order[:cut]), self.take(order[cut:])


def dataset_from_arrays(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    """Build a Dataset from named arrays, checking keys, lengths and dtypes."""
    inputs: list[np.ndarray] = []
    for key in INPUT_KEYS:
        if key in arrays:
            inputs = [arrays[key]]
            break
    else:
        numbered = sorted(
            (k for k in arrays if k.startswith("inputs_") and k[7:].isdigit()),
            key=lambda k: int(k[7:]),
        )
        inputs = [arrays[k] for k in numbered]
    if not inputs:
        raise DeployError(
            f"data file {source} has arrays {sorted(arrays)} but no model inputs; "
            f"store them under 'inputs' (or 'inputs_0', 'inputs_1', ... for several inputs)"
        )
    labels = next((arrays[k] for k in LABEL_KEYS if k in arrays), None)
    count = len(inputs[0])
    for i, array in enumerate(inputs):
        if array.ndim < 1 or len(array) != count:
            raise DeployError(
                f"data file {source}: input {i} has shape {array.shape} but input 0 has "
                f"{count} samples; every input array needs the same first (batch) dimension"
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise DeployError(
                f"data file {source}: input {i} has dtype {array.dtype}; "
                f"store inputs as float32 (or integer token ids)"
            )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DeployError(
                f"data file {source}: input {i} contains NaN or infinite values; remove those samples"
            )
    if labels is not None:
        if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
            raise DeployError(
                f"data file {source}: labels have shape {labels.shape} and dtype {labels.dtype}; "
                f"expected {count} integer class ids, one per input sample"
            )
    if count < 20:
        raise DeployError(
            f"data file {source} has {count} samples; deploy needs at least 20 "
            f"(some to calibrate, the rest to validate on)"
        )
    inputs = [a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for a in inputs]
    return Dataset(inputs, None if labels is None else labels.astype(np.int64))


def load_data(path: str | os.PathLike) -> Dataset:
    """Load an ``.npz`` data file without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"data file {path} not found; pass an existing .npz with --data")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DeployError(
            f"data file {path} is not a readable .npz ({exc}); "
            f"write it with numpy.savez(path, inputs=..., labels=...)"
        ) from exc
    return dataset_from_arrays(arrays, str(path))
