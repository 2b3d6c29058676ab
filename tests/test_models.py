import logging

import pytest
import torch
from torch import nn

from deploy.errors import DeployError
from deploy.models import load_model

FACTORY = """
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(4, 2))


def other():
    return nn.Sequential(nn.Linear(4, 3))


def not_a_model():
    return 42
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(FACTORY)
    return path


def test_load_python_factory(model_file):
    assert load_model(model_file)[0].out_features == 2


def test_load_python_named_factory(model_file):
    assert load_model(f"{model_file}:other")[0].out_features == 3


def test_load_python_missing_factory(model_file):
    with pytest.raises(DeployError, match=r"no function missing\(\)"):
        load_model(f"{model_file}:missing")


def test_load_python_not_a_module(model_file):
    with pytest.raises(DeployError, match="not a torch.nn.Module"):
        load_model(f"{model_file}:not_a_model")


def test_load_python_syntax_error(tmp_path):
    (tmp_path / "broken.py").write_text("def build_model(:\n")
    with pytest.raises(DeployError, match="SyntaxError"):
        load_model(tmp_path / "broken.py")


def test_load_python_factory_raises(tmp_path):
    (tmp_path / "raises.py").write_text("def build_model():\n    raise KeyError('weights')\n")
    with pytest.raises(DeployError, match="KeyError"):
        load_model(tmp_path / "raises.py")


def test_load_missing_file(tmp_path):
    with pytest.raises(DeployError, match="missing.py not found"):
        load_model(tmp_path / "missing.py")


def test_load_unknown_suffix(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(DeployError, match="'.onnx'"):
        load_model(tmp_path / "model.onnx")


def test_load_pickle_needs_permission(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(DeployError, match="--allow-pickle"):
        load_model(tmp_path / "model.pt")


def test_load_pickle_allowed(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="unpickling"):
        model = load_model(tmp_path / "model.pt", allow_pickle=True)
    assert isinstance(model, nn.Linear)


def test_load_garbage_pt2(tmp_path):
    (tmp_path / "garbage.pt2").write_bytes(bytes(range(256)))
    with pytest.raises(DeployError, match="not a readable ExportedProgram"):
        load_model(tmp_path / "garbage.pt2")


def test_load_garbage_pt2_logs_no_traceback(tmp_path):
    # torch.export.load logs a multi-line traceback before it raises, but the CLI must print one line.
    (tmp_path / "garbage.pt2").write_bytes(bytes(range(256)))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    export_logger = logging.getLogger("torch.export")
    export_logger.addHandler(handler)
    try:
        with pytest.raises(DeployError):
            load_model(tmp_path / "garbage.pt2")
    finally:
        export_logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.exc_info] == []
