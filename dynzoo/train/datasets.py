"""The data of a run: datasets with the family's preprocessing, and the global-batch sampler that makes a run on N
processes take the batches of a run on one."""
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms

from .. import data
from .recipe import is_cifar

__all__ = ['GlobalBatchSampler', 'build_datasets', 'make_loader', 'normalization_of']


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


def _synthetic(num_samples: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_samples, 32, 32, 3), dtype=np.uint8), rng.integers(0, num_classes, num_samples)


def build_datasets(args, config) -> Tuple[Dataset, Dataset]:
    """(train, validation) datasets; CIFAR's validation set is its test split, as the authors report."""
    stats = 'cifar10' if args.dataset == 'synthetic' else args.dataset  # synthetic data: CIFAR-10-shaped
    augment = config['augment']
    preset = ('cifar' if is_cifar(args.dataset) else 'imagenet') if augment == 'none' else augment
    eval_tf = data.build_transforms(preset, train=False, dataset=stats, input_size=args.input_size)
    train_tf = eval_tf if augment == 'none' else data.build_transforms(preset, train=True, dataset=stats,
                                                                       input_size=args.input_size)
    if args.dataset == 'synthetic':
        n = args.synthetic_size
        return (data.ArrayDataset(*_synthetic(n, args.num_classes or 10, args.seed), transform=train_tf),
                data.ArrayDataset(*_synthetic(max(n // 4, 1), args.num_classes or 10, args.seed + 1),
                                  transform=eval_tf))
    if is_cifar(args.dataset):
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
        return (data.image_folder(args.data_root, True, preset, args.input_size, transform=train_tf),
                data.image_folder(args.data_root, False, preset, args.input_size))
    raise ValueError(f'unknown dataset {args.dataset!r}')


def make_loader(dataset, device: torch.device, workers: int, **kwargs) -> DataLoader:
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == 'cuda', **kwargs)


def normalization_of(dataset) -> Optional[Dict[str, Any]]:
    """The mean/std the evaluation transform uses, for the exported config."""
    steps = getattr(getattr(dataset, 'transform', None), 'transforms', [])
    norm = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    return None if norm is None else dict(mean=tuple(norm.mean), std=tuple(norm.std))
