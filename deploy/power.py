"""Energy per inference: read from hardware counters where the device exposes them.

Three sources are read around a timed loop:

- ``rapl``: Linux powercap for Intel RAPL (and AMD's RAPL-compatible
  driver), ``/sys/class/powercap/intel-rapl:N/energy_uj``, a microjoule
  counter that wraps at ``max_energy_range_uj``;
- ``nvml``: the NVIDIA driver's total energy counter in millijoules, through
  ``pynvml`` (Volta and newer GPUs);
- ``jetson``: the INA3221 power monitor of Jetson boards. It reports
  instantaneous voltage and current per rail in hwmon sysfs files, so power
  is sampled on a thread during the loop and integrated over time.

Where none is readable, the profile's power source is ``declared``: energy is
the declared active watts times the latency, and every such figure carries
``energy_source: estimate``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from deploy.errors import DeployError

logger = logging.getLogger(__name__)

RAPL_ROOT = Path("/sys/class/powercap")
JETSON_ROOTS = (Path("/sys/bus/i2c/drivers/ina3221"), Path("/sys/bus/i2c/drivers/ina3221x"))
SOURCES = ("rapl", "nvml", "jetson", "declared")
ESTIMATE = "estimate"


class EnergyReader:
    """A source of energy readings; ``start`` then ``stop`` returns the joules used in between."""

    source = "declared"

    def start(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement start()")

    def stop(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not implement stop()")

    def describe(self) -> str:
        return self.source


class RaplReader(EnergyReader):
    """Sum of the package-level RAPL domains under a powercap folder.

    Args:
        root: the powercap folder. Defaults to ``/sys/class/powercap``.

    Raises:
        DeployError: no readable ``intel-rapl:N/energy_uj`` exists under ``root``.
    """

    source = "rapl"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or RAPL_ROOT)
        # Top-level domains are intel-rapl:0, intel-rapl:1 (one per package);
        # subdomains (intel-rapl:0:0, core and uncore) are already inside them.
        self.domains = sorted(
            d for d in self.root.glob("intel-rapl:*") if d.name.count(":") == 1 and d.is_dir()
        )
        self.ranges = []
        for domain in self.domains:
            try:
                (domain / "energy_uj").read_text()
                self.ranges.append(int((domain / "max_energy_range_uj").read_text()))
            except (OSError, ValueError) as exc:
                raise DeployError(
                    f"RAPL counter {domain / 'energy_uj'} is not readable ({exc}); reading it "
                    f"usually needs root: run as root, or set power source 'declared'"
                ) from exc
        if not self.domains:
            raise DeployError(
                f"no RAPL domain (intel-rapl:N/energy_uj) found under {self.root}; "
                f"set power source 'declared' with active_watts in the device profile"
            )
        self._start: list[int] | None = None

    def read_uj(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def start(self) -> None:
        self._start = self.read_uj()

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("RaplReader.stop() called before start()")
        end = self.read_uj()
        total_uj = 0
        for before, after, span in zip(self._start, end, self.ranges, strict=True):
            # The counter runs from 0 to max_energy_range_uj and then starts again at 0.
            # NOTE: at most one wrap per timed loop is assumed.
            total_uj += after - before if after >= before else after + span - before
        self._start = None
        return total_uj / 1e6

    def describe(self) -> str:
        return f"rapl ({', '.join(d.name for d in self.domains)} under {self.root})"


class NvmlReader(EnergyReader):
    """The total energy counter of one NVIDIA GPU, in millijoules since the driver loaded.

    Raises:
        DeployError: pynvml is not installed, or the GPU has no energy counter.
    """

    source = "nvml"

    def __init__(self, device_index: int = 0):
        try:
            import pynvml
        except ImportError as exc:
            raise DeployError(
                "power source 'nvml' needs pynvml: pip install nvidia-ml-py, "
                "or set power source 'declared'"
            ) from exc
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as exc:
            raise DeployError(
                f"NVML energy counter of GPU {device_index} is not readable ({exc}); it needs a "
                f"Volta or newer GPU: set power source 'declared' instead"
            ) from exc
        self.device_index = device_index
        self._start: int | None = None

    def start(self) -> None:
        self._start = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("NvmlReader.stop() called before start()")
        end = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        used_mj = end - self._start
        self._start = None
        return used_mj / 1e3

    def describe(self) -> str:
        return f"nvml (GPU {self.device_index})"


class JetsonReader(EnergyReader):
    """Jetson INA3221 rails: voltage x current sampled on a thread and integrated over time.

    The Linux hwmon ina3221 driver writes ``inN_label``, ``inN_input`` (mV)
    and ``currN_input`` (mA) per rail.

    Args:
        root: a hwmon folder, or a folder searched for ``hwmon*/inN_label``.
            Defaults to the INA3221 i2c driver folders.
        rails: rail labels to sum, for example ``["VDD_IN"]``. Defaults to all.
        interval_s: sampling interval. Defaults to 0.005 s.
    """

    source = "jetson"

    def __init__(
        self,
        root: str | Path | None = None,
        rails: list[str] | None = None,
        interval_s: float = 0.005,
    ):
        roots = [Path(root)] if root else list(JETSON_ROOTS)
        self.channels: list[tuple[str, Path, Path]] = []
        for base in roots:
            for label in sorted(base.glob("**/in*_label")):
                index = label.name[2:-6]
                name = label.read_text().strip()
                volts, amps = (
                    label.with_name(f"in{index}_input"),
                    label.with_name(f"curr{index}_input"),
                )
                if volts.is_file() and amps.is_file() and (not rails or name in rails):
                    self.channels.append((name, volts, amps))
        if not self.channels:
            where = ", ".join(str(r) for r in roots)
            raise DeployError(
                f"no INA3221 rail (inN_label with inN_input and currN_input) found under {where}"
                + (f" for rails {rails}" if rails else "")
                + "; set power source 'declared' with active_watts in the device profile"
            )
        self.interval_s = interval_s
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read_watts(self) -> float:
        total = 0.0
        for _, volts, amps in self.channels:
            total += int(volts.read_text()) * int(amps.read_text()) / 1e6
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), self.read_watts()))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._samples = [(time.perf_counter(), self.read_watts())]
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="jetson-power", daemon=True)
        self._thread.start()

    def stop(self) -> float:
        if self._thread is None:
            raise RuntimeError("JetsonReader.stop() called before start()")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._samples.append((time.perf_counter(), self.read_watts()))
        return integrate_joules(self._samples)

    def describe(self) -> str:
        return f"jetson ({', '.join(name for name, _, _ in self.channels)})"


def integrate_joules(samples: list[tuple[float, float]]) -> float:
    """Integrate (time s, power W) samples with the trapezoid rule; return joules."""
    samples = sorted(samples)
    joules = 0.0
    for (t0, p0), (t1, p1) in zip(samples, samples[1:], strict=False):
        joules += (t1 - t0) * (p0 + p1) / 2
    return joules


def reader_for(power: dict) -> EnergyReader | None:
    """Return the reader a profile's ``power`` section names, or None for ``declared``.

    Raises:
        DeployError: the named counter is not readable on this machine.
    """
    source = power.get("source", "declared")
    if source == "declared":
        return None
    if source == "rapl":
        return RaplReader(power.get("path"))
    if source == "nvml":
        return NvmlReader(power.get("device_index") or 0)
    if source == "jetson":
        return JetsonReader(power.get("path"), power.get("rails") or None)
    raise DeployError(f"power source {source!r} is not one of {', '.join(SOURCES)}")


def detect_power_source() -> dict:
    """Return the ``power`` section for the first counter readable here, or ``declared``.

    The declared figures are a placeholder: edit ``active_watts`` to the
    device's measured or rated power, because every energy figure is
    proportional to it.
    """
    candidates = [
        ({"source": "rapl", "path": str(RAPL_ROOT)}, lambda: RaplReader()),
        ({"source": "nvml", "device_index": 0}, lambda: NvmlReader(0)),
        ({"source": "jetson", "path": None, "rails": []}, lambda: JetsonReader()),
    ]
    for section, make in candidates:
        try:
            make()
        except DeployError as exc:
            logger.debug("power source %s not available: %s", section["source"], exc)
            continue
        return {"active_watts": None, "idle_watts": None, **section}
    # NOTE: 15 W active and 5 W idle are placeholders, not measurements of any
    # machine; set them from the device's datasheet or a wall meter.
    return {"source": "declared", "active_watts": 15.0, "idle_watts": 5.0, "path": None}


def estimate_mj(power: dict, latency_ms: float) -> float | None:
    """Return declared active watts x latency in mJ, or None without a declared figure."""
    watts = power.get("active_watts")
    if watts is None or not math.isfinite(latency_ms):
        return None
    return watts * latency_ms


def measure_energy(
    reader: EnergyReader | None, fn: Callable[[], object], calls: int
) -> tuple[float, float]:
    """Run ``fn`` while ``reader`` counts; return (mJ per call, seconds of the whole loop).

    With ``reader`` None only the time is measured and the energy is NaN.
    """
    start = time.perf_counter()
    if reader is not None:
        reader.start()
    try:
        fn()
    finally:
        joules = reader.stop() if reader is not None else math.nan
    seconds = time.perf_counter() - start
    return joules * 1e3 / max(calls, 1), seconds


def energy_fields(power: dict, latency_ms: float, measured_mj: float | None = None) -> dict:
    """Return ``energy_mj`` and ``energy_source`` for one figure, labelling estimates.

    ``measured_mj`` is what a counter read, or None where the profile's
    source is ``declared``; then the figure is an estimate from the declared
    active watts.
    """
    if measured_mj is not None and math.isfinite(measured_mj):
        return {"energy_mj": measured_mj, "energy_source": power["source"]}
    estimate = estimate_mj(power, latency_ms)
    if estimate is None:
        return {}
    return {"energy_mj": estimate, "energy_source": ESTIMATE}


def average_watts(power: dict, latency_table: list[dict]) -> tuple[float, str]:
    """Return the power that converts latency to energy for this profile, and its source.

    With a counter it is the median of the measured entries' energy over
    latency; otherwise the declared active watts, labelled ``estimate``.

    Raises:
        DeployError: neither a measured entry nor ``active_watts`` exists.
    """
    ratios = sorted(
        e["energy_mj"] / e["p50_ms"]
        for e in latency_table
        if e.get("energy_source") not in (None, ESTIMATE) and e.get("energy_mj") and e["p50_ms"] > 0
    )
    if ratios:
        return ratios[len(ratios) // 2], power["source"]
    if power.get("active_watts"):
        return float(power["active_watts"]), ESTIMATE
    raise DeployError(
        "the device profile has no measured energy and no power.active_watts; declare the "
        "device's active watts in its power section to plan for energy budgets"
    )


def latency_budgets_from_energy(
    power: dict, latency_table: list[dict], budgets_mj: list[float]
) -> list[float]:
    """Convert energy budgets (mJ per inference) into the latency budgets (ms) the planner uses.

    NOTE: this assumes the average power stays the same across variants,
    which holds for the declared estimate by definition but only roughly for
    measured counters, where int8 and pruned layers can draw less.
    """
    bad = [b for b in budgets_mj if not (math.isfinite(b) and b > 0)]
    if bad:
        raise DeployError(f"energy budget {bad[0]} mJ is not a positive, finite number of mJ")
    watts, _ = average_watts(power, latency_table)
    return [budget / watts for budget in budgets_mj]


def variant_energy(power: dict, latency_table: list[dict], latency_ms: float | None) -> dict:
    """Return a validated variant's energy per inference: its measured p50 x the profile's power.

    The figure is always labelled ``estimate`` because no counter was read
    around the variant itself; ``energy_watts_source`` says whether the
    power came from the profile's counter readings or its declared watts.
    """
    if latency_ms is None or not math.isfinite(latency_ms):
        return {}
    try:
        watts, source = average_watts(power, latency_table)
    except DeployError:
        return {}
    return {
        "energy_mj": watts * latency_ms,
        "energy_source": ESTIMATE,
        "energy_watts": watts,
        "energy_watts_source": "declared" if source == ESTIMATE else source,
    }
