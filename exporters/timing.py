"""The one latency protocol every measurement in deploy goes through."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TimingProtocol:
    """The measurement protocol behind every latency.

    Attributes:
        warmup: untimed runs before timing starts; they absorb allocation and
            kernel selection. Defaults to 10.
        runs: timed runs; p50 and p90 are taken over them. Defaults to 100.
        threads: intra-op threads of the runtime. Defaults to 1.
        pin_cpus: CPU ids the process is pinned to while timing, or ``None``
            to leave affinity alone. Defaults to ``None``.
    """

    warmup: int = 10
    runs: int = 100
    threads: int = 1
    pin_cpus: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "warmup": self.warmup,
            "runs": self.runs,
            "threads": self.threads,
            "percentiles": [50, 90],
            "affinity": list(self.pin_cpus) if self.pin_cpus else "unpinned",
            "clock": "time.perf_counter",
        }


@dataclasses.dataclass(frozen=True)
class Latency:
    """Measured latency in milliseconds; ``cold_ms`` is the first (untimed) run."""

    p50: float
    p90: float
    runs: int
    cold_ms: float

    def to_dict(self) -> dict:
        return {"p50": self.p50, "p90": self.p90, "runs": self.runs, "cold_ms": self.cold_ms}


def time_callable(fn: Callable[[], object], protocol: TimingProtocol) -> Latency:
    """Time ``fn`` under ``protocol``: one cold run, warm-up, then timed runs."""
    previous_affinity = None
    if protocol.pin_cpus and hasattr(os, "sched_setaffinity"):
        previous_affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, protocol.pin_cpus)
    try:
        start = time.perf_counter()
        fn()
        cold_ms = (time.perf_counter() - start) * 1e3
        for _ in range(max(protocol.warmup - 1, 0)):
            fn()
        samples = np.empty(protocol.runs)
        for i in range(protocol.runs):
            start = time.perf_counter()
            fn()
            samples[i] = time.perf_counter() - start
    finally:
        if previous_affinity is not None:
            os.sched_setaffinity(0, previous_affinity)
    samples *= 1e3
    return Latency(
        p50=float(np.percentile(samples, 50)),
        p90=float(np.percentile(samples, 90)),
        runs=protocol.runs,
        cold_ms=cold_ms,
    )
