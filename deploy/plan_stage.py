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
    fit_rates,
    outside_layers_share,
    plan_entries,
    predict_plan,
    runtime_int8,
    weight_bytes,
)
from deploy.measure import time_sessions
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
        base_nodes = None
        if baseline_path is not None:
            # The baseline timed and profiled again beside the entries, in fresh
            # sessions, because its first timing may have met other load. The
            # share of its time in operators of no layer stays with every plan.
            # NOTE: measured on this machine, also when the profile is another device's.
            base_ms = time_sessions(baseline_path, sample, protocol).p50
            base_nodes = node_profile(baseline_path, sample, protocol.threads, runs=30)
            outside_share = outside_layers_share(
                unprofiled_op_times(op_totals(base_nodes), max(base_ms - call_ms, 0.0))
            )
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
        int8_plan = {
            x.name: Option("dense", "int8") if Option("dense", "int8") in options[x.name] else dense
            for x in layers
        }
        names_in_order = [x.name for x in layers]
        if local:
            # How fast each layer computes inside the fp32 baseline, from ONNX
            # Runtime's profiler. Only meaningful where the profile is this machine's.
            in_model = layer_node_times(base_nodes, names_in_order, max(base_ms - call_ms, 0.0))
            entries = {x.name: costs.entry_for(x.name, 1.0, dense) for x in layers}
            fit = dataclasses.replace(fit, rates=fit_rates(in_model, entries, "fp32"))
        # The baseline quantized whole is measured on this machine, so it
        # calibrates a profile of this machine only.
        anchor = None
        if local and any(o != dense for o in int8_plan.values()):
            anchor = _int8_anchor(
                baseline_path, int8_plan, config.quantize, io_names, calibration, protocol
            )
        if anchor is not None:
            anchor_ms, nodes = anchor
            in_model = layer_node_times(nodes, names_in_order, max(anchor_ms - call_ms, 0.0))
            entries = {
                name: costs.entry_for(name, 1.0, option)
                for name, option in int8_plan.items()
                if option.precision == "int8"
            }
            rates = {**fit.rates, **fit_rates(in_model, entries, "int8")}
            fit = dataclasses.replace(fit, rates=rates)
            logger.info(
                "    in-model rates of %d of %d layers from the profiled fp32 baseline and "
                "the baseline quantized whole (%.3f ms)",
                len({key.split("|")[0] for key in fit.rates}),
                len(layers),
                anchor_ms,
            )
        fit = dataclasses.replace(
            fit, activation_bytes=activation_bytes(plan_entries(chain, base_plan, costs))
        )
        latency = {
            (name, keep, option): fit.layer_ms(name, costs.entry_for(name, keep, option))
            for (name, keep, option) in latency
        }
        base_prediction = predict_plan(chain, base_plan, fit, costs)
        overhead = fit.overhead_ms

    neighbours = None
    if baseline_path is not None:
        neighbours = _neighbours(baseline_path, layers)

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
            )
            for x in layers
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
        "plans": [p.to_dict() for p in plans],
    }


def _int8_islands(plans: list[Plan], choices, neighbours, method: str) -> list[Plan]:
    # ONNX Runtime quantizes a float layer directly between two int8 layers
    # with per-tensor weights when it loads a QDQ file (runtime_int8). That
    # path is far slower than per-channel int8: 1.4 ms against 0.26 ms for a
    # 240-channel 5x5 depthwise conv at 28 x 28 on an AVX-512 Xeon. So such a
    # layer is made per-channel int8 instead where int8 is one of its options.
    by_name = {c.name: c for c in choices}
    changed = 0
    result: dict[tuple, Plan] = {}
    for plan in plans:
        layers = dict(plan.layers)
        while True:
            flips = [
                name
                for name in runtime_int8(layers, neighbours, method)
                if dataclasses.replace(layers[name], precision="int8") in by_name[name].options
            ]
            if not flips:
                break
            for name in flips:
                layers[name] = dataclasses.replace(layers[name], precision="int8")
        if layers != plan.layers:
            changed += 1
            distortion = sum(by_name[n].distortion[o] for n, o in layers.items())
            plan = dataclasses.replace(plan, layers=layers, predicted_distortion=distortion)
        result.setdefault(plan.signature(), plan)
    if changed:
        logger.info(
            "    %d plan(s) put float layers between int8 layers, which ONNX Runtime would run in "
            "per-tensor int8; those layers are per-channel int8 instead",
            changed,
        )
    return sorted(result.values(), key=lambda p: p.predicted_latency_ms)


def _int8_anchor(
    baseline_path: Path, int8_plan: dict, quantize: QuantizeConfig, names, calibration, protocol
) -> tuple[float, list] | None:
    # The baseline with every layer that may be int8 quantized: its p50, timed
    # like an entry, and its profiled nodes. None where quantizing it fails.
    path = baseline_path.with_name("baseline.int8-anchor.onnx")
    layers = [name for name, option in int8_plan.items() if option.precision == "int8"]
    feeds = calibration_feeds(names, calibration) if quantize.method == "static" else None
    try:
        quantize_layers(baseline_path, path, layers, quantize, feeds)
        sample = dict(zip(names, [a[:1] for a in calibration], strict=True))
        p50 = time_sessions(path, sample, protocol).p50
        return p50, node_profile(path, sample, protocol.threads, runs=30)
    except ExportError as exc:
        logger.info(
            "    int8 layers keep their entries' latency: quantizing the baseline failed (%s)", exc
        )
        return None
    finally:
        path.unlink(missing_ok=True)


def _neighbours(path: Path, layers) -> dict:
    # Each layer's direct neighbours in the float graph, for layers with one Conv or Gemm node.
    proto = onnx.load(str(path))
    layer_nodes = {}
    for layer in layers:
        found = nodes_of_module(proto, layer.name, ("Conv", "Gemm"))
        if len(found) == 1:
            layer_nodes[layer.name] = found[0]
    return layer_neighbours(proto, layer_nodes)
