"""The planner: one option per layer for each budget, by dynamic programming.

Each layer has options (a structural choice: ``dense``, ``prune:K`` or
``lowrank:R``, crossed with a precision: ``fp32`` or ``int8``), each with a
predicted latency from the device profile and a distortion from the
sensitivity analysis. Distortion is close to additive across layers, so the
plan that minimizes summed distortion within a latency budget is found by a
dynamic program over the layers, with latency discretized into bins.

Pruning a layer's output channels also shrinks the input of the layer that
consumes them, so the DP carries the open producer's keep fraction as its
state: a consumer's latency depends on it. It also carries the previous
layer's precision, because what runs between two layers (conversions, and
pools that change kernels with the precision around them) costs what it
costs in that context (``LayerChoices.gap_ms``). The planner never runs a
model.
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
        gap_ms: the time between the previous layer and this one, keyed
            by (previous precision, this precision); "io" stands for the
            model's input. It scales with the previous layer's output keep.
            Defaults to none: nothing between layers.
        tail_ms: after the last layer, the time to the model's output,
            keyed by its precision. Defaults to none.
    """

    name: str
    input_from: str | None
    passthrough: bool
    options: list[Option]
    latency_ms: dict[tuple[float, Option], float]
    distortion: dict[Option, float]
    gap_ms: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    tail_ms: dict[str, float] = dataclasses.field(default_factory=dict)

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


def _precisions(layers: list[LayerChoices]) -> list[str]:
    return ["io", *sorted({o.precision for layer in layers for o in layer.options})]


def _step_ms(layer: LayerChoices, in_keep: float, before: str, option: Option, last: bool) -> float:
    # The layer at this option, the gap before it, and after the last layer the gap to the output.
    ms = (
        layer.latency_ms[(in_keep, option)]
        + layer.gap_ms.get((before, option.precision), 0.0) * in_keep
    )
    if last:
        ms += layer.tail_ms.get(option.precision, 0.0) * _out_keep(layer, in_keep, option)
    return ms


def predict(
    layers: list[LayerChoices], choice: dict[str, Option], overhead_ms: float
) -> tuple[float, float]:
    """Return (latency_ms, distortion) the costs predict for one option per layer."""
    latency, distortion, keep, before = overhead_ms, 0.0, 1.0, "io"
    for k, layer in enumerate(layers):
        option = choice[layer.name]
        in_keep = keep if layer.input_from is not None else 1.0
        latency += _step_ms(layer, in_keep, before, option, k == len(layers) - 1)
        distortion += layer.distortion[option]
        keep, before = _out_keep(layer, in_keep, option), option.precision
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
    precisions = _precisions(layers)
    width = len(precisions)
    index = {
        (keep, precision): i * width + j
        for i, keep in enumerate(keeps)
        for j, precision in enumerate(precisions)
    }
    inf = math.inf
    # best[s, b]: least distortion so far in state s (the open keep and the
    # previous layer's precision) with total cost <= b bins.
    best = np.full((len(index), bins + 1), inf)
    best[index[(1.0, "io")], :] = 0.0
    back = []  # per layer: (state, bin) -> (option index, previous state)
    for k, layer in enumerate(layers):
        last = k == len(layers) - 1
        new = np.full_like(best, inf)
        choice = np.full(best.shape, -1, dtype=np.int64)
        source = np.full(best.shape, -1, dtype=np.int64)
        for in_keep in layer.input_keeps():
            for before in precisions:
                s = index[(in_keep, before)]
                if not np.isfinite(best[s]).any():
                    continue
                for o, option in enumerate(layer.options):
                    ms = _step_ms(layer, in_keep, before, option, last)
                    cost = math.ceil(ms / unit - 1e-9)
                    if cost > bins:
                        continue
                    t = index[(_out_keep(layer, in_keep, option), option.precision)]
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
    for k in reversed(range(len(layers))):
        layer, (choice, source) = layers[k], back[k]
        o, previous = int(choice[state, remaining]), int(source[state, remaining])
        option = layer.options[o]
        chosen[layer.name] = option
        in_keep, before = keeps[previous // width], precisions[previous % width]
        ms = _step_ms(layer, in_keep, before, option, k == len(layers) - 1)
        remaining -= math.ceil(ms / unit - 1e-9)
        state = previous
    chosen = {layer.name: chosen[layer.name] for layer in layers}
    latency, distortion = predict(layers, chosen, overhead_ms)
    return Plan(chosen, latency, distortion, budget_ms)


def fastest_latency(layers: list[LayerChoices], overhead_ms: float) -> float:
    """Return the least predicted latency any plan reaches."""
    best = {(1.0, "io"): overhead_ms}
    for k, layer in enumerate(layers):
        last = k == len(layers) - 1
        new: dict[tuple[float, str], float] = {}
        for (keep, before), so_far in best.items():
            if layer.input_from is None and keep != 1.0:
                continue
            in_keep = keep if layer.input_from is not None else 1.0
            for option in layer.options:
                state = (_out_keep(layer, in_keep, option), option.precision)
                total = so_far + _step_ms(layer, in_keep, before, option, last)
                if total < new.get(state, math.inf):
                    new[state] = total
        best = new
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
