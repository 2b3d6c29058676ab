"""Costs: per layer and option, the latency the device profile gives.

Entries missing from the profile are measured on this machine on demand and
added to it, so a later run reuses them.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from deploy.analyze import LayerInfo
from deploy.latency_model import interpolate_entry, net_ms
from deploy.measure import LayerSpec, measure_spec
from deploy.passes.lowrank import max_useful_rank
from deploy.passes.prune import PrunableLayer, kept_channels
from deploy.planner import Option
from deploy.power import reader_for
from deploy.profiles import DeviceProfile, entry_key, timing_protocol

logger = logging.getLogger(__name__)

PASSES = ("lowrank", "prune", "quantize")


@dataclasses.dataclass
class SearchSpace:
    """The options the planner may choose from.

    Attributes:
        passes: the passes to use, a subset of ``lowrank``, ``prune``,
            ``quantize``. Defaults to all three.
        keep_ratios: output-channel fractions that ``prune`` may keep.
            Defaults to 0.75, 0.5, 0.375 and 0.25.
        rank_fractions: ``lowrank`` ranks as fractions of the largest rank
            that still saves multiply-adds. Defaults to 0.25, 0.5 and 0.75.
        round_to: channel and rank multiple. Defaults to 8.
        min_lowrank_saving: a rank is offered only if its measured fp32
            latency is at most this fraction of the dense layer's. Defaults
            to 0.9.
    """

    passes: tuple[str, ...] = PASSES
    keep_ratios: tuple[float, ...] = (0.75, 0.5, 0.375, 0.25)
    rank_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    round_to: int = 8
    min_lowrank_saving: float = 0.9

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plannable_producers(
    layers: list[LayerInfo], prunable: dict[str, PrunableLayer]
) -> tuple[dict[str, PrunableLayer], dict[str, str], set[str]]:
    """Return the producers the planner may prune, and for each affected layer its producer.

    The DP carries one open producer at a time, so a producer qualifies only
    when its single consumer follows it in run order with nothing but its
    depthwise pass-through layers in between.
    """
    order = [layer.name for layer in layers]
    position = {name: i for i, name in enumerate(order)}
    producers, input_from, passthrough = {}, {}, set()
    for name, info in prunable.items():
        if name not in position or len(info.consumers) != 1 or info.consumers[0] not in position:
            continue
        between = order[position[name] + 1 : position[info.consumers[0]]]
        if sorted(between) != sorted(info.passthrough):
            continue
        producers[name] = info
        input_from[info.consumers[0]] = name
        for layer in between:
            input_from[layer] = name
            passthrough.add(layer)
    return producers, input_from, passthrough


def layer_spec(
    info: LayerInfo, in_keep: float, struct: str, producer: PrunableLayer | None, round_to: int
) -> LayerSpec:
    """Return the shapes ``info`` runs with when its input keeps ``in_keep`` and it takes ``struct``."""
    in_features = info.in_features
    if producer is not None and in_keep < 1.0:
        per_channel = info.in_features // producer.channels
        in_features = kept_channels(producer.channels, in_keep, round_to) * per_channel
    out_features = info.out_features
    groups = info.groups
    if info.depthwise:
        out_features = groups = in_features
    if struct.startswith("prune:"):
        out_features = kept_channels(info.out_features, float(struct.split(":")[1]), round_to)
    option = struct if struct.startswith("lowrank:") else "dense"
    if info.kind == "conv2d":
        input_shape = (1, in_features, *info.input_shape[2:])
    else:
        input_shape = (*info.input_shape[:-1], in_features)
    return LayerSpec(
        info.kind,
        tuple(input_shape),
        out_features,
        info.kernel,
        info.stride,
        info.padding,
        groups,
        option,
    )


def candidate_ranks(info: LayerInfo, module, space: SearchSpace) -> list[int]:
    """Return the ranks to try for a layer: fractions of the largest useful rank, rounded."""
    limit = max_useful_rank(module)
    ranks = set()
    for fraction in space.rank_fractions:
        rank = int(limit * fraction) // space.round_to * space.round_to
        if space.round_to <= rank <= limit:
            ranks.add(rank)
    return sorted(ranks)


class CostTable:
    """Latency lookups against a device profile, measuring missing entries on demand.

    Latencies are net of the session call (``latency_model.net_ms``), so they
    add up over a model's layers.

    Args:
        profile: the device profile; measured entries are added to it.
        save_every: save the profile after this many new entries. Defaults to 20.
        measure: measure missing entries on this machine. When False (a
            profile of another device), missing entries are interpolated
            between measured ones and listed in ``interpolated``. Defaults to True.
        quantization: how the run quantizes int8 layers, ``static`` or
            ``dynamic``; int8 entries are looked up and measured that way.
            Defaults to ``static``.
    """

    def __init__(
        self,
        profile: DeviceProfile,
        save_every: int = 20,
        measure: bool = True,
        quantization: str = "static",
    ):
        self.profile = profile
        self.quantization = quantization
        self.protocol = timing_protocol(profile)
        self.save_every = save_every
        self.measure = measure
        self.measured = 0
        self.reused = 0
        self.interpolated: dict[str, dict] = {}
        self.specs: dict[tuple, LayerSpec] = {}
        self._reader = None
        if measure:
            self._reader = reader_for(profile.data["power"])

    def entry(self, spec: LayerSpec, precision: str) -> dict:
        """Return the entry of ``spec`` at ``precision``: stored, measured now or interpolated."""
        key = entry_key(**spec.key_fields(precision, self.quantization))
        entry = self.profile.lookup(key) or self.interpolated.get(key)
        if entry is not None:
            self.reused += 1
            return entry
        if not self.measure:
            estimate = interpolate_entry(
                self.profile.data["latency_table"], spec, precision, self.quantization
            )
            entry = {"p50_ms": estimate["net_ms"], **estimate}
            self.interpolated[key] = entry
            return entry
        entry = measure_spec(
            spec,
            precision,
            self.protocol,
            self.profile.data["power"],
            self._reader,
            quantization=self.quantization,
        )
        self.profile.add_entry(entry)
        self.measured += 1
        if self.profile.path is not None and self.measured % self.save_every == 0:
            self.profile.save()
        return entry

    def latency(self, spec: LayerSpec, precision: str) -> float:
        return net_ms(self.entry(spec, precision))

    def entry_for(self, layer: str, in_keep: float, option: Option) -> dict:
        """Return the entry behind ``layer_options``' latency of (layer, input keep, option).

        An option the layer was not offered at this precision (a float-only
        layer that ONNX Runtime quantizes anyway) takes the shapes of the same
        structural option at another precision.
        """
        spec = self.specs.get((layer, in_keep, option))
        if spec is None:
            spec = next(
                (
                    found
                    for (name, keep, other), found in self.specs.items()
                    if name == layer and keep == in_keep and other.struct == option.struct
                ),
                None,
            )
        if spec is None:
            raise KeyError(f"no latency was looked up for {layer} with {option}")
        return self.entry(spec, option.precision)

    def flush(self) -> None:
        if self.profile.path is not None and self.measured:
            self.profile.save()


def layer_options(
    model,
    layers: list[LayerInfo],
    prunable: dict[str, PrunableLayer],
    space: SearchSpace,
    costs: CostTable,
    progress=None,
) -> tuple[
    dict[str, list[Option]], dict[tuple[str, float, Option], float], dict[str, str], set[str]
]:
    """Return each layer's options and the latency of every (layer, input keep, option).

    Low-rank options whose measured latency does not beat the dense layer's
    by ``space.min_lowrank_saving`` are dropped here, so they are never offered.
    """
    producers, input_from, passthrough = (
        plannable_producers(layers, prunable) if "prune" in space.passes else ({}, {}, set())
    )
    precisions = ["fp32"]
    if "quantize" in space.passes and "int8" in costs.profile.precisions:
        precisions.append("int8")
    options: dict[str, list[Option]] = {}
    latency: dict[tuple[str, float, Option], float] = {}
    start = time.perf_counter()
    for i, info in enumerate(layers):
        module = model.get_submodule(info.name)
        producer = producers.get(input_from.get(info.name, ""))
        in_keeps = [1.0] + (list(space.keep_ratios) if producer is not None else [])
        structs = ["dense"]
        if info.name in producers:
            structs += [f"prune:{k}" for k in space.keep_ratios]
        if "lowrank" in space.passes and info.name not in passthrough:
            dense_ms = costs.latency(
                layer_spec(info, 1.0, "dense", producer, space.round_to), "fp32"
            )
            for rank in candidate_ranks(info, module, space):
                struct = f"lowrank:{rank}"
                spec = layer_spec(info, 1.0, struct, producer, space.round_to)
                if costs.latency(spec, "fp32") <= space.min_lowrank_saving * dense_ms:
                    structs.append(struct)
        layer_opts = [Option(s, p) for s in structs for p in precisions]
        for in_keep in in_keeps:
            for option in layer_opts:
                spec = layer_spec(info, in_keep, option.struct, producer, space.round_to)
                latency[(info.name, in_keep, option)] = costs.latency(spec, option.precision)
                costs.specs[(info.name, in_keep, option)] = spec
        options[info.name] = layer_opts
        if progress:
            progress(i + 1, len(layers), info.name, time.perf_counter() - start)
    costs.flush()
    return options, latency, input_from, passthrough
