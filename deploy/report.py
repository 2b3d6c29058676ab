"""Run reports: the frontier, ``manifest.json``, ``report.md`` and ``pareto.png``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


def quality(entry: dict) -> float:
    """Return the quality axis of the frontier: accuracy when labels exist, else agreement."""
    return entry["accuracy"] if entry.get("accuracy") is not None else entry["agreement"]


def mark_frontier(entries: list[dict]) -> None:
    """Set ``on_frontier`` on each entry: valid, and not beaten on both quality and p50 latency."""
    valid = [e for e in entries if e["status"] == "ok"]
    for entry in entries:
        entry["on_frontier"] = False
    for entry in valid:
        q, t = quality(entry), entry["latency_ms"]["p50"]
        beaten = any(
            quality(o) >= q
            and o["latency_ms"]["p50"] <= t
            and (quality(o) > q or o["latency_ms"]["p50"] < t)
            for o in valid
            if o is not entry
        )
        entry["on_frontier"] = not beaten


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file through a temporary name and a rename, so it is never seen half-written."""
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_quality(value: float | None) -> str:
    """Format an accuracy or agreement in [0, 1] with four decimals, or "-" when missing."""
    return "-" if value is None else f"{value:.4f}"


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def report_markdown(manifest: dict) -> str:
    """Render the run as a Markdown table sorted by measured p50 latency."""
    baseline = manifest["baseline"]
    entries = [baseline, *manifest["variants"]]
    rows = sorted(
        entries, key=lambda e: (e["status"] != "ok", e["latency_ms"].get("p50", float("inf")))
    )
    base_p50 = baseline["latency_ms"]["p50"]
    lines = [
        f"# deploy run: {manifest['model']}",
        "",
        f"Device profile: `{manifest['device_profile']['name']}` "
        f"({manifest['device_profile']['runtime']}, {manifest['device_profile']['threads']} thread(s)). "
        f"Latency: batch 1, the baseline and every valid variant timed side by side in "
        f"{baseline['latency_ms'].get('rounds', 5)} alternating rounds "
        f"({manifest['protocol']['warmup']} warm-up runs each), "
        f"{baseline['latency_ms'].get('runs', manifest['protocol']['runs'])} "
        f"timed runs per model in all; p50 and p90 are medians over the rounds. "
        f"Predicted ms is the latency model's figure, recalibrated to the baseline's "
        f"side-by-side p50; the baseline's own is the latency model's figure for it "
        f"when the model was calibrated, before the variants were built. "
        f"Validation on {manifest['data']['validation_samples']} "
        f"held-out samples. `*` marks the frontier.",
        "",
        "| | variant | plan | accuracy | agreement | max abs error | p50 ms | p90 ms | speedup | predicted ms | size KB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        p50 = e["latency_ms"].get("p50")
        speedup = f"{base_p50 / p50:.2f}x" if p50 else "-"
        lines.append(
            f"| {'*' if e.get('on_frontier') else ''} | {e['name']} | {e.get('summary', '')} | "
            f"{_fmt(e['accuracy'])} | {_fmt(e['agreement'])} | {_fmt(e['max_abs_error'], 3)} | "
            f"{_fmt(p50, 3)} | {_fmt(e['latency_ms'].get('p90'), 3)} | {speedup} | "
            f"{_fmt(e.get('predicted_latency_ms'), 3)} | {e['size_bytes'] / 1024:.0f} | "
            f"{e['status']}{': ' + e['reason'] if e.get('reason') else ''} |"
        )
    slower = [
        e["name"]
        for e in manifest["variants"]
        if e["status"] == "ok" and e["latency_ms"].get("p50", 0.0) >= base_p50
    ]
    if slower:
        lines += [
            "",
            f"Not faster than the fp32 baseline on this device: {', '.join(slower)}.",
        ]
    for e in manifest["variants"]:
        if e.get("runtime_int8_layers"):
            lines += [
                "",
                f"{e['name']}: ONNX Runtime runs {', '.join(e['runtime_int8_layers'])} in int8 "
                f"with per-tensor weights although the plan keeps them in float, because int8 "
                f"layers surround them. Its accuracy and latency above are what ONNX Runtime runs.",
            ]
    lines += [
        "",
        "Artifacts are ONNX files relative to this folder; `manifest.json` has every figure.",
        "",
    ]
    return "\n".join(lines)


def plot_pareto(manifest: dict, path: Path) -> None:
    """Draw quality against measured p50 latency with the frontier, to a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in [manifest["baseline"], *manifest["variants"]] if e["status"] == "ok"]
    label = "accuracy" if manifest["baseline"].get("accuracy") is not None else "agreement"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(
        [e["latency_ms"]["p50"] for e in entries],
        [quality(e) for e in entries],
        color="0.6",
        label="variants",
    )
    front = sorted((e for e in entries if e["on_frontier"]), key=lambda e: e["latency_ms"]["p50"])
    ax.plot(
        [e["latency_ms"]["p50"] for e in front],
        [quality(e) for e in front],
        "o-",
        color="C0",
        label="frontier",
    )
    base = manifest["baseline"]
    ax.scatter(
        [base["latency_ms"]["p50"]],
        [quality(base)],
        marker="*",
        s=160,
        color="C3",
        label="fp32 baseline",
        zorder=3,
    )
    for e in entries:
        ax.annotate(
            e["name"],
            (e["latency_ms"]["p50"], quality(e)),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel("measured latency p50 (ms, batch 1)")
    ax.set_ylabel(label)
    ax.set_title(f"{manifest['model']} on {manifest['device_profile']['name']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".pareto.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(run_dir: Path, manifest: dict) -> None:
    """Write report.md and pareto.png, then manifest.json last: a run with a manifest is complete."""
    write_atomic(run_dir / "report.md", report_markdown(manifest))
    plot_pareto(manifest, run_dir / "pareto.png")
    write_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
