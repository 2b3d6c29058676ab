"""Model analysis: every Linear and Conv layer, its shapes, FLOPs and parameter bytes.

Analysis runs the model once on an example batch with forward hooks; it never
changes the model.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

LAYER_TYPES = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One Linear or Conv2d layer as seen on a batch-1 forward pass.

    ``input_shape`` and ``output_shape`` include the batch dimension (1). For a
    Linear layer applied to a sequence they are (1, tokens, features).
    """

    name: str
    kind: str  # "linear" or "conv2d"
    in_features: int  # input channels for a conv
    out_features: int  # output channels for a conv
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    param_bytes: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv2d" and self.groups > 1 and self.groups == self.in_features

    @property
    def positions(self) -> int:
        """Output positions per sample: pixels for a conv, tokens for a Linear."""
        if self.kind == "conv2d":
            return self.output_shape[-1] * self.output_shape[-2]
        return math.prod(self.output_shape[1:-1]) if len(self.output_shape) > 2 else 1


def analyze(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[LayerInfo]:
    """Return the Linear and Conv2d layers of ``model`` in the order they run.

    ``example_inputs`` is one batch; shapes are reported for batch 1. A layer
    that runs more than once per forward (weight sharing) is reported once.
    """
    seen: dict[str, LayerInfo] = {}
    handles = []

    def record(name: str, module: nn.Module):
        def hook(_module, args, output):
            if name in seen:
                return
            x = args[0]
            in_shape = (1, *x.shape[1:])
            out_shape = (1, *output.shape[1:])
            params = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size
                positions = out_shape[-1] * out_shape[-2]
                macs = (
                    positions
                    * module.out_channels
                    * (module.in_channels // module.groups)
                    * k[0]
                    * k[1]
                )
                info = LayerInfo(
                    name,
                    "conv2d",
                    module.in_channels,
                    module.out_channels,
                    tuple(k),
                    tuple(module.stride),
                    tuple(module.padding),
                    module.groups,
                    module.bias is not None,
                    in_shape,
                    out_shape,
                    macs,
                    params,
                )
            else:
                positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
                macs = positions * module.in_features * module.out_features
                info = LayerInfo(
                    name,
                    "linear",
                    module.in_features,
                    module.out_features,
                    (1, 1),
                    (1, 1),
                    (0, 0),
                    1,
                    module.bias is not None,
                    in_shape,
                    out_shape,
                    macs,
                    params,
                )
            seen[name] = info

        return hook

    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(record(name, module)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*[t[:1] for t in example_inputs])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return list(seen.values())
