"""Train dynzoo models: the authors' recipes per family, a fast CIFAR recipe, one process or many (``torchrun``).

    python -m dynzoo.train --model msdnet_cifar_b7 --dataset cifar10 --data-path cifar10_jpeg.npz --output runs/b7
    torchrun --nproc_per_node 2 -m dynzoo.train ...   # DistributedDataParallel: gloo on CPU, nccl on GPU

* Presets (``--preset``, default the model family's authors' recipe) set the optimizer, learning-rate schedule,
  epochs, global batch, weight decay, augmentation and loss; every preset value can be overridden on the command
  line. ``fast_cifar`` is dynzoo's short recipe for CPU training (cosine with warm-up, label smoothing, bf16).
* The loss follows the family: summed multi-exit cross-entropy for networks with several exits (MSDNet, the
  multi-classifier baselines), ``dynzoo.losses.SCANLoss`` / ``BYOTLoss`` for SCAN / Self-Distillation, plain
  cross-entropy for single-exit networks (DenseNet-BC; SDPoint samples its instance per batch itself in train mode).
* ``--batch-size`` is the *global* batch: each of N processes takes one contiguous N-th of every global batch, so a
  run gives the same batches, and without batch-dependent layers the same updates, on any number of processes.
* Every epoch, rank 0 writes the full resume state ``last.pth`` atomically (model, EMA, loss, optimizer, scheduler,
  every rank's RNG states, epoch; ``dynzoo.train_state``) and, with ``--compact-dir``, a compact copy small enough to
  commit between sessions. ``--resume`` continues from the full state (exactly) or else the compact one (same
  schedule, same epoch); a killed run loses at most the epoch in progress. ``--stop-after-epochs N`` ends this
  invocation after N epochs, resumable, for runs that span several sittings.
* ``--model-ema`` keeps an exponential moving average of the weights (``timm.utils.ModelEmaV3``), validated beside
  the model every epoch; the export takes whichever has the higher mean top-1 over the exits.
* ``log.json`` records the run; at the end the model is exported Hub-ready (``dynzoo.hub.save_pretrained``) with its
  per-exit validation accuracy; SDPoint networks first get batch-norm statistics re-estimated per instance and every
  instance evaluated, as their authors do.
* The training process keeps freed memory for reuse (``dynzoo.inference.retain_freed_memory``) instead of
  page-faulting every step's activations anew on CPU.
"""
import argparse
import inspect
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.models import split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms
from tqdm import tqdm

from . import data, losses
from .cli import parse_key_values
from .factory import create_model, is_dynzoo_model
from .hub import load_checkpoint_file, save_pretrained
from .inference import retain_freed_memory
from .models import MultiExitNetwork
from .models.sdpoint import NIL, SDPointResNet
from .sdpoint import recalibrate_bn
from .train_state import (COMPACT_NAME, atomic_write, find_resume_state, load_compact_state, save_checkpoint,
                          save_compact_state)

__all__ = ['PRESETS', 'DEFAULTS', 'GlobalBatchSampler', 'resolve_config', 'build_loss', 'add_train_args',
           'run_train', 'main']

# Every preset value; a preset overrides some of them, the command line overrides any of them.
DEFAULTS: Dict[str, Any] = dict(
    epochs=300, batch_size=64, opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, wd_bn_bias=True,
    sched='multistep', milestones=[0.5, 0.75], decay_rate=0.1, warmup_epochs=0, warmup_lr=1e-5, min_lr=0.0,
    label_smoothing=0.0, augment='auto', amp='none', channels_last=False, loss='auto',
)

# Milestones below 1 are fractions of the epochs. Sources: the spec files (MSDNet PyTorch args.py/main.py; SCAN and
# Self-Distillation train.py; SDPoint main.py) and the DenseNet paper (CIFAR: batch 64, 300 epochs, /10 at 50% and
# 75%, wd 1e-4, Nesterov; ImageNet: batch 256, 90 epochs, /10 at 30 and 60).
PRESETS: Dict[str, Dict[str, Any]] = {
    'msdnet_cifar': dict(epochs=300, batch_size=64, opt='momentum', lr=0.1, weight_decay=1e-4,
                         milestones=[0.5, 0.75]),
    'msdnet_imagenet': dict(epochs=90, batch_size=256, opt='momentum', lr=0.1, weight_decay=1e-4,
                            milestones=[30, 60]),
    'scan_cifar': dict(epochs=200, batch_size=128, opt='momentum', lr=0.1, weight_decay=5e-4,
                       milestones=[75, 130, 180]),
    'byot_cifar': dict(epochs=250, batch_size=128, opt='momentum', lr=0.1, weight_decay=5e-4,
                       milestones=[83, 166, 240]),
    'sdpoint_imagenet': dict(epochs=115, batch_size=256, opt='momentum', lr=0.1, weight_decay=1e-4,
                             milestones=[40, 75, 105]),
    'densenet_cifar': dict(epochs=300, batch_size=64, opt='nesterov', lr=0.1, weight_decay=1e-4,
                           milestones=[0.5, 0.75]),
    'densenet_imagenet': dict(epochs=90, batch_size=256, opt='nesterov', lr=0.1, weight_decay=1e-4,
                              milestones=[30, 60]),
    # dynzoo's short CPU recipe (issue 9): cosine after a 2-epoch warm-up, label smoothing, no decay on BN/bias,
    # bf16 autocast + channels-last (msdnet_cifar_b7 on one CPU thread: 3.4x the fp32 images/s,
    # benchmarks/train_throughput.py).
    'fast_cifar': dict(epochs=60, batch_size=128, opt='nesterov', lr=0.1, weight_decay=5e-4, wd_bn_bias=False,
                       sched='cosine', warmup_epochs=2, warmup_lr=0.01, label_smoothing=0.1, amp='bf16',
                       channels_last=True),
}

# Registered-name prefix -> family (for presets, augmentation and loss).
FAMILY_PREFIXES = {'msdnet_': 'msdnet', 'scan_': 'scan', 'byot_': 'byot', 'sdpoint_': 'sdpoint',
                   'densenet_': 'densenet', 'resnet_mc': 'resnet_mc'}
# Families whose loss is not the default (summed CE for multi-exit networks, CE otherwise); the loss classes are
# looked up in dynzoo.losses when training starts and called as loss(model(x, return_features=True), target).
FAMILY_LOSSES = {'scan': 'SCANLoss', 'byot': 'BYOTLoss'}
FEATURE_LOSSES = {'SCANLoss', 'BYOTLoss'}
DATASET_CLASSES = {'cifar10': 10, 'cifar100': 100, 'synthetic': 10}


def family_of(model_name: str) -> Optional[str]:
    arch = split_model_name_tag(model_name)[0]
    return next((family for prefix, family in FAMILY_PREFIXES.items() if arch.startswith(prefix)), None)


def _is_cifar(dataset: str) -> bool:
    return dataset in ('cifar10', 'cifar100', 'synthetic')


def auto_preset(model_name: str, dataset: str) -> str:
    """The authors' recipe for the model's family on this kind of data (``fast_cifar`` if they published none)."""
    kind = 'cifar' if _is_cifar(dataset) else 'imagenet'
    name = f'{family_of(model_name)}_{kind}'
    if name in PRESETS:
        return name
    if kind == 'cifar':
        return 'fast_cifar'
    raise ValueError(f'no ImageNet preset for {model_name!r}; pick one with --preset ({", ".join(PRESETS)})')


def resolve_config(args) -> Dict[str, Any]:
    """DEFAULTS, then the preset, then every value given on the command line."""
    preset = args.preset if args.preset != 'auto' else auto_preset(args.model, args.dataset)
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; choose one of auto, {", ".join(PRESETS)}')
    config = dict(DEFAULTS, **PRESETS[preset], preset=preset)
    config.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    if config['augment'] == 'auto':
        family_preset = f'{family_of(args.model)}_cifar'
        if _is_cifar(args.dataset):
            config['augment'] = family_preset if family_preset in data.PRESETS else 'cifar'
        else:
            config['augment'] = 'imagenet'
    for key, option in (('epochs', '--epochs'), ('batch_size', '--batch-size')):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f'{option} must be a positive whole number, got {config[key]!r}')
    config['milestones'] = [int(round(m * config['epochs'])) if m < 1 else int(m) for m in config['milestones']]
    return config


class GlobalBatchSampler(Sampler):
    """A distributed batch sampler: every epoch, a permutation seeded by ``seed + epoch`` is cut into global batches
    (the last incomplete one dropped) and rank ``r`` of ``world_size`` yields the ``r``-th contiguous slice of each.

    Unlike ``DistributedSampler`` (which deals samples round-robin), the union of the ranks' batches at every step is
    the batch one process would take, so runs on 1 and N processes see the same global batches.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f'the global batch ({global_batch}) must be a multiple of the number of processes '
                             f'({world_size})')
        if num_samples < global_batch:
            raise ValueError(f'the dataset has {num_samples} samples, fewer than one batch of {global_batch}')
        self.num_samples, self.global_batch, self.rank, self.world_size, self.seed = (
            num_samples, global_batch, rank, world_size, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        per_rank = self.global_batch // self.world_size
        for b in range(len(self)):
            start = b * self.global_batch + self.rank * per_rank
            yield order[start:start + per_rank]


def build_loss(model: nn.Module, model_name: str, config: Dict[str, Any], loss_kwargs: Optional[Dict] = None
               ) -> nn.Module:
    """The training loss: ``config['loss']`` ('auto', 'ce', 'multi_ce' or a class name in ``dynzoo.losses``).

    'auto' takes the family's loss (``FAMILY_LOSSES``), else summed multi-exit CE for networks with several exits,
    else plain CE. ``label_smoothing`` and the model's ``num_features``/``num_exits`` are passed to losses that take
    them (SCAN/BYOT losses have no label smoothing: it is then switched off in ``config``).
    """
    name = config['loss']
    if name == 'auto':
        multi_exit = isinstance(model, MultiExitNetwork) and model.num_exits > 1
        name = FAMILY_LOSSES.get(family_of(model_name), 'multi_ce' if multi_exit else 'ce')
    if name == 'ce':
        loss_cls = nn.CrossEntropyLoss
    elif name == 'multi_ce':
        loss_cls = losses.MultiExitCrossEntropy
    else:
        loss_cls = getattr(losses, name, None)
        if not (isinstance(loss_cls, type) and issubclass(loss_cls, nn.Module)):
            raise ValueError(f'dynzoo.losses has no loss {name!r} (in this version); pass --loss ce, multi_ce or a '
                             f'loss class of dynzoo.losses')
    accepted = inspect.signature(loss_cls).parameters
    num_features = getattr(model, 'num_features', None)
    kwargs = {k: v for k, v in dict(label_smoothing=config['label_smoothing'], num_features=num_features,
                                    feature_dim=num_features, num_exits=getattr(model, 'num_exits', None)).items()
              if k in accepted and v is not None}
    if config['label_smoothing'] and 'label_smoothing' not in accepted:
        print(f'{loss_cls.__name__} has no label smoothing: training without it')
        config['label_smoothing'] = 0.0
    loss = loss_cls(**kwargs, **(loss_kwargs or {}))
    if not hasattr(loss, 'forward_kwargs'):
        loss.forward_kwargs = {'return_features': True} if loss_cls.__name__ in FEATURE_LOSSES else {}
    return loss


class TrainStep(nn.Module):
    """Model and loss in one module, so that DDP sees (and synchronises) loss parameters such as BYOT's
    adaptation layers; ``forward`` returns the loss."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images, **self.criterion.forward_kwargs), target)


def _synthetic(num_samples: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_samples, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, num_samples)


def build_datasets(args, config) -> Tuple[Dataset, Dataset]:
    """(train, validation) datasets; CIFAR's validation set is its test split, as the authors report."""
    stats = 'cifar10' if args.dataset == 'synthetic' else args.dataset  # synthetic data: CIFAR-10-shaped
    augment = config['augment']
    preset = ('cifar' if _is_cifar(args.dataset) else 'imagenet') if augment == 'none' else augment
    eval_tf = data.build_transforms(preset, train=False, dataset=stats, input_size=args.input_size)
    train_tf = eval_tf if augment == 'none' else data.build_transforms(preset, train=True, dataset=stats,
                                                                       input_size=args.input_size)
    if args.dataset == 'synthetic':
        n = args.synthetic_size
        return (data.ArrayDataset(*_synthetic(n, args.num_classes or 10, args.seed), transform=train_tf),
                data.ArrayDataset(*_synthetic(max(n // 4, 1), args.num_classes or 10, args.seed + 1),
                                  transform=eval_tf))
    if _is_cifar(args.dataset):
        source = args.data_source or ('npz' if args.data_path else 'torchvision')
        common = dict(source=source, root=args.data_root, path=args.data_path, name=args.dataset,
                      download=args.download)
        train_set = data.cifar_dataset('train', transform=train_tf, **common)
        if args.holdout:  # the images `dynzoo eval --mode budget --holdout N` fits its thresholds on
            train_set = Subset(train_set, data.holdout_indices(len(train_set), args.holdout)[0].tolist())
        return train_set, data.cifar_dataset('test', transform=eval_tf, **common)
    if args.dataset == 'imagefolder':
        if not args.data_root:
            raise ValueError('--dataset imagefolder needs --data-root <folder with train/ and val/>')
        train_set = data.image_folder(args.data_root, True, preset, args.input_size)
        train_set.transform = train_tf
        return train_set, data.image_folder(args.data_root, False, preset, args.input_size)
    raise ValueError(f'unknown dataset {args.dataset!r}')


class _Distributed:
    """Process-group bookkeeping (a single process when not started by ``torchrun``)."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        use_cuda = torch.cuda.is_available() and device != 'cpu'
        self.device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group('nccl' if use_cuda else 'gloo')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> List[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state['state']['key'] = torch.from_numpy(numpy_state['state']['key'].astype(np.int64))
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    numpy_state = dict(state['numpy'])
    numpy_state['state'] = dict(numpy_state['state'], key=state['numpy']['state']['key'].numpy().astype(np.uint32))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _autocast(amp: str, device: torch.device):
    if amp == 'none':
        return nullcontext()
    if amp != 'bf16':
        raise ValueError(f"--amp must be 'bf16' or 'none', got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _as_exits(outputs) -> List[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _eval_batches(loader: DataLoader, device: torch.device, config: Dict[str, Any]):
    """``(images, target)`` on ``device``, images in the run's memory format."""
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if config['channels_last']:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, target


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dist_info: _Distributed, config: Dict[str, Any]) -> List[float]:
    """Top-1 (%) of every exit over the whole validation set (counts summed across processes)."""
    model.eval()
    correct, total = None, 0
    for images, target in _eval_batches(loader, dist_info.device, config):
        with _autocast(config['amp'], dist_info.device):
            exits = _as_exits(model(images))
        hits = [int((logits.argmax(1) == target).sum()) for logits in exits]
        correct = hits if correct is None else [c + h for c, h in zip(correct, hits)]
        total += len(target)
    sums = dist_info.sum((correct or []) + [total])
    return [100.0 * c / sums[-1] for c in sums[:-1]]


@torch.no_grad()
def evaluate_instances(model: nn.Module, loader: DataLoader, device: torch.device,
                       config: Dict[str, Any]) -> Dict[str, float]:
    """Top-1 (%) of every instance of an SDPoint network, ``{instance name: accuracy}``, in one pass over ``loader``."""
    model.eval()
    instances = model.instances()
    correct, total = [0] * len(instances), 0
    for images, target in _eval_batches(loader, device, config):
        with _autocast(config['amp'], device):
            for i, instance in enumerate(instances):
                correct[i] += int((model(images, instance=instance).argmax(1) == target).sum())
        total += len(target)
    return {instance.name: 100.0 * c / total for instance, c in zip(instances, correct)}


def recalibrate_full_instance(model: SDPointResNet, train_loader: DataLoader, device: torch.device,
                              config: Dict[str, Any], args) -> None:
    """Before each validation during training: the full instance's batch-norm statistics re-estimated on
    ``--val-recalibrate-batches`` training batches. The shared running statistics average over the randomly drawn
    instances and validate the full one poorly."""
    if args.val_recalibrate_batches > 0:
        with _autocast(config['amp'], device):
            recalibrate_bn(model, train_loader, instances=[NIL], num_batches=args.val_recalibrate_batches)


def finish_sdpoint(model: SDPointResNet, train_loader: DataLoader, val_set: Dataset, device: torch.device,
                   config: Dict[str, Any], args) -> Dict[str, float]:
    """The authors' last step before evaluating an SDPoint network: batch-norm statistics re-estimated for every
    instance on training images (``dynzoo.sdpoint.recalibrate_bn``, ``--recalibrate-batches`` batches, stored in the
    model), then every instance evaluated on the whole validation set."""
    with _autocast(config['amp'], device):
        recalibrate_bn(model, train_loader, num_batches=args.recalibrate_batches)
    val_loader = _loader(val_set, device, args.workers, batch_size=config['batch_size'] * 2)
    return evaluate_instances(model, val_loader, device, config)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynzoo train`` / ``python -m dynzoo.train``."""
    parser.add_argument('--model', required=True, help='model name, e.g. msdnet_cifar_b7')
    parser.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra constructor arguments')
    parser.add_argument('--pretrained', action='store_true', help='start from pretrained weights')
    parser.add_argument('--num-classes', type=int, default=None, help='default: from the dataset')
    parser.add_argument('--dataset', default='cifar10', choices=('cifar10', 'cifar100', 'imagefolder', 'synthetic'))
    parser.add_argument('--data-source', default=None, choices=('npz', 'torchvision'),
                        help='CIFAR source (default: npz when --data-path is given, else torchvision)')
    parser.add_argument('--data-path', default=None, help='packed-JPEG CIFAR npz (e.g. cifar10_jpeg.npz)')
    parser.add_argument('--data-root', default=None, help='torchvision CIFAR root, or the ImageNet-style folder')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR into --data-root')
    parser.add_argument('--input-size', type=int, default=224, help='image size for --dataset imagefolder')
    parser.add_argument('--synthetic-size', type=int, default=256, help='training images of --dataset synthetic')
    parser.add_argument('--output', required=True, help='run folder: last.pth, log.json, pretrained/')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='continue from OUTPUT/last.pth, else from the compact state in --compact-dir (or from '
                             'the given checkpoint); starts fresh if there is none')
    parser.add_argument('--compact-dir', default=None,
                        help='also keep a compact resume state (float16 weights and EMA, bfloat16 momentum) in '
                             'this folder every epoch, e.g. training/<run> to commit between sessions')
    parser.add_argument('--stop-after-epochs', type=int, default=None,
                        help='end this invocation after N epochs (resume later with --resume; no export)')
    parser.add_argument('--model-ema', action='store_true',
                        help='keep an EMA of the weights (timm ModelEmaV3), validate it, export it when better')
    parser.add_argument('--model-ema-decay', type=float, default=0.9998,
                        help='the EMA decay it warms up to (timm\'s warm-up, power 3/4)')
    parser.add_argument('--preset', default='auto', help=f'auto (the family\'s authors\' recipe) or one of: '
                                                         f'{", ".join(PRESETS)}')
    group = parser.add_argument_group('recipe (overrides the preset)')
    group.add_argument('--epochs', type=int)
    group.add_argument('--batch-size', type=int, help='global batch (split across processes)')
    group.add_argument('--opt', help="timm optimizer: 'momentum' (SGD), 'nesterov', 'adamw', ...")
    group.add_argument('--lr', type=float)
    group.add_argument('--momentum', type=float)
    group.add_argument('--weight-decay', type=float)
    group.add_argument('--wd-bn-bias', action=argparse.BooleanOptionalAction, default=None,
                       help='also decay BatchNorm and bias parameters (the authors did)')
    group.add_argument('--sched', help="timm scheduler: 'multistep', 'cosine', 'step', ...")
    group.add_argument('--milestones', type=float, nargs='+', help='multistep epochs (values < 1: fractions)')
    group.add_argument('--decay-rate', type=float)
    group.add_argument('--warmup-epochs', type=int)
    group.add_argument('--warmup-lr', type=float)
    group.add_argument('--min-lr', type=float)
    group.add_argument('--label-smoothing', type=float)
    group.add_argument('--augment', help=f'dynzoo.data transform preset ({", ".join(data.PRESETS)}), auto or none')
    group.add_argument('--amp', choices=('bf16', 'none'), help='bf16 autocast (CPU with bf16 support, or GPU)')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None)
    group.add_argument('--loss', help="'auto', 'ce', 'multi_ce' or a class of dynzoo.losses")
    parser.add_argument('--loss-kwargs', nargs='*', metavar='KEY=VALUE', help='extra loss arguments')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=2, help='data-loading processes per training process')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--eval-interval', type=int, default=1, help='validate every N epochs (and at the end)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the training step (1 CPU thread, bf16: msdnet_cifar_b7 1.3x the images/s '
                             'after about 5 minutes of compiling; scan_resnet18 no gain; SDPoint recompiles per '
                             'instance)')
    parser.add_argument('--find-unused-parameters', action='store_true',
                        help='DDP: allow parameters without gradient (automatic for losses with parameters)')
    parser.add_argument('--export', default=None, help='Hub-ready folder written at the end (OUTPUT/pretrained)')
    parser.add_argument('--export-name', default=None, help='published name, e.g. msdnet_cifar_b7.c10')
    parser.add_argument('--holdout', type=int, default=0,
                        help='CIFAR: leave out the N training images that `dynzoo eval --mode budget --holdout N` '
                             'fits its early-exit thresholds on (MSDNet: 5000)')
    parser.add_argument('--recalibrate-batches', type=int, default=100,
                        help='SDPoint: training batches per instance for the final batch-norm recalibration')
    parser.add_argument('--val-recalibrate-batches', type=int, default=20,
                        help='SDPoint: training batches for the full instance\'s batch-norm statistics before each '
                             'validation during training (0: validate with the shared running statistics)')
    parser.add_argument('--export-note', default=None,
                        help='a line about the run for the model card (e.g. what it was fine-tuned from)')
    parser.add_argument('--export-dtype', default='float32', choices=('float32', 'float16'))
    parser.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')


def _loader(dataset, device: torch.device, workers: int, **kwargs) -> DataLoader:
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == 'cuda', **kwargs)


def _normalization(dataset) -> Optional[Dict[str, Any]]:
    """The mean/std the evaluation transform uses, for the exported config."""
    steps = getattr(getattr(dataset, 'transform', None), 'transforms', [])
    norm = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    return None if norm is None else dict(mean=tuple(norm.mean), std=tuple(norm.std))


def run_train(args) -> Dict[str, Any]:
    """Train as ``args`` say; returns the run record written to ``log.json`` (rank 0; other ranks: their view)."""
    config = resolve_config(args)
    dist_info = _Distributed(args.device)
    try:
        return _train(args, config, dist_info)
    finally:
        dist_info.close()


def _resume_state(args, output: Path) -> Optional[Dict[str, Any]]:
    """The state ``--resume`` continues from (full, else compact; see ``dynzoo.train_state``), or None to start
    fresh. Starting fresh over an existing state is refused: it would be overwritten at the first epoch."""
    if args.resume and args.resume != 'auto':
        path = Path(args.resume)
        if not path.is_file():
            raise FileNotFoundError(f'--resume {path}: no such checkpoint')
        return load_compact_state(path) if path.suffix == '.safetensors' else load_checkpoint_file(path)
    state, path = find_resume_state(output, args.compact_dir, load_checkpoint_file)
    if state is not None and not args.resume:
        raise FileExistsError(f'{path} exists: pass --resume to continue that run, or choose another --output '
                              f'(and --compact-dir)')
    if state is not None:
        print(f'resuming from {path}' + ('' if 'rng' in state else ' (compact state: no RNG state, so the random '
                                                                    'streams differ from an uninterrupted run)'))
    return state


def _restore(state: Dict[str, Any], parts: '_RunParts', config: Dict[str, Any], dist_info: _Distributed
             ) -> Tuple[int, int, List[Dict[str, Any]], float]:
    """Load a resume state into the run; returns ``(epoch, global_step, history, train_time)``."""
    parts.model.load_state_dict(state['model'])
    parts.criterion.load_state_dict(state['criterion'])
    parts.optimizer.load_state_dict(state['optimizer'])
    schedule_keys = ('epochs', 'sched', 'milestones', 'decay_rate', 'warmup_epochs', 'warmup_lr', 'min_lr', 'lr')
    if all(state['config'].get(k) == config[k] for k in schedule_keys):
        parts.scheduler.load_state_dict(state['scheduler'])
    else:  # timm's schedulers are functions of the step: the new schedule continues from global_step
        for group in parts.optimizer.param_groups:
            group['initial_lr'] = config['lr']
    if parts.ema is not None:
        if state.get('model_ema') is not None:
            parts.ema.module.load_state_dict(state['model_ema'])
        else:
            parts.ema.module.load_state_dict(parts.model.state_dict())
            print('the resumed run kept no EMA: it starts from the resumed weights')
    rng = state.get('rng')
    if rng is not None and len(rng) == dist_info.world_size:
        _set_rng_state(rng[dist_info.rank])
    elif rng is not None and dist_info.is_main:
        print(f'resuming on {dist_info.world_size} processes a run saved on {len(rng)}: random streams differ')
    changed = {k: (state['config'].get(k), v) for k, v in config.items() if state['config'].get(k) != v}
    if changed and dist_info.is_main:
        print(f'resuming with changed settings (checkpoint, now): {changed}')
    if dist_info.is_main:
        print(f'resumed from epoch {state["epoch"]} ({state["global_step"]} steps)')
    return state['epoch'], state['global_step'], state['history'], state['train_time']


class _RunParts:
    """What a run trains and how: model, loss, the module DDP/compile wrap, optimizer, scheduler, optional EMA."""

    def __init__(self, args, config: Dict[str, Any], dist_info: _Distributed, steps_per_epoch: int):
        num_classes = args.num_classes or DATASET_CLASSES.get(args.dataset)
        self.model_kwargs = parse_key_values(args.model_kwargs, '--model-kwargs')
        if num_classes:
            self.model_kwargs['num_classes'] = num_classes
        build = create_model if is_dynzoo_model(args.model) else timm.create_model
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.model = build(args.model, pretrained=args.pretrained, **self.model_kwargs)
        torch.manual_seed(args.seed + dist_info.rank)
        self.criterion = build_loss(self.model, args.model, config,
                                    parse_key_values(args.loss_kwargs, '--loss-kwargs'))
        self.step_module = TrainStep(self.model, self.criterion).to(dist_info.device)
        if config['channels_last']:
            self.step_module.to(memory_format=torch.channels_last)
        self.ema = (ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=True, warmup_power=3 / 4)
                    if args.model_ema else None)
        self.optimizer = create_optimizer_v2(self.step_module, opt=config['opt'], lr=config['lr'],
                                             weight_decay=config['weight_decay'], momentum=config['momentum'],
                                             filter_bias_and_bn=not config['wd_bn_bias'])
        per_epoch = config['sched'] in ('multistep', 'step')
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=config['sched'], num_epochs=config['epochs'], decay_milestones=config['milestones'],
            decay_epochs=config['milestones'][0] if config['sched'] == 'step' else None,
            decay_rate=config['decay_rate'], min_lr=config['min_lr'], warmup_lr=config['warmup_lr'],
            warmup_epochs=config['warmup_epochs'], step_on_epochs=per_epoch, updates_per_epoch=steps_per_epoch)

    def wrapped(self, args, dist_info: _Distributed) -> nn.Module:
        """The module the training step calls: DDP across processes, ``torch.compile`` with ``--compile``
        (evaluation and checkpoints use the plain modules, which share the parameters)."""
        module = self.step_module
        if dist_info.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[dist_info.device.index] if dist_info.device.type == 'cuda' else None,
                find_unused_parameters=args.find_unused_parameters or any(True for _ in self.criterion.parameters()))
        return torch.compile(module) if args.compile else module

    def state(self, **progress) -> Dict[str, Any]:
        return dict(model=self.model.state_dict(), criterion=self.criterion.state_dict(),
                    model_ema=self.ema.module.state_dict() if self.ema is not None else None,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), **progress)


def _train_epoch(parts: _RunParts, step_fn: nn.Module, loader: DataLoader, epoch: int, global_step: int,
                 config: Dict[str, Any], dist_info: _Distributed, progress: bool) -> Tuple[float, int, int]:
    """One epoch of training steps; returns ``(loss sum, steps, global step)``."""
    parts.step_module.train()
    loss_sum, steps = 0.0, 0
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{config["epochs"]}', leave=False, disable=not progress,
               dynamic_ncols=True)
    for images, target in bar:
        images = images.to(dist_info.device, non_blocking=True)
        target = target.to(dist_info.device, non_blocking=True)
        if config['channels_last']:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(config['amp'], dist_info.device):
            loss = step_fn(images, target)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1} step {steps + 1}: lower --lr')
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        global_step += 1
        parts.scheduler.step_update(num_updates=global_step)
        if parts.ema is not None:
            parts.ema.update(parts.model, step=global_step)
        loss_sum += loss.item()
        steps += 1
        bar.set_postfix(loss=f'{loss_sum / steps:.4f}', lr=f'{parts.optimizer.param_groups[0]["lr"]:.4g}')
    parts.scheduler.step(epoch + 1)
    return loss_sum, steps, global_step


def _validate(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, dist_info: _Distributed,
              config: Dict[str, Any], args) -> List[float]:
    if isinstance(model, SDPointResNet):
        recalibrate_full_instance(model, train_loader, dist_info.device, config, args)
    return evaluate(model, val_loader, dist_info, config)


def _export(args, config: Dict[str, Any], parts: _RunParts, entry: Optional[Dict[str, Any]], train_loader, val_loader,
            val_set, train_images: int, train_time: float, dist_info: _Distributed) -> None:
    """Rank 0 at the end of the run: the model, or its EMA when that validated better, exported Hub-ready."""
    accuracy = entry.get('val_top1') if entry else None
    model, note = parts.model, args.export_note
    ema_accuracy = entry.get('val_top1_ema') if entry else None
    if ema_accuracy and (accuracy is None or np.mean(ema_accuracy) > np.mean(accuracy)):
        model, accuracy = parts.ema.module, ema_accuracy
        note = '; '.join(filter(None, [note, f'EMA of the weights (decay {args.model_ema_decay})']))
        print('exporting the EMA weights: they validated better')
    per_instance = None
    if isinstance(model, SDPointResNet):
        per_instance = finish_sdpoint(model, train_loader, val_set, dist_info.device, config, args)
        accuracy = [per_instance[NIL.name]]
        print('per-instance val top-1: ' + ', '.join(f'{k} {v:.2f}' for k, v in per_instance.items()))
    if accuracy is None:
        accuracy = evaluate(model, val_loader, dist_info, config)
    export = Path(args.export) if args.export else Path(args.output) / 'pretrained'
    recipe = {k: config[k] for k in ('preset', 'epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched',
                                     'label_smoothing', 'augment', 'amp')}
    save_pretrained(
        model.eval(), export, model_name=args.export_name, per_exit_accuracy=accuracy,
        accuracy_dataset=f'{args.dataset} {"test" if _is_cifar(args.dataset) else "val"} ({len(val_set)} images)',
        training=dict(recipe, trainer='dynzoo.train', processes=dist_info.world_size,
                      train_time_h=round(train_time / 3600, 2), train_images=train_images,
                      **({'note': note} if note else {})),
        dtype=getattr(torch, args.export_dtype), data_config=_normalization(val_set),
        per_instance_accuracy=per_instance)
    print(f'done: per-exit val top-1 {[round(a, 2) for a in accuracy]}; Hub-ready weights in {export}')


def _train(args, config: Dict[str, Any], dist_info: _Distributed) -> Dict[str, Any]:
    output = Path(args.output)
    checkpoint = _resume_state(args, output)
    if dist_info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        if args.compact_dir:
            Path(args.compact_dir).mkdir(parents=True, exist_ok=True)
    random.seed(args.seed + dist_info.rank)
    np.random.seed(args.seed + dist_info.rank)
    torch.manual_seed(args.seed + dist_info.rank)

    train_set, val_set = build_datasets(args, config)
    sampler = GlobalBatchSampler(len(train_set), config['batch_size'], dist_info.rank, dist_info.world_size,
                                 args.seed)
    train_loader = _loader(train_set, dist_info.device, args.workers, batch_sampler=sampler)
    val_shard = Subset(val_set, range(dist_info.rank, len(val_set), dist_info.world_size))
    val_loader = _loader(val_shard, dist_info.device, args.workers,
                         batch_size=max(config['batch_size'] // dist_info.world_size, 1) * 2)
    parts = _RunParts(args, config, dist_info, len(sampler))
    start_epoch, global_step, history, train_time = 0, 0, [], 0.0
    if checkpoint is not None:
        start_epoch, global_step, history, train_time = _restore(checkpoint, parts, config, dist_info)
    if isinstance(parts.model, SDPointResNet):  # stored per-instance statistics describe the weights before this run
        for model in filter(None, [parts.model, parts.ema and parts.ema.module]):
            model.clear_bn_stats()
    step_fn = parts.wrapped(args, dist_info)
    record = dict(model=args.model, model_kwargs=parts.model_kwargs, dataset=args.dataset,
                  world_size=dist_info.world_size, config=config, epochs=history)
    if dist_info.is_main:
        print(f'training {args.model} on {args.dataset} ({len(train_set)} images, {len(sampler)} steps/epoch) with '
              f'preset {config["preset"]}: ' + ', '.join(f'{k}={v}' for k, v in config.items() if k != 'preset'))

    stop = config['epochs'] if args.stop_after_epochs is None else min(config['epochs'],
                                                                        start_epoch + args.stop_after_epochs)
    for epoch in range(start_epoch, stop):
        sampler.set_epoch(epoch)
        started = time.time()
        loss_sum, steps, global_step = _train_epoch(parts, step_fn, train_loader, epoch, global_step, config,
                                                    dist_info, dist_info.is_main and not args.no_progress)
        elapsed = time.time() - started
        train_time += elapsed
        loss_total, step_total = dist_info.sum([loss_sum, steps])
        entry = dict(epoch=epoch + 1, train_loss=loss_total / max(step_total, 1),
                     lr=parts.optimizer.param_groups[0]['lr'], val_top1=None, epoch_time_s=round(elapsed, 2),
                     images_per_s=round(len(sampler) * config['batch_size'] / elapsed, 1))
        if epoch + 1 == config['epochs'] or (epoch + 1) % args.eval_interval == 0:
            entry['val_top1'] = _validate(parts.model, train_loader, val_loader, dist_info, config, args)
            if parts.ema is not None:
                entry['val_top1_ema'] = _validate(parts.ema.module, train_loader, val_loader, dist_info, config, args)
        history.append(entry)
        rng = dist_info.gather(_rng_state())
        if dist_info.is_main:
            state = parts.state(epoch=epoch + 1, global_step=global_step, rng=rng, history=history,
                                train_time=train_time, config=config, model_name=args.model)
            save_checkpoint(output / 'last.pth', state)
            if args.compact_dir:
                save_compact_state(Path(args.compact_dir) / COMPACT_NAME, state)
            atomic_write(output / 'log.json', lambda f: f.write(json.dumps(record, indent=1).encode()))
            tqdm.write(_epoch_line(entry, config))

    record['train_time_s'] = round(train_time, 1)
    if dist_info.is_main:
        atomic_write(output / 'log.json', lambda f: f.write(json.dumps(record, indent=1).encode()))
    if stop < config['epochs']:
        print(f'stopped after epoch {stop} of {config["epochs"]}: continue with --resume')
    elif dist_info.is_main:
        _export(args, config, parts, history[-1] if history else None, train_loader, val_loader, val_set,
                len(train_set), train_time, dist_info)
    elif not (history and history[-1].get('val_top1')):
        evaluate(parts.model, val_loader, dist_info, config)  # rank 0 evaluates collectively: join it
    return record


def _epoch_line(entry: Dict[str, Any], config: Dict[str, Any]) -> str:
    top1 = lambda accuracy: ' '.join(f'{a:.2f}' for a in accuracy) if accuracy else '-'
    ema = f'  EMA [{top1(entry["val_top1_ema"])}]' if entry.get('val_top1_ema') else ''
    return (f'epoch {entry["epoch"]}/{config["epochs"]}  loss {entry["train_loss"]:.4f}  lr {entry["lr"]:.4g}  '
            f'val top-1 per exit [{top1(entry["val_top1"])}]{ema}  {entry["epoch_time_s"]:.0f}s '
            f'({entry["images_per_s"]:.0f} img/s)')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dynzoo.train``: as ``dynzoo train``, a user error is one error line and status 2 (``--debug``:
    its traceback)."""
    from .cli import add_debug_arg, run_reporting_user_errors
    parser = argparse.ArgumentParser(prog='python -m dynzoo.train', description=__doc__.split('\n')[0])
    add_train_args(parser)
    add_debug_arg(parser)
    args = parser.parse_args(argv)
    retain_freed_memory()
    return run_reporting_user_errors(parser.prog, run_train, args)


if __name__ == '__main__':
    raise SystemExit(main())
