"""What a run trains with: the configuration (defaults, the family's preset, the command line) and the loss."""
import inspect
from types import MappingProxyType
from typing import Any, Dict, Optional

import torch
from torch import nn

from .. import losses
from ..families import FAMILIES, family_of
from ..models import MultiExitNetwork

__all__ = ['DEFAULTS', 'PRESETS', 'DATASET_CLASSES', 'is_cifar', 'auto_preset', 'resolve_config', 'build_loss',
           'TrainStep']

# Every preset value; a preset overrides some of them, the command line overrides any of them.
DEFAULTS: Dict[str, Any] = dict(
    epochs=300, batch_size=64, opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, wd_bn_bias=True,
    sched='multistep', milestones=[0.5, 0.75], decay_rate=0.1, warmup_epochs=0, warmup_lr=1e-5, min_lr=0.0,
    label_smoothing=0.0, augment='auto', amp='none', channels_last=False, loss='auto',
)

# The families' recipes (``dynzoo.families``), then dynzoo's short CPU recipe: cosine after a 2-epoch warm-up, label
# smoothing, no decay on BN/bias, bf16 autocast and channels-last (benchmarks/train_throughput.py measures it).
PRESETS: Dict[str, Dict[str, Any]] = {
    **{recipe.name: dict(recipe.values) for family in FAMILIES.values() for recipe in family.recipes},
    'fast_cifar': dict(epochs=60, batch_size=128, opt='nesterov', lr=0.1, weight_decay=5e-4, wd_bn_bias=False,
                       sched='cosine', warmup_epochs=2, warmup_lr=0.01, label_smoothing=0.1, amp='bf16',
                       channels_last=True),
}
DATASET_CLASSES = {'cifar10': 10, 'cifar100': 100, 'synthetic': 10}


def is_cifar(dataset: str) -> bool:
    return dataset in ('cifar10', 'cifar100', 'synthetic')


def auto_preset(model_name: str, dataset: str) -> str:
    """The authors' recipe for the model's family on this kind of data (``fast_cifar`` if they published none)."""
    kind = 'cifar' if is_cifar(dataset) else 'imagenet'
    family = family_of(model_name)
    recipe = family.recipe(kind) if family is not None else None
    if recipe is not None:
        return recipe.name
    if kind == 'cifar':
        return 'fast_cifar'
    raise ValueError(f'no ImageNet preset for {model_name!r}; pick one with --preset ({", ".join(PRESETS)})')


def _auto_augment(model_name: str, dataset: str) -> str:
    """The family's CIFAR preprocessing (``dynzoo.data`` preset), dynzoo's plain one, or ImageNet's."""
    if not is_cifar(dataset):
        return 'imagenet'
    family = family_of(model_name)
    return family.augment if family is not None and family.augment else 'cifar'


def resolve_config(args) -> Dict[str, Any]:
    """DEFAULTS, then the preset, then every value given on the command line."""
    preset = args.preset if args.preset != 'auto' else auto_preset(args.model, args.dataset)
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; choose one of auto, {", ".join(PRESETS)}')
    config = dict(DEFAULTS, **PRESETS[preset], preset=preset)
    config.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    if config['augment'] == 'auto':
        config['augment'] = _auto_augment(args.model, args.dataset)
    for key, option in (('epochs', '--epochs'), ('batch_size', '--batch-size')):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f'{option} must be a positive whole number, got {config[key]!r}')
    config['milestones'] = [int(round(m * config['epochs'])) if m < 1 else int(m) for m in config['milestones']]
    return config


def _loss_class(name: str, model: nn.Module, model_name: str) -> type:
    if name == 'auto':
        family = family_of(model_name)
        if family is not None and family.loss is not None:
            return family.loss
        name = 'multi_ce' if isinstance(model, MultiExitNetwork) and model.num_exits > 1 else 'ce'
    if name == 'ce':
        return nn.CrossEntropyLoss
    if name == 'multi_ce':
        return losses.MultiExitCrossEntropy
    loss_cls = getattr(losses, name, None)
    if not (isinstance(loss_cls, type) and issubclass(loss_cls, nn.Module)):
        raise ValueError(f'dynzoo.losses has no loss {name!r} (in this version); pass --loss ce, multi_ce or a '
                         f'loss class of dynzoo.losses')
    return loss_cls


def build_loss(model: nn.Module, model_name: str, config: Dict[str, Any], loss_kwargs: Optional[Dict] = None
               ) -> nn.Module:
    """The training loss: ``config['loss']`` ('auto', 'ce', 'multi_ce' or a class name in ``dynzoo.losses``).

    'auto' takes the family's loss (``dynzoo.families``), else summed multi-exit CE for networks with several exits,
    else plain CE. ``label_smoothing`` and the model's ``num_features``/``num_exits`` are passed to losses that take
    them (SCAN/BYOT losses have no label smoothing: it is then switched off in ``config``).
    """
    loss_cls = _loss_class(config['loss'], model, model_name)
    accepted = inspect.signature(loss_cls).parameters
    num_features = getattr(model, 'num_features', None)
    kwargs = {k: v for k, v in dict(label_smoothing=config['label_smoothing'], num_features=num_features,
                                    feature_dim=num_features, num_exits=getattr(model, 'num_exits', None)).items()
              if k in accepted and v is not None}
    if config['label_smoothing'] and 'label_smoothing' not in accepted:
        print(f'{loss_cls.__name__} has no label smoothing: training without it')
        config['label_smoothing'] = 0.0
    return loss_cls(**kwargs, **(loss_kwargs or {}))


class TrainStep(nn.Module):
    """Model and loss in one module, so that DDP sees (and synchronises) loss parameters such as BYOT's
    adaptation layers; ``forward`` returns the loss. The model is called with the loss's ``forward_kwargs`` (SCAN and
    BYOT losses: ``return_features=True``)."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.forward_kwargs = dict(getattr(criterion, 'forward_kwargs', MappingProxyType({})))

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images, **self.forward_kwargs), target)
