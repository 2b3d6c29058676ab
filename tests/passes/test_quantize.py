import pytest
import torch

from deploy.passes.quantize import QuantizeConfig, fake_quantize_layer, needs_reduce_range


@pytest.fixture(scope="module")
def calibration(heldout):
    return (torch.from_numpy(heldout["inputs"][:64].copy()),)


@pytest.fixture
def quantized(digits_model, calibration):
    return fake_quantize_layer(digits_model, "features.6", calibration)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_fake_quantize_changes_layer_weight(digits_model, quantized):
    changed = _changed(digits_model.state_dict(), quantized.state_dict())
    assert changed == {"features.6.weight"}


def test_fake_quantize_weight_on_int8_grid(quantized):
    # Per-channel symmetric int8: each output channel is a multiple of max|w| / 127.
    weight = quantized.features[6].weight.detach()
    scale = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    steps = weight / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_fake_quantize_hooks_only_layer(quantized):
    hooked = {name for name, m in quantized.named_modules() if m._forward_pre_hooks}
    assert hooked == {"features.6"}


def test_fake_quantize_model_unchanged(digits_model, calibration):
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    fake_quantize_layer(digits_model, "features.6", calibration)
    assert not _changed(before, digits_model.state_dict())


def test_fake_quantize_model_no_hooks(digits_model, calibration):
    fake_quantize_layer(digits_model, "features.6", calibration)
    assert not any(m._forward_pre_hooks for m in digits_model.modules())


def test_fake_quantize_output_close(digits_model, quantized, calibration):
    with torch.no_grad():
        reference = digits_model(*calibration)
        output = quantized(*calibration)
    assert (output - reference).norm() < 0.05 * reference.norm()


def test_fake_quantize_output_differs(digits_model, quantized, calibration):
    with torch.no_grad():
        assert not torch.equal(quantized(*calibration), digits_model(*calibration))


def test_fake_quantize_weight_only(digits_model, calibration):
    variant = fake_quantize_layer(digits_model, "features.6", calibration, quantize_input=False)
    assert not variant.features[6]._forward_pre_hooks


@pytest.mark.parametrize(
    ("field", "value"),
    [("method", "fp8"), ("calibrate_method", "histogram")],
    ids=["method", "calibrate-method"],
)
def test_quantize_config_rejects_unknown(field, value):
    with pytest.raises(ValueError, match=value):
        QuantizeConfig(**{field: value})


def test_quantize_config_round_trip():
    config = QuantizeConfig(layers=["features.3"], per_channel=False)
    assert QuantizeConfig.from_dict(config.to_dict()) == config


def test_fake_quantize_7_bit_grid(digits_model, calibration):
    variant = fake_quantize_layer(digits_model, "features.6", calibration, reduce_range=True)
    weight = variant.features[6].weight.detach()
    scale = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 64
    steps = weight / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.abs().max() <= 64 + 1e-3


ZEN_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
ICELAKE_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"


def test_reduce_range_without_vnni():
    assert needs_reduce_range(ZEN_CPUINFO, "x86_64") is True
    assert needs_reduce_range(ICELAKE_CPUINFO, "x86_64") is False
    assert needs_reduce_range("", "x86_64") is True
    assert needs_reduce_range(ZEN_CPUINFO, "aarch64") is False


def test_config_resolves_reduce_range():
    assert QuantizeConfig().reduce_range is needs_reduce_range()
    assert QuantizeConfig(reduce_range=False).reduce_range is False
