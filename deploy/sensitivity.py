"""Sensitivity: the output distortion each option on each layer causes alone.

Distortion is the normalized squared error of the model output on calibration
data, ``sum((y - y0)^2) / sum(y0^2)`` with ``y0`` the original output. The
planner adds it across layers. Every measurement applies one option to a copy
of the model; the model itself is never changed.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from torch import nn

from deploy.passes.lowrank import LowRankConfig, apply_lowrank
from deploy.passes.prune import PruneConfig, apply_prune
from deploy.passes.quantize import fake_quantize_layer
from deploy.planner import Option
from deploy.torch_utils import predict, to_tensors

logger = logging.getLogger(__name__)


def distortion(reference: np.ndarray, output: np.ndarray) -> float:
    """Return ``sum((output - reference)^2) / sum(reference^2)``."""
    scale = float(np.sum(reference.astype(np.float64) ** 2)) or 1.0
    return float(np.sum((output.astype(np.float64) - reference) ** 2) / scale)


def measure_sensitivity(
    model: nn.Module,
    options: dict[str, list[Option]],
    calibration: list[np.ndarray],
    example_inputs,
    round_to: int = 8,
    progress=None,
    reduce_range: bool = False,
) -> dict[str, dict[Option, float]]:
    """Return, per layer, the distortion of each of its options.

    An option's distortion is that of its structural choice plus that of
    int8 on the layer, each measured alone; ``reduce_range`` simulates
    7-bit int8 weights.
    """
    reference = predict(model, calibration)
    calibration_tensors = to_tensors(calibration)
    result: dict[str, dict[Option, float]] = {}
    start = time.perf_counter()
    for i, (name, layer_options) in enumerate(options.items()):
        by_struct: dict[str, float] = {}
        by_precision: dict[str, float] = {"fp32": 0.0}
        for option in layer_options:
            if option.struct not in by_struct:
                by_struct[option.struct] = _struct_distortion(
                    model, name, option.struct, calibration, reference, example_inputs, round_to
                )
            if option.precision not in by_precision:
                variant = fake_quantize_layer(
                    model, name, calibration_tensors, reduce_range=reduce_range
                )
                by_precision[option.precision] = distortion(
                    reference, predict(variant, calibration)
                )
        result[name] = {o: by_struct[o.struct] + by_precision[o.precision] for o in layer_options}
        if progress:
            progress(i + 1, len(options), name, time.perf_counter() - start)
    return result


def _struct_distortion(
    model, name, struct, calibration, reference, example_inputs, round_to
) -> float:
    if struct == "dense":
        return 0.0
    kind, value = struct.split(":")
    if kind == "lowrank":
        variant = apply_lowrank(model, LowRankConfig({name: int(value)}))
    elif kind == "prune":
        variant = apply_prune(model, PruneConfig({name: float(value)}, round_to), example_inputs)
    else:
        raise ValueError(f"unknown structural option {struct!r}")
    return distortion(reference, predict(variant, calibration))
