"""Field cases about what gets exported: training mode, frozen batch sizes, pruning masks.

Each test builds the small input a user hit the problem with and checks the
behaviour that replaced the silent failure.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from field import support
from torch import nn
from torch.nn.utils import prune as torch_prune

from deploy.data import dataset_from_arrays
from deploy.errors import DeployError
from deploy.passes.prune import PruneConfig, apply_prune
from deploy.pipeline import optimize
from deploy.validate import check_batch_sizes, zero_weight_fraction
from exporters.onnx import ExportError, OnnxRunner, onnx_from_torch
from exporters.timing import TimingProtocol

AXES = {"input": {0: "batch"}, "output": {0: "batch"}}


def _export(model, path, example):
    return onnx_from_torch(
        model, (example,), path, input_names=["input"], output_names=["output"], dynamic_axes=AXES
    )


def _trained_batchnorm_model() -> nn.Module:
    """The small CNN with BatchNorm running statistics far from their initial values."""
    model = support.small_model()
    batchnorm = model[1]
    batchnorm.running_mean.fill_(0.5)
    batchnorm.running_var.fill_(4.0)
    return model


def test_training_mode_model_compared_in_eval(small_files, tmp_path):
    """A model in training mode: reference and export compute the same (eval) function."""
    _, data, profile = small_files
    model = _trained_batchnorm_model().train()
    with pytest.warns(UserWarning, match="training mode"):
        manifest = optimize(
            model, str(data), str(profile), out=tmp_path / "run", config=support.small_config()
        )
    baseline = manifest["baseline"]
    assert baseline["status"] == "ok"
    assert baseline["agreement"] == 1.0
    assert baseline["max_abs_error"] < 1e-4
    # The user's model keeps its mode and its BatchNorm statistics.
    assert all(m.training for m in model.modules())
    assert float(model[1].running_mean[0]) == 0.5
    assert float(model[1].running_var[0]) == 4.0


def test_batchnorm_without_running_stats_named(small_files, tmp_path):
    _, data, profile = small_files
    model = support.small_model()
    model[1] = nn.BatchNorm2d(16, track_running_stats=False)
    # Batch statistics make each sample depend on the rest of its batch, which
    # a dynamic-batch export cannot express: the run stops with one error.
    with (
        pytest.warns(UserWarning, match="BatchNorm '1' has no running statistics"),
        pytest.raises(DeployError, match="ONNX export of the model failed"),
    ):
        optimize(
            model, str(data), str(profile), out=tmp_path / "run", config=support.small_config()
        )
    assert not (tmp_path / ".run.partial").exists()


class ChannelShuffle(nn.Module):
    """A ShuffleNet-style block whose forward reads sizes through ``.data``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = self.conv(x)
        batch, channels, height, width = x.data.size()
        x = x.view(batch, 2, channels // 2, height, width).transpose(1, 2).contiguous()
        return self.fc(x.view(batch, -1))


def test_channel_shuffle_fails_at_batch_three(tmp_path):
    """The exporter freezes the example batch size; the check names the Reshape and axis 0."""
    model = ChannelShuffle().eval()
    path = _export(model, tmp_path / "shuffle.onnx", torch.randn(2, 1, 8, 8))
    inputs = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with pytest.raises(ExportError) as error:
        check_batch_sizes(OnnxRunner(path), [inputs], sizes=(2, 3))
    message = str(error.value)
    assert "'/Reshape'" in message
    assert "axis 0 (batch)" in message
    assert "batch 3" in message
    assert "x.data.size()" in message


def test_channel_shuffle_rejected_by_optimize(small_files, tmp_path):
    """The whole run stops at the baseline with one error that names node and axis."""
    _, data, profile = small_files
    with pytest.raises(DeployError, match=r"Reshape.*axis 0 \(batch\)"):
        optimize(
            ChannelShuffle().eval(),
            str(data),
            str(profile),
            out=tmp_path / "run",
            config=support.small_config(),
        )
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / ".run.partial").exists()


def _sparse_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 64, 10),
    ).eval()


def _initializer_names(path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.initializer]


def test_unstructured_pass_folds_masks(tmp_path):
    """80% magnitude pruning: no mask in the export, 80% zeros, and the same file size."""
    model = _sparse_cnn()
    example = torch.randn(2, 1, 8, 8)
    layers = {"2": 0.8, "5": 0.8}
    pruned = apply_prune(model, PruneConfig(unstructured=layers), (example,))
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in pruned.named_parameters())
    assert not any(name.endswith("_mask") for name, _ in pruned.named_buffers())
    dense_path = _export(model, tmp_path / "dense.onnx", example)
    sparse_path = _export(pruned, tmp_path / "sparse.onnx", example)
    assert not [n for n in _initializer_names(sparse_path) if "mask" in n or "orig" in n]
    assert zero_weight_fraction(dense_path) < 0.01
    assert zero_weight_fraction(sparse_path) > 0.75
    # Dense storage: the file does not shrink, which the report must not hide.
    dense, sparse = dense_path.stat().st_size, sparse_path.stat().st_size
    assert abs(dense - sparse) / dense < 0.02
    # The original is untouched.
    assert zero_weight_fraction(_export(model, tmp_path / "again.onnx", example)) < 0.01


def test_user_pruned_model_masks_folded(small_files, tmp_path):
    """A model pruned with torch.nn.utils.prune: the run folds the masks and states sparsity."""
    _, _, profile = small_files
    model = _sparse_cnn()
    for index in (2, 5):
        torch_prune.l1_unstructured(model[index], "weight", amount=0.8)
    inputs = np.random.default_rng(0).standard_normal((60, 1, 8, 8)).astype(np.float32)
    data = dataset_from_arrays({"inputs": inputs}, "random")
    with pytest.warns(UserWarning, match="unstructured sparsity"):
        manifest = optimize(
            model, data, str(profile), out=tmp_path / "run", config=support.small_config()
        )
    baseline = manifest["baseline"]
    assert baseline["status"] == "ok"
    assert baseline["zero_weight_fraction"] > 0.7
    names = _initializer_names(tmp_path / "run" / baseline["artifact"])
    assert not [n for n in names if "mask" in n or "orig" in n]
    # The measured size is the file's, dense storage included.
    assert baseline["size_bytes"] == (tmp_path / "run" / baseline["artifact"]).stat().st_size
    # The user's model keeps its masks and hooks.
    assert torch_prune.is_pruned(model)
    assert hasattr(model[2], "weight_mask")


def test_protocol_recorded_in_manifest(small_files, tmp_path):
    """Latency protocol: warm-up excluded, fixed threads and affinity, cold start apart."""
    _, data, profile = small_files
    manifest = optimize(
        support.small_model(),
        str(data),
        str(profile),
        out=tmp_path / "run",
        config=support.small_config(),
    )
    protocol = manifest["protocol"]
    assert protocol["warmup"] == 2
    assert protocol["runs"] == 10
    assert protocol["threads"] == 1
    assert protocol["warmup_excluded"] is True
    assert isinstance(protocol["affinity"], list)
    assert "cold_start" in protocol
    for entry in [manifest["baseline"], *manifest["variants"]]:
        latency = entry["latency_ms"]
        assert latency["runs"] == protocol["runs"]
        assert latency["cold_ms"] > 0
        assert latency["p50"] <= latency["p90"]


def test_timing_excludes_warmup():
    """The first runs are slow (allocation, kernel selection); p50 and p90 must not see them."""
    from exporters.timing import time_callable

    calls = []

    def slow_first():
        calls.append(1)
        if len(calls) <= 3:
            import time

            time.sleep(0.02)

    latency = time_callable(slow_first, TimingProtocol(warmup=3, runs=20))
    assert latency.p90 < 5.0
    assert latency.cold_ms >= 20.0
    assert len(calls) == 3 + 20


def test_runner_rejects_other_thread_count(tmp_path):
    path = _export(support.small_model(), tmp_path / "m.onnx", torch.randn(2, 1, 8, 8))
    runner = OnnxRunner(path, threads=1)
    feeds = {"input": np.zeros((1, 1, 8, 8), np.float32)}
    with pytest.raises(ValueError, match="prescribes 2"):
        runner.time(feeds, TimingProtocol(warmup=1, runs=2, threads=2))
