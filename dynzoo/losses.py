"""Training losses for multi-exit networks."""
from pathlib import Path
from types import MappingProxyType
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .models import CheckpointMismatchError
from .models._helpers import unwrap_state_dict

__all__ = ['MultiExitCrossEntropy', 'SCANLoss', 'BYOTLoss', 'soft_cross_entropy']


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


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch mean of ``-sum(softmax(teacher / T) * log_softmax(logits / T))``, the SCAN/BYOT authors' ``CrossEntropy``.

    It equals ``KL(teacher || student) + H(teacher)``: the same gradient as the KL divergence, a larger value.
    """
    return -(F.softmax(teacher_logits / temperature, dim=1)
             * F.log_softmax(logits / temperature, dim=1)).sum(dim=1).mean()


def _logits_and_features(outputs, loss_name: str) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2 and isinstance(outputs[0], (tuple, list))):
        raise ValueError(f'{loss_name} takes the (logits, features) pair of model(x, return_features=True), '
                         f'got {type(outputs).__name__}')
    logits, features = outputs
    if len(logits) != len(features) or len(logits) < 2:
        raise ValueError(f'{loss_name} needs one logits and one feature tensor per exit (at least 2 exits), '
                         f'got {len(logits)} logits and {len(features)} features')
    return list(logits), list(features)


class SCANLoss(nn.Module):
    """The SCAN authors' training loss (``train.py`` of pytorch-scalable-neural-networks), exits shallow first.

    ``CE(z_deep, y) + sum_shallow [T^2 * lambda_kd * softCE_T(z_k, z_deep) + (1 - lambda_kd) * CE(z_k, y)]
    + feature_weight * sum_shallow ||f_deep - f_k||^2``, where the deepest exit is the (detached) teacher,
    ``softCE_T`` is :func:`soft_cross_entropy` (batch mean) and the feature term is a plain sum of squares over the
    batch and the feature dimensions (the authors computed it inside their forward). As in the authors' code, the
    feature term is left out when ``lambda_kd == 0``. Defaults: ``lambda_kd=0.5`` (``--lambda_KD``), ``T=3``
    (hard-coded there), ``feature_weight=5e-7``.

    ``forward(outputs, target)`` takes ``outputs = model(x, return_features=True)``.
    """

    # what the trainer passes to the model: this loss needs the exits' features too
    forward_kwargs = MappingProxyType({'return_features': True})

    def __init__(self, lambda_kd: float = 0.5, temperature: float = 3.0, feature_weight: float = 5e-7):
        super().__init__()
        self.lambda_kd = lambda_kd
        self.temperature = temperature
        self.feature_weight = feature_weight

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        logits, features = _logits_and_features(outputs, type(self).__name__)
        teacher, teacher_feature = logits[-1].detach(), features[-1].detach()
        kd_weight = self.temperature ** 2 * self.lambda_kd
        loss = F.cross_entropy(logits[-1], target)
        for shallow in reversed(logits[:-1]):
            loss = loss + kd_weight * soft_cross_entropy(shallow, teacher, self.temperature)
            loss = loss + (1 - self.lambda_kd) * F.cross_entropy(shallow, target)
        if self.lambda_kd != 0:
            feature_loss = sum(((teacher_feature - f) ** 2).sum() for f in features[:-1])
            loss = loss + self.feature_weight * feature_loss
        return loss


class BYOTLoss(nn.Module):
    """The Self-Distillation (BYOT, journal version) training loss, exits shallow first.

    ``variant='code'`` (default) is the authors' ``train.py`` (pytorch-self-distillation-final):
    ``CE(z_deep, y) + sum_shallow [alpha * softCE_T(z_k, z_deep) + (1 - alpha) * CE(z_k, y)]
    + feature_weight * sum_{k in hinted} ||A_k(f_k) - f_deep||``, with the deepest exit as the (detached) teacher,
    no ``T^2`` factor, and ``||.||`` the *non-squared* Frobenius norm over the whole batch (``torch.dist``). The feature
    hint reaches every shallow exit except the deepest shallow one (with 4 exits: exits 1 and 2, not 3), as the
    authors' index test does (their comment says the opposite). Defaults: ``alpha=0.3``, ``T=3``, ``0.03``.

    ``variant='paper'`` is the formula of the BYOT paper as quoted second-hand (spec A5; its coefficients were not
    given): ``sum_all (1 - alpha) * CE(z_k, y) + sum_shallow [alpha * KL_T(z_deep || z_k)
    + feature_weight * ||A_k(f_k) - f_deep||^2]``, with the squared L2 distance per sample averaged over the batch
    (our reading) and the hint on every shallow exit.

    ``A_k`` are the trainable ``adaptation_layers`` (Linear ``feature_dim -> feature_dim``, PyTorch init) that the
    authors attach to the network: add this loss's parameters to the optimizer. They keep the authors' indices (layer
    ``num_exits - 2 - k`` serves shallow exit ``k``, so layer 0 serves the deepest shallow exit and is unused by the
    code variant), which lets :meth:`load_adaptation_layers` read them from the authors' checkpoints.
    """

    # what the trainer passes to the model: this loss needs the exits' features too
    forward_kwargs = MappingProxyType({'return_features': True})

    def __init__(self, feature_dim: int = 512, num_exits: int = 4, alpha: float = 0.3, temperature: float = 3.0,
                 feature_weight: float = 0.03, variant: str = 'code'):
        super().__init__()
        if variant not in ('code', 'paper'):
            raise ValueError(f"variant must be 'code' (the authors' train.py) or 'paper', got {variant!r}")
        self.num_exits = num_exits
        self.alpha = alpha
        self.temperature = temperature
        self.feature_weight = feature_weight
        self.variant = variant
        self.adaptation_layers = nn.ModuleList(nn.Linear(feature_dim, feature_dim) for _ in range(num_exits - 1))

    def load_adaptation_layers(self, checkpoint: Union[str, Path, Dict[str, torch.Tensor]]) -> 'BYOTLoss':
        """Load ``adaptation_layers.*`` from an authors' checkpoint (a path or a state dict); returns ``self``."""
        if isinstance(checkpoint, (str, Path)):
            from .hub import load_checkpoint_file
            checkpoint = load_checkpoint_file(checkpoint)
        prefix = 'adaptation_layers.'
        state = {k: v for k, v in unwrap_state_dict(checkpoint).items() if k.startswith(prefix)}
        if not state:
            raise ValueError('the checkpoint holds no adaptation_layers.* keys (SCAN checkpoints and checkpoints saved '
                             'before the first training step have none)')
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise CheckpointMismatchError(
                f'the checkpoint\'s adaptation layers do not fit this BYOTLoss ({differing[0]}: checkpoint '
                f'{found.get(differing[0])}, loss {expected.get(differing[0])}): build it with '
                f'BYOTLoss(feature_dim=model.num_features, num_exits=model.num_exits)')
        self.load_state_dict(state)
        return self

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        logits, features = _logits_and_features(outputs, type(self).__name__)
        if len(logits) != self.num_exits:
            raise ValueError(f'BYOTLoss was built for {self.num_exits} exits, got {len(logits)}')
        teacher, teacher_feature = logits[-1].detach(), features[-1].detach()
        paper = self.variant == 'paper'
        loss = (1 - self.alpha if paper else 1.0) * F.cross_entropy(logits[-1], target)
        for index in range(1, self.num_exits):
            k = self.num_exits - 1 - index
            if paper:
                log_student = F.log_softmax(logits[k] / self.temperature, dim=1)
                kd = F.kl_div(log_student, F.softmax(teacher / self.temperature, dim=1), reduction='batchmean')
            else:
                kd = soft_cross_entropy(logits[k], teacher, self.temperature)
            loss = loss + self.alpha * kd + (1 - self.alpha) * F.cross_entropy(logits[k], target)
            if paper or index != 1:
                adapted = self.adaptation_layers[index - 1](features[k])
                if paper:
                    hint = ((adapted - teacher_feature) ** 2).sum(dim=1).mean()
                else:
                    hint = torch.dist(adapted, teacher_feature)
                loss = loss + self.feature_weight * hint
        return loss
