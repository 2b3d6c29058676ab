import numpy as np
import pytest
import torch

from deploy.planner import Option
from deploy.sensitivity import distortion, measure_sensitivity

OPTIONS = [
    Option("dense", "fp32"),
    Option("dense", "int8"),
    Option("prune:0.25", "fp32"),
    Option("lowrank:16", "fp32"),
]


@pytest.fixture(scope="module")
def sensitivity(heldout, example_inputs):
    from deploy.zoo.digits import build_model

    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_sensitivity(
        model, {"features.6": OPTIONS}, [heldout["inputs"][:32].copy()], example_inputs
    )
    return result["features.6"], model, before


def test_sensitivity_dense_zero(sensitivity):
    assert sensitivity[0][Option("dense", "fp32")] == 0.0


@pytest.mark.parametrize("option", OPTIONS[1:], ids=["int8", "prune", "lowrank"])
def test_sensitivity_lossy_positive(sensitivity, option):
    assert sensitivity[0][option] > 0.0


def test_sensitivity_int8_below_prune(sensitivity):
    assert sensitivity[0][Option("dense", "int8")] < sensitivity[0][Option("prune:0.25", "fp32")]


def test_sensitivity_model_unchanged(sensitivity):
    _, model, before = sensitivity
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_distortion_identical_zero():
    reference = np.random.default_rng(0).standard_normal((4, 10))
    assert distortion(reference, reference) == 0.0


def test_distortion_normalized():
    reference = np.ones((4, 10))
    assert distortion(reference, 2 * reference) == pytest.approx(1.0)
