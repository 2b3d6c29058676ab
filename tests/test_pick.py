import json

import pytest

from deploy.cli import main
from deploy.errors import DeployError
from deploy.pick import pick


def entry(name: str, accuracy: float, p50: float, status: str = "ok") -> dict:
    return {
        "name": name,
        "summary": name,
        "artifact": f"variants/{name}.onnx",
        "accuracy": accuracy,
        "agreement": 1.0,
        "latency_ms": {"p50": p50, "p90": p50},
        "on_frontier": True,
        "status": status,
    }


@pytest.fixture
def run_dir(tmp_path):
    """A finished run: baseline 99% at 2 ms, v01 98.5% at 1 ms, v02 96% at 0.5 ms."""
    manifest = {
        "baseline": entry("baseline", 0.99, 2.0),
        "variants": [
            entry("v01", 0.985, 1.0),
            entry("v02", 0.96, 0.5),
            entry("v03", 0.99, 0.1, status="rejected"),
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(2.0, "baseline"), (1.0, "v01"), (0.7, "v02")],
    ids=["loose", "at-v01", "between"],
)
def test_pick_max_latency(run_dir, limit, expected):
    assert pick(run_dir, max_latency_ms=limit)["name"] == expected


@pytest.mark.parametrize(
    ("drop", "expected"),
    [(0.0, "baseline"), (0.5, "v01"), (3.0, "v02")],
    ids=["none", "half-point", "three-points"],
)
def test_pick_max_accuracy_drop(run_dir, drop, expected):
    assert pick(run_dir, max_accuracy_drop=drop)["name"] == expected


def test_pick_both_constraints(run_dir):
    assert pick(run_dir, max_latency_ms=1.5, max_accuracy_drop=3.0)["name"] == "v02"


def test_pick_skips_rejected(run_dir):
    # v03 is faster and as accurate as the baseline, but its validation failed.
    assert pick(run_dir, max_latency_ms=0.6)["name"] == "v02"


def test_pick_nothing_qualifies_latency(run_dir):
    with pytest.raises(DeployError, match="closest is v02"):
        pick(run_dir, max_latency_ms=0.2)


def test_pick_nothing_qualifies_names_constraint(run_dir):
    with pytest.raises(DeployError, match="--max-latency-ms 0.2"):
        pick(run_dir, max_latency_ms=0.2)


def test_pick_nothing_qualifies_both(run_dir):
    # v01 misses the latency by 2%, and v02 misses the accuracy drop by 2.5 points.
    with pytest.raises(DeployError, match="closest is v01"):
        pick(run_dir, max_latency_ms=0.98, max_accuracy_drop=0.5)


def test_pick_names_failed_constraint(run_dir):
    with pytest.raises(DeployError) as raised:
        pick(run_dir, max_latency_ms=0.98, max_accuracy_drop=0.5)
    assert "misses --max-latency-ms 0.98" in str(raised.value)
    assert "meets --max-accuracy-drop 0.5" in str(raised.value)


def test_pick_needs_constraint(run_dir):
    with pytest.raises(DeployError, match="needs a constraint"):
        pick(run_dir)


@pytest.mark.parametrize("value", [-1.0, float("nan")], ids=["negative", "nan"])
def test_pick_rejects_bad_limit(run_dir, value):
    with pytest.raises(DeployError, match="--max-latency-ms"):
        pick(run_dir, max_latency_ms=value)


def test_pick_missing_manifest(tmp_path):
    with pytest.raises(DeployError, match="has no manifest.json"):
        pick(tmp_path, max_latency_ms=1.0)


def test_pick_garbage_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DeployError, match="not readable JSON"):
        pick(tmp_path, max_latency_ms=1.0)


def test_cli_pick_prints_artifact(run_dir, capsys):
    main(["pick", str(run_dir), "--max-latency-ms", "1.0"])
    assert f"artifact: {run_dir}/variants/v01.onnx" in capsys.readouterr().out


def test_cli_pick_exit_code(run_dir):
    assert main(["pick", str(run_dir), "--max-latency-ms", "1.0"]) == 0


def test_cli_pick_nothing_qualifies(run_dir, capsys):
    assert main(["pick", str(run_dir), "--max-latency-ms", "0.2"]) != 0
    assert capsys.readouterr().err.startswith("deploy: error: no variant")
