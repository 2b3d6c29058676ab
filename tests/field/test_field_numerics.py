"""Field cases about numerics: per-tensor int8 of depthwise convs, layers kept float, fp16 overflow."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from field import support
from onnxruntime.quantization import quantize_dynamic
from torch import nn

from deploy.errors import DeployError
from deploy.passes.quantize import QuantizeConfig
from deploy.pipeline import resolve_keep_float
from deploy.planner import Option, Plan
from deploy.validate import per_tensor_zeroed_channels
from exporters.onnx import (
    ExportError,
    OnnxRunner,
    first_nonfinite_node,
    fp16_from_onnx,
    fp16_from_onnx_without_overflow,
    onnx_from_torch,
    quantize_onnx,
    quantized_nodes,
)

AXES = {"input": {0: "batch"}, "output": {0: "batch"}}


def _export(model, path, example, opset=None):
    return onnx_from_torch(
        model,
        (example,),
        path,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes=AXES,
        opset=opset,
    )


class DepthwiseNet(nn.Module):
    """A MobileNet-style stem and depthwise conv whose channel weight ranges span 1e-2 to 1e2.

    Such ranges are common after BatchNorm folding. The stem and the
    classifier are scaled so that the float function stays well conditioned.
    """

    def __init__(self, channels: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.fc = nn.Linear(channels * 64, 10)
        scales = torch.logspace(-2, 2, channels)
        with torch.no_grad():
            self.stem.weight.div_(scales.sqrt().view(-1, 1, 1, 1))
            self.stem.bias.div_(scales.sqrt())
            peak = self.dw.weight.abs().amax(dim=(1, 2, 3), keepdim=True)
            self.dw.weight.mul_(scales.view(-1, 1, 1, 1) / peak)
            self.dw.bias.zero_()
            self.fc.weight.view(10, channels, 64).div_(scales.sqrt().view(1, -1, 1))

    def forward(self, x):
        return self.fc(self.dw(self.stem(x)).flatten(1))


def _agreement(path, inputs, reference) -> float:
    output = OnnxRunner(path).run({"input": inputs})[0]
    return float((output.argmax(1) == reference.argmax(1)).mean())


def test_depthwise_per_tensor_collapses(tmp_path):
    """The fault itself: dynamic per-tensor int8 zeroes whole depthwise channels."""
    model = DepthwiseNet().eval()
    inputs = torch.randn(200, 3, 8, 8)
    reference = model(inputs).detach().numpy()
    float_path = _export(model, tmp_path / "dw.onnx", inputs[:2])
    found = per_tensor_zeroed_channels(float_path)
    assert any(f.startswith("depthwise node /dw/Conv") for f in found), found
    quantized = quantize_onnx(
        float_path, tmp_path / "dw.int8.onnx", method="dynamic", per_channel=False
    )
    assert _agreement(quantized, inputs.numpy(), reference) < 0.6
    # A well-conditioned model is not flagged.
    plain = _export(support.small_model(), tmp_path / "plain.onnx", torch.randn(2, 1, 8, 8))
    assert per_tensor_zeroed_channels(plain) == []


def _int8_everywhere(choices, *args, **kwargs):
    """A planner stand-in: every layer takes its dense int8 option where it has one."""
    layers = {}
    for choice in choices:
        int8 = [o for o in choice.options if o.struct == "dense" and o.precision == "int8"]
        layers[choice.name] = int8[0] if int8 else Option("dense", "fp32")
    return [Plan(layers, 0.01, 0.0)]


def _data(shape, samples=120):
    inputs = np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32)
    return {"inputs": inputs}


def test_depthwise_dynamic_rejected_per_channel_offered(small_files, tmp_path, monkeypatch):
    """The quantize pass does not ship it: rejected, depthwise node named, per-channel offered."""
    from deploy.pipeline import optimize

    _, _, profile = small_files
    monkeypatch.setattr("deploy.plan_stage.sweep", _int8_everywhere)
    config = support.small_config(
        passes=("quantize",), quantize=QuantizeConfig(method="dynamic", per_channel=False)
    )
    manifest = optimize(
        DepthwiseNet().eval(),
        _data((3, 8, 8)),
        str(profile),
        out=tmp_path / "run",
        config=config,
    )
    variants = {v["name"]: v for v in manifest["variants"]}
    rejected = variants["v01"]
    assert rejected["status"] == "rejected"
    assert "depthwise node /dw/Conv" in rejected["reason"]
    assert "per-channel static" in rejected["reason"]
    assert not rejected["on_frontier"]
    offered = variants["v01-per-channel"]
    recipe = offered["plan"]["recipe"]["quantize"]
    assert recipe["method"] == "static"
    assert recipe["per_channel"] is True
    assert offered["agreement"] > rejected["agreement"]
    assert (tmp_path / "run" / offered["artifact"]).is_file()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def test_dynamic_quantizer_renames_gemm(tmp_path):
    """The fault: ONNX Runtime's dynamic quantizer renames Gemm to MatMul and ignores the name."""
    path = _export(_mlp(), tmp_path / "mlp.onnx", torch.randn(2, 1, 4, 4))
    raw = tmp_path / "raw.onnx"
    quantize_dynamic(str(path), str(raw), nodes_to_exclude=["/1/Gemm"])
    assert quantized_nodes(onnx.load(str(raw)), ["/1/Gemm"]) == ["/1/Gemm_MatMul_quant"]
    # deploy's wrapper passes the renamed node too, and checks the result.
    kept = quantize_onnx(
        path, tmp_path / "kept.onnx", method="dynamic", nodes_to_exclude=["/1/Gemm"]
    )
    proto = onnx.load(str(kept))
    assert quantized_nodes(proto, ["/1/Gemm"]) == []
    assert quantized_nodes(proto, ["/3/Gemm"]) != []


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_keep_float_layer_stays_float(small_files, tmp_path, monkeypatch, method):
    """--keep-float by ONNX node name and by module name: those layers stay float32."""
    from deploy.pipeline import optimize

    _, data, profile = small_files
    monkeypatch.setattr("deploy.plan_stage.sweep", _int8_everywhere)
    quantize = QuantizeConfig(method=method, keep_float=["/7/Gemm", "0"])
    config = support.small_config(passes=("quantize",), quantize=quantize)
    manifest = optimize(
        support.small_model(), str(data), str(profile), out=tmp_path / "run", config=config
    )
    variant = manifest["variants"][0]
    assert variant["plan"]["recipe"]["quantize"]["layers"] == ["3", "9"]
    proto = onnx.load(str(tmp_path / "run" / variant["artifact"]))
    assert quantized_nodes(proto, ["/7/Gemm", "/0/Conv"]) == []
    assert quantized_nodes(proto, ["/9/Gemm"]) != []


def test_keep_float_unknown_name_lists_matches(tmp_path):
    model = support.small_model()
    path = _export(model, tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    assert resolve_keep_float(["/7/Gemm", "9"], model, path) == {"7", "9"}
    with pytest.raises(DeployError, match=r"'/7/Gem'.*close matches: /7/Gemm"):
        resolve_keep_float(["/7/Gem"], model, path)
    with pytest.raises(DeployError, match=r"'classifier'.*layers: 0, 3, 7, 9"):
        resolve_keep_float(["classifier"], model, path)
    # The name the quantizer gives the node after its rewrite is not a name of the model.
    with pytest.raises(DeployError, match="close matches: /7/Gemm"):
        resolve_keep_float(["/7/Gemm_MatMul"], model, path)


def _overflowing_norm() -> nn.Module:
    """A Linear whose outputs reach about 1.6e4, feeding a LayerNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(3e4 / 4)
        model[0].bias.zero_()
    return model


def test_fp16_layernorm_overflow_found(tmp_path):
    """Decomposed LayerNorm in fp16: the square overflows, and the first such node is named."""
    model = _overflowing_norm()
    inputs = torch.randn(40, 16)
    assert float(model[0](inputs).abs().max()) > 1e4
    path = _export(model, tmp_path / "norm.onnx", inputs[:2], opset=16)
    half = fp16_from_onnx(path, tmp_path / "norm.fp16.onnx")
    feed = {"input": inputs[:1].numpy()}
    assert first_nonfinite_node(half, feed) == ("/1/Pow", "Pow")
    assert first_nonfinite_node(path, feed) is None


def test_fp16_keeps_norm_in_fp32(tmp_path):
    model = _overflowing_norm()
    inputs = torch.randn(40, 16)
    reference = model(inputs).detach().numpy()
    path = _export(model, tmp_path / "norm.onnx", inputs[:2], opset=16)
    feeds = [{"input": inputs[:8].numpy()}]
    kept = fp16_from_onnx_without_overflow(path, tmp_path / "safe.fp16.onnx", feeds)
    assert "/1/Pow" in kept
    assert all(name.startswith("/1/") for name in kept)
    output = OnnxRunner(tmp_path / "safe.fp16.onnx").run({"input": inputs.numpy()})[0]
    assert np.isfinite(output).all()
    assert float((output.argmax(1) == reference.argmax(1)).mean()) > 0.95


def test_fp16_rejects_when_overflow_remains(tmp_path):
    """An overflow in the model's own first layer cannot be fixed by keeping a norm in fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e4)
    path = _export(model, tmp_path / "big.onnx", torch.randn(2, 16), opset=16)
    feeds = [{"input": np.full((1, 16), 10.0, np.float32)}]
    with pytest.raises(ExportError, match=r"first in node /0/Gemm"):
        fp16_from_onnx_without_overflow(path, tmp_path / "big.fp16.onnx", feeds, max_rounds=1)
    assert not (tmp_path / "big.fp16.onnx").exists()
