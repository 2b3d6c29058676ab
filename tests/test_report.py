import pytest

from deploy.report import mark_frontier, plot_pareto, quality, report_markdown, write_report


def entry(name: str, accuracy: float, p50: float, status: str = "ok") -> dict:
    return {
        "name": name,
        "plan": None,
        "summary": name,
        "artifact": f"{name}.onnx",
        "accuracy": accuracy,
        "agreement": 1.0,
        "max_abs_error": 0.0,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1} if status == "ok" else {},
        "predicted_latency_ms": p50,
        "size_bytes": 2048,
        "on_frontier": False,
        "status": status,
        "reason": None if status == "ok" else "broken",
    }


@pytest.fixture
def entries() -> dict[str, dict]:
    """Hand-made entries. The frontier is base (most accurate), fast (fastest) and mid."""
    items = [
        entry("base", 0.99, 2.0),
        entry("mid", 0.98, 1.2),
        entry("fast", 0.90, 0.5),
        entry("beaten", 0.97, 1.5),  # mid is faster and more accurate
        entry("slow-tie", 0.99, 2.5),  # as accurate as base, slower
        entry("rejected", 1.0, 0.1, status="rejected"),
    ]
    mark_frontier(items)
    return {e["name"]: e for e in items}


@pytest.mark.parametrize("name", ["base", "mid", "fast"])
def test_frontier_keeps_unbeaten(entries, name):
    assert entries[name]["on_frontier"]


@pytest.mark.parametrize("name", ["beaten", "slow-tie"])
def test_frontier_drops_beaten(entries, name):
    assert not entries[name]["on_frontier"]


def test_frontier_drops_rejected(entries):
    assert not entries["rejected"]["on_frontier"]


def test_frontier_equal_entries_both_kept():
    items = [entry("a", 0.95, 1.0), entry("b", 0.95, 1.0)]
    mark_frontier(items)
    assert all(e["on_frontier"] for e in items)


def test_frontier_uses_agreement_without_labels():
    items = [entry("a", None, 1.0), entry("b", None, 2.0)]
    items[0]["agreement"] = 0.9
    mark_frontier(items)
    assert [e["on_frontier"] for e in items] == [True, True]


def test_quality_falls_back_to_agreement():
    item = entry("a", None, 1.0)
    item["agreement"] = 0.75
    assert quality(item) == 0.75


@pytest.fixture
def manifest(entries) -> dict:
    return {
        "model": "toy",
        "device_profile": {"name": "test-cpu", "runtime": "onnxruntime", "threads": 1},
        "protocol": {"warmup": 2, "runs": 10},
        "data": {"validation_samples": 100},
        "baseline": entries["base"],
        "variants": [e for name, e in entries.items() if name != "base"],
    }


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_report_sorted_by_latency(manifest):
    names = [row[1] for row in _table_rows(report_markdown(manifest))]
    assert names == ["fast", "mid", "beaten", "base", "slow-tie", "rejected"]


def test_report_marks_frontier(manifest):
    marked = {row[1] for row in _table_rows(report_markdown(manifest)) if row[0] == "*"}
    assert marked == {"base", "mid", "fast"}


def test_report_speedup(manifest):
    rows = {row[1]: row for row in _table_rows(report_markdown(manifest))}
    assert "4.00x" in rows["fast"]


def test_report_rejected_reason(manifest):
    rows = {row[1]: row for row in _table_rows(report_markdown(manifest))}
    assert rows["rejected"][-1] == "rejected: broken"


def test_plot_pareto_writes_png(manifest, tmp_path):
    plot_pareto(manifest, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_files(manifest, tmp_path):
    write_report(tmp_path, manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "pareto.png",
        "report.md",
    ]


def test_report_names_slow_variants(manifest):
    text = report_markdown(manifest)
    assert "Not faster than the fp32 baseline on this device: slow-tie." in text


def test_report_names_runtime_int8_layers(manifest):
    manifest["variants"][0]["runtime_int8_layers"] = ["blocks.4.depthwise"]
    text = report_markdown(manifest)
    name = manifest["variants"][0]["name"]
    assert f"{name}: ONNX Runtime runs blocks.4.depthwise in int8" in text
