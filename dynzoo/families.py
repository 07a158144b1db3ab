"""What a model family is, in one place: its networks and registered names, its authors' training recipes, loss and
augmentation, their cost counter and the filter that reads their checkpoints.

``dynzoo.hub`` (``convert_checkpoint``), ``dynzoo.train`` (presets, loss, augmentation) and ``dynzoo.flops`` (the
authors' counting convention) read these descriptors; ``family_of(name or model)`` finds one.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from timm.models import list_models, model_entrypoint, split_model_name_tag
from torch import nn

from . import losses
from .models import DenseNet, DenseNetMC, MSDNet, ResNetMC, ScanResNet, SDPointResNet
from .models._helpers import checkpoint_filter
from .models.densenet_bc import checkpoint_filter_fn as densenet_checkpoint_filter
from .models.msdnet import checkpoint_filter_fn as msdnet_checkpoint_filter, msdnet_op_counter
from .models.scan import checkpoint_filter_fn as scan_checkpoint_filter

__all__ = ['Recipe', 'Family', 'FAMILIES', 'family_of']

CheckpointFilter = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]
MacsCounter = Callable[[nn.Module, torch.Tensor], List[int]]


@dataclass(frozen=True)
class Recipe:
    """A named training preset: ``values`` override ``dynzoo.train.DEFAULTS`` for data of kind ``data``
    (``'cifar'`` or ``'imagenet'``). Milestones below 1 are fractions of the epochs."""
    name: str
    data: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Family:
    """One model family.

    * ``networks``: its network classes; ``prefixes``: the registered names' prefixes.
    * ``recipes``: the authors' training presets; ``augment``: the ``dynzoo.data`` preset of their CIFAR
      preprocessing (None: dynzoo's plain CIFAR one).
    * ``loss``: the ``dynzoo.losses`` class the authors train with (None: cross-entropy summed over the exits, or
      plain cross-entropy for one exit).
    * ``authors_macs``: the authors' own cost counter, ``counter(model, image) -> per-exit counts`` (None: none).
    * ``checkpoint_filter``: reads the authors' released checkpoints into dynzoo's keys (None: they released none).
    """
    name: str
    networks: Tuple[Type[nn.Module], ...]
    prefixes: Tuple[str, ...]
    recipes: Tuple[Recipe, ...] = ()
    augment: Optional[str] = None
    loss: Optional[Type[nn.Module]] = None
    authors_macs: Optional[MacsCounter] = None
    checkpoint_filter: Optional[CheckpointFilter] = field(default=None, repr=False)

    def recipe(self, data: str) -> Optional[Recipe]:
        """The authors' recipe for data of kind ``data`` (``'cifar'`` or ``'imagenet'``), if they published one."""
        return next((recipe for recipe in self.recipes if recipe.data == data), None)

    def owns(self, model_name: str) -> bool:
        """True for the names (``architecture[.tag]``) of this family's registered architectures."""
        return split_model_name_tag(model_name)[0].startswith(self.prefixes)

    def model_names(self) -> List[str]:
        """This family's registered architectures (timm's own models of the same prefix left out)."""
        modules = {network.__module__ for network in self.networks}
        return [name for prefix in self.prefixes for name in list_models(f'{prefix}*')
                if model_entrypoint(name).__module__ in modules]


# Sources of the recipes: the spec files (MSDNet PyTorch args.py/main.py; SCAN and Self-Distillation train.py;
# SDPoint main.py) and the DenseNet paper (CIFAR: batch 64, 300 epochs, /10 at 50% and 75%, wd 1e-4, Nesterov;
# ImageNet: batch 256, 90 epochs, /10 at 30 and 60).
FAMILIES: Dict[str, Family] = {family.name: family for family in (
    Family('msdnet', (MSDNet,), ('msdnet_',), recipes=(
        Recipe('msdnet_cifar', 'cifar', dict(epochs=300, batch_size=64, opt='momentum', lr=0.1, weight_decay=1e-4,
                                             milestones=[0.5, 0.75])),
        Recipe('msdnet_imagenet', 'imagenet', dict(epochs=90, batch_size=256, opt='momentum', lr=0.1,
                                                   weight_decay=1e-4, milestones=[30, 60]))),
        augment='msdnet_cifar', authors_macs=msdnet_op_counter, checkpoint_filter=msdnet_checkpoint_filter),
    Family('scan', (ScanResNet,), ('scan_',), recipes=(
        Recipe('scan_cifar', 'cifar', dict(epochs=200, batch_size=128, opt='momentum', lr=0.1, weight_decay=5e-4,
                                           milestones=[75, 130, 180])),),
        augment='scan_cifar', loss=losses.SCANLoss, checkpoint_filter=scan_checkpoint_filter),
    Family('byot', (ScanResNet,), ('byot_',), recipes=(
        Recipe('byot_cifar', 'cifar', dict(epochs=250, batch_size=128, opt='momentum', lr=0.1, weight_decay=5e-4,
                                           milestones=[83, 166, 240])),),
        augment='byot_cifar', loss=losses.BYOTLoss, checkpoint_filter=scan_checkpoint_filter),
    Family('sdpoint', (SDPointResNet,), ('sdpoint_',), recipes=(
        Recipe('sdpoint_imagenet', 'imagenet', dict(epochs=115, batch_size=256, opt='momentum', lr=0.1,
                                                    weight_decay=1e-4, milestones=[40, 75, 105])),),
        checkpoint_filter=checkpoint_filter),
    Family('densenet', (DenseNet, DenseNetMC), ('densenet_',), recipes=(
        Recipe('densenet_cifar', 'cifar', dict(epochs=300, batch_size=64, opt='nesterov', lr=0.1, weight_decay=1e-4,
                                               milestones=[0.5, 0.75])),
        Recipe('densenet_imagenet', 'imagenet', dict(epochs=90, batch_size=256, opt='nesterov', lr=0.1,
                                                     weight_decay=1e-4, milestones=[30, 60]))),
        augment='densenet_cifar', checkpoint_filter=densenet_checkpoint_filter),
    Family('resnet_mc', (ResNetMC,), ('resnet_mc',)),
)}


def family_of(model: Union[str, nn.Module]) -> Optional[Family]:
    """The family of a model name (``architecture[.tag]``) or of a model (by its registered architecture, else by
    its class); None for models of no dynzoo family."""
    if isinstance(model, str):
        return next((family for family in FAMILIES.values() if family.owns(model)), None)
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    family = family_of(architecture) if architecture else None
    return family or next((family for family in FAMILIES.values() if isinstance(model, family.networks)), None)
