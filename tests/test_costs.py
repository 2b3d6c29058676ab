import pytest

from deploy.analyze import analyze
from deploy.costs import (
    CostTable,
    SearchSpace,
    candidate_ranks,
    layer_options,
    layer_spec,
    plannable_producers,
)
from deploy.measure import LayerSpec
from deploy.passes.prune import prunable_layers
from deploy.profiles import load_profile

SPEC = LayerSpec("linear", (1, 64), 32)


@pytest.fixture
def costs(make_profile, tmp_path) -> CostTable:
    profile = make_profile()
    profile.save(tmp_path / "test-cpu.yaml")
    return CostTable(profile)


def test_cost_first_lookup_measures(costs):
    costs.latency(SPEC, "fp32")
    assert costs.measured == 1


def test_cost_first_lookup_adds_entry(costs):
    costs.latency(SPEC, "fp32")
    assert len(costs.profile.data["latency_table"]) == 1


def test_cost_second_lookup_reuses(costs):
    costs.latency(SPEC, "fp32")
    costs.latency(SPEC, "fp32")
    assert costs.measured == 1


def test_cost_second_lookup_counted(costs):
    costs.latency(SPEC, "fp32")
    costs.latency(SPEC, "fp32")
    assert costs.reused == 1


def test_cost_second_lookup_same_value(costs):
    assert costs.latency(SPEC, "fp32") == costs.latency(SPEC, "fp32")


def test_cost_precision_separate_entry(costs):
    costs.latency(SPEC, "fp32")
    costs.latency(SPEC, "int8")
    assert costs.measured == 2


def test_cost_flush_saves_profile(costs):
    costs.latency(SPEC, "fp32")
    costs.flush()
    assert len(load_profile(costs.profile.path).data["latency_table"]) == 1


def test_cost_reused_after_reload(costs):
    costs.latency(SPEC, "fp32")
    costs.flush()
    reloaded = CostTable(load_profile(costs.profile.path))
    reloaded.latency(SPEC, "fp32")
    assert reloaded.measured == 0


def test_cost_flush_marks_measured(costs):
    costs.latency(SPEC, "fp32")
    costs.flush()
    assert load_profile(costs.profile.path).data["measured"] is True


@pytest.fixture
def digits_layers(digits_model, example_inputs):
    return {layer.name: layer for layer in analyze(digits_model, example_inputs)}


@pytest.fixture
def digits_prunable(digits_model, example_inputs):
    return prunable_layers(digits_model, example_inputs)


def test_layer_spec_pruned_input(digits_layers, digits_prunable):
    spec = layer_spec(
        digits_layers["features.6"], 0.5, "dense", digits_prunable["features.3"], round_to=8
    )
    assert spec.input_shape == (1, 64, 8, 8)


def test_layer_spec_pruned_flatten_input(digits_layers, digits_prunable):
    # classifier.1 reads 256 channels x 2x2 positions, so keeping 128 channels leaves 512 inputs.
    spec = layer_spec(
        digits_layers["classifier.1"], 0.5, "dense", digits_prunable["features.10"], round_to=8
    )
    assert spec.input_shape == (1, 512)


def test_layer_spec_pruned_output(digits_layers):
    spec = layer_spec(digits_layers["features.6"], 1.0, "prune:0.25", None, round_to=8)
    assert spec.out_features == 32


def test_layer_spec_lowrank_option(digits_layers):
    spec = layer_spec(digits_layers["features.6"], 1.0, "lowrank:32", None, round_to=8)
    assert spec.option == "lowrank:32"


def test_candidate_ranks_useful(digits_model, digits_layers):
    module = digits_model.get_submodule("classifier.1")
    ranks = candidate_ranks(digits_layers["classifier.1"], module, SearchSpace())
    assert ranks == [48, 96, 152]


def test_plannable_producers_chain(digits_layers, digits_prunable):
    producers, input_from, _ = plannable_producers(list(digits_layers.values()), digits_prunable)
    assert input_from == {
        "features.3": "features.0",
        "features.6": "features.3",
        "features.10": "features.6",
        "classifier.1": "features.10",
        "classifier.4": "classifier.1",
    }


def test_layer_options_prune_and_int8(make_profile, digits_model, example_inputs):
    # Only the last two layers, with one keep ratio, so that few entries are measured.
    layers = analyze(digits_model, example_inputs)[-2:]
    prunable = {
        k: v
        for k, v in prunable_layers(digits_model, example_inputs).items()
        if k == "classifier.1"
    }
    space = SearchSpace(passes=("prune", "quantize"), keep_ratios=(0.5,))
    options, latency, _, _ = layer_options(
        digits_model, layers, prunable, space, CostTable(make_profile())
    )
    assert {o.struct for o in options["classifier.1"]} == {"dense", "prune:0.5"}
    assert {o.precision for o in options["classifier.4"]} == {"fp32", "int8"}
    assert ("classifier.4", 0.5, options["classifier.4"][0]) in latency
