"""Normalisation statistics of every data preset: the one source of the models' pretrained configs and of
``dynzoo.data``'s transforms.

Sources: MSDNet PyTorch ``dataloader.py``; SCAN ``train.py`` and the journal Self-Distillation ``train.py`` (spec
scan_sdpoint.md A6); gpleiss efficient-densenet ``demo.py``; torchvision's ImageNet recipe. Per preset, one
``(mean, std)`` per dataset, or ``'default'`` where the authors used one pair for every dataset.
"""
from typing import Dict, Tuple

__all__ = ['NORMALIZATION', 'normalization']

NORMALIZATION: Dict[str, Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]]] = {
    'cifar': {
        'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))},
    'msdnet_cifar': {
        'cifar10': ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
        'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))},
    'scan_cifar': {'default': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))},
    'byot_cifar': {'default': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))},
    'densenet_cifar': {'default': ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784))},
    'imagenet': {'default': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
}


def normalization(preset: str, dataset: str = 'cifar10') -> Dict[str, Tuple[float, ...]]:
    """``dict(mean=..., std=...)`` of ``preset`` (a key of ``NORMALIZATION``) for ``dataset``."""
    if preset not in NORMALIZATION:
        raise ValueError(f'unknown preset {preset!r}; choose one of {sorted(NORMALIZATION)}')
    stats = NORMALIZATION[preset]
    mean_std = stats.get(dataset, stats.get('default'))
    if mean_std is None:
        raise ValueError(f'preset {preset!r} has normalisation for {sorted(stats)} only, not {dataset!r}')
    return dict(mean=mean_std[0], std=mean_std[1])
