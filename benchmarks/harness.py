"""Shared parts of the benchmark scripts: ONNX Runtime baselines, alternating timing, JSON rows.

Every variant is timed in the same process with the same batch-1 input and a
fixed intra-op thread count. Timing alternates: each round times every
variant for a few runs, in an order rotated from round to round, so that load
from other processes on a shared machine spreads over all variants instead of
landing on whichever ran at the wrong moment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exporters.onnx import CalibrationFeeds, OnnxRunner


def load_example(name: str):
    """Import ``examples/<name>.py`` by path (its name would clash with the benchmark script's)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None, description: str, example: str, out: Path):
    """Parse a benchmark script's options: the run to reuse, the JSON file, threads and rounds."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", type=Path, help=f"reuse this finished examples/{example}.py run")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    parser.add_argument(
        "--runs-per-round",
        type=int,
        default=20,
        help="timed runs per variant and round (default 20)",
    )
    return parser.parse_args(argv)


def ort_baselines(
    fp32_path: Path, folder: Path, calibration_feeds: list[dict[str, np.ndarray]] | None
) -> dict[str, Path]:
    """Quantize ``fp32_path`` with ONNX Runtime's own tools, as its documentation shows.

    Writes ``ort-dynamic`` (``quantize_dynamic`` defaults), ``ort-dynamic-per-channel``
    and, when ``calibration_feeds`` is given, ``ort-static-qdq`` (``quantize_static``:
    QDQ, uint8 activations, per-channel int8 weights, min/max calibration). The
    ``-7bit`` twins set ``reduce_range``, which ONNX Runtime recommends on
    x86 CPUs without VNNI, and which deploy uses there. Every model first
    goes through ONNX Runtime's ``quant_pre_process``.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "fp32.preprocessed.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    paths = {
        "ort-dynamic": folder / "ort-dynamic.onnx",
        "ort-dynamic-per-channel": folder / "ort-dynamic-per-channel.onnx",
    }
    quantize_dynamic(str(prepared), str(paths["ort-dynamic"]))
    quantize_dynamic(str(prepared), str(paths["ort-dynamic-per-channel"]), per_channel=True)
    paths["ort-dynamic-per-channel-7bit"] = folder / "ort-dynamic-per-channel-7bit.onnx"
    quantize_dynamic(
        str(prepared),
        str(paths["ort-dynamic-per-channel-7bit"]),
        per_channel=True,
        reduce_range=True,
    )
    for suffix, reduce_range in (("", False), ("-7bit", True)):
        if not calibration_feeds:
            break
        paths[f"ort-static-qdq{suffix}"] = folder / f"ort-static-qdq{suffix}.onnx"
        quantize_static(
            str(prepared),
            str(paths[f"ort-static-qdq{suffix}"]),
            CalibrationFeeds(calibration_feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return paths


def run_all(path: Path, feeds: list[dict[str, np.ndarray]], threads: int) -> np.ndarray:
    """Run every feed through ``path`` and return the first output, concatenated."""
    runner = OnnxRunner(path, threads)
    return np.concatenate([runner.run(feed)[0] for feed in feeds])


def time_alternating(
    paths: dict[str, Path],
    feed: dict[str, np.ndarray],
    *,
    threads: int,
    rounds: int = 10,
    runs_per_round: int = 20,
    warmup: int = 10,
    log: Callable[[str], None] = print,
) -> dict[str, tuple[float, float]]:
    """Return each variant's (p50, p90) latency in ms on ``feed``, timed in alternating rounds."""
    runners = {name: OnnxRunner(path, threads) for name, path in paths.items()}
    for runner in runners.values():
        for _ in range(warmup):
            runner.session.run(None, feed)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            session = runners[name].session
            for _ in range(runs_per_round):
                start = time.perf_counter()
                session.run(None, feed)
                samples[name].append((time.perf_counter() - start) * 1e3)
        log(f"  timing round {r + 1}/{rounds} done")
    return {
        name: (float(np.percentile(s, 50)), float(np.percentile(s, 90)))
        for name, s in samples.items()
    }


def machine(threads: int) -> dict:
    """Describe this machine and the runtime versions the numbers were measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    except (OSError, StopIteration):
        isa = []
    return {
        "cpu": cpu,
        "cpu_flags": isa,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }


def add_speedups(rows: list[dict], fidelity: str, baselines: list[str]) -> None:
    """Add ``speedup_vs_fp32`` and ``speedup_vs_best_ort`` to every row, in place.

    The best ONNX Runtime option at equal or better fidelity is the fastest of
    ``baselines`` (fp32 included) whose ``fidelity`` metric is at least the
    row's own; fp32 is exact, so there is always one.
    """
    by_name = {row["name"]: row for row in rows}
    fp32 = by_name["fp32"]["p50_ms"]
    for row in rows:
        row["speedup_vs_fp32"] = fp32 / row["p50_ms"]
        candidates = [
            by_name[name]
            for name in baselines
            if by_name[name][fidelity] >= row[fidelity] - 1e-12 and name != row["name"]
        ]
        if row["name"] in baselines:
            row["best_ort_at_fidelity"] = None
            row["speedup_vs_best_ort"] = None
            continue
        best = min(candidates, key=lambda r: r["p50_ms"])
        row["best_ort_at_fidelity"] = best["name"]
        row["speedup_vs_best_ort"] = best["p50_ms"] / row["p50_ms"]


def write_results(path: Path, rows: list[dict], machine_info: dict, extra: dict) -> None:
    """Write the rows, the machine and the command that produced them as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine_info,
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")


def compare(
    args,
    manifest: dict,
    baselines: dict[str, Path],
    batches: list[dict[str, np.ndarray]],
    single: dict[str, np.ndarray],
    fidelity: Callable[[np.ndarray], dict[str, float]],
    fidelity_fields: list[str],
    extra: dict,
) -> None:
    """Measure fidelity and alternating latency of the baselines and the run's variants.

    Every validated variant of the run is compared, not only its frontier:
    the run timed each variant once, at a different moment, and the
    alternating timing here decides. Writes ``args.out`` and prints the
    Markdown table.

    Args:
        args: the script's arguments (``run``, ``out``, ``threads``,
            ``rounds``, ``runs_per_round``).
        manifest: the run's manifest.
        baselines: name -> ONNX file of fp32 and ONNX Runtime's own int8 models.
        batches: the held-out feeds for fidelity.
        single: the batch-1 feed for timing.
        fidelity: maps a model's concatenated outputs to its fidelity metrics.
        fidelity_fields: the metrics, the first being the one compared.
        extra: more fields for the JSON file (model, inputs).
    """
    paths = dict(baselines)
    on_frontier = {}
    for variant in manifest["variants"]:
        if variant["status"] == "ok":
            name = f"deploy-{variant['name']} ({variant['summary']})"
            paths[name] = args.run / variant["artifact"]
            on_frontier[name] = variant["on_frontier"]
    rows = []
    for name, path in paths.items():
        metrics = fidelity(run_all(path, batches, args.threads))
        row = {"name": name, "size_bytes": path.stat().st_size, **metrics}
        if name in on_frontier:
            row["on_run_frontier"] = on_frontier[name]
        rows.append(row)
        print(f"{name}: {metrics}", file=sys.stderr)
    latency = time_alternating(
        paths,
        single,
        threads=args.threads,
        rounds=args.rounds,
        runs_per_round=args.runs_per_round,
        log=lambda message: print(message, file=sys.stderr),
    )
    for row in rows:
        row["p50_ms"], row["p90_ms"] = latency[row["name"]]
    add_speedups(rows, fidelity_fields[0], list(baselines))
    write_results(args.out, rows, machine(args.threads), {**extra, "run": str(args.run)})
    print(markdown_table(rows, fidelity_fields))


def markdown_table(rows: list[dict], fidelity_fields: list[str]) -> str:
    """Format the rows as a Markdown table, fastest first."""
    header = ["variant", "p50 ms", "p90 ms", "x fp32", "x best ORT", "MB", *fidelity_fields]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: r["p50_ms"]):
        vs_ort = row.get("speedup_vs_best_ort")
        cells = [
            row["name"],
            f"{row['p50_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['speedup_vs_fp32']:.2f}",
            "-" if vs_ort is None else f"{vs_ort:.2f} ({row['best_ort_at_fidelity']})",
            f"{row['size_bytes'] / 1e6:.1f}",
            *(f"{row[f]:.4f}" for f in fidelity_fields),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
