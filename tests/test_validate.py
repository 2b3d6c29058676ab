import json

import numpy as np
import pytest
import torch
from torch import nn

from deploy.data import Dataset
from deploy.validate import validate_artifact
from exporters.onnx import onnx_from_torch
from exporters.timing import TimingProtocol

PROTOCOL = TimingProtocol(warmup=2, runs=10)


class BakedBatch(nn.Module):
    """A classifier whose flatten is ``x.view(2, -1)``: the example batch size is baked in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).view(2, -1))


@pytest.fixture(scope="module")
def validation_data(heldout) -> Dataset:
    return Dataset([heldout["inputs"][:200]], heldout["labels"][:200])


@pytest.fixture(scope="module")
def baseline(digits_onnx, validation_data, digits_reference):
    return validate_artifact(
        digits_onnx, validation_data, digits_reference[:200], PROTOCOL, classification=True
    )


@pytest.fixture(scope="module")
def baked(tmp_path_factory, validation_data):
    torch.manual_seed(0)
    model = BakedBatch().eval()
    path = tmp_path_factory.mktemp("baked") / "baked.onnx"
    example = torch.from_numpy(validation_data.inputs[0][:2].copy())
    onnx_from_torch(
        model,
        (example,),
        path,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    reference = np.zeros((len(validation_data), 10), np.float32)
    return validate_artifact(path, validation_data, reference, PROTOCOL, classification=True)


def test_baseline_status_ok(baseline):
    assert baseline.status == "ok"


def test_baseline_truthy(baseline):
    assert baseline


def test_baseline_agreement_one(baseline):
    assert baseline.agreement == 1.0


def test_baseline_max_abs_error_tiny(baseline):
    assert baseline.max_abs_error < 1e-4


def test_baseline_accuracy(baseline, validation_data, digits_reference):
    expected = float((digits_reference[:200].argmax(1) == validation_data.labels).mean())
    assert baseline.accuracy == pytest.approx(expected)


def test_baseline_latency_fields(baseline):
    assert set(baseline.latency_ms) >= {"p50", "p90"}


def test_baseline_size(baseline, digits_onnx):
    assert baseline.size_bytes == digits_onnx.stat().st_size


def test_baseline_serializes(baseline):
    assert json.loads(json.dumps(baseline.to_dict()))["status"] == "ok"


def test_baked_batch_rejected(baked):
    assert baked.status == "rejected"


def test_baked_batch_falsy(baked):
    assert not baked


def test_baked_batch_names_node(baked):
    assert "in node '/fc/Gemm'" in baked.reason


@pytest.fixture(scope="module")
def embedding(digits_onnx, validation_data, digits_reference):
    """The baseline validated as an embedding model: agreement by cosine similarity."""
    return validate_artifact(
        digits_onnx, validation_data, digits_reference[:200], PROTOCOL, classification=False
    )


def test_embedding_agreement(embedding):
    assert embedding.agreement == 1.0


def test_embedding_no_accuracy(embedding):
    assert embedding.accuracy is None
