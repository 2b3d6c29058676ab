"""``profile``: measure this machine's latency table into a device profile.

The sweep covers every option the planner may choose (``costs.layer_options``
with a ``SearchSpace``) at each precision of the profile, either for the
layers of one model or for a standard set of common CNN and transformer layer
shapes. Each entry is saved as soon as it is measured, so an interrupted sweep
resumes where it stopped: a rerun reuses the entries in the file.

``check`` compares predicted with measured latency over a finished run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from deploy.costs import CostTable, SearchSpace, candidate_ranks, layer_options
from deploy.errors import DeployError
from deploy.latency_model import check_run
from deploy.measure import LayerSpec
from deploy.passes.prune import kept_channels
from deploy.profiles import DeviceProfile, load_profile, local_profile_matches, new_local_profile

logger = logging.getLogger(__name__)

# Standard sweep, batch 1: (op, input shape, output channels or features, kernel, stride, groups).
# CNN stages from 32x32 down to 4x4 with 3x3, pointwise and depthwise convs,
# classifier heads, and the projections of a MiniLM-sized transformer
# (hidden 384, MLP 1536) over 128 tokens.
STANDARD_LAYERS: tuple[tuple, ...] = (
    ("conv2d", (1, 3, 32, 32), 32, (3, 3), (1, 1), 1),
    ("conv2d", (1, 32, 32, 32), 32, (3, 3), (1, 1), 1),
    ("conv2d", (1, 32, 16, 16), 64, (3, 3), (1, 1), 1),
    ("conv2d", (1, 64, 8, 8), 128, (3, 3), (1, 1), 1),
    ("conv2d", (1, 128, 8, 8), 128, (3, 3), (1, 1), 1),
    ("conv2d", (1, 128, 4, 4), 256, (3, 3), (1, 1), 1),
    ("conv2d", (1, 64, 16, 16), 128, (1, 1), (1, 1), 1),
    ("conv2d", (1, 128, 8, 8), 256, (1, 1), (1, 1), 1),
    ("conv2d", (1, 64, 16, 16), 64, (3, 3), (1, 1), 64),
    ("conv2d", (1, 128, 8, 8), 128, (3, 3), (1, 1), 128),
    ("linear", (1, 1024), 256, (1, 1), (1, 1), 1),
    ("linear", (1, 256), 10, (1, 1), (1, 1), 1),
    ("linear", (1, 128, 384), 384, (1, 1), (1, 1), 1),
    ("linear", (1, 128, 384), 1536, (1, 1), (1, 1), 1),
    ("linear", (1, 128, 1536), 384, (1, 1), (1, 1), 1),
)


def standard_specs(space: SearchSpace) -> list[LayerSpec]:
    """Return the standard sweep: each layer of ``STANDARD_LAYERS`` with each option of ``space``."""
    specs = []
    for op, input_shape, out, kernel, stride, groups in STANDARD_LAYERS:
        padding = (kernel[0] // 2, kernel[1] // 2)
        dense = LayerSpec(op, input_shape, out, kernel, stride, padding, groups)
        specs.append(dense)
        depthwise = groups > 1
        if "prune" in space.passes and not depthwise:
            for keep in space.keep_ratios:
                kept = kept_channels(out, keep, space.round_to)
                if kept != out:
                    specs.append(LayerSpec(op, input_shape, kept, kernel, stride, padding, groups))
        if "lowrank" in space.passes and not depthwise:
            for rank in candidate_ranks(None, dense.build(), space):
                specs.append(
                    LayerSpec(
                        op, input_shape, out, kernel, stride, padding, groups, f"lowrank:{rank}"
                    )
                )
    return list(dict.fromkeys(specs))


def _open_profile(out: Path, threads: int | None) -> DeviceProfile:
    if not out.exists():
        profile = new_local_profile(out.stem, threads or 1)
        profile.path = out
        profile.save()
        logger.info("created %s for this machine (%s)", out, profile.data["device"]["cpu_model"])
        return profile
    profile = load_profile(out, require_runtime=False)
    if profile.runtime != "onnxruntime":
        # TODO: measure TensorRT profiles (engine build per layer, CUDA event timing).
        raise DeployError(
            f"device profile {out} targets {profile.runtime}; deploy profile measures with "
            f"ONNX Runtime only, so measure into an onnxruntime profile"
        )
    if profile.data["measured"] and not local_profile_matches(profile):
        raise DeployError(
            f"device profile {out} was measured on {profile.data['device'].get('cpu_model')}, not "
            f"on this machine; pass another --out to measure this machine"
        )
    if threads is not None and profile.data["measured"] and threads != profile.threads:
        raise DeployError(
            f"device profile {out} was measured with {profile.threads} threads, not {threads}; "
            f"pass --threads {profile.threads} to resume it, or another --out"
        )
    if not profile.data["measured"]:
        # A template: keep its name, declared power and precisions, take this machine's identity.
        fresh = new_local_profile(profile.name, threads or profile.threads)
        for field in ("device", "runtime"):
            profile.data[field] = fresh.data[field]
    logger.info("resuming %s: %d entries already measured", out, len(profile.data["latency_table"]))
    return profile


def _example_inputs(data, input_shape) -> tuple[torch.Tensor, ...]:
    if data is not None:
        from deploy.data import load_data
        from deploy.torch_utils import to_tensors

        dataset = load_data(data)
        return to_tensors([a[:2] for a in dataset.inputs])
    if input_shape is None:
        raise DeployError(
            "profiling a model needs its input: pass --data FILE.npz (as for optimize) or "
            "--input-shape 1,3,224,224"
        )
    if any(d < 1 for d in input_shape):
        raise DeployError(f"input shape {input_shape} has a dimension below 1; pass positive sizes")
    return (torch.randn(*input_shape),)


def profile(
    out: str | os.PathLike,
    model=None,
    *,
    data=None,
    input_shape: tuple[int, ...] | None = None,
    threads: int | None = None,
    space: SearchSpace | None = None,
    allow_pickle: bool = False,
) -> DeviceProfile:
    """Measure this machine's latency table into the device profile ``out``; return it.

    Args:
        out: profile file to create or resume (``.yaml`` or ``.json``).
        model: an ``nn.Module`` or a path ``load_model`` reads; its layers are
            swept. Defaults to the standard sweep of common layer shapes.
        data: ``.npz`` whose first samples give the model's input shapes.
        input_shape: the model's input shape instead of ``data``, batch first.
        threads: intra-op threads to measure with. Defaults to 1, or the
            resumed profile's.
        space: options to sweep. Defaults to ``SearchSpace()``, the planner's.
        allow_pickle: allow unpickling a ``.pt`` model. Defaults to False.

    Raises:
        DeployError: bad input, or ``out`` belongs to another machine.
    """
    if threads is not None and threads < 1:
        raise DeployError(f"threads {threads} must be at least 1")
    out = Path(out)
    if out.suffix not in (".yaml", ".yml", ".json"):
        raise DeployError(f"profile file {out} must end in .yaml or .json")
    space = space or SearchSpace()
    created = not out.exists()
    device_profile = _open_profile(out, threads)
    # Saving rewrites and revalidates the whole file, so entries are saved in
    # groups of five, and once more on any exit (Ctrl-C included).
    costs = CostTable(device_profile, save_every=5)
    try:
        _sweep(device_profile, costs, model, data, input_shape, space, allow_pickle)
    except BaseException:
        if created and not device_profile.data["latency_table"]:
            # A bad model or input shape: leave no empty profile behind.
            out.unlink(missing_ok=True)
        raise
    finally:
        costs.flush()
    logger.info(
        "%s: %d entries (%d measured now)",
        out,
        len(device_profile.data["latency_table"]),
        costs.measured,
    )
    return device_profile


def _sweep(device_profile, costs, model, data, input_shape, space, allow_pickle) -> None:
    precisions = [p for p in device_profile.precisions if p in ("fp32", "int8")]
    start = time.perf_counter()
    if model is None:
        specs = standard_specs(space)
        total = len(specs) * len(precisions)
        logger.info("standard sweep: %d layer shapes x %s", len(specs), ", ".join(precisions))
        done = 0
        for spec in specs:
            for precision in precisions:
                costs.latency(spec, precision)
                done += 1
                if done % 10 == 0 or done == total:
                    logger.info(
                        "    %d/%d entries (%d measured, %d reused) %.0f s",
                        done,
                        total,
                        costs.measured,
                        costs.reused,
                        time.perf_counter() - start,
                    )
    else:
        from deploy.analyze import analyze
        from deploy.models import load_model
        from deploy.passes.prune import prunable_layers

        module = model if isinstance(model, torch.nn.Module) else load_model(model, allow_pickle)
        module.eval()
        example = _example_inputs(data, input_shape)
        try:
            layers = analyze(module, example)
        except (RuntimeError, ValueError) as exc:
            shape = tuple(example[0].shape)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DeployError(
                f"the model does not run on an input of shape {shape} ({first}); pass the "
                f"model's own input shape with --input-shape, batch first"
            ) from exc
        if not layers:
            raise DeployError("the model has no Linear or Conv2d layer; nothing to profile")
        prunable = prunable_layers(module, example) if "prune" in space.passes else {}

        def progress(done, count, name, elapsed):
            logger.info(
                "    layer %d/%d (%s): %d measured, %d reused, %.0f s",
                done,
                count,
                name,
                costs.measured,
                costs.reused,
                elapsed,
            )

        layer_options(module, layers, prunable, space, costs, progress=progress)


def check(run_dir: str | os.PathLike, retime_rounds: int = 0) -> dict:
    """Summarize predicted against measured latency over a run's variants (``check_run``).

    ``retime_rounds`` > 0 times the run's artifacts again side by side first.
    Defaults to 0.
    """
    return check_run(run_dir, retime_rounds)
