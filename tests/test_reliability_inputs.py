"""Bad input everywhere: each case gets one error line naming the value and the fix, exit code 2.

The cases run ``deploy.cli.main`` in this process (fast) and a few through a
real subprocess, to check the exit code and that no traceback reaches the
user unless ``--debug`` is given.
"""

from __future__ import annotations

import errno
import json
import shutil
import zipfile

import numpy as np
import pytest
import yaml
from field import support

from deploy import report
from deploy.cli import main
from deploy.errors import DeployError


def _cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deploy: error:")]


@pytest.fixture
def files(tmp_path, tmp_path_factory):
    model, data, profile = support.small_files_in(tmp_path)
    shutil.copyfile(support.measured_profile(tmp_path_factory), profile)
    return {"model": model, "data": data, "profile": profile, "dir": tmp_path}


def _optimize_args(files, **replace) -> list[str]:
    paths = {
        "--model": files["model"],
        "--data": files["data"],
        "--device-profile": files["profile"],
        "--out": files["dir"] / "run",
    }
    paths.update(replace)
    argv = ["optimize"]
    for flag, value in paths.items():
        argv += [flag, str(value)]
    return argv + support.SMALL_ARGS


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# Each builder writes one bad file into the folder and returns the --flag and path to pass.
def _truncated_npz(folder):
    good = support.write_data(folder)
    data = good.read_bytes()
    return _write(folder / "cut.npz", data[: len(data) // 2])


def _object_npz(folder):
    path = folder / "objects.npz"
    np.savez(path, inputs=np.array([{"a": 1}] * 30, dtype=object))
    return path


def _npz(folder, name, **arrays):
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _truncated_pt2(folder):
    import torch

    model = support.small_model()
    path = folder / "model.pt2"
    program = torch.export.export(model, (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(path))
    data = path.read_bytes()
    return _write(folder / "cut.pt2", data[: len(data) // 3])


def _profile_with(folder, change):
    data = yaml.safe_load(support.write_profile(folder).read_text())
    change(data)
    return _write(folder / "changed.yaml", yaml.safe_dump(data))


def _set(path, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


BAD_FILES = {
    # name: (flag, builder, words the one error line must contain)
    "model missing": ("--model", lambda d: d / "absent.py", ["absent.py", "not found"]),
    "model wrong suffix": ("--model", lambda d: _write(d / "m.onnx", "x"), ["'.onnx'", ".pt2"]),
    "model syntax error": (
        "--model",
        lambda d: _write(d / "bad.py", "def build_model(:\n"),
        ["bad.py", "SyntaxError"],
    ),
    "model no factory": (
        "--model",
        lambda d: _write(d / "nofactory.py", "def other():\n    return 1\n"),
        ["build_model", "other"],
    ),
    "model factory raises": (
        "--model",
        lambda d: _write(d / "raises.py", "def build_model():\n    raise KeyError('w')\n"),
        ["build_model()", "KeyError"],
    ),
    "model not a module": (
        "--model",
        lambda d: _write(d / "notmodule.py", "def build_model():\n    return 3\n"),
        ["int", "nn.Module"],
    ),
    "model empty file": ("--model", lambda d: _write(d / "empty.py", ""), ["build_model"]),
    "model truncated pt2": ("--model", _truncated_pt2, ["cut.pt2", "torch.export.save"]),
    "model garbage pt2": (
        "--model",
        lambda d: _write(d / "junk.pt2", b"\x00\x01junk" * 50),
        ["junk.pt2", "ExportedProgram"],
    ),
    "model pickle without flag": (
        "--model",
        lambda d: _write(d / "m.pt", b"\x80\x04junk"),
        ["--allow-pickle", "arbitrary code"],
    ),
    "data missing": ("--data", lambda d: d / "absent.npz", ["absent.npz", "not found"]),
    "data truncated": ("--data", _truncated_npz, ["cut.npz", "numpy.savez"]),
    "data not npz": ("--data", lambda d: _write(d / "text.npz", "a,b\n1,2\n"), ["text.npz"]),
    "data pickled objects": ("--data", _object_npz, ["objects.npz"]),
    "data no inputs key": (
        "--data",
        lambda d: _npz(d, "nokey", images=np.zeros((30, 1, 8, 8), np.float32)),
        ["images", "'inputs'"],
    ),
    "data nan inputs": (
        "--data",
        lambda d: _npz(d, "nan", inputs=np.full((30, 1, 8, 8), np.nan, np.float32)),
        ["NaN"],
    ),
    "data bool inputs": (
        "--data",
        lambda d: _npz(d, "bool", inputs=np.zeros((30, 1, 8, 8), bool)),
        ["bool", "float32"],
    ),
    "data complex inputs": (
        "--data",
        lambda d: _npz(d, "complex", inputs=np.zeros((30, 1, 8, 8), np.complex64)),
        ["complex64", "float32"],
    ),
    "data wrong shape": (
        "--data",
        lambda d: _npz(d, "shape", inputs=np.zeros((30, 3, 5), np.float32)),
        ["failed on the data's inputs", "(3, 5)"],
    ),
    "data integer inputs": (
        "--data",
        lambda d: _npz(d, "ints", inputs=np.zeros((30, 1, 8, 8), np.int64)),
        ["failed on the data's inputs", "int64"],
    ),
    "data float labels": (
        "--data",
        lambda d: _npz(
            d, "labels", inputs=np.zeros((30, 1, 8, 8), np.float32), labels=np.zeros(30)
        ),
        ["labels", "integer class ids"],
    ),
    "data too few samples": (
        "--data",
        lambda d: _npz(d, "few", inputs=np.zeros((5, 1, 8, 8), np.float32)),
        ["5 samples", "at least 20"],
    ),
    "data ragged inputs": (
        "--data",
        lambda d: _npz(
            d,
            "ragged",
            inputs_0=np.zeros((30, 1, 8, 8), np.float32),
            inputs_1=np.zeros((20, 4), np.float32),
        ),
        ["input 1", "same first"],
    ),
    "profile missing": ("--device-profile", lambda d: d / "absent.yaml", ["absent.yaml"]),
    "profile binary": (
        "--device-profile",
        lambda d: _write(d / "bin.yaml", b"\xff\xfe\x00garbage"),
        ["bin.yaml", "YAML"],
    ),
    "profile a list": ("--device-profile", lambda d: _write(d / "l.yaml", "- 1\n"), ["mapping"]),
    "profile threads text": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["runtime", "threads"], "two")),
        ["runtime.threads", "'two'"],
    ),
    "profile infinite latency": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["power", "active_watts"], float("inf"))),
        ["power.active_watts", "finite"],
    ),
    "profile nan warmup": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["protocol", "warmup"], float("nan"))),
        ["protocol.warmup", "finite"],
    ),
    "profile negative runs": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["protocol", "runs"], -5)),
        ["protocol.runs", "-5"],
    ),
    "profile future schema": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["schema_version"], 2)),
        ["schema_version 2"],
    ),
    "profile unknown field": (
        "--device-profile",
        lambda d: _profile_with(d, _set(["colour"], "red")),
        ["colour"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_one_line_error(case, files, capsys):
    flag, build, words = BAD_FILES[case]
    path = build(files["dir"])
    code, err = _cli(_optimize_args(files, **{flag: path}), capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    assert not (files["dir"] / "run").exists()
    assert not (files["dir"] / ".run.partial").exists()


BAD_OPTIONS = {
    # name: (extra arguments, words the error line must contain)
    "unknown option": (["--colour", "red"], ["--colour"]),
    "misspelled option": (["--budgt-ms", "3"], ["--budgt-ms", "did you mean --budget-ms"]),
    "negative budget": (["--budget-ms", "-1"], ["-1.0 ms", "positive"]),
    "zero budget": (["--budget-ms", "0"], ["0.0 ms", "positive"]),
    "nan budget": (["--budget-ms", "nan"], ["nan ms", "finite"]),
    "infinite budget": (["--budget-ms", "inf"], ["inf ms", "finite"]),
    "text budget": (["--budget-ms", "fast"], ["'fast'", "milliseconds"]),
    "empty budget": (["--budget-ms", ","], ["no budget"]),
    "zero num budgets": (["--num-budgets", "0"], ["--num-budgets", "at least 1"]),
    "text num budgets": (["--num-budgets", "ten"], ["'ten'", "whole number"]),
    "unknown pass": (["--passes", "distill"], ["'distill'", "lowrank, prune, quantize"]),
    "unknown task": (["--task", "detection"], ["'detection'", "classification"]),
    "empty keep float": (["--keep-float", " , "], ["no layer name"]),
    "negative min timing": (["--min-timing-s", "-1"], ["--min-timing-s", "-1 s", "0 to 600"]),
    "huge min timing": (["--min-timing-s", "1e9"], ["--min-timing-s", "1e9 s", "0 to 600"]),
    "text min timing": (["--min-timing-s", "soon"], ["'soon'", "seconds"]),
    "debug after command": (["--debug"], ["--debug", "before the command"]),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_option_one_line_error(case, files, capsys):
    extra, words = BAD_OPTIONS[case]
    code, err = _cli(_optimize_args(files) + extra, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]


def test_existing_run_rejected(files, capsys):
    out = files["dir"] / "run"
    out.mkdir()
    (out / report.MANIFEST).write_text("{}")
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 2
    assert "already holds a finished run" in _error_lines(err)[0]
    assert (out / report.MANIFEST).read_text() == "{}"


def test_existing_folder_rejected(files, capsys):
    out = files["dir"] / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 2
    assert "already exists" in _error_lines(err)[0]
    assert (out / "notes.txt").read_text() == "mine"


def test_existing_file_as_out_rejected(files, capsys):
    out = files["dir"] / "run"
    out.write_text("mine")
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 2
    assert "already exists" in _error_lines(err)[0]
    assert out.read_text() == "mine"


def test_partial_run_needs_resume(files, capsys):
    partial = files["dir"] / ".run.partial"
    (partial / "variants").mkdir(parents=True)
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 2
    assert "--resume" in _error_lines(err)[0]
    assert partial.is_dir()


def test_impossible_budget_names_fastest(files, capsys):
    code, err = _cli(_optimize_args(files) + ["--budget-ms", "0.000001"], capsys)
    assert code == 2, err
    line = _error_lines(err)[0]
    assert "1e-06 ms is below the fastest plan" in line
    assert "raise the budget" in line
    assert not (files["dir"] / ".run.partial").exists()


def test_unknown_keep_float_lists_matches(files, capsys):
    code, err = _cli(_optimize_args(files) + ["--keep-float", "classifer.1"], capsys)
    assert code == 2, err
    line = _error_lines(err)[0]
    assert "'classifer.1'" in line
    assert not (files["dir"] / ".run.partial").exists()


def test_full_disk_keeps_resumable_run(files, capsys, monkeypatch):
    """ENOSPC on the third atomic write: one error line, no half-written file, --resume finishes."""
    real = report.write_atomic
    calls = []

    def full_disk(path, text):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr("deploy.run_folder.write_atomic", full_disk)
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 2, err
    line = _error_lines(err)[0]
    assert "no space left on the device" in line
    assert "--resume" in line
    partial = files["dir"] / ".run.partial"
    assert partial.is_dir()
    for path in partial.rglob("*.json"):
        json.loads(path.read_text())
    assert not list(partial.rglob(".*"))

    monkeypatch.setattr("deploy.run_folder.write_atomic", real)
    code, err = _cli(_optimize_args(files) + ["--resume"], capsys)
    assert code == 0, err
    manifest = json.loads((files["dir"] / "run" / report.MANIFEST).read_text())
    assert manifest["variants"]


def test_full_disk_in_real_write_leaves_no_temporary(tmp_path, monkeypatch):
    """A write that fails part-way leaves neither the target nor the temporary file."""
    import os

    target = tmp_path / "out.json"
    target.write_text("previous")
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, fd, mode):
            self.handle = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.os, "fdopen", FullFile)
    with pytest.raises(OSError):
        report.write_atomic(target, "new content")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_no_traceback_without_debug(files):
    """A real process: exit code 2 and one line; with --debug the exception propagates."""
    argv = _optimize_args(files, **{"--model": files["dir"] / "absent.py"})
    plain = support.run_cli(argv, files["dir"])
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    with pytest.raises(DeployError, match="absent.py"):
        main(["--debug", *argv])


def test_internal_error_one_line(files, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("deploy.pipeline.optimize", broken)
    code, err = _cli(_optimize_args(files), capsys)
    assert code == 1
    assert "Traceback" not in err
    assert "internal error: ZeroDivisionError" in err
    assert "--debug" in err


def test_zip_without_arrays(files, capsys):
    path = files["dir"] / "empty.npz"
    with zipfile.ZipFile(path, "w"):
        pass
    code, err = _cli(_optimize_args(files, **{"--data": path}), capsys)
    assert code == 2
    assert "no model inputs" in _error_lines(err)[0]
