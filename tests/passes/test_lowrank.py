import pytest
import torch
from torch import nn

from deploy.analyze import analyze
from deploy.passes.lowrank import LowRankConfig, apply_lowrank, factorize, max_useful_rank


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(32, 48).eval(), torch.randn(5, 32)
    return nn.Conv2d(8, 16, 3, padding=1).eval(), torch.randn(5, 8, 6, 6)


def _full_rank(module: nn.Module) -> int:
    return min(module.weight.shape[0], module.weight[0].numel())


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    return sum(layer.macs for layer in analyze(nn.Sequential(module), (x,)))


@pytest.mark.parametrize("kind", ["linear", "conv"], ids=["linear", "conv"])
def test_factorize_full_rank_exact(kind):
    module, x = _layer(kind)
    factored = factorize(module, _full_rank(module))
    with torch.no_grad():
        assert torch.allclose(factored(x), module(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"], ids=["linear", "conv"])
def test_factorize_low_rank_fewer_macs(kind):
    module, x = _layer(kind)
    rank = max_useful_rank(module)
    assert _macs(factorize(module, rank), x) < _macs(module, x)


@pytest.mark.parametrize("kind", ["linear", "conv"], ids=["linear", "conv"])
def test_factorize_above_useful_rank_no_saving(kind):
    module, x = _layer(kind)
    rank = max_useful_rank(module) + 1
    assert _macs(factorize(module, rank), x) >= _macs(module, x)


@pytest.mark.parametrize("kind", ["linear", "conv"], ids=["linear", "conv"])
def test_factorize_low_rank_close(kind):
    # The best rank-r approximation: its error is below the dense output's size.
    module, x = _layer(kind)
    with torch.no_grad():
        error = (factorize(module, 4)(x) - module(x)).norm()
        assert error < module(x).norm()


def test_factorize_conv_keeps_stride():
    module = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    x = torch.randn(1, 8, 9, 9)
    assert factorize(module, 4)(x).shape == module(x).shape


def test_factorize_bias_on_second():
    module, _ = _layer("linear")
    factored = factorize(module, 4)
    assert factored[0].bias is None


@pytest.mark.parametrize("rank", [0, 33], ids=["zero", "above-full"])
def test_factorize_rank_out_of_range(rank):
    module, _ = _layer("linear")
    with pytest.raises(ValueError, match=f"rank {rank}"):
        factorize(module, rank)


def test_factorize_grouped_conv_rejected():
    with pytest.raises(ValueError, match="grouped conv"):
        factorize(nn.Conv2d(8, 8, 3, groups=8), 2)


@pytest.mark.parametrize("n", [8, 64, 256], ids=["n8", "n64", "n256"])
def test_max_useful_rank_square_linear(n):
    assert max_useful_rank(nn.Linear(n, n)) < n / 2


@pytest.mark.parametrize("n", [8, 64, 256], ids=["n8", "n64", "n256"])
def test_max_useful_rank_square_linear_value(n):
    assert max_useful_rank(nn.Linear(n, n)) == n // 2 - 1


def test_max_useful_rank_depthwise_zero():
    assert max_useful_rank(nn.Conv2d(8, 8, 3, groups=8)) == 0


def test_apply_lowrank_fewer_macs(digits_model, example_inputs):
    variant = apply_lowrank(digits_model, LowRankConfig({"features.6": 32, "classifier.1": 64}))
    before = sum(layer.macs for layer in analyze(digits_model, example_inputs))
    after = sum(layer.macs for layer in analyze(variant, example_inputs))
    assert after < before


def test_apply_lowrank_output_shape(digits_model, example_inputs):
    variant = apply_lowrank(digits_model, LowRankConfig({"features.6": 32}))
    with torch.no_grad():
        assert variant(*example_inputs).shape == digits_model(*example_inputs).shape


def test_apply_lowrank_model_unchanged(digits_model):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    apply_lowrank(digits_model, LowRankConfig({"features.6": 32}))
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_lowrank_model_keeps_layer(digits_model):
    apply_lowrank(digits_model, LowRankConfig({"features.6": 32}))
    assert isinstance(digits_model.features[6], nn.Conv2d)


def test_apply_lowrank_unknown_layer(digits_model):
    with pytest.raises(ValueError, match="features.99"):
        apply_lowrank(digits_model, LowRankConfig({"features.99": 4}))


def test_lowrank_config_round_trip():
    config = LowRankConfig({"features.3": 32, "classifier.1": 64})
    assert LowRankConfig.from_dict(config.to_dict()) == config
