import itertools

import numpy as np
import pytest

from deploy.errors import DeployError
from deploy.planner import LayerChoices, Option, Plan, fastest_latency, plan_for_budget, sweep

# Latencies are multiples of this step, and budgets are whole milliseconds with
# no overhead, so the planner's bins (budget / (budget / STEP)) are exact and its
# result must equal the brute-force optimum.
STEP = 0.25

DENSE = Option("dense", "fp32")
DENSE_INT8 = Option("dense", "int8")
PRUNE = Option("prune:0.5", "fp32")
PRUNE_INT8 = Option("prune:0.5", "int8")
LOWRANK = Option("lowrank:4", "fp32")
LOWRANK_INT8 = Option("lowrank:4", "int8")


def _steps(rng, low: int, high: int) -> float:
    return float(rng.integers(low, high)) * STEP


def _distortions(rng, latency: dict[Option, float]) -> dict[Option, float]:
    # Faster options distort more, as on a real model, so that budgets bind.
    slowest = max(latency.values())
    return {
        o: (slowest - t) * rng.uniform(0.5, 1.5) + rng.uniform(0, 0.1) for o, t in latency.items()
    }


def synthetic_layers(seed: int) -> list[LayerChoices]:
    """Three layers: ``a`` can be pruned, ``b`` consumes its channels, ``c`` has no producer.

    ``b`` runs faster when ``a`` keeps half its channels, so the planner must
    carry ``a``'s choice into ``b``'s latency.
    """
    rng = np.random.default_rng(seed)
    a_latency = {o: _steps(rng, 2, 12) for o in (DENSE, DENSE_INT8, PRUNE, PRUNE_INT8)}
    b_full = {o: _steps(rng, 4, 16) for o in (DENSE, DENSE_INT8, LOWRANK, LOWRANK_INT8)}
    b_latency = {}
    for option, full in b_full.items():
        b_latency[(1.0, option)] = full
        b_latency[(0.5, option)] = full - _steps(rng, 1, 4)
    c_latency = {o: _steps(rng, 2, 12) for o in (DENSE, DENSE_INT8)}
    return [
        LayerChoices(
            "a",
            None,
            False,
            list(a_latency),
            {(1.0, o): t for o, t in a_latency.items()},
            _distortions(rng, a_latency),
        ),
        LayerChoices("b", "a", False, list(b_full), b_latency, _distortions(rng, b_full)),
        LayerChoices(
            "c",
            None,
            False,
            list(c_latency),
            {(1.0, o): t for o, t in c_latency.items()},
            _distortions(rng, c_latency),
        ),
    ]


def brute_force(layers: list[LayerChoices], overhead_ms: float = 0.0):
    """Yield (latency, distortion, choice) for every combination of options."""
    by_name = {layer.name: layer for layer in layers}
    for combination in itertools.product(*(layer.options for layer in layers)):
        choice = dict(zip(by_name, combination, strict=True))
        latency, distortion = overhead_ms, 0.0
        for layer in layers:
            option = choice[layer.name]
            in_keep = choice[layer.input_from].keep if layer.input_from else 1.0
            latency += layer.latency_ms[(in_keep, option)]
            distortion += layer.distortion[option]
        yield latency, distortion, choice


def best_within(layers, budget_ms: float):
    fitting = [c for c in brute_force(layers) if c[0] <= budget_ms + 1e-9]
    return min(fitting, key=lambda c: c[1]) if fitting else None


def budget_at(layers, fraction: float) -> float:
    """Return a budget ``fraction`` of the way from the fastest plan to the least-distortion plan.

    The budget is rounded to a multiple of STEP. A negative fraction gives a budget below the
    fastest plan.
    """
    combinations = list(brute_force(layers))
    fastest = min(c[0] for c in combinations)
    free = min(combinations, key=lambda c: c[1])[0]
    return max(round((fastest + fraction * (free - fastest)) / STEP), 1) * STEP


FRACTIONS = (-0.2, 0.0, 0.25, 0.5, 0.75, 1.0)
CASES = [(seed, fraction) for seed in range(8) for fraction in FRACTIONS]
CASE_IDS = [f"seed{s}-at{f:g}" for s, f in CASES]


@pytest.mark.parametrize(("seed", "fraction"), CASES, ids=CASE_IDS)
def test_plan_matches_brute_force(seed, fraction):
    layers = synthetic_layers(seed)
    budget = budget_at(layers, fraction)
    expected = best_within(layers, budget)
    plan = plan_for_budget(layers, budget, 0.0, bins=round(budget / STEP))
    if expected is None:
        assert plan is None
    else:
        assert plan.predicted_distortion == pytest.approx(expected[1])


@pytest.mark.parametrize(("seed", "fraction"), CASES, ids=CASE_IDS)
def test_plan_fits_budget(seed, fraction):
    layers = synthetic_layers(seed)
    budget = budget_at(layers, fraction)
    plan = plan_for_budget(layers, budget, 0.0, bins=round(budget / STEP))
    assert plan is None or plan.predicted_latency_ms <= budget + 1e-9


@pytest.mark.parametrize("seed", range(8), ids=[f"seed{s}" for s in range(8)])
def test_plan_predictions_consistent(seed):
    # The plan's own figures must be those of its options, recomputed independently.
    layers = synthetic_layers(seed)
    budget = budget_at(layers, 0.5)
    plan = plan_for_budget(layers, budget, 0.0, bins=round(budget / STEP))
    matches = [c for c in brute_force(layers) if c[2] == plan.layers]
    latency, distortion, _ = matches[0]
    assert (plan.predicted_latency_ms, plan.predicted_distortion) == pytest.approx(
        (latency, distortion)
    )


@pytest.mark.parametrize("seed", range(8), ids=[f"seed{s}" for s in range(8)])
def test_plan_default_bins_fits(seed):
    # Rounding latencies up to bins may cost optimality but never the budget.
    plan = plan_for_budget(synthetic_layers(seed), 17.3, 0.4)
    assert plan is None or plan.predicted_latency_ms <= 17.3


@pytest.mark.parametrize("seed", range(8), ids=[f"seed{s}" for s in range(8)])
def test_fastest_latency_brute_force(seed):
    layers = synthetic_layers(seed)
    expected = min(c[0] for c in brute_force(layers, 0.5))
    assert fastest_latency(layers, 0.5) == pytest.approx(expected)


def producer_consumer_layers() -> list[LayerChoices]:
    """Pruning ``a`` saves 0.25 ms on ``a`` itself but 2 ms on its consumer ``b``."""
    return [
        LayerChoices(
            "a",
            None,
            False,
            [DENSE, PRUNE],
            {(1.0, DENSE): 2.0, (1.0, PRUNE): 1.75},
            {DENSE: 0.0, PRUNE: 0.3},
        ),
        LayerChoices(
            "b",
            "a",
            False,
            [DENSE, LOWRANK],
            {(1.0, DENSE): 4.0, (1.0, LOWRANK): 3.0, (0.5, DENSE): 2.0, (0.5, LOWRANK): 1.5},
            {DENSE: 0.0, LOWRANK: 0.2},
        ),
    ]


def test_plan_prunes_producer_for_consumer():
    # Budget 4 ms: low-rank b alone gives 5 ms, so only pruning a (1.75 + 2.0) fits.
    plan = plan_for_budget(producer_consumer_layers(), 4.0, 0.0, bins=16)
    assert plan.layers == {"a": PRUNE, "b": DENSE}


def test_plan_predicted_latency_uses_pruned_input():
    plan = plan_for_budget(producer_consumer_layers(), 4.0, 0.0, bins=16)
    assert plan.predicted_latency_ms == pytest.approx(3.75)


def test_plan_loose_budget_keeps_dense():
    plan = plan_for_budget(producer_consumer_layers(), 10.0, 0.0)
    assert plan.layers == {"a": DENSE, "b": DENSE}


def test_plan_overhead_above_budget():
    assert plan_for_budget(producer_consumer_layers(), 1.0, 2.0) is None


def test_sweep_plans_distinct():
    plans = sweep(synthetic_layers(0), 0.0, baseline_ms=40.0, count=12)
    signatures = [plan.signature() for plan in plans]
    assert len(signatures) == len(set(signatures))


def test_sweep_several_plans():
    assert len(sweep(synthetic_layers(0), 0.0, baseline_ms=40.0, count=12)) >= 3


def test_sweep_fastest_first():
    plans = sweep(synthetic_layers(0), 0.0, baseline_ms=40.0, count=12)
    latencies = [plan.predicted_latency_ms for plan in plans]
    assert latencies == sorted(latencies)


def test_sweep_explicit_budgets():
    plans = sweep(producer_consumer_layers(), 0.0, 6.0, budgets_ms=[3.5, 6.0])
    assert [plan.budget_ms for plan in plans] == [3.5, 6.0]


def test_sweep_impossible_budget_raises():
    with pytest.raises(DeployError, match="below the fastest plan"):
        sweep(producer_consumer_layers(), 0.1, 6.0, budgets_ms=[1.0])


def test_sweep_impossible_budget_names_fastest():
    # Fastest: a pruned (1.75) + b lowrank on pruned input (1.5) + overhead 0.1.
    with pytest.raises(DeployError, match=r"3\.350 ms"):
        sweep(producer_consumer_layers(), 0.1, 6.0, budgets_ms=[1.0])


@pytest.mark.parametrize("budget", [0.0, -1.0, float("nan")], ids=["zero", "negative", "nan"])
def test_sweep_rejects_bad_budget(budget):
    with pytest.raises(DeployError, match="not a positive number"):
        sweep(producer_consumer_layers(), 0.0, 6.0, budgets_ms=[budget])


def test_plan_round_trip():
    plan = plan_for_budget(producer_consumer_layers(), 4.0, 0.0, bins=16)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_describe():
    plan = Plan({"a": PRUNE, "b": LOWRANK_INT8, "c": DENSE_INT8}, 1.0, 0.1)
    assert plan.describe() == "prune x1, lowrank x1, int8 x2"


def test_plan_describe_fixed_order():
    plan = Plan({"a": DENSE_INT8, "b": LOWRANK_INT8, "c": PRUNE}, 1.0, 0.1)
    assert plan.describe() == "prune x1, lowrank x1, int8 x2"


def test_plan_describe_baseline():
    assert Plan({"a": DENSE}, 1.0, 0.0).describe() == "fp32 baseline"


def _many_layers(count: int) -> list[LayerChoices]:
    # Latencies that fall between the planner's bins, as measured ones do.
    rng = np.random.default_rng(0)
    layers = []
    for i in range(count):
        fast = float(rng.uniform(0.1, 0.4))
        layers.append(
            LayerChoices(
                f"l{i}",
                None,
                False,
                [DENSE, LOWRANK],
                {(1.0, DENSE): fast + float(rng.uniform(0.5, 1.0)), (1.0, LOWRANK): fast},
                {DENSE: 0.0, LOWRANK: 0.01},
            )
        )
    return layers


def test_sweep_many_layers_near_fastest():
    layers = _many_layers(50)
    fastest = sum(layer.latency_ms[(1.0, LOWRANK)] for layer in layers)
    baseline = sum(layer.latency_ms[(1.0, DENSE)] for layer in layers)
    plans = sweep(layers, 0.0, baseline_ms=baseline, count=2)
    assert plans[0].predicted_latency_ms < fastest * 1.15


def _two_layers_with_gaps() -> list[LayerChoices]:
    fp32, int8 = Option("dense", "fp32"), Option("dense", "int8")
    layers = [
        LayerChoices(
            name,
            None,
            False,
            [fp32, int8],
            {(1.0, fp32): 1.0, (1.0, int8): 0.6},
            {fp32: 0.0, int8: 0.1},
        )
        for name in ("a", "b")
    ]
    # Going from fp32 into int8 before b costs 1 ms; every other context is free.
    layers[1].gap_ms = {("fp32", "int8"): 1.0}
    layers[1].tail_ms = {"int8": 0.05}
    return layers


def test_plan_avoids_a_costly_precision_change():
    layers = _two_layers_with_gaps()
    plan = plan_for_budget(layers, budget_ms=1.7, overhead_ms=0.0)
    # int8 then fp32 (1.6 ms) fits; fp32 then int8 would take 2.65 ms.
    assert plan.layers == {"a": Option("dense", "int8"), "b": Option("dense", "fp32")}
    assert plan.predicted_latency_ms == pytest.approx(1.6)
    assert plan.predicted_distortion == pytest.approx(0.1)


def test_fastest_latency_counts_gaps_and_tail():
    layers = _two_layers_with_gaps()
    # Both int8: 0.6 + 0.6, plus 0.05 from the last int8 layer to the output.
    assert fastest_latency(layers, 0.0) == pytest.approx(1.25)
