"""Low-rank factorization by truncated SVD.

A Linear layer W (out x in) becomes two: in -> r, then r -> out, with the
singular values split evenly between the factors. A k x k conv with C_in inputs
becomes a k x k conv to r channels followed by a 1 x 1 conv to C_out channels;
the factorization is the SVD of the weight reshaped to (C_out, C_in*k*k).

This pass is lossy: it does not preserve the computation.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

PRESERVES_COMPUTATION = False


@dataclasses.dataclass
class LowRankConfig:
    """Ranks per layer: ``{"features.3": 32, "classifier.1": 64}``."""

    ranks: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ranks": dict(self.ranks)}

    @classmethod
    def from_dict(cls, data: dict) -> LowRankConfig:
        return cls(ranks={str(k): int(v) for k, v in data.get("ranks", {}).items()})


def max_useful_rank(module: nn.Module) -> int:
    """Return the largest rank whose factorization has fewer multiply-adds than the layer.

    For an n x n Linear layer that is n/2 - 1: rank n/2 costs exactly as much.
    Depthwise and grouped convs cannot be factorized this way and return 0.
    """
    if isinstance(module, nn.Linear):
        m, n = module.out_features, module.in_features
        return max((m * n - 1) // (m + n), 0)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return 0
        kk = module.kernel_size[0] * module.kernel_size[1]
        cin, cout = module.in_channels, module.out_channels
        # dense: cout*cin*kk; factorized: r*cin*kk + cout*r, per output position
        return max((cout * cin * kk - 1) // (cin * kk + cout), 0)
    return 0


def _factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    # weight: (out, in); returns A (rank, in) and B (out, rank) with B @ A ~ weight.
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).to(weight.dtype)
    second = (u[:, :rank] * root[None, :]).to(weight.dtype)
    return first, second


def factorize(module: nn.Module, rank: int) -> nn.Sequential:
    """Return a two-layer Sequential computing a rank-``rank`` approximation of ``module``.

    Any rank up to the weight matrix's smaller side is accepted. Whether it
    saves time is decided by ``max_useful_rank`` and the latency table.
    """
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"lowrank cannot factorize the grouped conv {module}")
    weight = module.weight.detach()
    limit = min(weight.shape[0], weight[0].numel())
    if not 1 <= rank <= limit:
        raise ValueError(f"rank {rank} is outside 1..{limit} for {module}")
    bias = None if module.bias is None else module.bias.detach().clone()
    if isinstance(module, nn.Linear):
        first_w, second_w = _factors(weight, rank)
        first = nn.Linear(module.in_features, rank, bias=False)
        second = nn.Linear(rank, module.out_features, bias=bias is not None)
        first.weight.data.copy_(first_w)
        second.weight.data.copy_(second_w)
    else:
        cout, cin, kh, kw = weight.shape
        first_w, second_w = _factors(weight.reshape(cout, cin * kh * kw), rank)
        first = nn.Conv2d(
            cin,
            rank,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
        )
        second = nn.Conv2d(rank, cout, 1, bias=bias is not None)
        first.weight.data.copy_(first_w.reshape(rank, cin, kh, kw))
        second.weight.data.copy_(second_w.reshape(cout, rank, 1, 1))
    if bias is not None:
        second.bias.data.copy_(bias)
    return nn.Sequential(first, second).to(weight.device)


def apply_lowrank(model: nn.Module, config: LowRankConfig) -> nn.Module:
    """Return a copy of ``model`` with each layer in ``config.ranks`` factorized."""
    result = copy.deepcopy(model)
    for name, rank in config.ranks.items():
        try:
            module = result.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"lowrank: the model has no layer named {name!r}") from exc
        result.set_submodule(name, factorize(module, rank))
    return result
