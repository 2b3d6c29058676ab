import pytest
import torch

from deploy.analyze import analyze
from deploy.models import load_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, example_inputs):
    """The digits CNN saved as an ExportedProgram (.pt2) and loaded back by deploy."""
    from deploy.zoo.digits import build_model

    path = tmp_path_factory.mktemp("pt2") / "digits.pt2"
    torch.export.save(torch.export.export(build_model(), example_inputs), str(path))
    return load_model(path)


def test_pt2_matches_original(loaded, digits_model, heldout):
    x = torch.from_numpy(heldout["inputs"][:5].copy())
    with torch.no_grad():
        assert torch.allclose(loaded(x), digits_model(x), atol=1e-5)


def test_pt2_layer_names(loaded, digits_model, example_inputs):
    names = [layer.name for layer in analyze(loaded, example_inputs)]
    assert names == [layer.name for layer in analyze(digits_model, example_inputs)]


def test_pt2_other_batch(loaded, heldout):
    # The program was exported at batch 2, and the rewritten module drops its shape guard.
    with torch.no_grad():
        assert loaded(torch.from_numpy(heldout["inputs"][:7].copy())).shape == (7, 10)


def test_pt2_eval_mode(loaded):
    assert not loaded.training
