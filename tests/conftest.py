"""Shared fixtures: the trained digits CNN, the held-out digits and a small device profile.

Everything runs real PyTorch and ONNX Runtime on the CPU. Files go under
pytest's temporary folders, never into the working directory.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from deploy.data import Dataset, dataset_from_arrays
from deploy.profiles import DeviceProfile, new_local_profile
from deploy.zoo.digits import build_model, heldout_digits
from exporters.onnx import onnx_from_torch
from exporters.timing import TimingProtocol

# Few timed runs: the tests check that timing works, not how fast the CPU is.
FAST_WARMUP = 2
FAST_RUNS = 10


@pytest.fixture
def digits_model() -> torch.nn.Module:
    """The trained default CNN, fresh for each test, in eval mode."""
    return build_model()


@pytest.fixture(scope="session")
def heldout() -> dict[str, np.ndarray]:
    """The 797 digits the CNN never trained on: ``inputs`` (N, 1, 8, 8) and ``labels``."""
    arrays = heldout_digits()
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


@pytest.fixture(scope="session")
def digits_data(heldout) -> Dataset:
    return dataset_from_arrays(heldout, "held-out digits")


@pytest.fixture(scope="session")
def example_inputs(heldout) -> tuple[torch.Tensor, ...]:
    """A batch of two held-out digits, as the passes and the exporter take it."""
    return (torch.from_numpy(heldout["inputs"][:2].copy()),)


@pytest.fixture
def fast_protocol() -> TimingProtocol:
    return TimingProtocol(warmup=FAST_WARMUP, runs=FAST_RUNS, threads=1)


def _fast_profile(name: str = "test-cpu") -> DeviceProfile:
    profile = new_local_profile(name)
    profile.data["protocol"]["warmup"] = FAST_WARMUP
    profile.data["protocol"]["runs"] = FAST_RUNS
    return profile


@pytest.fixture(scope="session")
def make_profile():
    """A factory of empty profiles of this machine whose protocol times few runs."""
    return _fast_profile


@pytest.fixture
def profile_path(tmp_path):
    """An empty, schema-valid device profile file of this machine in ``tmp_path``."""
    return _fast_profile().save(tmp_path / "test-cpu.yaml")


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory, example_inputs):
    """The digits CNN exported to a float ONNX file, shared by the session."""
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    onnx_from_torch(
        build_model(),
        example_inputs,
        path,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return path


@pytest.fixture(scope="session")
def digits_reference(heldout) -> np.ndarray:
    """The PyTorch model's logits on the held-out digits."""
    with torch.no_grad():
        return build_model()(torch.from_numpy(heldout["inputs"].copy())).numpy()


def _small_config(**overrides):
    from deploy.costs import SearchSpace
    from deploy.finetune import FinetuneConfig
    from deploy.pipeline import OptimizeConfig

    settings = {
        "num_budgets": 3,
        "finetune": FinetuneConfig(epochs=1),
        "max_calibration_samples": 64,
        "space": SearchSpace(keep_ratios=(0.5,), rank_fractions=(0.5,)),
        "min_timing_s": 0.0,
    }
    return OptimizeConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def small_config():
    """A factory of OptimizeConfigs that finish in well under a minute on the digits CNN.

    Three budgets, one keep ratio and one rank fraction per layer, one
    fine-tuning epoch and 64 calibration samples. Keyword arguments override these settings.
    """
    return _small_config


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, heldout):
    """One finished ``deploy.optimize`` run on the digits CNN, shared by the session.

    Returns (manifest, run folder, the user's model, its state dict before the
    run). The model goes in in training mode, so a run that switched it to eval
    mode would show. The device profile is ``test-cpu.yaml`` beside the run folder.
    """
    import deploy

    root = tmp_path_factory.mktemp("optimize")
    profile_path = _fast_profile().save(root / "test-cpu.yaml")
    user_model = build_model().train()
    before = {k: v.clone() for k, v in user_model.state_dict().items()}
    with warnings.catch_warnings():
        # The run warns that a model in training mode is measured in eval mode.
        warnings.simplefilter("ignore", UserWarning)
        manifest = deploy.optimize(
            user_model, dict(heldout), profile_path, out=root / "run", config=_small_config()
        )
    return manifest, root / "run", user_model, before


@pytest.fixture(scope="session")
def measured_profile(digits_run):
    """A factory that copies the run's device profile, holding the digits CNN's entries, into a folder."""
    source = digits_run[1].parent / "test-cpu.yaml"

    def copy_to(folder):
        target = folder / "test-cpu.yaml"
        shutil.copyfile(source, target)
        return target

    return copy_to
