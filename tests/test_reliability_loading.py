"""Safe loading and the untouched user model: nothing unpickles code unless allowed, nothing changes.

A pickle whose ``__reduce__`` writes a marker file serves as a malicious
model; the marker must not appear unless the user passed ``allow_pickle``.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch
from field import support
from safetensors.torch import save_file

from deploy.data import load_data
from deploy.errors import DeployError
from deploy.models import load_model, load_state_dict
from deploy.pipeline import optimize


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: code execution during load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _malicious(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    return path


def test_pickle_refused_without_flag(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "model.pt", marker)
    with pytest.raises(DeployError, match="--allow-pickle"):
        load_model(path)
    assert not marker.exists()


def _pt2_with_member(tmp_path, member_suffix, content):
    """Save the small CNN as .pt2, then replace the archive member ending in ``member_suffix``."""
    import zipfile

    path = tmp_path / "model.pt2"
    program = torch.export.export(support.small_model(), (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(path))
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith(member_suffix):
                data = content
            target.writestr(info, data)
    return crafted


def test_pt2_pickled_member_refused(tmp_path):
    """torch.export.load retries a failed weights-only load with full unpickling."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    path = _pt2_with_member(tmp_path, "sample_inputs/model.pt", payload)
    with pytest.raises(DeployError, match="sample_inputs/model.pt.*--allow-pickle"):
        load_model(path)
    assert not marker.exists()
    # The fault is real: with the flag, loading runs the payload (after a warning).
    with pytest.warns(UserWarning, match="only do this for files you trust"):
        try:
            load_model(path, allow_pickle=True)
        except DeployError:
            pass  # the sample inputs are gone, so deserialization may fail afterwards
    assert marker.exists()


def test_pt2_use_pickle_weight_refused(tmp_path):
    import json as json_module

    config = {"config": {"0.weight": {"path_name": "weight_0", "use_pickle": True}}}
    path = _pt2_with_member(
        tmp_path, "weights/model_weights_config.json", json_module.dumps(config).encode()
    )
    with pytest.raises(DeployError, match="model_weights_config.json:0.weight"):
        load_model(path)


def test_plain_pt2_loads(tmp_path):
    path = tmp_path / "model.pt2"
    program = torch.export.export(support.small_model(), (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(path))
    model = load_model(path)
    inputs = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model(inputs), support.small_model()(inputs), atol=1e-5)


def test_pickle_allowed_with_flag_warns(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(support.small_model(), path)
    with pytest.raises(DeployError, match="arbitrary code"):
        load_model(path)
    with pytest.warns(UserWarning, match="only do this for files you trust"):
        model = load_model(path, allow_pickle=True)
    assert isinstance(model, torch.nn.Module)


def test_state_dict_pt_points_to_build_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(support.small_model().state_dict(), path)
    with pytest.raises(DeployError, match="contains weights only.*load_state_dict"):
        load_model(path)


def test_weights_only_loader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "weights.pt", marker)
    with pytest.raises(DeployError, match="as weights only"):
        load_state_dict(path)
    assert not marker.exists()


def test_safetensors_weights_round_trip(tmp_path):
    model = support.small_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    weights = load_state_dict(path)
    fresh = support.small_model()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.add_(1.0)
    fresh.load_state_dict(weights)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert set(load_state_dict(tmp_path / "weights.pt")) == set(weights)


def test_data_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data.npz"
    np.savez(path, inputs=np.array([_Payload(marker)] * 30, dtype=object))
    with pytest.raises(DeployError, match="not a readable .npz"):
        load_data(path)
    assert not marker.exists()


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: len(m._forward_pre_hooks) for name, m in model.named_modules()},
    }


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_user_model_and_files_unchanged(tmp_path, tmp_path_factory, mode):
    """Parameters, buffers, training flags and requires_grad before and after a full run."""
    model_file, data_file, profile = support.small_files_in(tmp_path)
    shutil.copyfile(support.measured_profile(tmp_path_factory), profile)
    model = support.small_model()
    model.train(mode == "train")
    model[0].weight.requires_grad_(False)
    before = _snapshot(model)
    files = {p: _digest(p) for p in (model_file, data_file)}
    config = support.small_config(passes=("quantize", "prune"))
    with pytest.warns() if mode == "train" else _no_context():
        manifest = optimize(
            model, str(data_file), str(profile), out=tmp_path / "run", config=config
        )
    assert manifest["variants"]
    after = _snapshot(model)
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for path, digest in files.items():
        assert _digest(path) == digest, path


def test_model_file_run_leaves_files_unchanged(tmp_path, tmp_path_factory):
    model_file, data_file, profile = support.small_files_in(tmp_path)
    shutil.copyfile(support.measured_profile(tmp_path_factory), profile)
    files = {p: _digest(p) for p in (model_file, data_file)}
    optimize(
        str(model_file),
        str(data_file),
        str(profile),
        out=tmp_path / "run",
        config=support.small_config(),
    )
    for path, digest in files.items():
        assert _digest(path) == digest, path
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(
        [model_file.name, data_file.name, profile.name, "run"]
    )


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
