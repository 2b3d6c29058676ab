"""The run folder: where a run is built, how it is written, and what must match to resume it.

A run is built in a hidden ``.NAME.partial`` folder beside ``out`` and
renamed to ``out`` once complete. Every file goes through ``write_atomic``,
so an interrupted run leaves only whole files behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
from torch import nn

from deploy.data import Dataset
from deploy.errors import DeployError
from deploy.report import MANIFEST, write_atomic


def prepare_out(out: Path, resume: bool) -> Path:
    """Return the partial folder of ``out``, created, or the interrupted one when ``resume``."""
    partial = out.parent / f".{out.name}.partial"
    if out.exists():
        if (out / MANIFEST).is_file():
            raise DeployError(
                f"output folder {out} already holds a finished run; choose another --out"
            )
        raise DeployError(f"output folder {out} already exists; choose another --out or remove it")
    if partial.exists() and not resume:
        raise DeployError(
            f"an interrupted run was found at {partial}; pass --resume to finish it, "
            f"or remove that folder to start over"
        )
    (partial / "variants").mkdir(parents=True, exist_ok=True)
    # A kill during an atomic write leaves its hidden temporary file; none of
    # them is ever read, so they are removed before resuming.
    for folder in (partial, partial / "variants"):
        for stale in folder.glob(".*"):
            if stale.is_file():
                stale.unlink()
    return partial


RUN_IDENTITY = "run.json"


def run_identity(model: nn.Module, model_name: str, dataset: Dataset, profile, config) -> dict:
    """Return what must match for ``--resume`` to reuse a partial run: model, data, profile, config."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    model_digest = digest.hexdigest()
    digest = hashlib.sha256()
    for array in [*dataset.inputs, *([] if dataset.labels is None else [dataset.labels])]:
        digest.update(np.ascontiguousarray(array).tobytes())
    return {
        "model": model_name,
        "model_sha256": model_digest,
        "data_sha256": digest.hexdigest(),
        "device_profile": profile.name,
        "config": json.loads(json.dumps(config.to_dict())),
    }


def check_same_run(partial: Path, identity: dict) -> None:
    """Record ``identity`` in a new partial folder, or refuse to resume one started differently."""
    saved = load_json(partial / RUN_IDENTITY)
    if saved is None:
        save_json(partial / RUN_IDENTITY, identity)
        return
    changed = [key for key in identity if saved.get(key) != identity[key]]
    if changed:
        raise DeployError(
            f"the interrupted run at {partial} was started with a different {changed[0]}; "
            f"resume it with the same arguments, or remove that folder to start over"
        )


def describe_write_failure(exc: OSError, partial: Path) -> str:
    """Return the one-line error for a failed write, with how to resume."""
    where = exc.filename or partial
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device while writing {where}; free some space, then rerun "
            f"the same command with --resume to finish the run from {partial}"
        )
    return (
        f"writing {where} failed ({exc.strerror or exc}); fix the cause, then rerun the same "
        f"command with --resume to finish the run from {partial}"
    )


def save_json(path: Path, data) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def load_json(path: Path):
    """Return the JSON in ``path``, or None where there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None
