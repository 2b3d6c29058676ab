"""Crash safety: ``kill -9`` at several points of a real run, then ``--resume`` finishes it.

After every kill the run folder holds only complete files (each JSON parses,
each ONNX file passes the checker), the final folder does not exist yet, and
the device profile still loads. The resumed run reuses the measured profile
entries and the variants validated before the kill, byte for byte.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import yaml
from field import support

from deploy.profiles import load_profile
from deploy.report import MANIFEST

# Files whose appearance triggers each kill, in run order.
KILL_AFTER = ["baseline.json", "plans.json", "variants/v01.json"]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=support.cli_env(),
    )


def _kill_when(process: subprocess.Popen, path: Path, timeout: float = 240.0) -> bool:
    """SIGKILL ``process`` as soon as ``path`` exists; return False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    process.kill()
    process.wait()
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _check_complete_files(partial: Path) -> None:
    """Every visible file in the partial run is complete; hidden temporaries are never read."""
    for path in partial.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
    assert not (partial / MANIFEST).exists() or json.loads((partial / MANIFEST).read_text())


def _entries(profile: Path) -> list[dict]:
    return yaml.safe_load(profile.read_text())["latency_table"]


PASSES = "quantize,prune"


@pytest.fixture(scope="session")
def measured_profile(tmp_path_factory) -> Path:
    return support.measured_profile(tmp_path_factory)


@pytest.fixture
def crash_run(tmp_path, measured_profile):
    model, data, profile = support.small_files_in(tmp_path)
    shutil.copyfile(measured_profile, profile)
    out = tmp_path / "run"
    args = [
        "optimize",
        "--model",
        str(model),
        "--data",
        str(data),
        "--device-profile",
        str(profile),
        "--out",
        str(out),
        "--passes",
        PASSES,
        "--num-budgets",
        "6",
        "--no-finetune",
    ]
    return tmp_path, out, profile, args


def test_kill_at_each_stage_then_resume(crash_run):
    folder, out, profile, args = crash_run
    partial = folder / f".{out.name}.partial"
    kills = 0
    saved_variants: dict[str, str] = {}
    saved_entries: list[dict] = []
    for index, marker in enumerate(KILL_AFTER):
        process = _start(args + (["--resume"] if index else []), folder)
        if not _kill_when(process, partial / marker):
            pytest.fail(f"the run finished before {marker} appeared: {process.stderr.read()}")
        kills += 1
        assert not out.exists()
        _check_complete_files(partial)
        load_profile(profile)
        entries = _entries(profile)
        assert all(e in entries for e in saved_entries), "a measured profile entry was lost"
        saved_entries = entries
        for path in (partial / "variants").glob("v*.json"):
            saved_variants[path.name] = path.read_text()

    finished = support.run_cli(args + ["--resume"], folder)
    assert finished.returncode == 0, finished.stderr
    assert not partial.exists()
    manifest = json.loads((out / MANIFEST).read_text())
    plans = json.loads((out / "plans.json").read_text())["plans"]
    names = {v["name"] for v in manifest["variants"]}
    assert {f"v{i + 1:02d}" for i in range(len(plans))} <= names
    for variant in manifest["variants"]:
        onnx.checker.check_model(onnx.load(str(out / variant["artifact"])))
    # Variants validated before a kill are reused as they were, not measured again.
    assert saved_variants, "no variant was validated before the last kill"
    for name, text in saved_variants.items():
        assert (out / "variants" / name).read_text() == text
    final_entries = _entries(profile)
    assert all(e in final_entries for e in saved_entries)
    assert "reusing" in finished.stderr
    assert kills == len(KILL_AFTER)


@pytest.mark.slow
def test_kill_at_random_moments(crash_run):
    """Kills at fixed delays land wherever the run happens to be; each leaves a resumable state."""
    folder, out, profile, args = crash_run
    partial = folder / f".{out.name}.partial"
    kills = 0
    for delay in (3.0, 5.5, 8.0):
        process = _start(args + (["--resume"] if partial.exists() else []), folder)
        time.sleep(delay)
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert not out.exists()
        if partial.exists():
            _check_complete_files(partial)
        load_profile(profile)
    resume = ["--resume"] if partial.exists() else []
    if not out.exists():
        finished = support.run_cli(args + resume, folder)
        assert finished.returncode == 0, finished.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["variants"]
    assert kills >= 1


def test_resume_rejects_changed_settings(tmp_path, measured_profile, monkeypatch):
    """An interrupted run resumes only with the same model, data, profile and config."""
    from deploy import pipeline
    from deploy.errors import DeployError

    model, data, profile = support.small_files_in(tmp_path)
    shutil.copyfile(measured_profile, profile)
    out = tmp_path / "run"
    partial = tmp_path / ".run.partial"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "plan_variants", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipeline.optimize(
                str(model), str(data), str(profile), out=out, config=support.small_config()
            )
    before = sorted(p.name for p in partial.iterdir())
    assert "baseline.json" in before
    changed = support.small_config(num_budgets=3)
    with pytest.raises(DeployError, match="different config"):
        pipeline.optimize(str(model), str(data), str(profile), out=out, config=changed, resume=True)
    assert sorted(p.name for p in partial.iterdir()) == before
    manifest = pipeline.optimize(
        str(model), str(data), str(profile), out=out, config=support.small_config(), resume=True
    )
    assert manifest["variants"]
