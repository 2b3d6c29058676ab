"""Pick one variant of a finished run by constraint."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from deploy.errors import DeployError
from deploy.report import MANIFEST, quality


def load_manifest(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise DeployError(
            f"{run_dir} has no {MANIFEST}; pass the folder a finished 'deploy optimize --out' wrote"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeployError(f"{path} is not readable JSON ({exc}); re-run 'deploy optimize'") from exc


def pick(
    run_dir: str | os.PathLike,
    max_latency_ms: float | None = None,
    max_accuracy_drop: float | None = None,
) -> dict:
    """Return the best variant within the constraints.

    With ``max_latency_ms`` the most accurate variant at or under that p50
    wins; with ``max_accuracy_drop`` (percentage points below the fp32
    baseline) the fastest qualifying variant wins; with both, both must hold
    and the fastest wins.

    Raises:
        DeployError: no constraint given, a constraint is not a finite
            non-negative number, or nothing qualifies (the message names the
            variant closest to qualifying and by how much it misses).
    """
    if max_latency_ms is None and max_accuracy_drop is None:
        raise DeployError("pick needs a constraint: pass --max-latency-ms or --max-accuracy-drop")
    for flag, value in (
        ("--max-latency-ms", max_latency_ms),
        ("--max-accuracy-drop", max_accuracy_drop),
    ):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise DeployError(f"{flag} {value} is not a finite, non-negative number")
    manifest = load_manifest(run_dir)
    baseline = manifest["baseline"]
    entries = [e for e in [baseline, *manifest["variants"]] if e["status"] == "ok"]
    base_quality = quality(baseline)

    def drop(entry) -> float:
        return (base_quality - quality(entry)) * 100.0

    def fits(entry) -> bool:
        ok = True
        if max_latency_ms is not None:
            ok &= entry["latency_ms"]["p50"] <= max_latency_ms
        if max_accuracy_drop is not None:
            ok &= drop(entry) <= max_accuracy_drop + 1e-9
        return ok

    chosen = [e for e in entries if fits(e)]
    if chosen:
        if max_accuracy_drop is not None:
            return min(chosen, key=lambda e: e["latency_ms"]["p50"])
        return max(chosen, key=lambda e: (quality(e), -e["latency_ms"]["p50"]))
    if not entries:
        raise DeployError(f"run {run_dir} has no valid variant; re-run 'deploy optimize'")

    # Nothing qualifies: report the variant that misses by the least.
    def miss(entry) -> float:
        latency_miss = (
            0.0
            if max_latency_ms is None
            else max(entry["latency_ms"]["p50"] - max_latency_ms, 0) / max(max_latency_ms, 1e-9)
        )
        drop_miss = (
            0.0 if max_accuracy_drop is None else max(drop(entry) - max_accuracy_drop, 0) / 100
        )
        return latency_miss + drop_miss

    closest = min(entries, key=miss)
    parts = []
    if max_latency_ms is not None:
        verdict = "meets" if closest["latency_ms"]["p50"] <= max_latency_ms else "misses"
        parts.append(
            f"p50 {closest['latency_ms']['p50']:.3f} ms {verdict} --max-latency-ms "
            f"{max_latency_ms:g}"
        )
    if max_accuracy_drop is not None:
        verdict = "meets" if drop(closest) <= max_accuracy_drop + 1e-9 else "misses"
        parts.append(
            f"accuracy drop {drop(closest):.2f} points {verdict} --max-accuracy-drop "
            f"{max_accuracy_drop:g}"
        )
    raise DeployError(
        f"no variant in {run_dir} meets the constraints; closest is {closest['name']} "
        f"({'; '.join(parts)}): relax the constraint or re-run with a wider sweep"
    )
