"""Structured channel pruning by L1 norm, through Torch-Pruning's dependency graph.

Pruning a layer's output channels physically removes them, together with every
coupled parameter the dependency graph finds: the BatchNorm after it, the
input channels of the layers that consume it (through flatten, depthwise convs
and element-wise ops). The channels with the smallest L1 weight norm go first.

This pass is lossy: it does not preserve the computation.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

PRESERVES_COMPUTATION = False


@dataclasses.dataclass
class PruneConfig:
    """Fraction of output channels to keep per layer, and the channel-count multiple.

    Attributes:
        keep: ``{"features.0": 0.5}`` keeps half of that layer's output channels.
        round_to: kept channel counts are rounded to a multiple of this, which
            suits vectorized kernels. Defaults to 4.
        unstructured: ``{"features.0": 0.8}`` zeroes the 80% of that layer's
            weights with the smallest magnitude. The masks are folded into
            the weights, so the layer keeps its shape: a dense runtime stores
            and runs it at the same size and speed. Defaults to none.
    """

    keep: dict[str, float] = dataclasses.field(default_factory=dict)
    round_to: int = 4
    unstructured: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, amount in self.unstructured.items():
            if not 0.0 <= amount < 1.0:
                raise ValueError(
                    f"prune: unstructured amount {amount} for {name!r} is outside [0, 1)"
                )

    def to_dict(self) -> dict:
        result = {"keep": dict(self.keep), "round_to": self.round_to}
        if self.unstructured:
            result["unstructured"] = dict(self.unstructured)
        return result

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        keep = {str(k): float(v) for k, v in data.get("keep", {}).items()}
        unstructured = {str(k): float(v) for k, v in data.get("unstructured", {}).items()}
        return cls(keep=keep, round_to=int(data.get("round_to", 4)), unstructured=unstructured)


def kept_channels(channels: int, keep: float, round_to: int = 4) -> int:
    """Return how many of ``channels`` a keep fraction leaves, rounded to ``round_to``, at least one."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep fraction {keep} is outside (0, 1]")
    target = channels * keep
    kept = (
        int(math.ceil(target / round_to) * round_to) if channels > round_to else math.ceil(target)
    )
    return max(1, min(channels, kept))


def _out_channels_fn(module: nn.Module):
    return (
        tp.prune_conv_out_channels
        if isinstance(module, nn.Conv2d)
        else tp.prune_linear_out_channels
    )


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _is_dense(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def _dependency_graph(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]):
    inputs = example_inputs[0] if len(example_inputs) == 1 else tuple(example_inputs)
    return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)


@dataclasses.dataclass(frozen=True)
class PrunableLayer:
    """A layer whose output channels can be pruned alone.

    ``consumers`` are the dense layers whose input channels shrink with it;
    ``passthrough`` are depthwise convs in between, which shrink too.
    """

    name: str
    channels: int
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...]


def prunable_layers(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> dict[str, PrunableLayer]:
    """Return the dense Linear and Conv2d layers whose output channels can be pruned on their own.

    A layer qualifies when it is the only dense layer producing the channels
    of its pruning group (no residual add couples it to another layer) and
    some layer consumes them (the model's output layer does not qualify). The
    model is not changed.
    """
    model = copy.deepcopy(model).eval()
    graph = _dependency_graph(model, example_inputs)
    names = _module_names(model)
    result = {}
    for name, module in model.named_modules():
        if not _is_dense(module):
            continue
        group = graph.get_pruning_group(module, _out_channels_fn(module), idxs=[0])
        producers, consumers, passthrough = set(), set(), set()
        for dep, _ in group:
            target = dep.target.module
            if not isinstance(target, (nn.Conv2d, nn.Linear)):
                continue
            handler = getattr(dep.handler, "__name__", "")
            target_name = names.get(id(target), "?")
            if not _is_dense(target):
                passthrough.add(target_name)
            elif handler == "prune_out_channels":
                producers.add(target_name)
            elif handler == "prune_in_channels":
                consumers.add(target_name)
        if producers == {name} and consumers:
            channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            result[name] = PrunableLayer(
                name, channels, tuple(sorted(consumers)), tuple(sorted(passthrough))
            )
    return result


def apply_prune(
    model: nn.Module, config: PruneConfig, example_inputs: tuple[torch.Tensor, ...]
) -> nn.Module:
    """Return a copy of ``model`` with the lowest-L1 output channels of each listed layer removed.

    Layers in ``config.unstructured`` then have their smallest-magnitude
    weights set to zero, with the masks folded in.
    """
    result = copy.deepcopy(model).eval()
    if config.keep:
        _prune_channels(result, config, example_inputs)
    for name, amount in config.unstructured.items():
        module = _layer(result, name)
        torch_prune.l1_unstructured(module, "weight", amount=amount)
        # Fold the mask: the weight becomes a plain parameter again, with no
        # weight_orig or weight_mask left to leak into an export.
        torch_prune.remove(module, "weight")
    return result


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"prune: the model has no layer named {name!r}") from exc
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ValueError(f"prune: layer {name!r} is not a Linear or Conv2d layer")
    return module


def _prune_channels(
    result: nn.Module, config: PruneConfig, example_inputs: tuple[torch.Tensor, ...]
) -> None:
    graph = _dependency_graph(result, example_inputs)
    for name, keep in config.keep.items():
        try:
            module = result.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"prune: the model has no layer named {name!r}") from exc
        if not _is_dense(module):
            raise ValueError(f"prune: layer {name!r} is not a dense Linear or Conv2d layer")
        weight = module.weight.detach()
        channels = weight.shape[0]
        kept = kept_channels(channels, keep, config.round_to)
        if kept == channels:
            continue
        norms = weight.abs().reshape(channels, -1).sum(dim=1)
        drop = torch.argsort(norms)[: channels - kept].tolist()
        group = graph.get_pruning_group(module, _out_channels_fn(module), idxs=drop)
        if not graph.check_pruning_group(group):
            raise ValueError(
                f"prune: keeping {kept} of {channels} channels of {name!r} is not valid"
            )
        group.prune()
