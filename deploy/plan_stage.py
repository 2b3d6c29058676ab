"""Stages 2-4 of a run: analyze the model, price its layers' options, and plan variants.

The costs come from the device profile (missing entries are measured here
when the profile is this machine's), calibrated on the fp32 baseline and on
the baseline quantized whole, both profiled with ONNX Runtime. The planner
then sweeps latency budgets over the layers' options and their sensitivity.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path

import onnx

from deploy.analyze import analyze
from deploy.costs import CostTable, layer_options
from deploy.errors import DeployError
from deploy.latency_model import (
    ChainLayer,
    activation_bytes,
    calibrate,
    edge_savings,
    fit_gaps,
    fit_rates,
    output_values,
    outside_layers_share,
    plan_entries,
    predict_plan,
    runtime_int8,
    weight_bytes,
)
from deploy.measure import profile_rounds, time_sessions
from deploy.passes.prune import prunable_layers
from deploy.passes.quantize import QuantizeConfig
from deploy.planner import LayerChoices, Option, Plan, sweep
from deploy.power import latency_budgets_from_energy
from deploy.profiles import core_cache_bytes, local_profile_matches
from deploy.sensitivity import measure_sensitivity
from deploy.stages import Stage, progress_logger
from deploy.variants import calibration_feeds, quantize_layers
from exporters.onnx import (
    ExportError,
    layer_neighbours,
    layer_node_times,
    node_owners,
    node_profile,
    nodes_of_module,
    op_totals,
    unprofiled_op_times,
)
from exporters.timing import TimingProtocol

logger = logging.getLogger(__name__)


def plan_variants(
    original,
    profile,
    config,
    calibration,
    example_inputs,
    baseline,
    total,
    keep_float=frozenset(),
    baseline_path: Path | None = None,
    io_names: list[str] | None = None,
    protocol: TimingProtocol | None = None,
) -> dict:
    """Run stages 2-4 and return what ``plans.json`` holds: the plans and the calibration figures."""
    with Stage(2, total, "analyze"):
        layers = analyze(original, example_inputs)
        if not layers:
            raise DeployError(
                "the model has no Linear or Conv2d layer; deploy has nothing to optimize"
            )
        prunable = prunable_layers(original, example_inputs) if "prune" in config.passes else {}
        logger.info(
            "    %d layers, %.1fM multiply-adds, %.2f MB of parameters%s",
            len(layers),
            sum(x.macs for x in layers) / 1e6,
            sum(x.param_bytes for x in layers) / 1e6,
            f", {len(prunable)} prunable" if "prune" in config.passes else "",
        )

    with Stage(3, total, f"costs from device profile {profile.name}"):
        # A profile of another device cannot be measured here: its missing entries are interpolated.
        costs = CostTable(
            profile,
            measure=local_profile_matches(profile),
            quantization=config.quantize.method,
        )
        options, latency, input_from, passthrough = layer_options(
            original, layers, prunable, config.space, costs, progress=progress_logger("layer")
        )
        for name in keep_float:
            if name in options:
                options[name] = [o for o in options[name] if o.precision != "int8"]
        logger.info(
            "    %d entries measured%s, %d lookups answered by entries already in the profile",
            costs.measured,
            f" and saved to {profile.path}" if profile.path and costs.measured else "",
            costs.reused,
        )
        dense = Option("dense", "fp32")
        chain = [ChainLayer(x.name, input_from.get(x.name), x.name in passthrough) for x in layers]
        base_plan = {x.name: dense for x in layers}
        saved, _ = edge_savings(chain, base_plan, costs)
        base_weights = sum(weight_bytes(e) for e in plan_entries(chain, base_plan, costs))
        layer_sum = sum(latency[(x.name, 1.0, dense)] for x in layers) - saved
        call_ms = statistics.median(
            costs.entry_for(x.name, 1.0, dense).get("call_ms", 0.0) for x in layers
        )
        local = baseline_path is not None and local_profile_matches(profile)
        sample = dict(zip(io_names or [], [a[:1] for a in calibration], strict=False))
        base_ms = baseline["latency_ms"]["p50"]
        outside_share = 0.0
        neighbours = _neighbours(baseline_path, layers) if baseline_path is not None else None
        anchors: list[tuple[Path, dict]] = []
        profiled: list[list] = []
        if local:
            # The baseline and copies of it quantized whole and in alternating
            # runs of two layers, profiled side by side on this machine: each
            # layer's time inside a model at each precision, and the time
            # between layers in each precision context.
            anchors = _anchor_models(
                baseline_path, layers, options, config.quantize, io_names, calibration, neighbours
            )
            try:
                base_ms, profiled = profile_rounds(
                    [baseline_path, *(path for path, _ in anchors)],
                    sample,
                    protocol,
                    call_ms,
                    min_seconds=config.min_timing_s,
                )
            finally:
                for path, _ in anchors:
                    path.unlink(missing_ok=True)
            outside_share = outside_layers_share(
                {op: ms for op, (ms, _) in op_totals(profiled[0]).items()}
            )
        elif baseline_path is not None:
            # The baseline timed and profiled again beside the entries, in fresh
            # sessions, because its first timing may have met other load. The
            # share of its time in operators of no layer stays with every plan.
            # NOTE: measured on this machine, also when the profile is another device's.
            base_ms = time_sessions(baseline_path, sample, protocol).p50
            base_nodes = node_profile(baseline_path, sample, protocol.threads, runs=30)
            outside_share = outside_layers_share(
                unprofiled_op_times(op_totals(base_nodes), max(base_ms - call_ms, 0.0))
            )
        if baseline_path is not None:
            logger.info(
                "    baseline p50 %.3f ms beside the entries, %.1f%% of it outside the layers",
                base_ms,
                100 * outside_share,
            )
        # A profile of another device differs from this machine's baseline by
        # the two devices' speeds, not by load, so only this machine's warns.
        fit = calibrate(
            base_ms,
            layer_sum,
            call_ms,
            warn=local,
            outside_share=outside_share,
            weight_bytes=base_weights,
            cache_bytes=profile.data["device"].get("cache_bytes")
            or (core_cache_bytes() if local else None),
        )
        if local:
            fit = _fit_in_model(
                fit,
                profiled,
                [{x.name: "fp32" for x in layers}, *(precisions for _, precisions in anchors)],
                layers,
                costs,
            )
            # The rates tell a plan whose weights fit in the core's private
            # cache from the baseline only where the baseline's do not.
            cache = profile.data["device"].get("cache_bytes") or core_cache_bytes()
            if cache and base_weights > 2 * cache:
                fit = dataclasses.replace(fit, private_cache_bytes=cache)
            logger.info(
                "    in-model rates of %d of %d layers and the time between layers in %d "
                "contexts, from the fp32 baseline and %d quantized copies profiled side by side",
                len({key.split("|")[0] for key in fit.rates}),
                len(layers),
                len(fit.gap_ms),
                len(anchors),
            )
        fit = dataclasses.replace(
            fit, activation_bytes=activation_bytes(plan_entries(chain, base_plan, costs))
        )
        # With gaps profiled, a layer costs its compute and the planner prices
        # the gaps between layers by the precisions on their two sides.
        price = fit.compute_ms if fit.gap_ms else fit.layer_ms
        latency = {
            (name, keep, option): price(name, costs.entry_for(name, keep, option))
            for (name, keep, option) in latency
        }
        base_prediction = predict_plan(chain, base_plan, fit, costs)
        overhead = fit.call_ms if fit.gap_ms and fit.call_ms is not None else fit.overhead_ms

    with Stage(4, total, "sensitivity and plan"):
        sensitivity = measure_sensitivity(
            original,
            options,
            calibration,
            example_inputs,
            config.space.round_to,
            progress=progress_logger("sensitivity"),
            reduce_range=bool(config.quantize.reduce_range),
        )
        choices = [
            LayerChoices(
                name=x.name,
                input_from=input_from.get(x.name),
                passthrough=x.name in passthrough,
                options=options[x.name],
                latency_ms={(k, o): v for (n, k, o), v in latency.items() if n == x.name},
                distortion=sensitivity[x.name],
                **_gap_costs(fit, layers, options, i),
            )
            for i, x in enumerate(layers)
        ]
        budgets_ms = config.budgets_ms
        if config.budgets_mj:
            budgets_ms = (budgets_ms or []) + latency_budgets_from_energy(
                profile.data["power"], profile.data["latency_table"], config.budgets_mj
            )
        plans = sweep(
            choices, overhead, baseline["latency_ms"]["p50"], config.num_budgets, budgets_ms
        )
        plans = [p for p in plans if any(o != dense for o in p.layers.values())]
        plans = _int8_islands(plans, choices, neighbours, config.quantize.method)
        for plan in plans:
            prediction = predict_plan(
                choices, plan.layers, fit, costs, neighbours, config.quantize.method
            )
            plan.predicted_latency_ms = prediction.latency_ms
            plan.prediction = prediction.to_dict()
        if not plans:
            faster = any(
                value < layer.latency_ms.get((keep, dense), float("inf"))
                for layer in choices
                for (keep, option), value in layer.latency_ms.items()
                if option != dense
            )
            if not faster:
                raise DeployError(
                    f"no option of the passes {', '.join(config.passes)} makes any layer "
                    f"faster than fp32 on device profile {profile.name!r}: its latency "
                    f"table has every option at least as slow as the dense fp32 layer "
                    f"(int8 is no faster than fp32 on CPUs without VNNI); add prune or "
                    f"lowrank with --passes"
                )
            raise DeployError(
                "no plan other than the fp32 baseline fits the budgets; raise --budget-ms "
                "or allow more passes with --passes"
            )
        logger.info(
            "    %d distinct plans, predicted %.3f to %.3f ms",
            len(plans),
            plans[0].predicted_latency_ms,
            plans[-1].predicted_latency_ms,
        )
    return {
        "overhead_ms": overhead,
        "baseline_predicted_ms": base_prediction.latency_ms,
        "outside_layers_share": outside_share,
        # What the latency model was fitted to, for 'deploy profile --check' and for reading
        # a prediction back to its parts.
        "calibration": dataclasses.asdict(fit),
        "plans": [p.to_dict() for p in plans],
    }


def _int8_islands(plans: list[Plan], choices, neighbours, method: str) -> list[Plan]:
    # ONNX Runtime quantizes a float layer directly between two int8 layers
    # with per-tensor weights when it loads a QDQ file (runtime_int8). That
    # path is far slower than per-channel int8: 1.4 ms against 0.26 ms for a
    # 240-channel 5x5 depthwise conv at 28 x 28 on an AVX-512 Xeon. So such a
    # layer is made per-channel int8 instead where int8 is one of its options.
    # A layer that must stay float (--keep-float) makes its neighbour after
    # it, or else before it, float instead.
    by_name = {c.name: c for c in choices}
    changed = 0
    result: dict[tuple, Plan] = {}

    for plan in plans:
        layers = dict(plan.layers)
        # Each round only adds int8 between int8 layers or float beside a
        # float layer, so it settles; the bound is a guard.
        for _ in range(2 * len(layers) + 1):
            changes = {}
            for name in runtime_int8(layers, neighbours, method):
                int8 = dataclasses.replace(layers[name], precision="int8")
                if int8 in by_name[name].options:
                    changes[name] = int8
                    continue
                for side in reversed(neighbours[name]):
                    fp32 = dataclasses.replace(layers[side], precision="fp32")
                    if fp32 in by_name[side].options:
                        changes[side] = fp32
                        break
            if not changes:
                break
            layers.update(changes)

        if layers != plan.layers:
            changed += 1
            distortion = sum(by_name[n].distortion[o] for n, o in layers.items())
            plan = dataclasses.replace(plan, layers=layers, predicted_distortion=distortion)
        result.setdefault(plan.signature(), plan)
    if changed:
        logger.info(
            "    %d plan(s) put float layers between int8 layers, which ONNX Runtime would run in "
            "per-tensor int8; those layers are per-channel int8 instead, or a neighbour of a "
            "layer kept in float is float too",
            changed,
        )
    return sorted(result.values(), key=lambda p: p.predicted_latency_ms)


def _anchor_models(
    baseline_path: Path, layers, options, quantize: QuantizeConfig, names, calibration, neighbours
) -> list[tuple[Path, dict]]:
    # Copies of the baseline quantized whole and, for static int8, in
    # alternating runs of two fp32 and two int8 layers at each of the four
    # offsets: every gap between two layers is then profiled in each of its
    # four precision contexts. Returns each file with each layer's precision
    # as ONNX Runtime runs it (runtime_int8). Quantizing that fails leaves
    # a copy out.
    can_int8 = [x.name for x in layers if Option("dense", "int8") in options[x.name]]
    if not can_int8:
        return []

    patterns = [set(can_int8)]
    if quantize.method == "static" and len(layers) > 2:
        for offset in range(4):
            chosen = {
                x.name for k, x in enumerate(layers) if (k + offset) % 4 >= 2 and x.name in can_int8
            }
            if chosen and chosen not in patterns:
                patterns.append(chosen)

    feeds = (
        calibration_feeds(names, [a[:16] for a in calibration])
        if quantize.method == "static"
        else None
    )
    dense = Option("dense", "fp32")
    models = []

    for k, chosen in enumerate(patterns):
        path = baseline_path.with_name(f"baseline.anchor{k}.onnx")
        plan = {x.name: Option("dense", "int8") if x.name in chosen else dense for x in layers}
        try:
            quantize_layers(baseline_path, path, sorted(chosen), quantize, feeds)
        except ExportError as exc:
            logger.info("    a quantized copy of the baseline is left out: %s", exc)
            continue
        runs_int8 = chosen | runtime_int8(plan, neighbours, quantize.method)
        models.append((path, {x.name: "int8" if x.name in runs_int8 else "fp32" for x in layers}))
    return models


def _fit_in_model(fit, profiled, precisions_of, layers, costs):
    # Rates: each layer's time in the fp32 baseline and in the copy quantized
    # whole over its entry's compute. Gaps: the nodes of no layer of every
    # profiled model, by the precisions around them. ``precisions_of`` is
    # each profiled model's layer precisions, the fp32 baseline first.
    names = [x.name for x in layers]
    dense = Option("dense", "fp32")
    owners = [node_owners(nodes, names) for nodes in profiled]

    rates = {}
    for precisions, nodes in list(zip(precisions_of, profiled, strict=True))[:2]:
        precision = "int8" if "int8" in precisions.values() else "fp32"
        in_model = layer_node_times(nodes, names, sum(ms for *_, ms in nodes))
        entries = {
            name: costs.entry_for(name, 1.0, Option("dense", precision))
            for name in names
            if precisions[name] == precision
        }
        rates.update(fit_rates(in_model, entries, precision))

    order = list(dict.fromkeys(owner for owner in owners[0] if owner is not None))
    gap_ms, gap_next = fit_gaps(
        [
            (nodes, own, precisions)
            for nodes, own, precisions in zip(profiled, owners, precisions_of, strict=True)
        ],
        order,
    )
    values = {name: output_values(costs.entry_for(name, 1.0, dense)) for name in names}
    return dataclasses.replace(
        fit,
        rates=rates,
        gap_ms=gap_ms,
        gap_next=gap_next,
        gap_values={name: v for name, v in values.items() if v},
    )


def _gap_costs(fit, layers, options, i: int) -> dict:
    # The planner's gap_ms before layer i and, for the last layer, its tail_ms.
    if not fit.gap_ms:
        return {}
    name = layers[i].name
    precisions = {o.precision for o in options[name]}
    before = layers[i - 1].name if i else ""
    earlier = {o.precision for o in options[before]} if before else {"io"}
    costs = {
        "gap_ms": {
            (a, b): fit.gap(before, a, b) for a in sorted(earlier) for b in sorted(precisions)
        }
    }
    if i == len(layers) - 1:
        costs["tail_ms"] = {b: fit.gap(name, b, "io") for b in sorted(precisions)}
    return costs


def _neighbours(path: Path, layers) -> dict:
    # Each layer's direct neighbours in the float graph, for layers with one Conv or Gemm node.
    proto = onnx.load(str(path))
    layer_nodes = {}
    for layer in layers:
        found = nodes_of_module(proto, layer.name, ("Conv", "Gemm"))
        if len(found) == 1:
            layer_nodes[layer.name] = found[0]
    return layer_neighbours(proto, layer_nodes)
