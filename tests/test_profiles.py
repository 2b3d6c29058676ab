"""Device profiles: schema, bad profiles, the latency model and ``deploy profile``."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy import costs as costs_module
from deploy.cli import main
from deploy.costs import CostTable, SearchSpace
from deploy.errors import DeployError
from deploy.latency_model import (
    Calibration,
    calibrate,
    check_run,
    interpolate_entry,
    net_ms,
    outside_layers_share,
    predict_plan,
    rescale_prediction,
)
from deploy.measure import LayerSpec
from deploy.planner import LayerChoices, Option
from deploy.profiles import (
    PROFILE_DIR,
    DeviceProfile,
    ProfileVersionWarning,
    load_profile,
    new_local_profile,
    validate_profile,
)
from deploy.profiling import profile, standard_specs

TEMPLATES = ["raspberry-pi5-ort-cpu", "jetson-orin-nano-trt", "phone-arm-ort-cpu"]

TINY_MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    ).eval()
"""


def _entry(**fields) -> dict:
    entry = {
        "op": "conv2d",
        "input_shape": [1, 16, 8, 8],
        "weight_shape": [16, 16, 3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "groups": 1,
        "option": "dense",
        "precision": "fp32",
        "p50_ms": 0.2,
        "p90_ms": 0.25,
        "runs": 100,
        "call_ms": 0.02,
    }
    entry.update(fields)
    return entry


@pytest.fixture
def document() -> dict:
    data = copy.deepcopy(new_local_profile("test").data)
    data["measured"] = True
    data["latency_table"] = [_entry()]
    return data


def _write(tmp_path, data, name="profile.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_valid_and_unmeasured(name):
    device_profile = load_profile(PROFILE_DIR / f"{name}.yaml", require_runtime=False)
    assert device_profile.data["measured"] is False
    assert device_profile.data["latency_table"] == []
    assert device_profile.data["runtime"]["version"] is None
    assert device_profile.data["power"]["active_watts"] > 0


def test_shipped_measured_profile_loads():
    measured = [
        p
        for p in PROFILE_DIR.glob("*.yaml")
        if not p.name.startswith("local-") and p.stem not in TEMPLATES
    ]
    assert measured, "no measured profile ships in device_profiles/"
    for path in measured:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileVersionWarning)
            device_profile = load_profile(path)
        assert device_profile.data["measured"] is True
        assert device_profile.data["latency_table"]
        assert all("call_ms" in e for e in device_profile.data["latency_table"])


def test_template_with_entries_rejected(document):
    document["measured"] = False
    with pytest.raises(DeployError, match="template"):
        validate_profile(document, "t.yaml")


def test_wrong_schema_version(tmp_path, document):
    document["schema_version"] = 2
    with pytest.raises(DeployError, match="schema_version 2.*deploy profile --out"):
        load_profile(_write(tmp_path, document))


@pytest.mark.parametrize(
    "section, field",
    [(None, "latency_table"), ("device", "cpu_model"), ("runtime", "batch_sizes")],
    ids=["top", "device", "runtime"],
)
def test_missing_field_named(tmp_path, document, section, field):
    del (document[section] if section else document)[field]
    name = f"{section}.{field}" if section else field
    with pytest.raises(DeployError, match=f"field {name} is missing"):
        load_profile(_write(tmp_path, document))


def test_negative_latency_named(tmp_path, document):
    document["latency_table"][0]["p50_ms"] = -1.0
    with pytest.raises(DeployError, match=r"latency_table\.0\.p50_ms is -1\.0, below the minimum"):
        load_profile(_write(tmp_path, document))


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_latency_named(tmp_path, document, value):
    document["latency_table"][0]["p90_ms"] = value
    with pytest.raises(DeployError, match=r"latency_table\.0\.p90_ms .*finite"):
        load_profile(_write(tmp_path, document))


def test_declared_power_needs_watts(document):
    document["power"] = {"source": "declared", "active_watts": None, "idle_watts": None}
    with pytest.raises(DeployError, match="power.active_watts"):
        validate_profile(document, "p.yaml")


def test_runtime_not_installed(tmp_path):
    path = PROFILE_DIR / "jetson-orin-nano-trt.yaml"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(DeployError, match="not installed.*pip install tensorrt"):
            load_profile(path)
    else:
        pytest.skip("tensorrt is installed here")


def test_other_runtime_version_warns(tmp_path, document):
    document["runtime"]["version"] = "0.0.1"
    with pytest.warns(ProfileVersionWarning, match="re-measure with 'deploy profile --out"):
        load_profile(_write(tmp_path, document))


def test_json_profile_round_trip(tmp_path, document):
    device_profile = DeviceProfile(document)
    saved = device_profile.save(tmp_path / "p.json")
    assert load_profile(saved).data["latency_table"] == document["latency_table"]


def _mutations():
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=5),
        st.lists(st.integers(-2, 3), max_size=3),
    )
    paths = st.sampled_from(
        [
            ("schema_version",),
            ("name",),
            ("measured",),
            ("device", "cores"),
            ("device", "architecture"),
            ("runtime", "name"),
            ("runtime", "threads"),
            ("runtime", "batch_sizes"),
            ("precisions",),
            ("power", "source"),
            ("power", "active_watts"),
            ("protocol", "runs"),
            ("protocol", "affinity"),
            ("latency_table", 0, "p50_ms"),
            ("latency_table", 0, "input_shape"),
            ("latency_table", 0, "option"),
            ("latency_table", 0, "runs"),
        ]
    )
    return st.lists(st.tuples(paths, leaf), min_size=1, max_size=3)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=_mutations())
def test_fuzzed_profile_loads_or_raises_deploy_error(tmp_path, document, mutations):
    data = copy.deepcopy(document)
    for path, value in mutations:
        target = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    file = tmp_path / "fuzz.json"
    file.write_text(json.dumps(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProfileVersionWarning)
            load_profile(file)
    except DeployError as exc:
        assert "device profile" in str(exc)
        assert "\n" not in str(exc)


def test_fuzzed_text_never_crashes(tmp_path):
    @settings(max_examples=100, deadline=None)
    @given(text=st.text(max_size=200))
    def check(text):
        file = tmp_path / "text.yaml"
        file.write_text(text)
        with pytest.raises(DeployError):
            load_profile(file)

    check()


def test_net_ms_subtracts_call():
    assert net_ms(_entry(p50_ms=0.2, call_ms=0.05)) == pytest.approx(0.15)
    assert net_ms({"p50_ms": 0.2}) == pytest.approx(0.2)
    assert net_ms(_entry(p50_ms=0.01, call_ms=0.05)) == 0.0


def test_interpolation_between_channel_counts():
    entries = [
        _entry(weight_shape=[8, 16, 3, 3], p50_ms=0.12),  # net 0.10
        _entry(weight_shape=[24, 16, 3, 3], p50_ms=0.32),  # net 0.30
    ]
    spec = LayerSpec("conv2d", (1, 16, 8, 8), 16, (3, 3), (1, 1), (1, 1))
    estimate = interpolate_entry(entries, spec, "fp32")
    assert estimate["net_ms"] == pytest.approx(0.20)
    assert estimate["interpolated_from"] == 2


def test_interpolation_without_family_raises():
    spec = LayerSpec("linear", (1, 64), 32)
    with pytest.raises(DeployError, match="deploy profile --model"):
        interpolate_entry([_entry()], spec, "fp32")


def test_cost_table_interpolates_unmeasurable(document):
    document["latency_table"] = [
        _entry(weight_shape=[8, 16, 3, 3], p50_ms=0.12),
        _entry(weight_shape=[24, 16, 3, 3], p50_ms=0.32),
    ]
    table = CostTable(DeviceProfile(document), measure=False)
    spec = LayerSpec("conv2d", (1, 16, 8, 8), 16, (3, 3), (1, 1), (1, 1))
    assert table.latency(spec, "fp32") == pytest.approx(0.20)
    assert table.measured == 0
    assert len(table.interpolated) == 1


class _StubCosts:
    def __init__(self, entries):
        self.entries = entries

    def entry_for(self, layer, in_keep, option):
        return self.entries[(layer, option.precision)]


def test_predict_plan_int8_chain_pays_boundary_once():
    names = ["a", "b", "c"]
    choices = []
    for name in names:
        options = [Option("dense", "fp32"), Option("dense", "int8")]
        choices.append(
            LayerChoices(
                name,
                None,
                False,
                options,
                {(1.0, o): 1.0 for o in options},
                {o: 0 for o in options},
            )
        )
    entries = {
        (n, p): {"op": "linear", "precision": p, "p50_ms": 1.0, "boundary_ms": 0.25}
        for n in names
        for p in ("fp32", "int8")
    }
    plan = {
        "a": Option("dense", "int8"),
        "b": Option("dense", "int8"),
        "c": Option("dense", "fp32"),
    }
    prediction = predict_plan(choices, plan, 0.5, _StubCosts(entries))
    # 0.5 overhead + 3 x 1.0 layers - one int8 -> int8 edge (a -> b).
    assert prediction.latency_ms == pytest.approx(3.25)
    assert prediction.edges_ms == pytest.approx(0.25)
    assert prediction.interpolated == []


def test_predict_plan_scales_edges():
    options = [Option("dense", "int8")]
    choices = [
        LayerChoices(n, None, False, options, {(1.0, options[0]): 2.0}, {options[0]: 0})
        for n in ("a", "b")
    ]
    entries = {
        (n, "int8"): {"op": "linear", "precision": "int8", "p50_ms": 2.5, "boundary_ms": 0.5}
        for n in ("a", "b")
    }
    plan = {n: options[0] for n in ("a", "b")}
    prediction = predict_plan(choices, plan, Calibration(0.1, 0.8), _StubCosts(entries))
    # Entries and the edge saving are both scaled: 0.1 + 0.8 x (2 x 2.5) - 0.8 x 0.5.
    assert prediction.latency_ms == pytest.approx(3.7)


def test_predict_plan_layer_rates():
    from deploy.latency_model import fit_rates

    options = [Option("dense", "fp32")]
    choices = [LayerChoices("a", None, False, options, {(1.0, options[0]): 1.0}, {})]
    entry = {"op": "conv2d", "precision": "fp32", "p50_ms": 1.0, "layout_ms": 0.4}
    # Inside the model the layer took 0.9 ms: its 0.6 ms of compute runs 1.5x slower.
    rates = fit_rates({"a": 0.9}, {"a": entry}, "fp32")
    assert rates == {"a|fp32": pytest.approx(1.5)}
    calibration = Calibration(0.0, 1.0, rates=rates)
    # The model's input and output are plain, so the conv keeps its 0.4 ms of conversions.
    prediction = predict_plan(
        choices, {"a": options[0]}, calibration, _StubCosts({("a", "fp32"): entry})
    )
    assert prediction.latency_ms == pytest.approx(1.5 * 0.6 + 0.4)


def test_calibrate_fits_baseline():
    calibration = calibrate(baseline_ms=1.05, layers_ms=2.0, call_ms=0.05)
    assert calibration.overhead_ms == pytest.approx(0.05)
    assert calibration.scale == pytest.approx(0.5)
    assert calibration.overhead_ms + calibration.scale * 2.0 == pytest.approx(1.05)


def test_calibrate_clips_busy_baseline():
    calibration = calibrate(baseline_ms=10.0, layers_ms=1.0, call_ms=0.0)
    assert calibration.scale == pytest.approx(2.0)


def test_calibrate_without_layers():
    assert calibrate(1.0, 0.0, 0.05) == Calibration(1.0, 1.0, 0.05)


def test_calibrate_fixed_outside_time():
    # 20% of the 1.0 ms past the session call is outside the layers: a plan
    # whose layers halve keeps that 0.2 ms.
    calibration = calibrate(baseline_ms=1.05, layers_ms=1.0, call_ms=0.05, outside_share=0.2)
    assert calibration.overhead_ms == pytest.approx(0.25)
    assert calibration.call_ms == pytest.approx(0.05)
    assert calibration.overhead_ms + calibration.scale * 0.5 == pytest.approx(0.65)


def test_outside_share_non_layer_ops():
    share = outside_layers_share({"MatMul": 6.0, "FusedConv": 2.0, "Softmax": 1.0, "Add": 1.0})
    assert share == pytest.approx(0.2)
    assert outside_layers_share({}) == 0.0


def test_op_times_every_operator(tmp_path):
    from exporters.onnx import op_times

    _relu_model(tmp_path / "m.onnx")
    times = op_times(tmp_path / "m.onnx", {"input": np.ones((1, 4), np.float32)}, runs=3)
    assert set(times) == {"Relu"}
    assert times["Relu"] >= 0.0


def _manifest(tmp_path, pairs):
    variants = [
        {
            "name": f"v{i}",
            "status": "ok",
            "predicted_latency_ms": predicted,
            "latency_ms": {"p50": measured, "p90": measured},
            "plan": {"prediction": {"interpolated": []}},
        }
        for i, (predicted, measured) in enumerate(pairs)
    ]
    variants.append({"name": "bad", "status": "rejected", "latency_ms": {}})
    (tmp_path / "manifest.json").write_text(json.dumps({"variants": variants}))
    return tmp_path


def test_check_json_fields(tmp_path, capsys):
    run = _manifest(tmp_path, [(1.05, 1.0), (0.8, 1.0), (2.0, 2.0), (1.09, 1.0)])
    assert main(["profile", "--check", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["variants"] == 4
    assert summary["within_10pct"] == pytest.approx(0.75)
    assert summary["median_abs_error_pct"] == pytest.approx(7.0)


def test_check_text_summary(tmp_path, capsys):
    run = _manifest(tmp_path, [(1.0, 1.0)])
    assert main(["profile", "--check", str(run)]) == 0
    assert "100% within 10%" in capsys.readouterr().out


def test_check_missing_manifest(tmp_path):
    with pytest.raises(DeployError, match="manifest.json"):
        check_run(tmp_path)


def test_standard_sweep_covers_options():
    specs = standard_specs(SearchSpace())
    options = {s.option.split(":")[0] for s in specs}
    assert options == {"dense", "lowrank"}
    assert any(s.groups > 1 for s in specs)
    assert any(s.op == "linear" and len(s.input_shape) == 3 for s in specs)
    assert len(specs) == len(set(specs))


@pytest.fixture
def quick_profile(tmp_path):
    """An empty profile of this machine with a short protocol, to keep the sweep fast."""
    device_profile = new_local_profile("quick")
    device_profile.data["protocol"].update(warmup=2, runs=10)
    return device_profile.save(tmp_path / "quick.yaml")


def test_profile_tiny_model_and_resume(tmp_path, quick_profile, monkeypatch, capsys):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    space = SearchSpace(keep_ratios=(0.5,), rank_fractions=(0.5,))
    measured = profile(quick_profile, str(model), input_shape=(1, 1, 4, 4), space=space)
    table = measured.data["latency_table"]
    assert measured.data["measured"] is True
    assert {e["precision"] for e in table} == {"fp32", "int8"}
    assert {e["op"] for e in table} == {"conv2d", "linear"}
    assert all(e["energy_source"] == "estimate" for e in table)
    assert all("boundary_ms" in e for e in table if e["precision"] == "int8")
    saved = load_profile(quick_profile)
    assert len(saved.data["latency_table"]) == len(table)

    # A rerun finds every entry in the file and measures nothing.
    def fail(*args, **kwargs):
        raise AssertionError("an entry was measured again")

    monkeypatch.setattr(costs_module, "measure_spec", fail)
    assert profile(quick_profile, str(model), input_shape=(1, 1, 4, 4), space=space)
    assert len(load_profile(quick_profile).data["latency_table"]) == len(table)


def test_profile_cli_rejects_other_machine(tmp_path, document, capsys):
    document["device"]["cpu_model"] = "Some Other CPU"
    path = _write(tmp_path, document)
    assert main(["profile", "--out", str(path), "--input-shape", "1,1,4,4"]) == 2
    assert "not on this machine" in capsys.readouterr().err


def test_profile_needs_input_shape(tmp_path, quick_profile):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    with pytest.raises(DeployError, match="--input-shape"):
        profile(quick_profile, str(model))


def _relu_model(path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_check_retime_replaces_measurements(tmp_path):
    _relu_model(tmp_path / "baseline.onnx")
    _relu_model(tmp_path / "v1.onnx")
    prediction = {"overhead_ms": 0.01, "scale": 1.0, "interpolated": []}
    manifest = {
        "protocol": {"warmup": 2, "runs": 10, "threads": 1},
        "baseline": {
            "artifact": "baseline.onnx",
            "latency_ms": {"p50": 1.0},
            "predicted_latency_ms": 1.0,
        },
        "variants": [
            {
                "name": "v1",
                "artifact": "v1.onnx",
                "status": "ok",
                "latency_ms": {"p50": 1000.0},
                "predicted_latency_ms": 0.5,
                "plan": {"prediction": prediction},
            }
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    summary = check_run(tmp_path, retime_rounds=2)
    assert summary["variants"] == 1
    assert summary["retime_rounds"] == 2
    assert summary["rows"][0]["measured_p50_ms"] < 1000.0
    assert summary["baseline_p50_ms"] < 1.0


def test_rescale_from_planned_prediction():
    # The planner predicted 0.5 ms with scale 1.0 against a baseline predicted
    # at 1.0 ms. The run's side-by-side timing already doubled the stored
    # prediction; re-timing the baseline at 2.0 ms must give 1.0 ms, not 2.0.
    prediction = {"latency_ms": 0.5, "overhead_ms": 0.0, "scale": 1.0, "call_ms": 0.0}
    entry = {"predicted_latency_ms": 1.0, "plan": {"prediction": prediction}}
    baseline = {"predicted_latency_ms": 1.0}
    assert rescale_prediction(entry, baseline, 2.0) == pytest.approx(1.0)
    assert rescale_prediction(entry, baseline, 1.0) == pytest.approx(0.5)


def test_retime_feeds_run_shapes(tmp_path):
    from deploy.latency_model import _feeds_for
    from exporters.onnx import OnnxRunner

    _relu_model(tmp_path / "m.onnx")
    runner = OnnxRunner(tmp_path / "m.onnx", 1)
    assert _feeds_for(runner, [[3, 4]])["input"].shape == (3, 4)
    assert _feeds_for(runner)["input"].shape == (1, 4)


def test_unprofiled_op_times_splits_excess():
    from exporters.onnx import unprofiled_op_times

    # 10 nodes recorded 1.2 ms in all, the model runs in 1.0 ms: 0.02 ms per node.
    ops = {"Conv": (1.0, 2), "MaxPool": (0.1, 4), "Flatten": (0.1, 4)}
    times = unprofiled_op_times(ops, run_ms=1.0)
    assert times["Conv"] == pytest.approx(0.96)
    assert times["MaxPool"] == pytest.approx(0.02)
    assert sum(times.values()) == pytest.approx(1.0)
    # A profile faster than the plain run is left as it is.
    assert unprofiled_op_times(ops, run_ms=5.0)["Conv"] == pytest.approx(1.0)


def _layout_entry(op, precision, net, layout_ms):
    return {"op": op, "precision": precision, "p50_ms": net, "layout_ms": layout_ms}


def test_edge_savings_by_layout():
    from deploy.latency_model import ChainLayer, edge_savings

    chain = [ChainLayer(n, None, False) for n in ("a", "b", "c", "d")]
    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    entries = {
        (n, p): _layout_entry("conv2d", p, 1.0, 0.4) for n in "abcd" for p in ("fp32", "int8")
    }
    costs = _StubCosts(entries)
    # All fp32: the three inner edges save half a layout on each side.
    saved, _ = edge_savings(chain, dict(zip("abcd", [fp32] * 4, strict=True)), costs)
    assert saved == pytest.approx(6 * 0.2)
    # fp32, int8, int8, fp32: only the b -> c edge is between one layout.
    plan = dict(zip("abcd", [fp32, int8, int8, fp32], strict=True))
    saved, _ = edge_savings(chain, plan, costs)
    assert saved == pytest.approx(2 * 0.2)
    # Alternating layouts convert on every edge.
    plan = dict(zip("abcd", [fp32, int8, fp32, int8], strict=True))
    assert edge_savings(chain, plan, costs)[0] == 0.0


def test_edge_savings_input_and_output_sides():
    from deploy.latency_model import ChainLayer, edge_savings

    chain = [ChainLayer(n, None, False) for n in ("a", "b")]
    fp32 = Option("dense", "fp32")
    entry = {**_layout_entry("conv2d", "fp32", 1.0, 0.4), "layout_in_ms": 0.1, "layout_out_ms": 0.3}
    costs = _StubCosts({(n, "fp32"): entry for n in "ab"})
    # The a -> b edge saves a's output side and b's input side.
    saved, _ = edge_savings(chain, {"a": fp32, "b": fp32}, costs)
    assert saved == pytest.approx(0.3 + 0.1)


def test_conversions_split_around_layer():
    from deploy.measure import _conversions

    nodes = [
        ("in", "QuantizeLinear", 0.02),
        ("t", "Transpose", 0.01),
        ("conv", "QLinearConv", 0.10),
        ("out", "DequantizeLinear", 0.03),
    ]
    before, after = _conversions(nodes, run_ms=0.16)
    assert before == pytest.approx(0.03)
    assert after == pytest.approx(0.03)
    # A profile 0.04 ms over the plain run loses 0.01 ms per node.
    before, after = _conversions(nodes, run_ms=0.12)
    assert before == pytest.approx(0.01)
    assert after == pytest.approx(0.02)


def test_weight_bytes_by_option_and_precision():
    from deploy.latency_model import weight_bytes

    dense = {"weight_shape": [64, 32, 3, 3], "option": "dense", "precision": "fp32"}
    assert weight_bytes(dense) == 64 * 32 * 9 * 4
    assert weight_bytes({**dense, "precision": "int8"}) == 64 * 32 * 9
    lowrank = {**dense, "option": "lowrank:8"}
    assert weight_bytes(lowrank) == 8 * (32 * 9 + 64) * 4


def test_calibrate_charges_weights_beyond_cache():
    # Layers add up to 0.8 ms but the baseline spends 1.0 ms in them with
    # 3 MB of weights and a 4 MB cache, half of it for weights: 0.2 ms per
    # MB beyond 2 MB.
    mb = 1_000_000
    calibration = calibrate(
        baseline_ms=1.0, layers_ms=0.8, call_ms=0.0, weight_bytes=3 * mb, cache_bytes=4 * mb
    )
    assert calibration.scale == 1.0
    assert calibration.cache_bytes == 2 * mb
    assert calibration.memory_ms(3 * mb) == pytest.approx(0.2)
    assert calibration.memory_ms(2.5 * mb) == pytest.approx(0.1)
    assert calibration.memory_ms(1 * mb) == 0.0


def test_calibrate_weights_within_cache_share():
    # Weights that fit their share of the cache: the scale maps the entries.
    mb = 1_000_000
    fits = calibrate(
        baseline_ms=1.0, layers_ms=0.8, call_ms=0.0, weight_bytes=1 * mb, cache_bytes=4 * mb
    )
    assert fits.scale == pytest.approx(1.25)
    assert fits.memory_ms(3 * mb) == 0.0


def test_core_cache_bytes_reads_private_cache(tmp_path):
    from deploy.profiles import core_cache_bytes

    caches = {
        "index0": ("Data", "48K", "0"),
        "index1": ("Instruction", "64K", "0"),
        "index2": ("Unified", "2048K", "0"),
        "index3": ("Unified", "491520K", "0-1"),
    }
    for name, (kind, size, shared) in caches.items():
        folder = tmp_path / "cpu0" / "cache" / name
        folder.mkdir(parents=True)
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(size + "\n")
        (folder / "shared_cpu_list").write_text(shared + "\n")
    assert core_cache_bytes(0, tmp_path) == 2048 * 1024
    assert core_cache_bytes(1, tmp_path) is None


def test_runtime_int8_float_between_int8():
    from deploy.latency_model import runtime_int8

    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    neighbours = {"a": (None, "b"), "b": ("a", "c"), "c": ("b", None)}
    plan = {"a": int8, "b": fp32, "c": int8}
    assert runtime_int8(plan, neighbours, "static") == {"b"}
    assert runtime_int8(plan, neighbours, "dynamic") == set()
    assert runtime_int8({**plan, "c": fp32}, neighbours, "static") == set()
    assert runtime_int8(plan, None, "static") == set()


def test_predict_plan_prices_runtime_int8():
    names = ["a", "b", "c"]
    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    choices = [
        LayerChoices(n, None, False, [fp32, int8], {(1.0, fp32): 1.0, (1.0, int8): 0.4}, {})
        for n in names
    ]
    entries = {
        (n, p): {"op": "conv2d", "precision": p, "p50_ms": 1.0 if p == "fp32" else 0.4}
        for n in names
        for p in ("fp32", "int8")
    }
    plan = {"a": int8, "b": fp32, "c": int8}
    neighbours = {"a": (None, "b"), "b": ("a", "c"), "c": ("b", None)}
    prediction = predict_plan(choices, plan, 0.0, _StubCosts(entries), neighbours)
    # b runs in int8: 3 x 0.4 ms instead of 0.4 + 1.0 + 0.4.
    assert prediction.latency_ms == pytest.approx(1.2)
    assert prediction.runtime_int8 == ["b"]


def test_profile_json_needs_check(tmp_path, capsys):
    assert main(["profile", "--out", str(tmp_path / "p.yaml"), "--json"]) == 2
    assert "--json applies to --check" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_activation_bytes_by_layout():
    from deploy.latency_model import activation_bytes

    conv = _entry(weight_shape=[8, 16, 3, 3], p50_ms=0.1)
    # 8 channels of 8 x 8 outputs (padding 1), 4 bytes each in fp32, 1 in int8.
    assert activation_bytes([conv]) == 8 * 64 * 4
    assert activation_bytes([{**conv, "precision": "int8"}]) == 8 * 64
    assert activation_bytes([{"p50_ms": 0.1}]) is None


def test_overhead_scales_with_written_bytes():
    conv = _entry(weight_shape=[8, 16, 3, 3], p50_ms=0.1)
    base = 8 * 64 * 4
    calibration = Calibration(0.3, 1.0, call_ms=0.1, activation_bytes=base)
    assert calibration.overhead_for([conv]) == pytest.approx(0.3)
    # An int8 layer writes a quarter of the bytes: a quarter of the 0.2 ms outside.
    assert calibration.overhead_for([{**conv, "precision": "int8"}]) == pytest.approx(0.15)
    # Entries without shapes keep the overhead.
    assert calibration.overhead_for([{"p50_ms": 0.1}]) == pytest.approx(0.3)


def test_retime_uses_saved_timing_input(tmp_path, monkeypatch):
    from deploy.latency_model import TIMING_INPUT
    from exporters.onnx import OnnxRunner

    _relu_model(tmp_path / "baseline.onnx")
    manifest = {
        "protocol": {"warmup": 1, "runs": 2, "threads": 1},
        "baseline": {"artifact": "baseline.onnx", "latency_ms": {"p50": 1.0}},
        "variants": [
            {
                "name": "v1",
                "artifact": "baseline.onnx",
                "status": "ok",
                "latency_ms": {"p50": 1.0},
                "predicted_latency_ms": 1.0,
            }
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    saved = np.full((1, 4), 7.0, np.float32)
    np.savez(tmp_path / TIMING_INPUT, input_0=saved)
    seen = []
    original = OnnxRunner.time

    def spy(self, feeds, protocol):
        seen.append(feeds["input"])
        return original(self, feeds, protocol)

    monkeypatch.setattr(OnnxRunner, "time", spy)
    check_run(tmp_path, retime_rounds=1)
    assert seen
    assert all(np.array_equal(feed, saved) for feed in seen)


def _gap_nodes(pool_ms: float, convert_ms: float = 0.0) -> list[tuple[str, str, float]]:
    # Two convs with a pool between them, and a conversion before the second.
    nodes = [("/a/Conv", "Conv", 1.0), ("/pool/MaxPool", "MaxPool", pool_ms)]
    if convert_ms:
        nodes.append(("/b/Conv_q", "QuantizeLinear", convert_ms))
    return [*nodes, ("/b/Conv", "Conv", 2.0)]


def test_fit_gaps_by_precision_context():
    from deploy.latency_model import fit_gaps

    owners = ["a", None, "b"]
    profiled = [
        (_gap_nodes(0.01), owners, {"a": "fp32", "b": "fp32"}),
        (_gap_nodes(0.05, 0.02), [*owners[:2], None, "b"], {"a": "fp32", "b": "int8"}),
        # The same context profiled twice: the median counts.
        (_gap_nodes(0.03, 0.02), [*owners[:2], None, "b"], {"a": "fp32", "b": "int8"}),
        (_gap_nodes(0.09, 0.02), [*owners[:2], None, "b"], {"a": "fp32", "b": "int8"}),
    ]
    gap_ms, gap_next = fit_gaps(profiled, ["a", "b"])
    assert gap_next == {"": "a", "a": "b", "b": ""}
    assert gap_ms["a|fp32|fp32"] == pytest.approx(0.01)
    assert gap_ms["a|fp32|int8"] == pytest.approx(0.07)
    assert gap_ms["|io|fp32"] == 0.0
    assert gap_ms["b|int8|io"] == 0.0


def test_gap_falls_back_to_the_next_layers_precision():
    calibration = Calibration(
        0.0,
        1.0,
        gap_ms={"a|fp32|fp32": 0.01, "a|int8|int8": 0.03},
        gap_next={"": "a", "a": "b", "b": ""},
    )
    assert calibration.gap("a", "fp32", "fp32") == pytest.approx(0.01)
    # Never profiled from fp32 into int8, so the int8 -> int8 time is used.
    assert calibration.gap("a", "fp32", "int8") == pytest.approx(0.03)
    assert calibration.gap("b", "int8", "io") == 0.0


def test_predict_plan_with_gaps_prices_compute_and_gaps():
    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    choices = [
        LayerChoices(n, None, False, [fp32, int8], {(1.0, fp32): 1.0, (1.0, int8): 1.0}, {})
        for n in ("a", "b")
    ]
    entries = {
        (n, p): _entry(precision=p, p50_ms=0.52, call_ms=0.02, layout_ms=0.1)
        for n in ("a", "b")
        for p in ("fp32", "int8")
    }
    calibration = Calibration(
        0.05,
        1.0,
        call_ms=0.02,
        rates={"a|fp32": 2.0, "b|fp32": 1.0, "a|int8": 1.0, "b|int8": 1.0},
        gap_ms={"|io|fp32": 0.0, "a|fp32|fp32": 0.01, "a|fp32|int8": 0.2, "b|int8|io": 0.03},
        gap_next={"": "a", "a": "b", "b": ""},
        gap_values={"a": 1024.0, "b": 1024.0},
    )
    prediction = predict_plan(choices, {"a": fp32, "b": int8}, calibration, _StubCosts(entries))
    # Compute is net less conversions (0.5 - 0.1), at each layer's rate: a at 2x, b at 1x.
    assert prediction.layers_ms == pytest.approx(0.8 + 0.4)
    # The call, then the gap after a (fp32 -> int8) and after b (int8 -> output).
    assert prediction.overhead_ms == pytest.approx(0.02 + 0.2 + 0.03)
    assert prediction.latency_ms == pytest.approx(0.02 + 0.23 + 1.2)
    assert prediction.edges_ms == 0.0


def test_gap_scales_with_pruned_output():
    calibration = Calibration(
        0.0,
        1.0,
        gap_ms={"a|fp32|fp32": 0.04},
        gap_next={"a": "b"},
        gap_values={"a": 1000.0},
    )
    precisions = {"a": "fp32", "b": "fp32"}
    assert calibration.gaps_ms(precisions, {"a": 1000.0}) == pytest.approx(0.04)
    # Half the channels kept: the pool after it reads half as much.
    assert calibration.gaps_ms(precisions, {"a": 500.0}) == pytest.approx(0.02)


def test_streaming_share_ramps_over_cache():
    calibration = Calibration(0.0, 1.0, private_cache_bytes=1000)
    assert calibration.streaming_share(800.0) == 0.0
    assert calibration.streaming_share(1500.0) == pytest.approx(0.5)
    assert calibration.streaming_share(5000.0) == 1.0
    assert Calibration(0.0, 1.0).streaming_share(10.0) == 1.0


def test_compute_ms_in_cache_drops_rate():
    entry = _entry(p50_ms=0.52, call_ms=0.02, layout_ms=0.1)
    calibration = Calibration(0.0, 1.0, rates={"a|fp32": 1.5})
    # 0.4 ms of compute: at the full rate, at half of its excess, and at none.
    assert calibration.compute_ms("a", entry) == pytest.approx(0.6)
    assert calibration.compute_ms("a", entry, streaming=0.5) == pytest.approx(0.5)
    assert calibration.compute_ms("a", entry, streaming=0.0) == pytest.approx(0.4)
