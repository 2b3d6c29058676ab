import pytest
import torch
from torch import nn

from deploy.passes.prune import PruneConfig, apply_prune, kept_channels, prunable_layers


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def pruned(digits_model, example_inputs):
    """The digits CNN with half of the output channels of ``features.3`` removed."""
    return apply_prune(digits_model, PruneConfig({"features.3": 0.5}), example_inputs)


def test_prune_fewer_params(digits_model, pruned):
    assert _params(pruned) < _params(digits_model)


def test_prune_conv_out_channels(pruned):
    assert pruned.features[3].out_channels == 64


def test_prune_conv_weight_shape(pruned):
    assert tuple(pruned.features[3].weight.shape) == (64, 64, 3, 3)


def test_prune_batchnorm_follows(pruned):
    assert pruned.features[4].num_features == 64


def test_prune_consumer_in_channels(pruned):
    assert pruned.features[6].in_channels == 64


def test_prune_output_shape_kept(digits_model, pruned, example_inputs):
    with torch.no_grad():
        assert pruned(*example_inputs).shape == digits_model(*example_inputs).shape


def test_prune_removes_lowest_l1(digits_model, pruned):
    weight = digits_model.features[3].weight.detach()
    norms = weight.abs().reshape(weight.shape[0], -1).sum(dim=1)
    kept = torch.argsort(norms, descending=True)[:64].sort().values
    assert torch.equal(pruned.features[3].weight, weight[kept])


def test_prune_consumer_keeps_matching_inputs(digits_model, pruned):
    weight = digits_model.features[3].weight.detach()
    norms = weight.abs().reshape(weight.shape[0], -1).sum(dim=1)
    kept = torch.argsort(norms, descending=True)[:64].sort().values
    consumer = digits_model.features[6].weight.detach()
    assert torch.equal(pruned.features[6].weight, consumer[:, kept])


def test_prune_linear_into_output(digits_model, example_inputs):
    pruned = apply_prune(digits_model, PruneConfig({"classifier.1": 0.25}), example_inputs)
    assert pruned.classifier[4].in_features == 64


def test_prune_flatten_consumer(digits_model, example_inputs):
    # 256 channels of 2x2 flatten into 1024 Linear inputs, so keeping 128 channels leaves 512.
    pruned = apply_prune(digits_model, PruneConfig({"features.10": 0.5}), example_inputs)
    assert pruned.classifier[1].in_features == 512


def test_prune_model_unchanged(digits_model, example_inputs):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    apply_prune(digits_model, PruneConfig({"features.3": 0.5}), example_inputs)
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prune_model_shapes_unchanged(digits_model, example_inputs):
    apply_prune(digits_model, PruneConfig({"features.3": 0.5}), example_inputs)
    assert digits_model.features[3].out_channels == 128


def test_prune_keep_all_is_copy(digits_model, example_inputs):
    pruned = apply_prune(digits_model, PruneConfig({"features.3": 1.0}), example_inputs)
    assert _params(pruned) == _params(digits_model)


def test_prune_unknown_layer(digits_model, example_inputs):
    with pytest.raises(ValueError, match="features.99"):
        apply_prune(digits_model, PruneConfig({"features.99": 0.5}), example_inputs)


def test_prunable_excludes_output_layer(digits_model, example_inputs):
    assert "classifier.4" not in prunable_layers(digits_model, example_inputs)


def test_prunable_layer_names(digits_model, example_inputs):
    names = set(prunable_layers(digits_model, example_inputs))
    assert names == {"features.0", "features.3", "features.6", "features.10", "classifier.1"}


def test_prunable_consumer(digits_model, example_inputs):
    layers = prunable_layers(digits_model, example_inputs)
    assert layers["features.10"].consumers == ("classifier.1",)


def test_prunable_excludes_residual_pair(example_inputs):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.head(y + self.b(y))

    layers = prunable_layers(Residual().eval(), example_inputs)
    assert "b" not in layers


@pytest.mark.parametrize(
    ("channels", "keep", "round_to", "expected"),
    [(128, 0.5, 4, 64), (128, 0.3, 8, 40), (10, 0.5, 4, 8), (3, 0.5, 4, 2), (64, 0.01, 4, 4)],
    ids=["half", "round-up", "round-four", "below-round-to", "at-least-round-to"],
)
def test_kept_channels(channels, keep, round_to, expected):
    assert kept_channels(channels, keep, round_to) == expected


@pytest.mark.parametrize("keep", [0.0, 1.5], ids=["zero", "above-one"])
def test_kept_channels_bad_fraction(keep):
    with pytest.raises(ValueError, match="outside"):
        kept_channels(64, keep)


def test_prune_config_round_trip():
    config = PruneConfig({"features.3": 0.5}, round_to=8)
    assert PruneConfig.from_dict(config.to_dict()) == config
