"""Running a PyTorch model over numpy batches."""

from __future__ import annotations

import numpy as np
import torch


def first_output(output) -> torch.Tensor:
    """Return the tensor a model's forward produced, or the first of several."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and output:
        return next(iter(output.values()))
    raise TypeError(f"the model returned {type(output).__name__}; deploy needs a tensor output")


def to_tensors(arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


@torch.no_grad()
def predict(model: torch.nn.Module, arrays: list[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Run ``model`` over all samples in batches and return its (first) output as float32 numpy."""
    outputs = []
    for start in range(0, len(arrays[0]), batch_size):
        batch = to_tensors([a[start : start + batch_size] for a in arrays])
        outputs.append(first_output(model(*batch)).float().numpy())
    return np.concatenate(outputs)
