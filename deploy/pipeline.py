"""``optimize``: the whole flow of one run, from model and data to a run folder.

analyze -> costs -> sensitivity -> plan -> materialize -> export -> validate -> report

The run is built in a hidden ``.NAME.partial`` folder beside ``out`` and
renamed to ``out`` once ``manifest.json`` is written, so ``out`` exists only
when complete. A run that stops part-way leaves the partial folder;
``resume=True`` picks it up, reusing the plans and every variant already
validated.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from deploy.analyze import analyze
from deploy.costs import PASSES, CostTable, SearchSpace, layer_options
from deploy.data import Dataset, dataset_from_arrays, load_data
from deploy.errors import DeployError
from deploy.finetune import FinetuneConfig, distill
from deploy.latency_model import (
    TIMING_INPUT,
    ChainLayer,
    activation_bytes,
    calibrate,
    edge_savings,
    fit_rates,
    outside_layers_share,
    plan_entries,
    predict_plan,
    rescale_prediction,
    runtime_int8,
    weight_bytes,
)
from deploy.measure import time_sessions
from deploy.models import load_model
from deploy.passes.lowrank import LowRankConfig, apply_lowrank
from deploy.passes.prune import PruneConfig, apply_prune, prunable_layers
from deploy.passes.quantize import QuantizeConfig
from deploy.planner import LayerChoices, Option, Plan, sweep
from deploy.power import latency_budgets_from_energy, variant_energy
from deploy.profiles import (
    DEFAULT_PROFILE,
    DeviceProfile,
    core_cache_bytes,
    load_profile,
    local_profile_matches,
    new_local_profile,
    timing_protocol,
)
from deploy.report import MANIFEST, format_quality, mark_frontier, write_atomic, write_report
from deploy.sensitivity import measure_sensitivity
from deploy.torch_utils import first_output, predict, to_tensors
from deploy.validate import (
    Validation,
    per_tensor_zeroed_channels,
    time_side_by_side,
    validate_artifact,
)
from exporters.onnx import (
    ExportError,
    OnnxRunner,
    layer_neighbours,
    layer_node_times,
    node_profile,
    nodes_of_module,
    onnx_from_torch,
    op_totals,
    quantize_onnx,
    runtime_quantized_nodes,
    unprofiled_op_times,
)
from exporters.timing import TimingProtocol

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class OptimizeConfig:
    """Settings of one ``optimize`` run; ``None`` means the default.

    Attributes:
        budgets_ms: latency budgets to plan for, in milliseconds. Defaults to
            ``num_budgets`` budgets spaced from the fastest reachable plan to
            the fp32 baseline.
        num_budgets: budgets in the default sweep. Defaults to 10.
        passes: passes the planner may use. Defaults to lowrank, prune and
            quantize.
        calibration_fraction: share of the data used for sensitivity,
            calibration and fine-tuning; the rest is held out for validation.
            Defaults to 0.4.
        finetune: recovery fine-tuning by distillation for pruned or
            factorized variants, or ``None`` to skip it. Defaults to
            ``FinetuneConfig()``.
        quantize: int8 recipe (method, per-channel, calibration). Defaults to
            static QDQ, per-channel, min/max calibration.
        space: options the planner may choose per layer.
        task: ``classification`` (agreement is top-1 agreement) or
            ``embedding`` (agreement is the share of samples with cosine
            similarity >= 0.99). Defaults to ``classification``.
        max_calibration_samples: cap on samples used for sensitivity and
            quantization calibration. Defaults to 256.
    """

    budgets_ms: list[float] | None = None
    # Energy budgets in mJ per inference, converted to latency budgets with the profile's power.
    budgets_mj: list[float] | None = None
    num_budgets: int = 10
    passes: tuple[str, ...] = PASSES
    calibration_fraction: float = 0.4
    finetune: FinetuneConfig | None = dataclasses.field(default_factory=FinetuneConfig)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeConfig)
    space: SearchSpace | None = None
    task: str = "classification"
    max_calibration_samples: int = 256

    def __post_init__(self):
        if isinstance(self.passes, str) or not isinstance(self.passes, (list, tuple)):
            raise DeployError(
                f"passes {self.passes!r} must be a list of pass names, such as ('prune', 'quantize')"
            )
        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise DeployError(f"unknown pass {unknown[0]!r}; choose from {', '.join(PASSES)}")
        if not self.passes:
            raise DeployError(f"passes is empty; choose at least one of {', '.join(PASSES)}")
        self.passes = tuple(self.passes)
        if self.budgets_ms is not None:
            self.budgets_ms = _check_budgets(self.budgets_ms)
        _check_int("num_budgets", self.num_budgets, 1)
        _check_int("max_calibration_samples", self.max_calibration_samples, 1)
        fraction = self.calibration_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise DeployError(f"calibration_fraction {fraction!r} must be a number in [0.05, 0.9]")
        if not 0.05 <= self.calibration_fraction <= 0.9:
            raise DeployError(
                f"calibration fraction {self.calibration_fraction} is outside [0.05, 0.9]; "
                f"the rest of the data must be left for validation"
            )
        if self.task not in ("classification", "embedding"):
            raise DeployError(f"task {self.task!r} is not 'classification' or 'embedding'")
        if self.finetune is not None and not isinstance(self.finetune, FinetuneConfig):
            raise DeployError(f"finetune {self.finetune!r} must be a FinetuneConfig or None")
        if not isinstance(self.quantize, QuantizeConfig):
            raise DeployError(f"quantize {self.quantize!r} must be a QuantizeConfig")
        if self.space is not None and not isinstance(self.space, SearchSpace):
            raise DeployError(f"space {self.space!r} must be a SearchSpace or None")
        if self.space is None:
            self.space = SearchSpace(passes=tuple(self.passes))
        else:
            # ``passes`` is what --passes sets; a search space names at most those.
            self.space = dataclasses.replace(
                self.space, passes=tuple(p for p in self.passes if p in self.space.passes)
            )

    def to_dict(self) -> dict:
        return {
            "budgets_ms": self.budgets_ms,
            "budgets_mj": self.budgets_mj,
            "num_budgets": self.num_budgets,
            "passes": list(self.passes),
            "calibration_fraction": self.calibration_fraction,
            "finetune": self.finetune.to_dict() if self.finetune else None,
            "quantize": self.quantize.to_dict(),
            "space": self.space.to_dict(),
            "task": self.task,
        }


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeployError(f"{name} {value!r} must be a whole number of at least {minimum}")
    if value < minimum:
        raise DeployError(f"{name} {value} must be at least {minimum}")


def _check_budgets(budgets) -> list[float]:
    if isinstance(budgets, (str, bytes)) or not hasattr(budgets, "__iter__"):
        raise DeployError(f"budgets_ms {budgets!r} must be a list of milliseconds, such as [0.5]")
    values = list(budgets)
    if not values:
        raise DeployError("budgets_ms is empty; give at least one budget or None for the sweep")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise DeployError(f"latency budget {value!r} is not a number of milliseconds")
        if not (math.isfinite(value) and value > 0):
            raise DeployError(
                f"latency budget {value} ms is not a positive, finite number of milliseconds"
            )
    return [float(v) for v in values]


class _Stage:
    """Logs start and finish lines with timings for one stage."""

    def __init__(self, number: int, total: int, name: str):
        self.label = f"[{number}/{total}] {name}"

    def __enter__(self):
        self.start = time.perf_counter()
        logger.info("%s ...", self.label)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            logger.info("%s done in %.1f s", self.label, time.perf_counter() - self.start)


def _progress(stage: str):
    def report(done: int, total: int, name: str, elapsed: float):
        logger.info("    %s %d/%d (%s) %.1f s", stage, done, total, name, elapsed)

    return report


def _resolve_profile(device_profile) -> DeviceProfile:
    if isinstance(device_profile, DeviceProfile):
        return device_profile
    if device_profile is not None:
        return load_profile(device_profile)
    path = Path(DEFAULT_PROFILE)
    if path.is_file():
        profile = load_profile(path)
        if local_profile_matches(profile):
            return profile
        logger.warning("%s was measured on another CPU; measuring a fresh profile", path)
    profile = new_local_profile(path.stem)
    profile.path = path
    return profile


def _resolve_data(data) -> tuple[Dataset, str]:
    if data is None:
        from deploy.zoo.digits import heldout_digits

        return dataset_from_arrays(
            heldout_digits(), "held-out digits"
        ), "sklearn load_digits (held-out)"
    if isinstance(data, Dataset):
        return data, "in-memory dataset"
    if isinstance(data, Mapping) or hasattr(data, "files"):
        # A dict of arrays, or the NpzFile that np.load returns.
        arrays = {key: np.asarray(data[key]) for key in data.keys()}
        return dataset_from_arrays(arrays, "in-memory arrays"), "in-memory arrays"
    return load_data(data), str(data)


def _resolve_model(model, allow_pickle: bool) -> tuple[nn.Module, str]:
    if model is None:
        from deploy.zoo.digits import build_model

        return build_model(), "digits-cnn"
    if isinstance(model, nn.Module):
        return model, type(model).__name__
    return load_model(model, allow_pickle), Path(str(model).split(":")[0]).stem


def _warn_on_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            warnings.warn(
                f"BatchNorm {name!r} has no running statistics, so it normalizes with batch "
                f"statistics even in eval mode and the exported graph differs from training",
                stacklevel=3,
            )


def _copy_model(model: nn.Module) -> nn.Module:
    """Deep-copy the user's model, including one pruned with ``torch.nn.utils.prune``.

    A pruned layer holds its masked weight as a computed (non-leaf) tensor,
    which deepcopy rejects. A detached copy replaces it, and the pruning hook
    recomputes it from ``weight_orig`` and ``weight_mask`` in the copy.
    """
    from torch.nn.utils import prune as torch_prune

    memo = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                for method in getattr(hook, "_pruning_methods", [hook]):
                    tensor = getattr(module, method._tensor_name, None)
                    if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                        memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(model, memo)


def _fold_pruning_masks(model: nn.Module) -> None:
    """Fold ``torch.nn.utils.prune`` masks into plain weights, in place on deploy's copy.

    A masked layer keeps ``weight_orig`` and ``weight_mask`` and recomputes the
    weight in a forward pre-hook, so an export would carry both tensors.
    """
    from torch.nn.utils import prune as torch_prune

    folded = []
    for name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                for method in getattr(hook, "_pruning_methods", [hook]):
                    if hasattr(module, f"{method._tensor_name}_mask"):
                        torch_prune.remove(module, method._tensor_name)
                        folded.append(f"{name}.{method._tensor_name}")
    if folded:
        logger.info("    folded pruning masks into %s", ", ".join(folded))
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    if total and zeros / total >= 0.5:
        warnings.warn(
            f"{zeros / total:.0%} of the Conv and Linear weights are zero (unstructured "
            f"sparsity); ONNX Runtime on the CPU stores and runs them as dense tensors, so "
            f"size and latency do not shrink: remove whole channels with the prune pass instead",
            stacklevel=3,
        )


def _io_names(model: nn.Module, data: Dataset) -> tuple[list[str], dict[str, dict[int, str]]]:
    count = len(data.inputs)
    names = ["input"] if count == 1 else [f"input_{i}" for i in range(count)]
    axes: dict[str, dict[int, str]] = {}
    for name, array in zip(names, data.inputs, strict=True):
        axes[name] = {0: "batch"}
        if np.issubdtype(array.dtype, np.integer) and array.ndim >= 2:
            axes[name][1] = "sequence"
    axes["output"] = {0: "batch"}
    return names, axes


def _check_sequence_lengths(
    path: Path, model: nn.Module, data: Dataset, axes: dict[str, dict[int, str]]
) -> None:
    """Check that an export with a dynamic sequence axis matches the model at two lengths.

    Batch sizes are checked by validation; this covers axis 1 of integer
    inputs (token ids, attention masks), run at the data's length and at half
    of it on three samples.

    Raises:
        DeployError: the export fails or disagrees with the model at a length.
    """
    sequence = [1 in input_axes for name, input_axes in axes.items() if name != "output"]
    if not any(sequence):
        return
    runner = OnnxRunner(path, 1)
    full = min(a.shape[1] for a, s in zip(data.inputs, sequence, strict=True) if s)
    for length in (full, max(full // 2, 1)):
        arrays = [
            a[:3, :length] if s else a[:3] for a, s in zip(data.inputs, sequence, strict=True)
        ]
        expected = predict(model, arrays)
        try:
            output = runner.run(dict(zip(runner.input_names, arrays, strict=True)))[0]
        except ExportError as exc:
            raise DeployError(f"the fp32 export fails at sequence length {length}: {exc}") from exc
        error = float(np.abs(output - expected).max())
        if output.shape != expected.shape or error > 1e-3 * max(float(np.abs(expected).max()), 1.0):
            raise DeployError(
                f"the fp32 export differs from the model at sequence length {length} "
                f"(max abs error {error:.3g}); the export baked in the example length"
            )


def _check_model_runs(model: nn.Module, data: Dataset) -> np.ndarray:
    try:
        with torch.no_grad():
            output = first_output(model(*to_tensors([a[:2] for a in data.inputs])))
    except Exception as exc:
        shapes = ", ".join(f"{a.shape[1:]} {a.dtype}" for a in data.inputs)
        raise DeployError(
            f"the model failed on the data's inputs (per sample: {shapes}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            f"store inputs in the data file with the shape and dtype the model expects"
        ) from exc
    return output.detach().numpy()


def _prepare_out(out: Path, resume: bool) -> Path:
    partial = out.parent / f".{out.name}.partial"
    if out.exists():
        if (out / MANIFEST).is_file():
            raise DeployError(
                f"output folder {out} already holds a finished run; choose another --out"
            )
        raise DeployError(f"output folder {out} already exists; choose another --out or remove it")
    if partial.exists() and not resume:
        raise DeployError(
            f"an interrupted run was found at {partial}; pass --resume to finish it, "
            f"or remove that folder to start over"
        )
    (partial / "variants").mkdir(parents=True, exist_ok=True)
    # A kill during an atomic write leaves its hidden temporary file; none of
    # them is ever read, so they are removed before resuming.
    for folder in (partial, partial / "variants"):
        for stale in folder.glob(".*"):
            if stale.is_file():
                stale.unlink()
    return partial


RUN_IDENTITY = "run.json"


def _run_identity(model: nn.Module, model_name: str, dataset: Dataset, profile, config) -> dict:
    """Return what must match for ``--resume`` to reuse a partial run: model, data, profile, config."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    model_digest = digest.hexdigest()
    digest = hashlib.sha256()
    for array in [*dataset.inputs, *([] if dataset.labels is None else [dataset.labels])]:
        digest.update(np.ascontiguousarray(array).tobytes())
    return {
        "model": model_name,
        "model_sha256": model_digest,
        "data_sha256": digest.hexdigest(),
        "device_profile": profile.name,
        "config": json.loads(json.dumps(config.to_dict())),
    }


def _check_same_run(partial: Path, identity: dict) -> None:
    saved = _load_json(partial / RUN_IDENTITY)
    if saved is None:
        _save_json(partial / RUN_IDENTITY, identity)
        return
    changed = [key for key in identity if saved.get(key) != identity[key]]
    if changed:
        raise DeployError(
            f"the interrupted run at {partial} was started with a different {changed[0]}; "
            f"resume it with the same arguments, or remove that folder to start over"
        )


def _describe_write_failure(exc: OSError, partial: Path) -> str:
    where = exc.filename or partial
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device while writing {where}; free some space, then rerun "
            f"the same command with --resume to finish the run from {partial}"
        )
    return (
        f"writing {where} failed ({exc.strerror or exc}); fix the cause, then rerun the same "
        f"command with --resume to finish the run from {partial}"
    )


def _save_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _feeds(
    names: list[str], arrays: list[np.ndarray], batch: int = 32
) -> list[dict[str, np.ndarray]]:
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


def _export(model, example_inputs, path: Path, names, axes) -> None:
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


def _quantize_variant(
    float_path: Path, path: Path, plan: Plan, quantize: QuantizeConfig, feeds
) -> None:
    layers = [name for name, option in plan.layers.items() if option.precision == "int8"]
    _quantize_layers(float_path, path, layers, quantize, feeds)


def _quantize_layers(
    float_path: Path, path: Path, layers: list[str], quantize: QuantizeConfig, feeds
) -> None:
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


def _entry(
    name: str,
    artifact: str,
    validation: Validation,
    predicted: float | None,
    plan: dict | None,
    summary: str,
) -> dict:
    return {
        "name": name,
        "plan": plan,
        "summary": summary,
        "artifact": artifact,
        **validation.to_dict(),
        "predicted_latency_ms": predicted,
        "on_frontier": False,
    }


def optimize(
    model: nn.Module | str | os.PathLike | None = None,
    data: Dataset | dict | str | os.PathLike | None = None,
    device_profile: DeviceProfile | str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    config: OptimizeConfig | None = None,
    resume: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Optimize a trained model for a device; write a run folder and return its manifest.

    Args:
        model: an ``nn.Module``, or a path ``load_model`` reads (.py, .pt2).
            Defaults to the CNN trained on scikit-learn's digits.
        data: a ``Dataset``, a dict of arrays or an ``.npz`` path. Defaults to
            the held-out digits.
        device_profile: a ``DeviceProfile`` or a profile path. Defaults to
            ``device_profiles/local-cpu.yaml``, measured here if missing.
        out: run folder to create. Defaults to ``runs/<model>-<time>``.
        config: run settings. Defaults to ``OptimizeConfig()``.
        resume: finish an interrupted run of the same ``out``. Defaults to False.
        allow_pickle: allow unpickling a ``.pt`` model. Defaults to False.

    Raises:
        DeployError: bad input or an impossible budget; no run folder is left behind.
    """
    config = config or OptimizeConfig()
    user_model, model_name = _resolve_model(model, allow_pickle)
    dataset, data_source = _resolve_data(data)
    profile = _resolve_profile(device_profile)
    if profile.runtime != "onnxruntime":
        raise DeployError(
            f"device profile {profile.name} targets {profile.runtime}; optimize measures with "
            f"ONNX Runtime on this machine: pass an onnxruntime profile"
        )
    protocol = timing_protocol(profile)
    if protocol.pin_cpus is None and hasattr(os, "sched_getaffinity"):
        # One fixed affinity for the baseline and every variant of this run.
        cpus = tuple(sorted(os.sched_getaffinity(0)))[: protocol.threads]
        protocol = dataclasses.replace(protocol, pin_cpus=cpus)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out is not None else Path("runs") / f"{model_name}-{stamp}"

    # Work on a copy in eval mode: the user's model keeps its parameters and mode.
    _warn_on_batchnorm(user_model)
    if any(m.training for m in user_model.modules()):
        warnings.warn(
            "the model is in training mode; deploy exports, measures and compares its eval-mode "
            "function (BatchNorm running statistics, no dropout), and your model stays in "
            "training mode",
            stacklevel=2,
        )
    original = _copy_model(user_model).eval()
    _fold_pruning_masks(original)
    _check_model_runs(original, dataset)
    calibration_set, validation_set = dataset.split(config.calibration_fraction)
    calibration = [a[: config.max_calibration_samples] for a in calibration_set.inputs]
    example_inputs = to_tensors([a[:2] for a in calibration])
    names, axes = _io_names(original, dataset)
    classification = config.task == "classification"

    existed = (out.parent / f".{out.name}.partial").exists()
    partial = _prepare_out(out, resume)
    completed = keep_partial = False
    try:
        _check_same_run(partial, _run_identity(original, model_name, dataset, profile, config))
        manifest = _run(
            original,
            model_name,
            data_source,
            profile,
            protocol,
            config,
            calibration,
            validation_set,
            example_inputs,
            names,
            axes,
            classification,
            partial,
        )
        partial.rename(out)
        completed = True
    except KeyboardInterrupt:
        keep_partial = True
        raise
    except OSError as exc:
        # A full disk or a lost permission: what was written so far is complete
        # (every file goes through a temporary name), so keep it for --resume.
        keep_partial = True
        raise DeployError(_describe_write_failure(exc, partial)) from exc
    finally:
        # Bad input found before any variant was validated leaves nothing behind;
        # otherwise the partial folder stays for --resume. A resumed run never
        # deletes what the interrupted run left.
        if (
            not completed
            and not keep_partial
            and not existed
            and not any((partial / "variants").glob("*.json"))
        ):
            shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "wrote %s (%d variants, %d on the frontier)",
        out,
        len(manifest["variants"]),
        sum(v["on_frontier"] for v in manifest["variants"]),
    )
    return manifest


def _run(
    original,
    model_name,
    data_source,
    profile,
    protocol,
    config,
    calibration,
    validation_set,
    example_inputs,
    names,
    axes,
    classification,
    partial: Path,
) -> dict:
    total = 7
    reference = predict(original, validation_set.inputs)

    with _Stage(1, total, "export and validate the fp32 baseline"):
        baseline = _load_json(partial / "baseline.json")
        if baseline is None:
            _export(original, example_inputs, partial / "baseline.onnx", names, axes)
            check = validate_artifact(
                partial / "baseline.onnx",
                validation_set,
                reference,
                protocol,
                classification=classification,
            )
            if not check:
                raise DeployError(f"the fp32 export of the model is broken: {check.reason}")
            _check_sequence_lengths(partial / "baseline.onnx", original, validation_set, axes)
            baseline = _entry("baseline", "baseline.onnx", check, None, None, "fp32 baseline")
            _save_json(partial / "baseline.json", baseline)
        logger.info(
            "    baseline p50 %.3f ms, accuracy %s",
            baseline["latency_ms"]["p50"],
            format_quality(baseline["accuracy"]),
        )

    keep_float = resolve_keep_float(config.quantize.keep_float, original, partial / "baseline.onnx")
    planned = _load_json(partial / "plans.json")
    if planned is None:
        planned = _plan(
            original,
            profile,
            config,
            calibration,
            example_inputs,
            baseline,
            total,
            keep_float,
            partial / "baseline.onnx",
            names,
            protocol,
        )
        _save_json(partial / "plans.json", planned)
    else:
        logger.info(
            "[2-4/%d] reusing %d plans from the interrupted run", total, len(planned["plans"])
        )
    plans = [Plan.from_dict(p) for p in planned["plans"]]

    with _Stage(5, total, f"materialize, export and validate {len(plans)} variants"):
        feeds = _feeds(names, calibration)
        variants = []
        for i, plan in enumerate(plans):
            name = f"v{i + 1:02d}"
            saved = partial / "variants" / f"{name}.json"
            entry = _load_json(saved)
            if entry is None:
                entry = _build_variant(
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
                    partial,
                )
                _save_json(saved, entry)
            if entry.get("per_tensor_zeroed"):
                variants.append(entry)
                entry = _per_channel_variant(
                    name,
                    plan,
                    partial,
                    (original, example_inputs, calibration, validation_set, reference, protocol),
                    (config, names, axes, feeds, classification),
                )
            logger.info(
                "    %s %-28s p50 %.3f ms (predicted %.3f), accuracy %s, %s",
                name,
                entry["summary"],
                entry["latency_ms"].get("p50", float("nan")),
                entry["predicted_latency_ms"],
                format_quality(entry["accuracy"]),
                entry["status"],
            )
            variants.append(entry)

    with _Stage(6, total, "time the baseline and the variants side by side"):
        baseline["predicted_latency_ms"] = planned["baseline_predicted_ms"]
        baseline["outside_layers_share"] = planned.get("outside_layers_share", 0.0)
        _retime_side_by_side(partial, baseline, variants, validation_set, protocol)

    with _Stage(7, total, "report"):
        for entry in [baseline, *variants]:
            entry.update(
                variant_energy(
                    profile.data["power"],
                    profile.data["latency_table"],
                    entry["latency_ms"].get("p50"),
                )
            )
        mark_frontier([baseline, *variants])
        manifest = {
            "schema_version": 1,
            "model": model_name,
            "created_at": datetime.datetime.now(datetime.timezone.utc)
            .replace(microsecond=0)
            .isoformat(),
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "device_profile": {
                "name": profile.name,
                "path": str(profile.path) if profile.path else None,
                "runtime": profile.runtime,
                "runtime_version": profile.data["runtime"]["version"],
                "threads": profile.threads,
                "cpu_model": profile.data["device"].get("cpu_model"),
            },
            "protocol": {
                **protocol.to_dict(),
                "batch_size": 1,
                "input_shapes": [[1, *a.shape[1:]] for a in validation_set.inputs],
                "warmup_excluded": True,
                "side_by_side": "p50 and p90 are medians over 5 alternating rounds that time "
                "the baseline and every valid variant on the same input",
                "cold_start": "a fresh session's creation plus its first run, reported as "
                "cold_ms apart from p50 and p90",
            },
            "data": {
                "source": data_source,
                "calibration_samples": len(calibration[0]),
                "validation_samples": len(validation_set),
                "labels": validation_set.labels is not None,
            },
            "config": config.to_dict(),
            "overhead_ms": planned["overhead_ms"],
            "baseline": baseline,
            "variants": variants,
        }
        write_report(partial, manifest)
    return manifest


def resolve_keep_float(names: list[str], model: nn.Module, float_onnx: Path) -> set[str]:
    """Map layer names to keep in float to PyTorch module names, before any rewrite.

    Each name is a Conv2d or Linear module name of ``model`` or the name of a
    Conv, Gemm or MatMul node of its fp32 export ``float_onnx``; the runtime's
    quantizer may rename that node later (a dynamic rewrite turns Gemm into
    MatMul), which is why names are resolved here, against the export.

    Raises:
        DeployError: a name matches neither; the message lists close matches.
    """
    if not names:
        return set()
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    proto = onnx.load(str(float_onnx))
    nodes = {n.name: None for n in proto.graph.node if n.op_type in QUANTIZED_OPS}
    # Shorter (outer) names first, so that each node ends up owned by its innermost layer.
    for layer in sorted(layers, key=len):
        for node in nodes_of_module(proto, layer, QUANTIZED_OPS):
            nodes[node] = layer
    resolved = set()
    for name in names:
        if name in layers:
            resolved.add(name)
        elif nodes.get(name):
            resolved.add(nodes[name])
        elif name in nodes:
            raise DeployError(
                f"--keep-float node {name!r} belongs to no Conv2d or Linear module, so deploy "
                f"cannot keep it in float; name its layer instead"
            )
        else:
            close = difflib.get_close_matches(name, sorted(layers | set(nodes)), n=4, cutoff=0.5)
            raise DeployError(
                f"--keep-float name {name!r} is neither a Conv2d or Linear module of the model "
                f"nor a Conv, Gemm or MatMul node of its ONNX export; "
                + (
                    f"close matches: {', '.join(close)}"
                    if close
                    else f"layers: {', '.join(sorted(layers))}"
                )
            )
    logger.info("    kept in float: %s", ", ".join(sorted(resolved)))
    return resolved


def _retime_side_by_side(
    partial: Path, baseline: dict, variants: list[dict], data, protocol
) -> None:
    """Replace each valid entry's p50 and p90 with figures timed side by side, in place.

    Validation times each artifact right after building it, minutes apart, so
    a change in machine load between them would skew every speedup. Timing
    them again in alternating rounds makes the ratios comparable. The
    predictions are recalibrated to the baseline timed here; the variants'
    own timings play no part in them.
    """
    entries = [e for e in [baseline, *variants] if e["status"] == "ok"]
    # The input timed here, kept for 'deploy profile --check --retime'.
    inputs = {f"input_{k}": a[:1] for k, a in enumerate(data.inputs)}
    buffer = io.BytesIO()
    np.savez(buffer, **inputs)
    write_atomic(partial / TIMING_INPUT, buffer.getvalue())
    timed = time_side_by_side({e["name"]: partial / e["artifact"] for e in entries}, data, protocol)
    baseline_p50 = timed["baseline"]["p50"]
    for entry in entries:
        entry["latency_ms"]["validation_p50"] = entry["latency_ms"]["p50"]
        entry["latency_ms"].update(timed[entry["name"]])
        if entry is not baseline and entry.get("predicted_latency_ms") is not None:
            entry["predicted_latency_ms"] = rescale_prediction(entry, baseline, baseline_p50)
    logger.info(
        "    baseline p50 %.3f ms side by side (%.3f ms when validated)",
        baseline_p50,
        baseline["latency_ms"]["validation_p50"],
    )


def _plan(
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
    with _Stage(2, total, "analyze"):
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

    with _Stage(3, total, f"costs from device profile {profile.name}"):
        # A profile of another device cannot be measured here: its missing entries are interpolated.
        costs = CostTable(
            profile,
            measure=local_profile_matches(profile),
            quantization=config.quantize.method,
        )
        options, latency, input_from, passthrough = layer_options(
            original, layers, prunable, config.space, costs, progress=_progress("layer")
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

    with _Stage(4, total, "sensitivity and plan"):
        sensitivity = measure_sensitivity(
            original,
            options,
            calibration,
            example_inputs,
            config.space.round_to,
            progress=_progress("sensitivity"),
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


def _per_channel_variant(name, plan, partial: Path, data, settings) -> dict:
    """Build (or reuse) the per-channel static int8 alternative to a rejected per-tensor variant."""
    config = settings[0]
    saved = partial / "variants" / f"{name}-per-channel.json"
    entry = _load_json(saved)
    if entry is None:
        quantize = dataclasses.replace(config.quantize, method="static", per_channel=True)
        entry = _build_variant(
            f"{name}-per-channel",
            plan,
            *data,
            dataclasses.replace(config, quantize=quantize),
            *settings[1:],
            partial,
            summary=f"{plan.describe()} (per-channel static int8)",
        )
        _save_json(saved, entry)
    return entry


def _build_variant(
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
    _export(variant, example_inputs, float_path, names, axes)
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
            _quantize_variant(float_path, artifact, plan, config.quantize, feeds)
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
    entry = _entry(
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
    feeds = _feeds(names, calibration) if quantize.method == "static" else None
    try:
        _quantize_layers(baseline_path, path, layers, quantize, feeds)
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
