import numpy as np
import onnx
import pytest
import torch
from torch import nn

from exporters.onnx import (
    ExportError,
    OnnxRunner,
    check_onnx,
    nodes_of_module,
    onnx_from_torch,
    quantize_onnx,
)

AXES = {"input": {0: "batch"}, "output": {0: "batch"}}


def _export(model: nn.Module, example, path):
    return onnx_from_torch(
        model, example, path, input_names=["input"], output_names=["output"], dynamic_axes=AXES
    )


def _feeds(heldout, count: int = 64, batch: int = 16) -> list[dict[str, np.ndarray]]:
    images = heldout["inputs"][:count]
    return [{"input": images[s : s + batch]} for s in range(0, count, batch)]


def _initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((t for t in proto.graph.initializer if t.name == name), None)


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in proto.graph.node for output in node.output}


@pytest.fixture(scope="module")
def int8_onnx(digits_onnx, heldout, tmp_path_factory):
    """The digits CNN quantized static int8 (QDQ), with ``classifier.1`` kept in float."""
    proto = onnx.load(str(digits_onnx))
    exclude = nodes_of_module(proto, "classifier.1", ["Gemm"])
    path = tmp_path_factory.mktemp("int8") / "digits.int8.onnx"
    return quantize_onnx(
        digits_onnx, path, calibration_feeds=_feeds(heldout), nodes_to_exclude=exclude
    )


def test_export_checker_passes(digits_onnx):
    check_onnx(digits_onnx)


def test_export_batch_axis_symbolic(digits_onnx):
    proto = onnx.load(str(digits_onnx))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_export_runs_at_batch(digits_onnx, heldout, batch):
    runner = OnnxRunner(digits_onnx)
    (output,) = runner.run({"input": heldout["inputs"][:batch]})
    assert output.shape == (batch, 10)


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_export_matches_torch(digits_onnx, digits_reference, heldout, batch):
    (output,) = OnnxRunner(digits_onnx).run({"input": heldout["inputs"][:batch]})
    np.testing.assert_allclose(output, digits_reference[:batch], atol=1e-4)


def test_export_failure_leaves_nothing(tmp_path):
    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.cummax(x, -1)[0]

    with pytest.raises(ExportError, match="cummax"):
        _export(Unsupported(), (torch.randn(2, 4),), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_nodes_of_module_names_scope(digits_onnx):
    proto = onnx.load(str(digits_onnx))
    assert nodes_of_module(proto, "features.3", ["Conv"]) == ["/features/features.3/Conv"]


def test_nodes_of_module_no_prefix_match(digits_onnx):
    # "features.1" is a BatchNorm folded into the conv, so it must not match "features.10".
    proto = onnx.load(str(digits_onnx))
    assert nodes_of_module(proto, "features.1", ["Conv"]) == []


def test_quantize_static_smaller(digits_onnx, int8_onnx):
    assert int8_onnx.stat().st_size < digits_onnx.stat().st_size


def test_quantize_static_has_qdq(int8_onnx):
    ops = {node.op_type for node in onnx.load(str(int8_onnx)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantize_static_agreement(int8_onnx, digits_reference, heldout):
    (output,) = OnnxRunner(int8_onnx).run({"input": heldout["inputs"]})
    agreement = float((output.argmax(1) == digits_reference.argmax(1)).mean())
    assert agreement >= 0.95


def test_quantize_static_checker_passes(int8_onnx):
    check_onnx(int8_onnx)


def test_quantize_excluded_node_float_weight(int8_onnx):
    proto = onnx.load(str(int8_onnx))
    (node,) = [n for n in proto.graph.node if n.name == "/classifier/classifier.1/Gemm"]
    weight = _initializer(proto, node.input[1])
    assert weight is not None
    assert weight.data_type == onnx.TensorProto.FLOAT


def test_quantize_included_node_int8_weight(int8_onnx):
    proto = onnx.load(str(int8_onnx))
    (node,) = [n for n in proto.graph.node if n.name == "/features/features.3/Conv"]
    assert _producers(proto)[node.input[1]].op_type == "DequantizeLinear"


def test_quantize_dynamic_runs(digits_onnx, heldout, tmp_path):
    path = quantize_onnx(digits_onnx, tmp_path / "dynamic.onnx", method="dynamic")
    (output,) = OnnxRunner(path).run({"input": heldout["inputs"][:3]})
    assert output.shape == (3, 10)


def test_quantize_static_needs_feeds(digits_onnx, tmp_path):
    with pytest.raises(ValueError, match="calibration feeds"):
        quantize_onnx(digits_onnx, tmp_path / "int8.onnx")


def test_quantize_failure_leaves_nothing(digits_onnx, tmp_path):
    with pytest.raises(ValueError):
        quantize_onnx(digits_onnx, tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


def test_quantize_unknown_method(digits_onnx, tmp_path):
    with pytest.raises(ValueError, match="fp4"):
        quantize_onnx(digits_onnx, tmp_path / "int8.onnx", method="fp4")


class _BakedBatch(nn.Module):
    """Reshapes to the example batch of 2, so any other batch breaks the Gemm after it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.view(2, -1))


def test_runner_error_names_node(tmp_path):
    path = _export(_BakedBatch().eval(), (torch.randn(2, 16),), tmp_path / "baked.onnx")
    with pytest.raises(ExportError, match="in node '/fc/Gemm'"):
        OnnxRunner(path).run({"input": np.zeros((1, 16), np.float32)})


def test_runner_missing_file(tmp_path):
    with pytest.raises(ExportError, match="could not load"):
        OnnxRunner(tmp_path / "missing.onnx")


class _Sandwich(nn.Module):
    """Pointwise, depthwise and pointwise convs with ReLU6, and a residual branch."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 8, 1)
        self.head = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = nn.functional.relu6(self.depthwise(y))
        return self.head(x + self.project(y))


@pytest.fixture(scope="module")
def sandwich(tmp_path_factory):
    """The float ONNX file of ``_Sandwich`` and its QDQ file with only ``depthwise`` in float."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sandwich")
    float_path = _export(_Sandwich().eval(), (torch.randn(1, 8, 16, 16),), folder / "f.onnx")
    proto = onnx.load(str(float_path))
    keep = nodes_of_module(proto, "depthwise", ["Conv"])
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(4)]
    int8_path = quantize_onnx(
        float_path, folder / "q.onnx", calibration_feeds=feeds, nodes_to_exclude=keep
    )
    return proto, onnx.load(str(int8_path)), int8_path, keep[0]


def test_runtime_quantized_float_between_int8(sandwich):
    from exporters.onnx import runtime_quantized_nodes

    _, int8_proto, _, depthwise = sandwich
    assert runtime_quantized_nodes(int8_proto) == [depthwise]


def test_runtime_quantized_matches_onnxruntime(sandwich, tmp_path):
    import onnxruntime as ort

    _, _, int8_path, _ = sandwich
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    # All four convs run in int8, the float depthwise one included.
    assert sum(node.op_type == "QLinearConv" for node in optimized.graph.node) == 4


def test_layer_neighbours_direct_chain(sandwich):
    from exporters.onnx import layer_neighbours

    float_proto = sandwich[0]
    layers = {
        name: nodes_of_module(float_proto, name, ["Conv"])[0]
        for name in ("expand", "depthwise", "project", "head")
    }
    neighbours = layer_neighbours(float_proto, layers)
    assert neighbours["depthwise"] == ("expand", "project")
    assert neighbours["expand"] == (None, "depthwise")
    # The residual add sits between project and head.
    assert neighbours["project"] == ("depthwise", None)
    assert neighbours["head"] == (None, None)


def test_layer_node_times_by_scope_then_order():
    from exporters.onnx import layer_node_times

    nodes = [
        ("/blocks.0/act/Clip_output_0_nchwc", "Conv", 0.30),  # renamed: matched by order
        ("ReorderOutput", "ReorderOutput", 0.05),
        ("/blocks.0/project/Conv", "Conv", 0.20),
        ("/head/Gemm", "FusedGemm", 0.10),
    ]
    layers = ["blocks.0.expand", "blocks.0.project", "head"]
    times = layer_node_times(nodes, layers, run_ms=0.65)
    assert times == {
        "blocks.0.project": pytest.approx(0.20),
        "head": pytest.approx(0.10),
        "blocks.0.expand": pytest.approx(0.30),
    }
    # A profile 0.04 ms over the plain run loses 0.01 ms per node.
    assert layer_node_times(nodes, layers, run_ms=0.61)["head"] == pytest.approx(0.09)


def test_layer_node_times_leaves_unmatched_out():
    from exporters.onnx import layer_node_times

    nodes = [("/a/x_nchwc", "Conv", 0.3), ("/b/y_nchwc", "Conv", 0.2)]
    assert layer_node_times(nodes, ["c"], run_ms=0.5) == {}


class _Residual(nn.Module):
    """A conv, a conv on its output, their sum and a conv on the sum."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.head(y + torch.relu(self.body(y)))


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("residual")
    path = _export(_Residual().eval(), (torch.randn(1, 3, 8, 8),), folder / "f.onnx")
    proto = onnx.load(str(path))
    convs = {name: nodes_of_module(proto, name, ["Conv"])[0] for name in ("stem", "body", "head")}
    return path, proto, convs


def test_float_region_skips_mixed_add(residual):
    from exporters.onnx import float_region_nodes

    _, proto, convs = residual
    adds = [n.name for n in proto.graph.node if n.op_type == "Add"]
    assert len(adds) == 1
    # Every conv int8: the Add sits inside the int8 region.
    assert adds[0] not in float_region_nodes(proto, convs.values(), ["Conv"])
    # Only the head int8: the Add reads two float convs' outputs.
    skipped = float_region_nodes(proto, [convs["head"]], ["Conv"])
    assert adds[0] in skipped
    assert all(
        proto_node.op_type != "Conv"
        for proto_node in proto.graph.node
        if proto_node.name in skipped
    )


def test_one_int8_layer_leaves_residual_add_float(residual, tmp_path):
    from exporters.onnx import float_region_nodes

    path, proto, convs = residual
    rng = np.random.default_rng(0)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    exclude = [convs["stem"], convs["body"]]
    exclude += float_region_nodes(proto, [convs["head"]], ["Conv"])
    out = quantize_onnx(
        path, tmp_path / "q.onnx", calibration_feeds=feeds, nodes_to_exclude=exclude
    )
    int8 = onnx.load(str(out))
    producers = {o: n for n in int8.graph.node for o in n.output}
    add = next(n for n in int8.graph.node if n.op_type == "Add")
    # The Add reads float tensors, not dequantized ones, and its output is
    # quantized for the head.
    assert all(producers[i].op_type != "DequantizeLinear" for i in add.input)
    initializers = {t.name for t in int8.graph.initializer}
    quantized = {
        n.input[0]
        for n in int8.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in initializers
    }
    assert add.output[0] in quantized
    assert not quantized & set(add.input)
