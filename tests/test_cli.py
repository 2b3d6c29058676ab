"""``deploy optimize`` on bad input, run as the installed command in a subprocess.

Each case must exit non-zero with one ``deploy: error:`` line that names the
bad value, print no traceback, and leave neither the run folder nor its hidden
``.run.partial`` folder behind.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

UNSUPPORTED_MODEL = """
import torch
from torch import nn


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        # torch.onnx has no exporter for cummax at opset 17.
        return torch.cummax(self.fc(x.flatten(1)), -1)[0]


def build_model():
    return Cumulative().eval()
"""


def deploy_command() -> list[str]:
    script = Path(sys.executable).with_name("deploy")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deploy.cli"]


@dataclasses.dataclass
class Failure:
    returncode: int
    stderr: str
    folder: Path
    names: str  # the bad value the message must name

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("deploy: error:")]


def _write_inputs(folder: Path, heldout) -> None:
    np.savez(folder / "digits.npz", inputs=heldout["inputs"], labels=heldout["labels"])
    np.savez(folder / "no-inputs.npz", images=heldout["inputs"], labels=heldout["labels"])
    (folder / "unsupported.py").write_text(UNSUPPORTED_MODEL)
    (folder / "syntax.py").write_text("def build_model(:\n    pass\n")
    (folder / "garbage.pt2").write_bytes(bytes(range(256)) * 4)
    (folder / "broken.yaml").write_text("schema_version: 1\nname: broken\n")


# Case id: (arguments after "optimize", the value the error must name). Cases without
# --device-profile get a copy of a measured profile. The output folder is always "run".
CASES = {
    "missing-model": (["--model", "missing.py", "--data", "digits.npz"], "missing.py"),
    "garbage-pt2": (["--model", "garbage.pt2", "--data", "digits.npz"], "garbage.pt2"),
    "syntax-error": (["--model", "syntax.py", "--data", "digits.npz"], "syntax.py"),
    "npz-no-inputs": (["--data", "no-inputs.npz"], "no-inputs.npz"),
    "profile-schema": (["--device-profile", "broken.yaml"], "broken.yaml"),
    "impossible-budget": (
        ["--budget-ms", "0.001", "--passes", "quantize", "--no-finetune"],
        "0.001",
    ),
    "export-fails": (["--model", "unsupported.py", "--data", "digits.npz"], "cummax"),
}


@pytest.fixture(scope="module")
def failures(tmp_path_factory, heldout, measured_profile) -> dict[str, Failure]:
    """Run every case at once: each is mostly single-threaded start-up, so they overlap well."""
    running = {}
    for case, (arguments, names) in CASES.items():
        folder = tmp_path_factory.mktemp(case)
        _write_inputs(folder, heldout)
        if "--device-profile" not in arguments:
            arguments = [*arguments, "--device-profile", str(measured_profile(folder))]
        process = subprocess.Popen(
            [*deploy_command(), "optimize", *arguments, "--out", "run"],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running[case] = (process, folder, names)
    results = {}
    for case, (process, folder, names) in running.items():
        _, stderr = process.communicate(timeout=600)
        results[case] = Failure(process.returncode, stderr, folder, names)
    return results


@pytest.fixture(params=list(CASES), ids=list(CASES))
def failure(request, failures) -> Failure:
    return failures[request.param]


def test_cli_error_exit_code(failure):
    assert failure.returncode != 0


def test_cli_error_one_error_line(failure):
    assert len(failure.error_lines) == 1, failure.stderr


def test_cli_error_is_last_line(failure):
    # A message that wrapped onto more lines would leave text after the error line.
    assert failure.stderr.strip().splitlines()[-1].startswith("deploy: error:"), failure.stderr


def test_cli_error_names_value(failure):
    assert failure.names in failure.error_lines[0]


def test_cli_error_no_traceback(failure):
    assert "Traceback" not in failure.stderr, failure.stderr


def test_cli_error_no_run_folder(failure):
    assert not (failure.folder / "run").exists()


def test_cli_error_no_partial_folder(failure):
    assert not (failure.folder / ".run.partial").exists()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, make_profile):
    """The README's main job, ``deploy optimize`` on the digits CNN, with the profile and run in tmp."""
    folder = tmp_path_factory.mktemp("default")
    profile = make_profile()
    profile.data["protocol"].update(warmup=10, runs=100)
    profile_path = profile.save(folder / "local-cpu.yaml")
    subprocess.run(
        [*deploy_command(), "optimize", "--device-profile", str(profile_path), "--out", "run"],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return json.loads((folder / "run" / "manifest.json").read_text()), folder


@pytest.mark.slow
def test_default_run_frontier(default_run):
    manifest, _ = default_run
    assert sum(v["on_frontier"] for v in manifest["variants"]) >= 3


@pytest.mark.slow
def test_default_run_speedup(default_run):
    # At least one variant 1.5x faster than fp32 with at most a 1-point accuracy drop.
    manifest, _ = default_run
    baseline = manifest["baseline"]
    assert any(
        baseline["latency_ms"]["p50"] / v["latency_ms"]["p50"] >= 1.5
        and baseline["accuracy"] - v["accuracy"] <= 0.01
        for v in manifest["variants"]
        if v["status"] == "ok"
    )


@pytest.mark.slow
def test_default_run_distinct_plans(default_run):
    manifest, _ = default_run
    assert len(manifest["variants"]) >= 5


@pytest.mark.slow
def test_default_run_pick(default_run):
    _, folder = default_run
    result = subprocess.run(
        [*deploy_command(), "pick", "run", "--max-accuracy-drop", "1"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "artifact: run/variants/" in result.stdout


def test_profile_wrong_input_shape(tmp_path):
    result = subprocess.run(
        [
            *deploy_command(),
            "profile",
            "--out",
            str(tmp_path / "p.yaml"),
            "--model",
            "deploy/zoo/digits.py",
            "--input-shape",
            "1,3,8,8",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 2
    assert "--input-shape" in result.stderr
    assert "internal error" not in result.stderr
    # No empty profile is left behind.
    assert not (tmp_path / "p.yaml").exists()
