"""Passes: transformations of PyTorch modules.

Each pass has a config dataclass that round-trips through JSON and a function
that applies it to a copy of the model. Passes know nothing of ONNX, runtimes
or files.
"""

from deploy.passes.lowrank import LowRankConfig, apply_lowrank, max_useful_rank
from deploy.passes.prune import PruneConfig, apply_prune, prunable_layers
from deploy.passes.quantize import QuantizeConfig, fake_quantize_layer

__all__ = [
    "LowRankConfig",
    "PruneConfig",
    "QuantizeConfig",
    "apply_lowrank",
    "apply_prune",
    "fake_quantize_layer",
    "max_useful_rank",
    "prunable_layers",
]
