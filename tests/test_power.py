"""Energy readers against folders laid out like the real sysfs, and a stand-in NVML module."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import types

import pytest

from deploy.errors import DeployError
from deploy.power import (
    ESTIMATE,
    JetsonReader,
    NvmlReader,
    RaplReader,
    energy_fields,
    integrate_joules,
    latency_budgets_from_energy,
    measure_energy,
    reader_for,
    variant_energy,
)


def _rapl_domain(root, name, energy_uj, max_range_uj=262143328850):
    domain = root / name
    domain.mkdir(parents=True)
    (domain / "name").write_text("package-0\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")
    (domain / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return domain


@pytest.fixture
def powercap(tmp_path):
    """/sys/class/powercap with two packages and a core subdomain (which must not be summed)."""
    root = tmp_path / "powercap"
    _rapl_domain(root, "intel-rapl:0", 1_000_000)
    _rapl_domain(root, "intel-rapl:0:0", 500_000)
    _rapl_domain(root, "intel-rapl:1", 2_000_000)
    return root


def test_rapl_sums_packages_only(powercap):
    reader = RaplReader(powercap)
    assert [d.name for d in reader.domains] == ["intel-rapl:0", "intel-rapl:1"]
    reader.start()
    (powercap / "intel-rapl:0" / "energy_uj").write_text("1500000\n")
    (powercap / "intel-rapl:0:0" / "energy_uj").write_text("9500000\n")
    (powercap / "intel-rapl:1" / "energy_uj").write_text("2250000\n")
    assert reader.stop() == pytest.approx(0.75)


def test_rapl_counter_wraps(tmp_path):
    root = tmp_path / "powercap"
    domain = _rapl_domain(root, "intel-rapl:0", 999_900, max_range_uj=1_000_000)
    reader = RaplReader(root)
    reader.start()
    # The counter passed max_energy_range_uj and restarted at 0: 100 uJ before, 400 after.
    (domain / "energy_uj").write_text("400\n")
    assert reader.stop() == pytest.approx(500e-6)


def test_rapl_missing_folder_names_fix(tmp_path):
    with pytest.raises(DeployError, match="declared"):
        RaplReader(tmp_path / "nothing")


def test_rapl_unreadable_counter(tmp_path):
    root = tmp_path / "powercap"
    domain = _rapl_domain(root, "intel-rapl:0", 10)
    (domain / "max_energy_range_uj").write_text("not a number\n")
    with pytest.raises(DeployError, match="not readable"):
        RaplReader(root)


def _fake_pynvml(counter_mj: list[int], supported: bool = True):
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def total_energy(handle):
        if not supported:
            raise NVMLError("Not Supported")
        return counter_mj[0]

    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    module.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return module


def test_nvml_reads_total_energy(monkeypatch):
    counter = [123_456]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(counter))
    reader = NvmlReader(0)
    reader.start()
    counter[0] += 2_500
    assert reader.stop() == pytest.approx(2.5)


def test_nvml_unsupported_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([0], supported=False))
    with pytest.raises(DeployError, match="Volta"):
        NvmlReader(0)


def test_nvml_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(DeployError, match="pip install nvidia-ml-py"):
        NvmlReader(0)


@pytest.fixture
def ina3221(tmp_path):
    """An INA3221 hwmon folder as L4T 34+ lays it out: three rails, mV and mA per rail."""
    hwmon = tmp_path / "1-0040" / "hwmon" / "hwmon3"
    hwmon.mkdir(parents=True)
    for index, (label, mv, ma) in enumerate(
        [("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5000, 400), ("VDD_SOC", 5000, 200)], 1
    ):
        (hwmon / f"in{index}_label").write_text(f"{label}\n")
        (hwmon / f"in{index}_input").write_text(f"{mv}\n")
        (hwmon / f"curr{index}_input").write_text(f"{ma}\n")
    return tmp_path


def test_jetson_selected_rail(ina3221):
    reader = JetsonReader(ina3221, rails=["VDD_IN"])
    assert [name for name, _, _ in reader.channels] == ["VDD_IN"]
    assert reader.read_watts() == pytest.approx(5.0)


def test_jetson_all_rails(ina3221):
    assert JetsonReader(ina3221).read_watts() == pytest.approx(8.0)


def test_jetson_integrates_changing_power(ina3221):
    reader = JetsonReader(ina3221, rails=["VDD_IN"], interval_s=0.002)
    current = next(ina3221.glob("**/curr1_input"))
    reader.start()
    time.sleep(0.1)
    # 5 W -> 15 W half way. Replace the file whole, as sysfs shows a new value
    # at once: write_text truncates first, and the reader could see it empty.
    staged = current.with_name("curr1_input.new")
    staged.write_text("3000\n")
    os.replace(staged, current)
    time.sleep(0.1)
    joules = reader.stop()
    # 0.1 s at 5 W then 0.1 s at 15 W is 2 J; sleeps overrun, so allow a margin.
    assert 1.6 < joules < 3.0


def test_jetson_missing_rail(ina3221):
    with pytest.raises(DeployError, match="VDD_GPU"):
        JetsonReader(ina3221, rails=["VDD_GPU"])


def test_integrate_trapezoid():
    assert integrate_joules([(0.0, 2.0), (1.0, 4.0), (2.0, 4.0)]) == pytest.approx(7.0)


def test_measure_energy_per_call(powercap):
    reader = RaplReader(powercap)
    counter = powercap / "intel-rapl:0" / "energy_uj"

    def loop():
        counter.write_text("1100000\n")  # 100 mJ over the loop

    per_call_mj, seconds = measure_energy(reader, loop, calls=50)
    assert per_call_mj == pytest.approx(2.0)
    assert seconds >= 0


def test_measure_energy_without_reader():
    per_call_mj, _ = measure_energy(None, lambda: None, calls=10)
    assert math.isnan(per_call_mj)


def test_energy_estimate_is_labelled():
    power = {"source": "declared", "active_watts": 10.0, "idle_watts": 2.0}
    assert energy_fields(power, 0.5) == {"energy_mj": 5.0, "energy_source": ESTIMATE}


def test_energy_measured_is_labelled_by_source():
    power = {"source": "rapl", "active_watts": None, "idle_watts": None}
    assert energy_fields(power, 0.5, 1.25) == {"energy_mj": 1.25, "energy_source": "rapl"}
    assert energy_fields(power, 0.5, None) == {}


def test_reader_for_sources(powercap, ina3221):
    assert reader_for({"source": "declared", "active_watts": 1.0}) is None
    assert isinstance(reader_for({"source": "rapl", "path": str(powercap)}), RaplReader)
    jetson = reader_for({"source": "jetson", "path": str(ina3221), "rails": ["VDD_SOC"]})
    assert isinstance(jetson, JetsonReader)
    with pytest.raises(DeployError, match="not one of"):
        reader_for({"source": "wattmeter"})


def test_jetson_sampler_thread_stops(ina3221):
    reader = JetsonReader(ina3221, interval_s=0.001)
    before = threading.active_count()
    reader.start()
    reader.stop()
    assert threading.active_count() == before


def test_energy_budget_from_declared_watts():
    power = {"source": "declared", "active_watts": 10.0, "idle_watts": 2.0}
    assert latency_budgets_from_energy(power, [], [5.0, 20.0]) == pytest.approx([0.5, 2.0])


def test_energy_budget_from_measured_entries():
    power = {"source": "rapl", "active_watts": None, "idle_watts": None}
    table = [
        {"p50_ms": 1.0, "energy_mj": 4.0, "energy_source": "rapl"},
        {"p50_ms": 2.0, "energy_mj": 12.0, "energy_source": "rapl"},
        {"p50_ms": 1.0, "energy_mj": 5.0, "energy_source": "rapl"},
    ]
    # Median power over the entries is 5 W, so 10 mJ allows 2 ms.
    assert latency_budgets_from_energy(power, table, [10.0]) == pytest.approx([2.0])


def test_energy_budget_rejects_bad_values():
    power = {"source": "declared", "active_watts": 10.0, "idle_watts": 2.0}
    with pytest.raises(DeployError, match="-1.0 mJ"):
        latency_budgets_from_energy(power, [], [-1.0])
    with pytest.raises(DeployError, match="active_watts"):
        latency_budgets_from_energy({"source": "declared", "active_watts": None}, [], [1.0])


def test_variant_energy_is_estimate():
    power = {"source": "declared", "active_watts": 10.0, "idle_watts": 2.0}
    energy = variant_energy(power, [], 0.25)
    assert energy["energy_mj"] == pytest.approx(2.5)
    assert energy["energy_source"] == ESTIMATE
    assert energy["energy_watts_source"] == "declared"
    assert variant_energy(power, [], None) == {}
