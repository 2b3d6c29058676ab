"""Small inputs for the reliability and field-case tests: a model file, data and a profile.

The model is a 4-layer CNN on 1x8x8 inputs, small enough that a whole
``optimize`` run with ``--passes quantize`` takes a few seconds, while still
having a BatchNorm, convolutions and Linear layers to plan over.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from deploy.finetune import FinetuneConfig
from deploy.pipeline import OptimizeConfig
from deploy.profiles import new_local_profile

REPO = Path(__file__).resolve().parents[2]

MODEL_SOURCE = """\
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 128, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    return model.eval()
"""


def write_model(folder: Path) -> Path:
    """Write the small CNN as a ``build_model()`` file; return its path."""
    path = folder / "small_model.py"
    path.write_text(MODEL_SOURCE)
    return path


def small_model():
    """Return the small CNN itself, in eval mode."""
    namespace: dict = {}
    exec(MODEL_SOURCE, namespace)
    return namespace["build_model"]()


def write_data(folder: Path, samples: int = 60) -> Path:
    """Write seeded random inputs (samples, 1, 8, 8) with integer labels as an .npz."""
    rng = np.random.default_rng(0)
    path = folder / "small_data.npz"
    np.savez(
        path,
        inputs=rng.standard_normal((samples, 1, 8, 8)).astype(np.float32),
        labels=rng.integers(0, 10, samples),
    )
    return path


def write_profile(folder: Path) -> Path:
    """Write an empty profile of this machine whose protocol times 10 runs after 2 warm-ups."""
    profile = new_local_profile("reliability-cpu")
    profile.data["protocol"]["warmup"] = 2
    profile.data["protocol"]["runs"] = 10
    return profile.save(folder / "reliability-cpu.yaml")


def small_config(**overrides) -> OptimizeConfig:
    """Return a quick OptimizeConfig: int8 and pruning, four budgets, no fine-tuning."""
    settings = {
        "passes": ("quantize", "prune"),
        "num_budgets": 4,
        "finetune": None,
        "min_timing_s": 0.0,
    }
    settings.update(overrides)
    if settings["finetune"] is not None and not isinstance(settings["finetune"], FinetuneConfig):
        settings["finetune"] = FinetuneConfig()
    return OptimizeConfig(**settings)


SMALL_ARGS = [
    "--passes",
    "quantize,prune",
    "--num-budgets",
    "4",
    "--no-finetune",
    "--min-timing-s",
    "0",
]


def run_cli(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run ``deploy ARGS`` in a subprocess with this interpreter; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=cli_env(),
        **kwargs,
    )


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def small_files_in(folder: Path) -> tuple[Path, Path, Path]:
    """Write the small model, data and profile files into ``folder``; return their paths."""
    return write_model(folder), write_data(folder), write_profile(folder)


_MEASURED: dict[str, Path] = {}


def measured_profile(tmp_path_factory) -> Path:
    """Return a profile with every entry a small_config run of the small CNN needs, measured once.

    Tests copy it, so each run reuses the entries instead of timing them again.
    """
    if "path" not in _MEASURED:
        from deploy.pipeline import optimize

        folder = tmp_path_factory.mktemp("measured")
        model, data, profile = small_files_in(folder)
        optimize(str(model), str(data), str(profile), out=folder / "run", config=small_config())
        _MEASURED["path"] = profile
    return _MEASURED["path"]
