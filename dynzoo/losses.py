"""Training losses for multi-exit networks."""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['MultiExitCrossEntropy']


class MultiExitCrossEntropy(nn.Module):
    """Sum over exits of ``weight_k * CE(logits_k, target)``; unweighted, this is the MSDNet authors' loss.

    ``weights``: one weight per exit (default all 1); ``label_smoothing`` as in ``F.cross_entropy``.
    """

    def __init__(self, weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0):
        super().__init__()
        self.weights = None if weights is None else list(weights)
        self.label_smoothing = label_smoothing

    def forward(self, outputs: List[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f'{len(weights)} exit weights given for {len(outputs)} exits')
        return sum(w * F.cross_entropy(o, target, label_smoothing=self.label_smoothing)
                   for w, o in zip(weights, outputs))
