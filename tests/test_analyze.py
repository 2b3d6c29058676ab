import pytest
import torch
from torch import nn

from deploy.analyze import analyze

# Hand-computed for DigitsCNN on a 1x8x8 input. A conv's MACs are
# output positions * C_out * C_in * k * k. Parameter bytes count float32 weights and bias.
DIGITS_LAYERS = {
    "features.0": ("conv2d", (1, 1, 8, 8), (1, 64, 8, 8), 64 * 64 * 1 * 9, (64 * 9 + 64) * 4),
    "features.3": (
        "conv2d",
        (1, 64, 8, 8),
        (1, 128, 8, 8),
        64 * 128 * 64 * 9,
        (128 * 64 * 9 + 128) * 4,
    ),
    "features.6": (
        "conv2d",
        (1, 128, 8, 8),
        (1, 128, 8, 8),
        64 * 128 * 128 * 9,
        (128 * 128 * 9 + 128) * 4,
    ),
    "features.10": (
        "conv2d",
        (1, 128, 4, 4),
        (1, 256, 4, 4),
        16 * 256 * 128 * 9,
        (256 * 128 * 9 + 256) * 4,
    ),
    "classifier.1": ("linear", (1, 1024), (1, 256), 1024 * 256, (1024 * 256 + 256) * 4),
    "classifier.4": ("linear", (1, 256), (1, 10), 256 * 10, (256 * 10 + 10) * 4),
}


@pytest.fixture
def digits_layers(digits_model, example_inputs):
    return {layer.name: layer for layer in analyze(digits_model, example_inputs)}


def test_analyze_layer_order(digits_model, example_inputs):
    names = [layer.name for layer in analyze(digits_model, example_inputs)]
    assert names == list(DIGITS_LAYERS)


@pytest.mark.parametrize("name", list(DIGITS_LAYERS), ids=list(DIGITS_LAYERS))
def test_analyze_kind(digits_layers, name):
    assert digits_layers[name].kind == DIGITS_LAYERS[name][0]


@pytest.mark.parametrize("name", list(DIGITS_LAYERS), ids=list(DIGITS_LAYERS))
def test_analyze_input_shape(digits_layers, name):
    assert digits_layers[name].input_shape == DIGITS_LAYERS[name][1]


@pytest.mark.parametrize("name", list(DIGITS_LAYERS), ids=list(DIGITS_LAYERS))
def test_analyze_output_shape(digits_layers, name):
    assert digits_layers[name].output_shape == DIGITS_LAYERS[name][2]


@pytest.mark.parametrize("name", list(DIGITS_LAYERS), ids=list(DIGITS_LAYERS))
def test_analyze_macs(digits_layers, name):
    assert digits_layers[name].macs == DIGITS_LAYERS[name][3]


@pytest.mark.parametrize("name", list(DIGITS_LAYERS), ids=list(DIGITS_LAYERS))
def test_analyze_param_bytes(digits_layers, name):
    assert digits_layers[name].param_bytes == DIGITS_LAYERS[name][4]


def test_analyze_flops_twice_macs(digits_layers):
    layer = digits_layers["features.3"]
    assert layer.flops == 2 * layer.macs


def test_analyze_total_macs(digits_layers):
    # About 19M multiply-adds, as the DigitsCNN docstring states.
    assert sum(layer.macs for layer in digits_layers.values()) == 19_175_936


def test_analyze_batch_reported_as_one(digits_model, heldout):
    batch = (torch.from_numpy(heldout["inputs"][:5].copy()),)
    layers = analyze(digits_model, batch)
    assert all(layer.input_shape[0] == 1 for layer in layers)


def test_analyze_keeps_training_flag(digits_model, example_inputs):
    digits_model.train()
    analyze(digits_model, example_inputs)
    assert digits_model.training


def test_analyze_removes_hooks(digits_model, example_inputs):
    analyze(digits_model, example_inputs)
    assert not any(module._forward_hooks for module in digits_model.modules())


def test_analyze_linear_on_sequence():
    model = nn.Sequential(nn.Linear(16, 32))
    (layer,) = analyze(model, (torch.randn(2, 7, 16),))
    assert layer.macs == 7 * 16 * 32


def test_analyze_depthwise_conv():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    (layer,) = analyze(model, (torch.randn(1, 8, 6, 6),))
    assert layer.depthwise


def test_analyze_depthwise_macs():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    (layer,) = analyze(model, (torch.randn(1, 8, 6, 6),))
    assert layer.macs == 36 * 8 * 1 * 9


def test_analyze_shared_layer_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert len(analyze(model, (torch.randn(1, 4),))) == 1
