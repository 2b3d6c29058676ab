"""The embedded default: a CNN trained on scikit-learn's bundled handwritten digits.

The 1797 8x8 digits are shuffled with a fixed seed; the first 1000 train the
network, and the other 797 are never seen in training and form the data that
``deploy optimize`` calibrates and validates on.

Retrain (about a minute on 2 cores) with::

    python -m deploy.zoo.digits
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
SEED = 0
TRAIN_SIZE = 1000


class DigitsCNN(nn.Module):
    """A VGG-style CNN for 1x8x8 digits.

    Wide enough that batch-1 inference is dominated by convolution arithmetic
    (about 19M multiply-adds) rather than by per-call overhead.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 128, 256)):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.BatchNorm2d(c4),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c4 * 4, 256),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return all digits as (N, 1, 8, 8) float32 in [0, 1] and int64 labels, shuffled with SEED."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    images = (digits.images[order] / 16.0).astype(np.float32)[:, None]
    return images, digits.target[order].astype(np.int64)


def heldout_digits() -> dict[str, np.ndarray]:
    """Return the digits the default model never trained on, as ``inputs`` and ``labels``."""
    images, labels = digits_arrays()
    return {"inputs": images[TRAIN_SIZE:], "labels": labels[TRAIN_SIZE:]}


def build_model() -> DigitsCNN:
    """Build the trained default CNN from the weights shipped with deploy, in eval mode."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model.eval()


def train(epochs: int = 40, seed: int = SEED) -> DigitsCNN:
    """Train DigitsCNN on the first TRAIN_SIZE shuffled digits with random one-pixel shifts."""
    torch.manual_seed(seed)
    images, labels = digits_arrays()
    x = torch.from_numpy(images[:TRAIN_SIZE])
    y = torch.from_numpy(labels[:TRAIN_SIZE])
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * ((TRAIN_SIZE + 63) // 64)
    )
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(TRAIN_SIZE, generator=generator)
        for start in range(0, TRAIN_SIZE, 64):
            batch = order[start : start + 64]
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            inputs = torch.roll(x[batch], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info("epoch %d loss %.4f", epoch + 1, loss.item())
    return model.eval()


if __name__ == "__main__":
    from safetensors.torch import save_file

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trained = train()
    held = heldout_digits()
    with torch.no_grad():
        predictions = trained(torch.from_numpy(held["inputs"])).argmax(1).numpy()
    accuracy = float((predictions == held["labels"]).mean())
    logger.info("held-out accuracy %.4f on %d digits", accuracy, len(predictions))
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(WEIGHTS))
    logger.info("wrote %s", WEIGHTS)
