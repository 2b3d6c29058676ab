"""The latency model: a whole variant's latency from its layers' latency table entries.

Where the profile is this machine's, a variant's predicted latency is

    call + sum over layers of compute(entry) x rate + sum over gaps of gap time

- ``compute`` is the one-layer model's net time less its conversions
  (see below), and ``rate`` how much slower that layer computes inside the
  model than alone, from ONNX Runtime's profiler on the fp32 baseline and on
  the baseline quantized whole (``fit_rates``).
- A gap is everything ONNX Runtime runs between one layer and the next:
  reorders, QuantizeLinear, DequantizeLinear, transposes, pools, adds,
  normalizations, attention's MatMuls of two activations. Its time depends
  on the precisions on its two sides: on an AMD EPYC a MaxPool between an
  fp32 conv and an int8 one ran as a uint8 pool in NCHW, 60 us against 4 us
  between two fp32 convs. So gaps are profiled in each context, on the
  baseline quantized whole and on copies quantized in alternating runs of
  two fp32 and two int8 layers (``fit_gaps``). A gap after a pruned layer
  scales with the values that layer writes.

Every model behind the rates and gaps is profiled round-robin with the
baseline, so that a burst of load on the machine shifts them alike.

For a profile of another device, nothing can be profiled here, and the
predicted latency is

    overhead + sum over layers of cost(entry) - what edges of one layout save

- ``net(entry)`` is the one-layer model's median less ``call_ms``, the cost of
  an empty session call measured beside it: a whole model pays the call once,
  not once per layer.
- A one-layer model converts its input and output: NCHWc reorders around
  an fp32 conv, QuantizeLinear, transposes and DequantizeLinear around a
  static int8 layer. Its entry records that time (``layout_in_ms``,
  ``layout_out_ms``); the rest of ``net`` is the layer's compute. Inside a
  model a layer converts only on an edge to a neighbour of another layout,
  so each edge between two layers of one layout saves the output side of
  the first and the input side of the second (``edge_savings``).
- ``cost(entry)`` is the net entry times a per-model ``scale``, plus memory
  traffic for weights beyond the core's cache (``calibrate``): a one-layer
  model runs with its weights in cache, a whole model may not. A layer
  with an in-model rate but no gaps profiled costs its compute at that
  rate plus its conversions (``Calibration.layer_ms``).
- ``overhead`` is one session call plus the time the baseline spends
  outside its layers (attention's softmax, normalization, GELU, pooling,
  reshapes), measured as a share of its run time with ONNX Runtime's
  profiler. Those operators read what the layers write, so that time
  scales with the bytes the plan's layers write (``activation_bytes``):
  int8 and pruned layers write fewer, low-rank ones as many.

A plan is priced as ONNX Runtime will run it. With static QDQ int8, ONNX
Runtime quantizes a float Conv or Gemm that sits directly between two int8
layers when it loads the file (``runtime_int8``), so such a layer is priced
with its int8 entry.

Where an entry is missing and cannot be measured (a profile of another
device), its net latency is interpolated in multiply-adds between measured
entries of the same operator, kernel, option kind and precision. The
prediction names the layers it interpolated.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import statistics
from pathlib import Path

import numpy as np

from deploy.errors import DeployError
from deploy.measure import LayerSpec
from exporters.onnx import LAYER_OPS

logger = logging.getLogger(__name__)

WITHIN = 0.10
# The batch-1 input a run's side-by-side timing used, saved in the run folder.
TIMING_INPUT = "timing_input.npz"
MIN_SCALE, MAX_SCALE = 0.5, 2.0
# The share of the core's private cache left to a model's weights, because
# activations and everything else use the rest. NOTE: an estimate. On one
# digits run on a Xeon with a 2 MB L2, before in-model rates existed, half
# the L2 put 6 of 9 variants within 10% and the whole L2 put 3.
WEIGHT_CACHE_SHARE = 0.5


def net_ms(entry: dict) -> float:
    """Return an entry's latency without the session call: ``p50_ms - call_ms``, at least 0.

    Entries measured before ``call_ms`` existed return ``p50_ms``.
    """
    return max(float(entry["p50_ms"]) - float(entry.get("call_ms", 0.0)), 0.0)


def spec_of_entry(entry: dict) -> LayerSpec:
    """Return the LayerSpec an entry was measured for."""
    weight = entry["weight_shape"]
    kernel = tuple(weight[2:]) if entry["op"] == "conv2d" else (1, 1)
    return LayerSpec(
        entry["op"],
        tuple(entry["input_shape"]),
        weight[0],
        kernel,
        tuple(entry.get("stride", (1, 1))),
        tuple(entry.get("padding", (0, 0))),
        entry.get("groups", 1),
        entry["option"],
    )


def _family(spec: LayerSpec, precision: str) -> tuple:
    # Entries of one family differ only in channel counts, spatial size or rank,
    # so their latency grows with multiply-adds in a comparable way.
    depthwise = spec.op == "conv2d" and spec.groups > 1 and spec.groups == spec.in_features
    return (
        spec.op,
        precision,
        spec.option.split(":")[0],
        spec.kernel,
        spec.stride,
        depthwise,
        spec.groups > 1 and not depthwise,
    )


def interpolate_entry(
    entries: list[dict], spec: LayerSpec, precision: str, quantization: str = "static"
) -> dict:
    """Estimate an entry for ``spec`` from measured entries of the same family.

    Net latency is interpolated linearly in multiply-adds between the two
    measured neighbours. Outside the measured range it is scaled from the
    nearest one in proportion to multiply-adds. Int8 entries count only if
    they were quantized the same way (``quantization``). The result has ``net_ms``,
    ``boundary_ms`` and ``layout_ms`` (from the nearest entry) and
    ``interpolated_from``.

    Raises:
        DeployError: no measured entry shares the operator, kernel, option
            kind and precision.
    """
    family = _family(spec, precision)
    points = []
    for entry in entries:
        other = spec_of_entry(entry)
        if (
            entry["precision"] == precision
            and entry.get("quantization", "static") == quantization
            and _family(other, precision) == family
        ):
            points.append((other.macs, net_ms(entry), entry))
    if not points:
        raise DeployError(
            f"the device profile has no {precision} {spec.op} {spec.option.split(':')[0]} entry "
            f"with kernel {spec.kernel} and stride {spec.stride} to interpolate from; measure it "
            f"on the device with 'deploy profile --model MODEL --out PROFILE'"
        )
    points.sort(key=lambda p: p[0])
    macs = [p[0] for p in points]
    target = spec.macs
    i = bisect.bisect_left(macs, target)
    if i < len(points) and macs[i] == target:
        lower = upper = points[i]
    elif 0 < i < len(points):
        lower, upper = points[i - 1], points[i]
    else:
        lower = upper = points[0] if i == 0 else points[-1]
    if lower is upper:
        estimate = lower[1] * target / max(lower[0], 1)
    else:
        weight = (target - lower[0]) / (upper[0] - lower[0])
        estimate = lower[1] + weight * (upper[1] - lower[1])
    nearest = min(points, key=lambda p: abs(math.log(max(p[0], 1) / max(target, 1))))
    estimated = {
        "net_ms": max(estimate, 0.0),
        "boundary_ms": float(nearest[2].get("boundary_ms", 0.0)),
        "interpolated_from": len({id(lower), id(upper)}),
    }
    if "layout_ms" in nearest[2]:
        estimated["layout_ms"] = min(float(nearest[2]["layout_ms"]), estimated["net_ms"])
    return estimated


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per-model calibration of the latency model on the measured fp32 baseline.

    Attributes:
        overhead_ms: time outside the layers: one session call and the
            operators that belong to no layer.
        scale: measured baseline time in the layers over the sum of their
            net entries; 1 where ``ms_per_byte`` explains the difference.
        call_ms: the session call alone. Defaults to ``overhead_ms``.
        cache_bytes: the core's private cache (``device.cache_bytes``), or
            None. Defaults to None.
        ms_per_byte: what each byte of layer weights beyond ``cache_bytes``
            adds. Defaults to 0.
        activation_bytes: the bytes the baseline's layers write per call
            (``activation_bytes``), or None to keep the overhead fixed.
            Defaults to None.
        rates: ``layer|precision`` -> how much slower the layer computes
            inside the model than its entry's compute, from the profiled
            baseline and the profiled baseline quantized whole
            (``fit_rates``). A layer with a rate ignores ``scale`` and
            ``ms_per_byte``. Defaults to none.
        gap_ms: ``layer|before|after`` -> the time of the operators of no
            layer that run after ``layer`` ("" for those before the first
            layer) when the layer before runs at precision ``before`` and
            the next one at ``after`` ("io" for the model's input or
            output), from profiled whole models (``fit_gaps``). With it a
            layer costs its compute at its rate and every conversion,
            pool, add and normalization is priced here. Defaults to none.
        gap_next: the layer that follows each gap's layer in run order
            ("" after the last). Defaults to none.
        gap_values: each layer's output values in the profiled models;
            a pruned layer's gap scales with the values it writes.
            Defaults to none.
        private_cache_bytes: the core's private cache (L2), or None. With
            gaps, a plan whose weights fit in it keeps them there between
            calls, so its layers run at their entries' rate (see
            ``streaming_share``). Defaults to None.
    """

    overhead_ms: float
    scale: float
    call_ms: float | None = None
    cache_bytes: int | None = None
    ms_per_byte: float = 0.0
    rates: dict = dataclasses.field(default_factory=dict)
    activation_bytes: float | None = None
    gap_ms: dict = dataclasses.field(default_factory=dict)
    gap_next: dict = dataclasses.field(default_factory=dict)
    gap_values: dict = dataclasses.field(default_factory=dict)
    private_cache_bytes: int | None = None

    def overhead_for(self, entries: list[dict]) -> float:
        """Return the overhead of a plan whose layers have ``entries``.

        The operators outside the layers (pooling, flattening, layout
        changes, normalization) read the layers' outputs. So their time,
        ``overhead_ms`` less the session call, scales with the bytes the
        layers write, against the baseline's ``activation_bytes``: an int8
        layer writes 1 byte per value, and a pruned one fewer channels.
        """
        call = self.overhead_ms if self.call_ms is None else self.call_ms
        written = activation_bytes(entries)
        if not self.activation_bytes or written is None:
            return self.overhead_ms
        return call + (self.overhead_ms - call) * written / self.activation_bytes

    def rate(self, layer: str, precision: str) -> float | None:
        """Return the layer's in-model rate at ``precision`` (``fit_rates``), or None."""
        return self.rates.get(f"{layer}|{precision}")

    def layer_ms(self, layer: str, entry: dict) -> float:
        """Return what a layer with ``entry`` costs inside the model, before its edges save anything.

        With a rate, the entry's compute (net less ``layout_ms``) runs at the
        rate and its conversions as measured. Without, the net entry is
        multiplied by ``scale``.
        """
        net = net_ms(entry)
        rate = self.rate(layer, entry.get("precision", "fp32"))
        if rate is None:
            return net * self.scale
        layout = min(float(entry.get("layout_ms", 0.0)), net)
        return rate * (net - layout) + layout

    def edge_weight(self, layer: str, entry: dict) -> float:
        """Return the factor on what ``layer``'s edges save: 1 with a rate, ``scale`` without."""
        if self.rate(layer, entry.get("precision", "fp32")) is not None:
            return 1.0
        return self.scale

    def compute_ms(self, layer: str, entry: dict, streaming: float = 1.0) -> float:
        """Return a layer's compute inside the model: its entry's net less ``layout_ms``, at its rate.

        A layer without a rate of its own takes the median rate of the
        layers at its precision, or ``scale``. Only ``streaming`` (0 to 1,
        see ``streaming_share``) of the rate's difference from 1 applies.
        """
        net = net_ms(entry)
        precision = entry.get("precision", "fp32")
        rate = self.rate(layer, precision)
        if rate is None:
            same = [r for key, r in self.rates.items() if key.endswith(f"|{precision}")]
            rate = statistics.median(same) if same else self.scale
        rate = 1.0 + (rate - 1.0) * streaming
        return rate * (net - min(float(entry.get("layout_ms", 0.0)), net))

    def streaming_share(self, weight_bytes: float) -> float:
        """Return how much of the in-model rates applies to a plan with ``weight_bytes`` of weights.

        The rates are fitted on the baseline, and where its weights exceed
        twice the core's private cache, every call reads them again from the
        shared cache or memory. Load from other
        tenants of a shared machine slows that. On an AMD EPYC with a 512 KB
        L2, a digits baseline of 3.1 MB ran at 1.0-1.8 ms within one minute,
        while its variants whose weights fit in the L2 kept their speed. So
        the share is 0 for weights within ``private_cache_bytes``, rises
        linearly to 1 at twice that, and is 1 without a cache size.
        """
        cache = self.private_cache_bytes
        if not cache:
            return 1.0
        return min(max((weight_bytes - cache) / cache, 0.0), 1.0)

    def gap(self, layer: str, before: str, after: str) -> float:
        """Return the time after ``layer`` between a layer at ``before`` and one at ``after``.

        A context never profiled takes the one with the same precision on
        both sides as the next layer, then as the layer before, then any.
        """
        for key in (
            f"{layer}|{before}|{after}",
            f"{layer}|{after}|{after}",
            f"{layer}|{before}|{before}",
        ):
            if key in self.gap_ms:
                return self.gap_ms[key]
        found = [ms for key, ms in self.gap_ms.items() if key.split("|")[0] == layer]
        return statistics.median(found) if found else 0.0

    def gaps_ms(self, precisions: dict[str, str], values: dict[str, float]) -> float:
        """Return the time between a plan's layers (``gap_ms``).

        ``precisions`` is each layer's precision as ONNX Runtime runs it.
        ``values`` is the number of values each layer writes, so the gap
        after a pruned layer scales with them.
        """
        total = 0.0
        for layer, following in self.gap_next.items():
            before = precisions.get(layer, "io") if layer else "io"
            after = precisions.get(following, "io") if following else "io"
            ms = self.gap(layer, before, after)
            if layer and self.gap_values.get(layer) and values.get(layer):
                ms *= values[layer] / self.gap_values[layer]
            total += ms
        return total

    def memory_ms(self, weight_bytes: float) -> float:
        """Return the memory traffic term for a model of ``weight_bytes`` bytes of layer weights."""
        if not self.cache_bytes or not self.ms_per_byte or self.rates:
            return 0.0
        return self.ms_per_byte * max(weight_bytes - self.cache_bytes, 0.0)


def activation_bytes(entries: list[dict]) -> float | None:
    """Return the bytes a plan's layers write per batch-1 call, or None where an entry has no shapes.

    A static int8 layer writes 1 byte per value, any other 4.
    """
    total = 0.0
    for entry in entries:
        if "input_shape" not in entry or "weight_shape" not in entry:
            return None
        spec = spec_of_entry(entry)
        values = spec.out_features * spec.output_positions
        total += values * (1 if layout(entry) == "int8" else 4)
    return total


def output_values(entry: dict) -> float | None:
    """Return the values a layer of ``entry`` writes per batch-1 call, or None without shapes."""
    if "input_shape" not in entry or "weight_shape" not in entry:
        return None
    spec = spec_of_entry(entry)
    return float(spec.out_features * spec.output_positions)


def fit_gaps(
    profiled: list[tuple[list[tuple[str, str, float]], list[str | None], dict[str, str]]],
    order: list[str],
) -> tuple[dict[str, float], dict[str, str]]:
    """Return ``gap_ms`` and ``gap_next`` (see ``Calibration``) from profiled whole models.

    Each of ``profiled`` is one model's nodes (``exporters.onnx.node_profile``,
    the profiler's own cost taken off), each node's layer or None
    (``exporters.onnx.node_owners``), and each layer's precision as ONNX
    Runtime ran it. A node of no layer belongs to the gap after the last
    layer node run before it. ``order`` is the layers in the run order of
    the fp32 baseline; its gaps are the ones priced. Where one gap and
    context was profiled more than once, the median counts.
    """
    following = dict(zip(["", *order], [*order, ""], strict=True))
    seen: dict[str, list[float]] = {}
    for nodes, owners, precisions in profiled:
        times = dict.fromkeys(following, 0.0)
        last = ""
        for (_, _, ms), owner in zip(nodes, owners, strict=True):
            if owner is not None:
                last = owner
            elif last in times:
                times[last] += ms
        for layer, ms in times.items():
            before = precisions.get(layer, "io") if layer else "io"
            after = precisions.get(following[layer], "io") if following[layer] else "io"
            seen.setdefault(f"{layer}|{before}|{after}", []).append(ms)
    return {key: statistics.median(values) for key, values in seen.items()}, following


def weight_bytes(entry: dict) -> float:
    """Return the bytes of weights of an entry's layer: 1 per int8 weight, 4 per fp32 one."""
    weight = entry.get("weight_shape")
    if not weight:
        return 0.0
    count = math.prod(weight)
    if entry.get("option", "dense").startswith("lowrank:"):
        rank = int(entry["option"].split(":")[1])
        count = rank * (math.prod(weight[1:]) + weight[0])
    return float(count) * (1 if entry.get("precision") == "int8" else 4)


def calibrate(
    baseline_ms: float,
    layers_ms: float,
    call_ms: float,
    warn: bool = True,
    outside_share: float = 0.0,
    weight_bytes: float | None = None,
    cache_bytes: int | None = None,
) -> Calibration:
    """Fit the calibration to a baseline measured at ``baseline_ms`` whose net entries sum to ``layers_ms``.

    ``outside_share`` is the fraction of the baseline's time past the session
    call spent in operators of no layer (``outside_layers_share``); it joins
    the overhead.

    A one-layer entry runs with its weights in the core's cache. A model
    whose layer weights (``weight_bytes``) exceed their share of the cache
    (``WEIGHT_CACHE_SHARE`` of ``cache_bytes``) streams the rest from memory
    on every call. Where both are given, the
    baseline's weights exceed the cache and its layers run slower than
    their entries add up to, that difference is charged per byte beyond the
    cache (``ms_per_byte``) and the scale stays 1: a variant whose weights
    fit pays none of it. Otherwise the scale maps the entries onto the
    baseline.

    The scale is clipped to [0.5, 2], with a warning unless ``warn`` is False. A scale outside that
    range came from load on the machine (the baseline was timed while other
    processes ran, or the profile was), not from the model, and would carry
    that load into every prediction.
    """
    call = min(max(call_ms, 0.0), baseline_ms)
    share = min(max(outside_share, 0.0), 1.0)
    if cache_bytes:
        cache_bytes = int(cache_bytes * WEIGHT_CACHE_SHARE)
    overhead = call + share * (baseline_ms - call)
    if layers_ms <= 0:
        return Calibration(max(baseline_ms, 0.0), 1.0, call)
    rest = max(baseline_ms - overhead, 0.0)
    if cache_bytes and weight_bytes and weight_bytes > cache_bytes and rest > layers_ms:
        per_byte = (rest - layers_ms) / (weight_bytes - cache_bytes)
        if rest <= MAX_SCALE * layers_ms:
            return Calibration(overhead, 1.0, call, cache_bytes, per_byte)
    scale = rest / layers_ms
    if not MIN_SCALE <= scale <= MAX_SCALE and warn:
        logger.warning(
            "the fp32 baseline took %.3f ms but its layers' latency table entries add up to "
            "%.3f ms; the machine was probably busy while one of them was timed, so predictions "
            "use a scale of %.1f instead of %.2f: rerun on an idle machine, or re-measure the "
            "profile with 'deploy profile'",
            baseline_ms,
            layers_ms + overhead,
            min(max(scale, MIN_SCALE), MAX_SCALE),
            scale,
        )
        scale = min(max(scale, MIN_SCALE), MAX_SCALE)
    return Calibration(overhead, scale, call)


@dataclasses.dataclass
class Prediction:
    """A variant's predicted latency and how it was composed, in ms.

    Attributes:
        latency_ms: the prediction.
        overhead_ms: the per-model overhead it includes.
        scale: the per-model scale applied to net entries of layers
            without an in-model rate.
        layers_ms: the sum of the layers' costs (``Calibration.layer_ms``).
        edges_ms: what edges between layers of one layout save
            (conversions the one-layer entries include; see ``edge_savings``).
        interpolated: layers whose entry was interpolated, not measured.
        call_ms: the session call within ``overhead_ms``.
        memory_ms: the memory traffic of weights beyond the core's cache
            (``Calibration.memory_ms``).
        weight_bytes: the layers' weights, in bytes.
        runtime_int8: float layers of the plan that ONNX Runtime runs in
            int8 (``runtime_int8``), priced as int8.
    """

    latency_ms: float
    overhead_ms: float
    scale: float
    layers_ms: float
    edges_ms: float
    interpolated: list[str]
    call_ms: float | None = None
    memory_ms: float = 0.0
    weight_bytes: float = 0.0
    runtime_int8: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ChainLayer:
    """One layer of a model in run order, as ``edge_savings`` reads it."""

    name: str
    input_from: str | None
    passthrough: bool


def layout(entry: dict) -> str:
    """Return the tensor layout a layer of ``entry`` reads and writes inside ONNX Runtime's CPU graph.

    ``int8`` is static QDQ int8, on uint8 NHWC tensors. ``nchwc`` is an fp32
    conv in ONNX Runtime's blocked layout. ``plain`` is float NCHW or
    row-major, which an fp32 Linear and a dynamically quantized layer read.
    """
    if entry.get("precision") == "int8" and entry.get("quantization", "static") == "static":
        return "int8"
    if entry.get("precision") == "fp32" and entry.get("op") == "conv2d":
        return "nchwc"
    return "plain"


def plan_entries(chain, plan_layers: dict, costs) -> list[dict]:
    """Return the entry behind each layer of a plan, in run order (see ``edge_savings``)."""
    entries = []
    keep = 1.0
    for layer in chain:
        option = plan_layers[layer.name]
        in_keep = keep if layer.input_from is not None else 1.0
        entries.append(costs.entry_for(layer.name, in_keep, option))
        keep = in_keep if layer.passthrough else option.keep
    return entries


def edge_savings(chain, plan_layers: dict, costs, weight=None) -> tuple[float, list[str]]:
    """Return what the edges of a plan save against the sum of its layers' entries, in ms, unscaled.

    A one-layer entry converts its input and its output (``layout_ms``): an
    fp32 conv reorders to NCHWc and back, an int8 layer quantizes and
    transposes. Inside a model a layer converts on an edge only where the
    neighbour there has another layout. The model's input and output count
    as ``plain``. The input side costs ``layout_in_ms`` and the output side
    ``layout_out_ms``, or half of ``layout_ms`` each in older entries.
    Entries measured before ``layout_ms`` existed fall back to
    ``boundary_ms``, saved on each int8 -> int8 edge. Also returns the
    layers whose entry was interpolated.

    Args:
        chain: the layers in run order, each with ``name``, ``input_from``
            (None for a layer whose input is never pruned) and
            ``passthrough``; the planner's ``LayerChoices`` qualify.
        plan_layers: layer name -> ``Option``.
        costs: the ``CostTable`` behind the plan's latencies.
        weight: a function of (layer name, entry) returning the factor on
            what that layer saves (``Calibration.edge_weight``). Defaults to
            None, a factor of 1.
    """
    chain = list(chain)
    entries = plan_entries(chain, plan_layers, costs)
    interpolated = [
        layer.name
        for layer, entry in zip(chain, entries, strict=True)
        if entry.get("interpolated_from")
    ]
    layouts = ["plain", *(layout(e) for e in entries), "plain"]
    saved = 0.0
    for k, entry in enumerate(entries):
        factor = 1.0 if weight is None else weight(chain[k].name, entry)
        if "layout_ms" in entry:
            half = float(entry["layout_ms"]) / 2
            into = float(entry.get("layout_in_ms", half))
            out = float(entry.get("layout_out_ms", half))
            saved += factor * (into * (layouts[k] == layouts[k + 1]))
            saved += factor * (out * (layouts[k + 2] == layouts[k + 1]))
        elif k and layouts[k] == layouts[k + 1] == "int8":
            saved += float(entry.get("boundary_ms", 0.0)) * factor
    return saved, interpolated


def fit_rates(
    in_model: dict[str, float], entries: dict[str, dict], precision: str
) -> dict[str, float]:
    """Return ``layer|precision`` -> the layer's in-model time over its entry's compute.

    ``in_model`` is each layer's time inside the profiled model
    (``exporters.onnx.layer_node_times``) and ``entries`` the entry of the
    same layer and option. A one-layer model runs with its weights and
    input in cache, and spends part of its time converting layouts. So
    inside a model the compute runs at its own rate, clipped here to
    0.25x-4x. An entry whose compute is under a tenth of its net latency
    gives no rate.
    """
    rates = {}
    for layer, ms in in_model.items():
        entry = entries.get(layer)
        if entry is None:
            continue
        net = net_ms(entry)
        compute = net - min(float(entry.get("layout_ms", 0.0)), net)
        if net <= 0 or compute < 0.1 * net:
            continue
        rates[f"{layer}|{precision}"] = min(max(ms / compute, 0.25), 4.0)
    return rates


def runtime_int8(plan_layers: dict, neighbours: dict | None, quantization: str) -> set[str]:
    """Return the float layers of a plan that ONNX Runtime runs in int8 all the same.

    With static QDQ quantization, ONNX Runtime quantizes a float Conv or
    Gemm whose input is dequantized and whose output is quantized again
    (see ``exporters.onnx.runtime_quantized_nodes``): a float layer directly
    between two int8 layers. ``neighbours`` is ``exporters.onnx.layer_neighbours``
    of the float graph, or None to assume none.
    """
    if quantization != "static" or not neighbours:
        return set()
    found = set()
    for layer, (before, after) in neighbours.items():
        option = plan_layers.get(layer)
        if option is None or option.precision != "fp32" or before is None or after is None:
            continue
        if plan_layers[before].precision == "int8" and plan_layers[after].precision == "int8":
            found.add(layer)
    return found


def predict_plan(
    choices,
    plan_layers: dict,
    calibration: Calibration | float,
    costs,
    neighbours: dict | None = None,
    quantization: str = "static",
) -> Prediction:
    """Predict a plan's latency from its layers' entries (see the module docstring).

    Args:
        choices: the planner's ``LayerChoices`` in run order, or any layers
            with ``name``, ``input_from`` and ``passthrough``.
        plan_layers: layer name -> ``Option`` of the plan.
        calibration: the model's ``Calibration``, or an overhead in ms with
            scale 1.
        costs: the ``CostTable`` that priced ``choices``; it holds the entry
            behind each (layer, input keep, option).
        neighbours: each layer's direct neighbours in the float graph
            (``exporters.onnx.layer_neighbours``); float layers that ONNX
            Runtime will quantize (``runtime_int8``) are priced as int8.
            Defaults to None.
        quantization: the run's int8 method. Defaults to ``static``.
    """
    if not isinstance(calibration, Calibration):
        calibration = Calibration(float(calibration), 1.0)
    quantized = runtime_int8(plan_layers, neighbours, quantization)
    plan_layers = {
        name: dataclasses.replace(option, precision="int8") if name in quantized else option
        for name, option in plan_layers.items()
    }
    entries = plan_entries(choices, plan_layers, costs)
    if calibration.gap_ms:
        return _predict_with_gaps(choices, plan_layers, entries, calibration, sorted(quantized))
    total = sum(
        calibration.layer_ms(layer.name, entry)
        for layer, entry in zip(choices, entries, strict=True)
    )
    edges_ms, interpolated = edge_savings(
        choices, plan_layers, costs, weight=calibration.edge_weight
    )
    weights = sum(weight_bytes(e) for e in entries)
    memory = calibration.memory_ms(weights)
    overhead = calibration.overhead_for(entries)
    latency = overhead + max(total - edges_ms, 0.0) + memory
    call = calibration.overhead_ms if calibration.call_ms is None else calibration.call_ms
    return Prediction(
        latency,
        overhead,
        calibration.scale,
        total,
        edges_ms,
        interpolated,
        call,
        memory,
        weights,
        sorted(quantized),
    )


def _predict_with_gaps(
    choices, plan_layers: dict, entries: list[dict], calibration: Calibration, quantized
) -> Prediction:
    # Each layer's compute at its in-model rate, and the time between layers
    # as profiled in the same precision context.
    names = [layer.name for layer in choices]
    weights = sum(weight_bytes(e) for e in entries)
    streaming = calibration.streaming_share(weights)
    total = sum(
        calibration.compute_ms(name, entry, streaming)
        for name, entry in zip(names, entries, strict=True)
    )
    precisions = {name: option.precision for name, option in plan_layers.items()}
    values = {
        name: v
        for name, entry in zip(names, entries, strict=True)
        if (v := output_values(entry)) is not None
    }
    gaps = calibration.gaps_ms(precisions, values)
    call = calibration.overhead_ms if calibration.call_ms is None else calibration.call_ms
    return Prediction(
        call + gaps + total,
        call + gaps,
        calibration.scale,
        total,
        0.0,
        [
            name
            for name, entry in zip(names, entries, strict=True)
            if entry.get("interpolated_from")
        ],
        call,
        0.0,
        weights,
        quantized,
    )


def _error_pct(entry: dict) -> float | None:
    predicted = entry.get("predicted_latency_ms")
    measured = (entry.get("latency_ms") or {}).get("p50")
    if predicted is None or not measured or entry.get("status", "ok") != "ok":
        return None
    return (predicted - measured) / measured * 100.0


def _feeds_for(runner, shapes: list | None = None) -> dict:
    # Timing depends on shapes and dtypes, not on values. ``shapes`` are the
    # run's own (protocol.input_shapes in its manifest). Older runs lack them.
    rng = np.random.default_rng(0)
    feeds = {}
    for k, spec in enumerate(runner.session.get_inputs()):
        if shapes and k < len(shapes):
            shape = list(shapes[k])
        else:
            # Batch 1, and 16 positions on any other dynamic axis.
            shape = [d if isinstance(d, int) else 16 for d in spec.shape]
            if shape and not isinstance(spec.shape[0], int):
                shape[0] = 1
        if "int" in spec.type:
            # Token ids and attention masks: 1 is a valid value of both.
            feeds[spec.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def retime_run(run_dir: Path, manifest: dict, names: list[str], rounds: int) -> dict[str, float]:
    """Time the baseline and ``names`` round-robin, ``rounds`` times; return each median p50 in ms.

    Timing them side by side exposes them to the same load, which a run's
    own figures (the baseline first, each variant minutes later) do not.
    """
    from exporters.onnx import OnnxRunner
    from exporters.timing import TimingProtocol

    protocol = manifest.get("protocol", {})
    timing = TimingProtocol(
        warmup=protocol.get("warmup", 10),
        runs=protocol.get("runs", 100),
        threads=protocol.get("threads", 1),
    )
    artifacts = {"baseline": manifest["baseline"]["artifact"]}
    artifacts.update({v["name"]: v["artifact"] for v in manifest["variants"] if v["name"] in names})
    shapes = protocol.get("input_shapes")
    saved = None
    if (run_dir / TIMING_INPUT).is_file():
        # The run's own input: MiniLM's variants ran up to 36% faster on
        # synthetic token ids than on the run's sentences.
        with np.load(run_dir / TIMING_INPUT, allow_pickle=False) as archive:
            saved = [archive[f"input_{k}"] for k in range(len(archive.files))]
    samples: dict[str, list[float]] = {name: [] for name in artifacts}
    for _ in range(rounds):
        # A fresh session each round, as in the run's own side-by-side timing.
        for name, path in artifacts.items():
            runner = OnnxRunner(run_dir / path, timing.threads)
            if saved is not None:
                specs = runner.session.get_inputs()
                feeds = {spec.name: array for spec, array in zip(specs, saved, strict=False)}
            else:
                feeds = _feeds_for(runner, shapes)
            samples[name].append(runner.time(feeds, timing).p50)
    return {name: statistics.median(values) for name, values in samples.items()}


def rescale_prediction(entry: dict, baseline: dict, baseline_ms: float) -> float:
    """Return the entry's prediction recalibrated to a baseline re-timed at ``baseline_ms``.

    It starts from the planner's prediction (``plan.prediction.latency_ms``),
    not from ``predicted_latency_ms``, which an earlier recalibration may have
    changed already: the run's side-by-side timing rescales it once, and
    ``deploy profile --check --retime`` must not scale that result again.
    """
    prediction = (entry.get("plan") or {}).get("prediction") or {}
    if "scale" not in prediction or not baseline.get("predicted_latency_ms"):
        return entry["predicted_latency_ms"]
    call = prediction.get("call_ms")
    call = prediction["overhead_ms"] if call is None else call
    planned = prediction.get("latency_ms", entry["predicted_latency_ms"])
    # Load slows the layers and the operators outside them alike: everything
    # past the session call scales with the baseline's change.
    before = baseline["predicted_latency_ms"] - call
    if before <= 0:
        return planned
    ratio = min(max((baseline_ms - call) / before, 0.0), 10.0)
    return call + (planned - call) * ratio


def check_run(run_dir: str | Path, retime_rounds: int = 0) -> dict:
    """Compare predicted and measured latency over the variants of a finished run.

    Returns ``variants`` (variants with both figures), ``within_10pct`` (the
    fraction predicted within 10% of the measured p50),
    ``median_abs_error_pct``, and per variant ``name``, ``predicted_ms``,
    ``measured_p50_ms`` and ``error_pct``. The baseline is left out because
    the calibration is fitted to it.

    With ``retime_rounds`` > 0 the baseline and the variants are timed again
    here, side by side, and each prediction is recalibrated to the re-timed
    baseline. Defaults to 0, the run's own figures.

    Raises:
        DeployError: ``run_dir`` has no readable ``manifest.json``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeployError(
            f"{path} is missing or not JSON ({exc}); pass a folder written by 'deploy optimize'"
        ) from exc
    if retime_rounds < 0:
        raise DeployError(f"retime rounds {retime_rounds} must be 0 or more")
    entries = [e for e in manifest.get("variants", []) if _error_pct(e) is not None]
    baseline_ms = (manifest.get("baseline") or {}).get("latency_ms", {}).get("p50")
    if retime_rounds and entries:
        timed = retime_run(run_dir, manifest, [e["name"] for e in entries], retime_rounds)
        baseline_ms = timed["baseline"]
        entries = [
            {
                **e,
                "predicted_latency_ms": rescale_prediction(e, manifest["baseline"], baseline_ms),
                "latency_ms": {"p50": timed[e["name"]]},
            }
            for e in entries
        ]
    rows = []
    for entry in entries:
        rows.append(
            {
                "name": entry["name"],
                "predicted_ms": entry["predicted_latency_ms"],
                "measured_p50_ms": entry["latency_ms"]["p50"],
                "error_pct": _error_pct(entry),
                "interpolated": ((entry.get("plan") or {}).get("prediction") or {}).get(
                    "interpolated", []
                ),
            }
        )
    errors = [abs(r["error_pct"]) for r in rows]
    return {
        "run": str(run_dir),
        "retime_rounds": retime_rounds,
        "baseline_p50_ms": baseline_ms,
        "variants": len(rows),
        "within_10pct": (sum(e <= WITHIN * 100 for e in errors) / len(errors)) if errors else None,
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "rows": rows,
    }


def outside_layers_share(op_ms: dict[str, float]) -> float:
    """Return the fraction of ``op_ms`` (operator type -> ms) spent outside ``LAYER_OPS``.

    Attention's activation-by-activation MatMuls count as layer time, because
    their operator type is the same as a Linear's. Take the profiler's own
    cost off first (``exporters.onnx.unprofiled_op_times``).
    """
    total = sum(op_ms.values())
    if total <= 0:
        return 0.0
    return sum(ms for op, ms in op_ms.items() if op not in LAYER_OPS) / total
