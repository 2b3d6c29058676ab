"""Stage 5 of a run: build each planned variant, export it, quantize it and validate it.

A variant is a copy of the original with the plan's low-rank and prune
options applied (then a short distillation), exported to ONNX and quantized
per layer with ONNX Runtime's tool. Its entry in the manifest records the
plan, the recipe that rebuilds it, and what validation measured.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from torch import nn

from deploy.errors import DeployError
from deploy.finetune import distill
from deploy.passes.lowrank import LowRankConfig, apply_lowrank
from deploy.passes.prune import PruneConfig, apply_prune
from deploy.passes.quantize import QuantizeConfig
from deploy.planner import Plan
from deploy.run_folder import load_json, save_json
from deploy.validate import Validation, per_tensor_zeroed_channels, validate_artifact
from exporters.onnx import (
    ExportError,
    float_region_nodes,
    nodes_of_module,
    onnx_from_torch,
    quantize_onnx,
    runtime_quantized_nodes,
)

if TYPE_CHECKING:
    from deploy.pipeline import OptimizeConfig

logger = logging.getLogger(__name__)


QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def calibration_feeds(
    names: list[str], arrays: list[np.ndarray], batch: int = 32
) -> list[dict[str, np.ndarray]]:
    """Split the calibration arrays into feeds of ``batch`` samples for the int8 calibrator."""
    return [
        dict(zip(names, [a[s : s + batch] for a in arrays], strict=True))
        for s in range(0, len(arrays[0]), batch)
    ]


def materialize(
    original: nn.Module,
    plan: Plan,
    example_inputs,
    calibration: list[np.ndarray],
    config: OptimizeConfig,
) -> tuple[nn.Module, dict]:
    """Apply a plan's low-rank and prune options (then fine-tune) to a copy; return it and its recipe."""
    ranks = {
        n: int(o.struct.split(":")[1])
        for n, o in plan.layers.items()
        if o.struct.startswith("lowrank:")
    }
    keeps = {n: o.keep for n, o in plan.layers.items() if o.struct.startswith("prune:")}
    lowrank = LowRankConfig(ranks)
    prune = PruneConfig(keeps, config.space.round_to)
    variant = apply_lowrank(original, lowrank)
    variant = apply_prune(variant, prune, example_inputs)
    finetuned = False
    if (ranks or keeps) and config.finetune is not None:
        variant = distill(variant, original, calibration, config.finetune)
        finetuned = True
    int8 = sorted(n for n, o in plan.layers.items() if o.precision == "int8")
    quantize = dataclasses.replace(config.quantize, layers=int8)
    recipe = {
        "lowrank": lowrank.to_dict(),
        "prune": prune.to_dict(),
        "quantize": quantize.to_dict() if int8 else None,
        "finetune": config.finetune.to_dict() if finetuned else None,
    }
    return variant.eval(), recipe


def export_onnx(model, example_inputs, path: Path, names, axes) -> None:
    """Export ``model`` to ONNX at ``path``; a failure raises a DeployError that names what to change."""
    try:
        onnx_from_torch(
            model,
            example_inputs,
            path,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
        )
    except ExportError as exc:
        raise DeployError(
            f"ONNX export of the model failed: {exc}; make the forward traceable by torch.onnx.export "
            f"(no data-dependent Python control flow, standard ops)"
        ) from exc


def quantize_variant(
    float_path: Path, path: Path, plan: Plan, quantize: QuantizeConfig, feeds
) -> None:
    """Quantize the plan's int8 layers of ``float_path`` into ``path``."""
    layers = [name for name, option in plan.layers.items() if option.precision == "int8"]
    quantize_layers(float_path, path, layers, quantize, feeds)


def quantize_layers(
    float_path: Path, path: Path, layers: list[str], quantize: QuantizeConfig, feeds
) -> None:
    """Quantize the Conv, Gemm and MatMul nodes of ``layers`` (module names) and no others."""
    proto = onnx.load(str(float_path))
    # Only the nodes of ``layers`` are quantized. MatMuls of no planned layer
    # (attention's Q @ K^T and weights @ V, both inputs activations) stay in
    # float: the sensitivity analysis never measured them.
    int8_nodes = set()
    for name in layers:
        int8_nodes.update(nodes_of_module(proto, name, QUANTIZED_OPS))
    exclude = [
        node.name
        for node in proto.graph.node
        if node.op_type in QUANTIZED_OPS and node.name not in int8_nodes
    ]
    # Adds, pools and reshapes are quantized only inside int8 regions.
    exclude += float_region_nodes(proto, int8_nodes, QUANTIZED_OPS)
    quantize_onnx(
        float_path,
        path,
        method=quantize.method,
        calibration_feeds=feeds,
        nodes_to_exclude=exclude,
        per_channel=quantize.per_channel,
        reduce_range=quantize.reduce_range,
        calibrate_method=quantize.calibrate_method,
    )


def run_entry(
    name: str,
    artifact: str,
    validation: Validation,
    predicted: float | None,
    plan: dict | None,
    summary: str,
) -> dict:
    """Return the manifest entry of a validated artifact."""
    return {
        "name": name,
        "plan": plan,
        "summary": summary,
        "artifact": artifact,
        **validation.to_dict(),
        "predicted_latency_ms": predicted,
        "on_frontier": False,
    }


def per_channel_variant(name, plan, partial: Path, data, settings) -> dict:
    """Build (or reuse) the per-channel static int8 alternative to a rejected per-tensor variant."""
    config = settings[0]
    saved = partial / "variants" / f"{name}-per-channel.json"
    entry = load_json(saved)
    if entry is None:
        quantize = dataclasses.replace(config.quantize, method="static", per_channel=True)
        entry = build_variant(
            f"{name}-per-channel",
            plan,
            *data,
            dataclasses.replace(config, quantize=quantize),
            *settings[1:],
            partial,
            summary=f"{plan.describe()} (per-channel static int8)",
        )
        save_json(saved, entry)
    return entry


def build_variant(
    name,
    plan,
    original,
    example_inputs,
    calibration,
    validation_set,
    reference,
    protocol,
    config,
    names,
    axes,
    feeds,
    classification,
    partial: Path,
    summary: str | None = None,
) -> dict:
    variant, recipe = materialize(original, plan, example_inputs, calibration, config)
    folder = partial / "variants"
    float_path = folder / f"{name}.fp32.onnx"
    export_onnx(variant, example_inputs, float_path, names, axes)
    artifact = float_path
    zeroed = []
    failure = None
    runtime_int8 = []
    if recipe["quantize"]:
        artifact = folder / f"{name}.int8.onnx"
        if not config.quantize.per_channel or config.quantize.method == "dynamic":
            # ONNX Runtime's dynamic ConvInteger has one weight scale per tensor
            # even when per_channel is set.
            proto = onnx.load(str(float_path))
            int8 = [
                n
                for x in recipe["quantize"]["layers"]
                for n in nodes_of_module(proto, x, QUANTIZED_OPS)
            ]
            zeroed = per_tensor_zeroed_channels(float_path, int8)
        try:
            quantize_variant(float_path, artifact, plan, config.quantize, feeds)
        except ExportError as exc:
            failure = f"quantization failed: {exc}"
            artifact = float_path
        else:
            float_path.unlink()
            runtime_int8 = _runtime_int8_layers(artifact, plan)
    check = validate_artifact(
        artifact, validation_set, reference, protocol, classification=classification
    )
    if failure:
        check = dataclasses.replace(check, status="rejected", reason=failure)
    elif zeroed:
        check = dataclasses.replace(
            check,
            status="rejected",
            reason=f"{config.quantize.method} per-tensor int8 rounds whole weight channels to "
            f"zero in {'; '.join(zeroed)}; a per-channel static variant is offered instead",
        )
    entry = run_entry(
        name,
        str(artifact.relative_to(partial)),
        check,
        plan.predicted_latency_ms,
        {**plan.to_dict(), "recipe": recipe},
        summary or plan.describe(),
    )
    if zeroed:
        entry["per_tensor_zeroed"] = zeroed
    if runtime_int8:
        entry["runtime_int8_layers"] = runtime_int8
        logger.info(
            "    %s: ONNX Runtime runs %d float layer(s) in int8 (per-tensor weights) because "
            "int8 layers surround them: %s",
            name,
            len(runtime_int8),
            ", ".join(runtime_int8),
        )
    return entry


def _runtime_int8_layers(artifact: Path, plan: Plan) -> list[str]:
    # The float layers of the plan whose nodes ONNX Runtime quantizes when it loads the file.
    proto = onnx.load(str(artifact))
    nodes = set(runtime_quantized_nodes(proto))
    return sorted(
        name
        for name, option in plan.layers.items()
        if option.precision == "fp32"
        and nodes & set(nodes_of_module(proto, name, ("Conv", "Gemm")))
    )
