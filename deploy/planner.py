"""The planner: one option per layer for each budget, by dynamic programming.

Each layer has options (a structural choice: ``dense``, ``prune:K`` or
``lowrank:R``, crossed with a precision: ``fp32`` or ``int8``), each with a
predicted latency from the device profile and a distortion from the
sensitivity analysis. Distortion is close to additive across layers, so the
plan that minimizes summed distortion within a latency budget is found by a
dynamic program over the layers, with latency discretized into bins.

Pruning a layer's output channels also shrinks the input of the layer that
consumes them, so the DP carries the open producer's keep fraction as its
state: a consumer's latency depends on it. The planner never runs a model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deploy.errors import DeployError


@dataclasses.dataclass(frozen=True)
class Option:
    """One choice for one layer: a structural option and a precision."""

    struct: str  # "dense", "prune:0.5" (keep half the output channels) or "lowrank:32"
    precision: str  # "fp32" or "int8"

    @property
    def keep(self) -> float:
        return float(self.struct.split(":")[1]) if self.struct.startswith("prune:") else 1.0

    def to_dict(self) -> dict:
        return {"option": self.struct, "precision": self.precision}


@dataclasses.dataclass
class LayerChoices:
    """The options of one layer with their costs.

    Attributes:
        name: the layer's PyTorch module name.
        input_from: the prunable producer whose keep fraction sets this
            layer's input channels, or None.
        passthrough: True for a depthwise layer whose channels follow its input.
        options: every option of the layer.
        latency_ms: predicted latency of (input keep, option).
        distortion: predicted output distortion of each option.
    """

    name: str
    input_from: str | None
    passthrough: bool
    options: list[Option]
    latency_ms: dict[tuple[float, Option], float]
    distortion: dict[Option, float]

    def input_keeps(self) -> list[float]:
        return sorted({keep for keep, _ in self.latency_ms}, reverse=True)


@dataclasses.dataclass
class Plan:
    """One option per layer, with the planner's predictions."""

    layers: dict[str, Option]
    predicted_latency_ms: float
    predicted_distortion: float
    budget_ms: float | None = None
    # The latency model's breakdown of predicted_latency_ms (latency_model.Prediction.to_dict()).
    prediction: dict | None = None

    def signature(self) -> tuple:
        return tuple(sorted((k, v.struct, v.precision) for k, v in self.layers.items()))

    def to_dict(self) -> dict:
        return {
            "layers": {name: option.to_dict() for name, option in self.layers.items()},
            "predicted_latency_ms": self.predicted_latency_ms,
            "predicted_distortion": self.predicted_distortion,
            "budget_ms": self.budget_ms,
            "prediction": self.prediction,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        layers = {k: Option(v["option"], v["precision"]) for k, v in data["layers"].items()}
        return cls(
            layers,
            data["predicted_latency_ms"],
            data["predicted_distortion"],
            data.get("budget_ms"),
            data.get("prediction"),
        )

    def describe(self) -> str:
        """Summarize the plan, for example ``prune x2, lowrank x1, int8 x5``."""
        counts: dict[str, int] = {}
        for option in self.layers.values():
            kind = option.struct.split(":")[0]
            if kind != "dense":
                counts[kind] = counts.get(kind, 0) + 1
            if option.precision != "fp32":
                counts[option.precision] = counts.get(option.precision, 0) + 1
        # A fixed order, so that equal plans read alike.
        order = {"prune": 0, "lowrank": 1}
        kinds = sorted(counts, key=lambda k: (order.get(k, 2), k))
        return ", ".join(f"{k} x{counts[k]}" for k in kinds) or "fp32 baseline"


def _keep_states(layers: list[LayerChoices]) -> list[float]:
    keeps = {1.0}
    for layer in layers:
        keeps.update(o.keep for o in layer.options)
    return sorted(keeps, reverse=True)


def _out_keep(layer: LayerChoices, in_keep: float, option: Option) -> float:
    return in_keep if layer.passthrough else option.keep


def predict(
    layers: list[LayerChoices], choice: dict[str, Option], overhead_ms: float
) -> tuple[float, float]:
    """Return (latency_ms, distortion) the costs predict for one option per layer."""
    latency, distortion, keep = overhead_ms, 0.0, 1.0
    for layer in layers:
        option = choice[layer.name]
        in_keep = keep if layer.input_from is not None else 1.0
        latency += layer.latency_ms[(in_keep, option)]
        distortion += layer.distortion[option]
        keep = _out_keep(layer, in_keep, option)
    return latency, distortion


def plan_for_budget(
    layers: list[LayerChoices], budget_ms: float, overhead_ms: float, bins: int = 400
) -> Plan | None:
    """Return the plan with the least summed distortion whose predicted latency fits ``budget_ms``.

    Returns None when no plan fits. Latencies are rounded up to bins of
    ``(budget_ms - overhead_ms) / bins``, so a returned plan always fits.
    """
    available = budget_ms - overhead_ms
    if available <= 0:
        return None
    unit = available / bins
    keeps = _keep_states(layers)
    index = {k: i for i, k in enumerate(keeps)}
    inf = math.inf
    # best[s, b]: least distortion so far with open keep state s and total cost <= b bins.
    best = np.full((len(keeps), bins + 1), inf)
    best[index[1.0], :] = 0.0
    back = []  # per layer: (state, bin) -> (previous state, option index, cost)
    for layer in layers:
        new = np.full_like(best, inf)
        choice = np.full(best.shape, -1, dtype=np.int64)
        source = np.full(best.shape, -1, dtype=np.int64)
        for in_keep in layer.input_keeps():
            s = index[in_keep]
            if not np.isfinite(best[s]).any():
                continue
            for o, option in enumerate(layer.options):
                cost = math.ceil(layer.latency_ms[(in_keep, option)] / unit - 1e-9)
                if cost > bins:
                    continue
                t = index[_out_keep(layer, in_keep, option)]
                shifted = np.full(bins + 1, inf)
                shifted[cost:] = best[s, : bins + 1 - cost] + layer.distortion[option]
                better = shifted < new[t]
                new[t][better] = shifted[better]
                choice[t][better] = o
                source[t][better] = s
        back.append((choice, source))
        best = new
    final = best[:, bins]
    if not np.isfinite(final).any():
        return None
    state, remaining = int(np.argmin(final)), bins
    chosen: dict[str, Option] = {}
    for layer, (choice, source) in zip(reversed(layers), reversed(back), strict=True):
        o, previous = int(choice[state, remaining]), int(source[state, remaining])
        option = layer.options[o]
        chosen[layer.name] = option
        in_keep = keeps[previous]
        remaining -= math.ceil(layer.latency_ms[(in_keep, option)] / unit - 1e-9)
        state = previous
    chosen = {layer.name: chosen[layer.name] for layer in layers}
    latency, distortion = predict(layers, chosen, overhead_ms)
    return Plan(chosen, latency, distortion, budget_ms)


def fastest_latency(layers: list[LayerChoices], overhead_ms: float) -> float:
    """Return the least predicted latency any plan reaches."""
    keeps = _keep_states(layers)
    best = {1.0: overhead_ms}
    for layer in layers:
        new: dict[float, float] = {}
        for in_keep, so_far in best.items():
            if layer.input_from is None and in_keep != 1.0:
                continue
            for option in layer.options:
                key = (in_keep if layer.input_from is not None else 1.0, option)
                t = _out_keep(layer, key[0], option)
                total = so_far + layer.latency_ms[key]
                if total < new.get(t, math.inf):
                    new[t] = total
        best = new
    del keeps
    return min(best.values())


def sweep(
    layers: list[LayerChoices],
    overhead_ms: float,
    baseline_ms: float,
    count: int = 10,
    budgets_ms: list[float] | None = None,
) -> list[Plan]:
    """Plan for a sweep of latency budgets; return the distinct plans, fastest first.

    Without ``budgets_ms`` the budgets are spaced geometrically from the
    fastest reachable latency to the baseline's.

    Raises:
        DeployError: a requested budget is below what any plan can reach.
    """
    fastest = fastest_latency(layers, overhead_ms)
    top = max(baseline_ms, fastest * 1.01)
    automatic = budgets_ms is None
    if automatic:
        budgets_ms = list(np.geomspace(fastest * 1.001, top, count))
    else:
        bad = [b for b in budgets_ms if not (math.isfinite(b) and b > 0)]
        if bad:
            raise DeployError(
                f"latency budget {bad[0]} ms is not a positive number of milliseconds"
            )
        impossible = [b for b in budgets_ms if b < fastest]
        if impossible:
            raise DeployError(
                f"latency budget {min(impossible):g} ms is below the fastest plan this device "
                f"profile predicts ({fastest:.3f} ms); raise the budget to at least {fastest:.3f} ms"
            )
    plans: dict[tuple, Plan] = {}
    for budget in sorted(budgets_ms):
        plan = plan_for_budget(layers, float(budget), overhead_ms)
        # The planner rounds each layer's latency up to its bin, so a budget
        # just above the fastest plan can fit nothing. In a sweep, raise such
        # a budget 2% at a time until a plan fits.
        while automatic and plan is None and budget < top:
            budget = min(budget * 1.02, top)
            plan = plan_for_budget(layers, float(budget), overhead_ms)
        if plan is not None and plan.signature() not in plans:
            plans[plan.signature()] = plan
    return sorted(plans.values(), key=lambda p: p.predicted_latency_ms)
