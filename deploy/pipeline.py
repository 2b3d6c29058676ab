"""``optimize``: the whole flow of one run, from model and data to a run folder.

analyze -> costs -> sensitivity -> plan -> materialize -> export -> validate -> report

The run is built in a hidden ``.NAME.partial`` folder beside ``out`` and
renamed to ``out`` once ``manifest.json`` is written, so ``out`` exists only
when complete. A run that stops part-way leaves the partial folder;
``resume=True`` picks it up, reusing the plans and every variant already
validated.

The stages live in their own modules: ``deploy.plan_stage`` (analyze,
costs, sensitivity, plan), ``deploy.variants`` (materialize, export,
quantize, validate) and ``deploy.run_folder`` (the partial folder and what
``--resume`` checks). This module resolves the inputs and runs them in order.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import io
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from deploy.costs import PASSES, SearchSpace
from deploy.data import Dataset, dataset_from_arrays, load_data
from deploy.errors import DeployError
from deploy.finetune import FinetuneConfig
from deploy.latency_model import (
    TIMING_INPUT,
    rescale_prediction,
)
from deploy.models import load_model
from deploy.passes.quantize import QuantizeConfig
from deploy.plan_stage import plan_variants
from deploy.planner import Plan
from deploy.power import variant_energy
from deploy.profiles import (
    DEFAULT_PROFILE,
    DeviceProfile,
    load_profile,
    local_profile_matches,
    new_local_profile,
    timing_protocol,
)
from deploy.report import format_quality, mark_frontier, write_atomic, write_report
from deploy.run_folder import (
    check_same_run,
    describe_write_failure,
    load_json,
    prepare_out,
    run_identity,
    save_json,
)
from deploy.stages import Stage
from deploy.torch_utils import first_output, predict, to_tensors
from deploy.validate import (
    MIN_SIDE_BY_SIDE_S,
    time_side_by_side,
    validate_artifact,
)
from deploy.variants import (
    QUANTIZED_OPS,
    build_variant,
    calibration_feeds,
    export_onnx,
    per_channel_variant,
    run_entry,
)
from exporters.onnx import (
    ExportError,
    OnnxRunner,
    nodes_of_module,
)

logger = logging.getLogger(__name__)


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
        min_timing_s: the minimum time, in seconds, that the alternating
            rounds of the calibration profiles and of the side-by-side
            timing take; on a shared machine a burst of load lasts seconds.
            0 keeps the fewest rounds (3 and 5). Defaults to 10.
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
    min_timing_s: float = MIN_SIDE_BY_SIDE_S

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
        seconds = self.min_timing_s
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds <= 600
        ):
            raise DeployError(f"min_timing_s {seconds!r} must be a number of seconds in [0, 600]")
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
            "min_timing_s": self.min_timing_s,
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
    partial = prepare_out(out, resume)
    completed = keep_partial = False
    try:
        check_same_run(partial, run_identity(original, model_name, dataset, profile, config))
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
        raise DeployError(describe_write_failure(exc, partial)) from exc
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

    with Stage(1, total, "export and validate the fp32 baseline"):
        baseline = load_json(partial / "baseline.json")
        if baseline is None:
            export_onnx(original, example_inputs, partial / "baseline.onnx", names, axes)
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
            baseline = run_entry("baseline", "baseline.onnx", check, None, None, "fp32 baseline")
            save_json(partial / "baseline.json", baseline)
        logger.info(
            "    baseline p50 %.3f ms, accuracy %s",
            baseline["latency_ms"]["p50"],
            format_quality(baseline["accuracy"]),
        )

    keep_float = resolve_keep_float(config.quantize.keep_float, original, partial / "baseline.onnx")
    planned = load_json(partial / "plans.json")
    if planned is None:
        planned = plan_variants(
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
        save_json(partial / "plans.json", planned)
    else:
        logger.info(
            "[2-4/%d] reusing %d plans from the interrupted run", total, len(planned["plans"])
        )
    plans = [Plan.from_dict(p) for p in planned["plans"]]

    with Stage(5, total, f"materialize, export and validate {len(plans)} variants"):
        feeds = calibration_feeds(names, calibration)
        variants = []
        for i, plan in enumerate(plans):
            name = f"v{i + 1:02d}"
            saved = partial / "variants" / f"{name}.json"
            entry = load_json(saved)
            if entry is None:
                entry = build_variant(
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
                save_json(saved, entry)
            if entry.get("per_tensor_zeroed"):
                variants.append(entry)
                entry = per_channel_variant(
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

    with Stage(6, total, "time the baseline and the variants side by side"):
        baseline["predicted_latency_ms"] = planned["baseline_predicted_ms"]
        baseline["outside_layers_share"] = planned.get("outside_layers_share", 0.0)
        _retime_side_by_side(
            partial, baseline, variants, validation_set, protocol, config.min_timing_s
        )

    with Stage(7, total, "report"):
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
                "side_by_side": "p50 and p90 are medians over alternating rounds that time "
                "the baseline and every valid variant on the same input: at least 5 rounds"
                + (f", spanning at least {config.min_timing_s:g} s" if config.min_timing_s else "")
                + " (each entry's latency_ms.rounds)",
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
    partial: Path, baseline: dict, variants: list[dict], data, protocol, min_seconds: float
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
    timed = time_side_by_side(
        {e["name"]: partial / e["artifact"] for e in entries},
        data,
        protocol,
        min_seconds=min_seconds,
    )
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
