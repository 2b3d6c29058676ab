import numpy as np
import pytest
from torch import nn

from deploy.measure import SESSIONS, LayerSpec, measure_spec
from deploy.profiles import validate_profile
from exporters.timing import TimingProtocol

PROTOCOL = TimingProtocol(warmup=2, runs=10)
CONV = LayerSpec("conv2d", (1, 16, 8, 8), 32, (3, 3), (1, 1), (1, 1))
ENTRY_FIELDS = {
    "op",
    "input_shape",
    "weight_shape",
    "option",
    "precision",
    "p50_ms",
    "p90_ms",
    "runs",
}


@pytest.fixture(scope="module", params=["fp32", "int8"])
def entry(request) -> dict:
    return measure_spec(CONV, request.param, PROTOCOL)


@pytest.fixture
def check_entry(make_profile):
    """Validate one entry against the schema, inside a profile's latency table."""

    def check(entry: dict) -> None:
        profile = make_profile()
        profile.add_entry(entry)
        validate_profile(profile.data, "test profile")

    return check


def test_entry_matches_schema(entry, check_entry):
    check_entry(entry)


def test_entry_has_fields(entry):
    assert ENTRY_FIELDS <= set(entry)


def test_entry_runs_from_protocol(entry):
    # Every session times the protocol's runs.
    assert entry["runs"] == SESSIONS * PROTOCOL.runs


def test_entry_layout_within_latency(entry):
    assert 0.0 <= entry["layout_ms"] <= entry["p50_ms"]
    assert entry["layout_in_ms"] + entry["layout_out_ms"] == pytest.approx(entry["layout_ms"])
    if entry["precision"] == "int8":
        # QuantizeLinear and DequantizeLinear around the int8 conv.
        assert entry["layout_ms"] > 0.0


def test_entry_p50_below_p90(entry):
    assert 0 < entry["p50_ms"] <= entry["p90_ms"]


def test_entry_weight_shape(entry):
    assert entry["weight_shape"] == [32, 16, 3, 3]


def test_measure_lowrank_entry(check_entry):
    spec = LayerSpec("linear", (1, 64), 64, option="lowrank:8")
    check_entry(measure_spec(spec, "fp32", PROTOCOL))


def test_measure_unknown_precision():
    with pytest.raises(ValueError, match="fp16"):
        measure_spec(LayerSpec("linear", (1, 8), 8), "fp16", PROTOCOL)


def test_spec_builds_lowrank():
    module = LayerSpec("conv2d", (1, 16, 8, 8), 32, (3, 3), option="lowrank:4").build()
    assert isinstance(module, nn.Sequential)


def test_spec_depthwise_weight_shape():
    spec = LayerSpec("conv2d", (1, 16, 8, 8), 16, (3, 3), groups=16)
    assert spec.weight_shape == (16, 1, 3, 3)


def test_measure_dynamic_int8_entry(check_entry):
    from deploy.profiles import _key_of, entry_key

    spec = LayerSpec("linear", (1, 16, 64), 64)
    entry = measure_spec(spec, "int8", PROTOCOL, quantization="dynamic")
    check_entry(entry)
    assert entry["quantization"] == "dynamic"
    assert entry["boundary_ms"] == 0.0
    # Dynamic and static int8 entries have different lookup keys.
    static_key = entry_key(**spec.key_fields("int8"))
    assert _key_of(entry) == entry_key(**spec.key_fields("int8", "dynamic")) != static_key


def test_profile_rounds_takes_the_profilers_cost_off(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from deploy.measure import profile_rounds

    # A chain of 20 Relus on a small tensor: nearly all of each profiled
    # node's time is the profiler's own.
    nodes = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"], name=f"relu{k}") for k in range(20)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("t20", TensorProto.FLOAT, [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    feeds = {"t0": np.ones((1, 64), np.float32)}
    p50, (profiled,) = profile_rounds([path], feeds, TimingProtocol(warmup=5, runs=30), 0.0)
    assert p50 > 0
    assert [name for name, *_ in profiled] == [f"relu{k}" for k in range(20)]
    assert all(ms >= 0 for *_, ms in profiled)
    # With the profiler's cost off, the nodes add up to no more than the
    # unprofiled run, give or take timing noise.
    assert sum(ms for *_, ms in profiled) <= 1.5 * p50
