"""Recovery fine-tuning by distillation from the original model.

After pruning or factorization the variant is trained for a few epochs to
reproduce the original model's outputs (mean squared error on the outputs)
on the calibration inputs. Labels are not needed. BatchNorm statistics and
dropout stay frozen (eval mode), so the short run only moves the weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from deploy.torch_utils import first_output, predict, to_tensors


@dataclasses.dataclass
class FinetuneConfig:
    """Recovery fine-tuning settings.

    Attributes:
        epochs: passes over the calibration inputs. Defaults to 15.
        lr: Adam learning rate. Defaults to 3e-4.
        batch_size: samples per step. Defaults to 32.
        seed: shuffling seed. Defaults to 0.
    """

    epochs: int = 15
    lr: float = 3e-4
    batch_size: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def distill(
    student: nn.Module, teacher: nn.Module, inputs: list[np.ndarray], config: FinetuneConfig
) -> nn.Module:
    """Train ``student`` in place to match ``teacher``'s outputs on ``inputs``; return it in eval mode."""
    targets = torch.from_numpy(predict(teacher, inputs))
    tensors = to_tensors(inputs)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    student.eval()
    count = len(targets)
    for _ in range(config.epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, config.batch_size):
            batch = order[start : start + config.batch_size]
            output = first_output(student(*[t[batch] for t in tensors]))
            loss = nn.functional.mse_loss(output, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return student.eval()
