"""End-to-end ``deploy.optimize`` on the digits CNN.

The finished run is the session fixture ``digits_run`` from conftest.py, sized
by ``small_config`` and a device profile that times 10 runs. It took about half
a minute on 2 otherwise idle cores.
"""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from torch import nn

import deploy
from deploy.errors import DeployError
from deploy.pipeline import OptimizeConfig
from deploy.planner import LayerChoices, Option, Plan
from deploy.profiles import load_profile
from deploy.variants import materialize
from deploy.zoo.digits import build_model

ENTRY_FIELDS = [
    "name",
    "plan",
    "artifact",
    "accuracy",
    "agreement",
    "max_abs_error",
    "latency_ms",
    "predicted_latency_ms",
    "size_bytes",
    "on_frontier",
    "status",
]


@pytest.fixture(scope="session")
def manifest(digits_run) -> dict:
    return digits_run[0]


@pytest.fixture(scope="session")
def run_dir(digits_run):
    return digits_run[1]


@pytest.fixture(scope="session")
def all_entries(manifest) -> list[dict]:
    return [manifest["baseline"], *manifest["variants"]]


def test_optimize_has_variants(manifest):
    assert len(manifest["variants"]) >= 1


@pytest.mark.parametrize("field", ENTRY_FIELDS)
def test_optimize_entry_field(all_entries, field):
    assert all(field in entry for entry in all_entries)


@pytest.mark.parametrize("percentile", ["p50", "p90"])
def test_optimize_entry_latency(all_entries, percentile):
    assert all(entry["latency_ms"][percentile] > 0 for entry in all_entries)


def test_optimize_variants_valid(manifest):
    assert [v["status"] for v in manifest["variants"]] == ["ok"] * len(manifest["variants"])


def test_optimize_variant_plans(manifest):
    assert all(v["plan"]["layers"] for v in manifest["variants"])


def test_optimize_variant_predicted(manifest):
    assert all(v["predicted_latency_ms"] > 0 for v in manifest["variants"])


def test_optimize_frontier_nonempty(all_entries):
    assert any(entry["on_frontier"] for entry in all_entries)


def test_optimize_baseline_agreement(manifest):
    assert manifest["baseline"]["agreement"] == 1.0


def test_optimize_baseline_accuracy(manifest):
    assert manifest["baseline"]["accuracy"] > 0.95


@pytest.mark.parametrize(
    ("package", "version"),
    [
        ("torch", torch.__version__),
        ("onnx", onnx.__version__),
        ("onnxruntime", onnxruntime.__version__),
    ],
    ids=["torch", "onnx", "onnxruntime"],
)
def test_optimize_versions(manifest, package, version):
    assert manifest["versions"][package] == version


def test_optimize_device_profile_name(manifest):
    assert manifest["device_profile"]["name"] == "test-cpu"


def test_optimize_protocol_runs(manifest):
    assert manifest["protocol"]["runs"] == 10


def test_optimize_manifest_file_matches(manifest, run_dir):
    assert json.loads((run_dir / "manifest.json").read_text()) == json.loads(json.dumps(manifest))


def test_optimize_artifacts_exist(all_entries, run_dir):
    missing = [e["artifact"] for e in all_entries if not (run_dir / e["artifact"]).is_file()]
    assert missing == []


def test_optimize_artifact_sizes(all_entries, run_dir):
    assert all((run_dir / e["artifact"]).stat().st_size == e["size_bytes"] for e in all_entries)


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
def test_optimize_artifact_dynamic_batch(manifest, run_dir, heldout, batch):
    path = run_dir / manifest["variants"][0]["artifact"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": heldout["inputs"][:batch]})
    assert output.shape == (batch, 10)


def test_optimize_report_md(run_dir):
    assert "| variant |" in (run_dir / "report.md").read_text()


def test_optimize_report_lists_variants(manifest, run_dir):
    text = (run_dir / "report.md").read_text()
    assert all(f"| {v['name']} |" in text for v in manifest["variants"])


def test_optimize_pareto_png(run_dir):
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimize_no_partial_left(run_dir):
    assert not (run_dir.parent / f".{run_dir.name}.partial").exists()


def test_optimize_user_model_params(digits_run):
    _, _, user_model, before = digits_run
    after = user_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_optimize_user_model_training(digits_run):
    user_model = digits_run[2]
    assert all(module.training for module in user_model.modules())


def test_optimize_profile_saved(run_dir):
    profile = load_profile(run_dir.parent / "test-cpu.yaml")
    assert len(profile.data["latency_table"]) > 0


def test_optimize_pick(run_dir, manifest):
    fastest = min(manifest["variants"], key=lambda v: v["latency_ms"]["p50"])
    chosen = deploy.pick(run_dir, max_latency_ms=fastest["latency_ms"]["p50"])
    assert chosen["latency_ms"]["p50"] <= fastest["latency_ms"]["p50"]


# Runs that stop on bad input: each must leave no run folder behind.


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "test-cpu.yaml")


@pytest.fixture(scope="module")
def impossible_budget(tmp_path_factory, measured_profile, small_config, heldout):
    folder = tmp_path_factory.mktemp("impossible")
    profile_path = measured_profile(folder)
    config = small_config(budgets_ms=[0.001], passes=("quantize",), finetune=None)
    with pytest.raises(DeployError) as raised:
        deploy.optimize(
            build_model(), dict(heldout), profile_path, out=folder / "run", config=config
        )
    return raised.value, folder


def test_optimize_impossible_budget_message(impossible_budget):
    assert "below the fastest plan" in str(impossible_budget[0])


def test_optimize_impossible_budget_names_fastest(impossible_budget):
    assert "raise the budget to at least" in str(impossible_budget[0])


def test_optimize_impossible_budget_no_folder(impossible_budget):
    assert _leftovers(impossible_budget[1]) == []


def test_optimize_no_faster_option(tmp_path, measured_profile, small_config, heldout):
    # A device whose int8 layers all run slower than fp32, as on x86 CPUs
    # without VNNI: int8 alone gives the planner nothing to trade.
    profile_path = measured_profile(tmp_path)
    document = yaml.safe_load(profile_path.read_text())
    fp32 = {
        _entry_shape(e): e["p50_ms"] for e in document["latency_table"] if e["precision"] == "fp32"
    }
    for entry in document["latency_table"]:
        if entry["precision"] == "int8":
            entry["p50_ms"] = entry["p90_ms"] = 10 * fp32.get(_entry_shape(entry), 1.0) + 1.0
    profile_path.write_text(yaml.safe_dump(document))
    config = small_config(passes=("quantize",), finetune=None)
    with pytest.raises(DeployError, match="makes any layer faster than fp32") as raised:
        deploy.optimize(
            build_model(), dict(heldout), profile_path, out=tmp_path / "run", config=config
        )
    assert "--passes" in str(raised.value)
    assert _leftovers(tmp_path) == []


def _entry_shape(entry: dict) -> tuple:
    return (entry["op"], tuple(entry["input_shape"]), tuple(entry["weight_shape"]), entry["option"])


class BakedBatch(nn.Module):
    """Runs at any batch in PyTorch, but ``int()`` freezes the example batch of 2 into the export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(int(x.shape[0]), -1))


@pytest.fixture(scope="module")
def baked_batch(tmp_path_factory, make_profile, small_config, heldout):
    folder = tmp_path_factory.mktemp("baked")
    profile_path = make_profile().save(folder / "test-cpu.yaml")
    torch.manual_seed(0)
    with pytest.raises(DeployError) as raised:
        deploy.optimize(
            BakedBatch().eval(),
            dict(heldout),
            profile_path,
            out=folder / "run",
            config=small_config(),
        )
    return raised.value, folder


def test_optimize_baked_batch_rejected(baked_batch):
    assert "fp32 export of the model is broken" in str(baked_batch[0])


def test_optimize_baked_batch_names_node(baked_batch):
    assert "'/fc/Gemm'" in str(baked_batch[0])


def test_optimize_baked_batch_no_folder(baked_batch):
    assert _leftovers(baked_batch[1]) == []


def test_optimize_existing_out(tmp_path, profile_path, heldout):
    (tmp_path / "run").mkdir()
    with pytest.raises(DeployError, match="already exists"):
        deploy.optimize(build_model(), dict(heldout), profile_path, out=tmp_path / "run")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("passes", ("fold",)),
        ("calibration_fraction", 0.99),
        ("task", "detection"),
        ("min_timing_s", -1.0),
    ],
    ids=["pass", "calibration-fraction", "task", "min-timing"],
)
def test_config_rejects_bad_value(setting, value):
    with pytest.raises(DeployError, match=str(value[0] if isinstance(value, tuple) else value)):
        OptimizeConfig(**{setting: value})


def test_materialize_applies_plan(digits_model, example_inputs, small_config, heldout):
    plan = Plan(
        {"features.3": Option("prune:0.5", "fp32"), "classifier.1": Option("lowrank:32", "int8")},
        1.0,
        0.1,
    )
    calibration = [np.ascontiguousarray(heldout["inputs"][:32])]
    variant, recipe = materialize(
        digits_model, plan, example_inputs, calibration, small_config(finetune=None)
    )
    assert variant.features[3].out_channels == 64
    assert recipe["quantize"]["layers"] == ["classifier.1"]


def test_passes_limit_search_space():
    from deploy.costs import SearchSpace

    config = OptimizeConfig(passes=("quantize",), space=SearchSpace(keep_ratios=(0.5,)))
    assert config.space.passes == ("quantize",)
    assert config.space.keep_ratios == (0.5,)


def _chain_choices(float_only: set[str]) -> list[LayerChoices]:
    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    return [
        LayerChoices(
            name,
            None,
            False,
            [fp32] if name in float_only else [fp32, int8],
            {},
            {fp32: 0.0, int8: 0.1},
        )
        for name in "abc"
    ]


def test_int8_islands_quantize_sandwiched_float():
    from deploy.plan_stage import _int8_islands

    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    neighbours = {"a": (None, "b"), "b": ("a", "c"), "c": ("b", None)}
    plan = Plan({"a": int8, "b": fp32, "c": int8}, 1.0, 0.2)
    (fixed,) = _int8_islands([plan], _chain_choices(set()), neighbours, "static")
    assert fixed.layers == {"a": int8, "b": int8, "c": int8}


def test_int8_islands_keep_float_neighbour():
    from deploy.plan_stage import _int8_islands

    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    neighbours = {"a": (None, "b"), "b": ("a", "c"), "c": ("b", None)}
    plan = Plan({"a": int8, "b": fp32, "c": int8}, 1.0, 0.2)
    # b is kept in float, so ONNX Runtime must not see it between two int8
    # layers: the layer after it goes back to fp32.
    (fixed,) = _int8_islands([plan], _chain_choices({"b"}), neighbours, "static")
    assert fixed.layers == {"a": int8, "b": fp32, "c": fp32}
    assert fixed.predicted_distortion == pytest.approx(0.1)
