import numpy as np
import torch

from deploy.finetune import FinetuneConfig, distill
from deploy.passes.prune import PruneConfig, apply_prune
from deploy.torch_utils import predict


def test_distill_reduces_error(digits_model, example_inputs, heldout):
    inputs = [heldout["inputs"][:128].copy()]
    student = apply_prune(digits_model, PruneConfig({"features.6": 0.25}), example_inputs)
    target = predict(digits_model, inputs)
    before = float(np.mean((predict(student, inputs) - target) ** 2))
    distill(student, digits_model, inputs, FinetuneConfig(epochs=2))
    after = float(np.mean((predict(student, inputs) - target) ** 2))
    assert after < before


def test_distill_teacher_unchanged(digits_model, example_inputs, heldout):
    inputs = [heldout["inputs"][:64].copy()]
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    student = apply_prune(digits_model, PruneConfig({"features.6": 0.5}), example_inputs)
    distill(student, digits_model, inputs, FinetuneConfig(epochs=1))
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())


def test_distill_returns_eval(digits_model, example_inputs, heldout):
    inputs = [heldout["inputs"][:64].copy()]
    student = apply_prune(digits_model, PruneConfig({"features.6": 0.5}), example_inputs)
    assert not distill(student, digits_model, inputs, FinetuneConfig(epochs=1)).training
