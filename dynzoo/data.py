"""Datasets and the authors' preprocessing: CIFAR (torchvision, packed JPEG npz, embedded sample), ImageNet folders.

* ``load_cifar_npz`` reads the packed-JPEG format (``{split}_jpeg`` bytes, ``{split}_offsets``, ``{split}_labels``,
  ``classes``) into uint8 arrays; ``load_sample`` reads the 1,000-image balanced CIFAR-10 test sample shipped in
  ``dynzoo/assets/`` (built by ``tools/make_cifar_sample.py``), so evaluation runs with no download.
* ``build_transforms(preset, train)`` gives each family's normalisation and augmentation as its authors trained it.
"""
import io
import os
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .models._normalization import NORMALIZATION, normalization

__all__ = [
    'SAMPLE_PATH', 'PRESETS', 'NPZ_FORMAT', 'PackedCifarError', 'load_cifar_npz', 'load_sample', 'ArrayDataset',
    'cifar_dataset', 'build_transforms', 'image_folder', 'holdout_indices', 'Cutout', 'normalization',
]

SAMPLE_PATH = Path(__file__).parent / 'assets' / 'cifar10_test_sample.npz'
CIFAR_NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}

# Per preset: the augmentation recipe (the normalisation statistics: ``dynzoo.models._normalization``, which the
# models' pretrained configs read too).
AUGMENTATIONS: Dict[str, str] = {
    'cifar': 'crop_flip', 'msdnet_cifar': 'crop_flip', 'scan_cifar': 'crop_flip',
    'byot_cifar': 'crop_flip_autoaugment_cutout', 'densenet_cifar': 'crop_flip', 'imagenet': 'imagenet',
}
PRESETS: Dict[str, dict] = {name: dict(augment=augment, stats=NORMALIZATION[name])
                            for name, augment in AUGMENTATIONS.items()}


NPZ_FORMAT = ("A packed-JPEG CIFAR npz (numpy.savez) holds, per split ('train', 'test'): {split}_jpeg (uint8, the "
              "JPEG files concatenated), {split}_offsets (int, one entry more than images: image i is "
              "{split}_jpeg[offsets[i]:offsets[i+1]]) and {split}_labels (int class indices), and classes (str)")


class PackedCifarError(ValueError):
    """A file that is not a packed-JPEG CIFAR npz, or lacks the split asked for; the message ends with the format
    (``NPZ_FORMAT``)."""

    def __init__(self, path, problem: str):
        super().__init__(f'{path} {problem}. {NPZ_FORMAT}')


def _not_packed(path, problem: str) -> PackedCifarError:
    return PackedCifarError(path, f'is not a packed-JPEG CIFAR npz: {problem}')


def _decode_jpeg_array(jpeg: np.ndarray, offsets: np.ndarray, path, split: str) -> np.ndarray:
    images = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        try:
            image = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert('RGB')
        except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise _not_packed(path, f'{split} image {i} (bytes {offsets[i]}..{offsets[i + 1]} of {split}_jpeg) is '
                                    'not an image file') from error
        if image.size != (32, 32):
            raise ValueError(f'image {i} is {image.size[0]}x{image.size[1]}; the packed CIFAR format holds 32x32 images')
        images[i] = np.asarray(image)
    return images


def _check_packed_arrays(path, split: str, jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> None:
    for key, array in ((f'{split}_jpeg', jpeg), (f'{split}_offsets', offsets), (f'{split}_labels', labels)):
        if array.ndim != 1 or not (array.dtype.kind in 'iu' or array.size == 0):
            raise _not_packed(path, f'{key} is a {array.dtype} array of shape {array.shape}, not a 1-D integer array')
    if jpeg.dtype != np.uint8:
        raise _not_packed(path, f'{split}_jpeg holds {jpeg.dtype}, not uint8 bytes')
    if len(offsets) != len(labels) + 1:
        raise _not_packed(path, f'{split}_offsets must have one entry more than {split}_labels '
                                f'({len(offsets)} vs {len(labels)})')
    if len(offsets) and (offsets[0] < 0 or offsets[-1] > len(jpeg) or (np.diff(offsets) < 0).any()):
        raise _not_packed(path, f'{split}_offsets must be rising positions in {split}_jpeg (0..{len(jpeg)}); they '
                                f'span {offsets.min()}..{offsets.max()}'
                                + (' and go down' if (np.diff(offsets) < 0).any() else ''))


def load_cifar_npz(path, split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
    """Decode the ``split`` ('train' or 'test') of a packed-JPEG CIFAR npz: (uint8 N x 32 x 32 x 3, int64 labels).
    A file of another kind (a pickle, a single ``.npy`` array, object arrays, garbage offsets or image bytes) raises
    a ``PackedCifarError`` that names the file and the expected format; nothing is unpickled."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no packed CIFAR npz at {path}; pass the path of a file such as cifar10_jpeg.npz')
    try:
        packed = np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # numpy takes any other file for a pickle
        raise _not_packed(path, 'it is neither a zip archive of arrays nor an .npy file') from error
    if not isinstance(packed, np.lib.npyio.NpzFile):
        raise _not_packed(path, f'it holds a single {packed.dtype} array of shape {packed.shape} (.npy), not named '
                                'arrays')
    with packed:
        keys = (f'{split}_jpeg', f'{split}_offsets', f'{split}_labels')
        missing = [k for k in keys if k not in packed.files]
        if missing:
            raise PackedCifarError(path, f'has no {split} split (missing {", ".join(missing)}; it holds '
                                         f'{packed.files})')
        try:
            jpeg, offsets, labels = (packed[k] for k in keys)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise _not_packed(path, f'its {split} arrays are damaged or hold pickled Python objects, which dynzoo '
                                    'never loads') from error
    _check_packed_arrays(path, split, jpeg, offsets, labels)
    return _decode_jpeg_array(jpeg, offsets, path, split), labels.astype(np.int64)


def load_sample() -> Tuple[np.ndarray, np.ndarray]:
    """The embedded CIFAR-10 test sample: 1,000 images, 100 per class, as (uint8 N x 32 x 32 x 3, int64 labels)."""
    return load_cifar_npz(SAMPLE_PATH, 'test')


class ArrayDataset(Dataset):
    """Images held in a uint8 N x H x W x 3 array; ``transform`` takes a PIL image (default: ``ToTensor``)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Optional[Callable] = None):
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels')
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f'images must be a uint8 N x H x W x 3 array, got {images.dtype} {images.shape}')
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.transform = transform if transform is not None else transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def cifar_dataset(split: str = 'train', source: str = 'npz', root=None, path=None, name: str = 'cifar10',
                  download: bool = False, transform: Optional[Callable] = None) -> Dataset:
    """CIFAR-10/100 from ``source``: 'npz' (packed JPEG file at ``path``), 'torchvision' (``root``, ``download``)
    or 'sample' (the embedded CIFAR-10 test sample, test split only). Items are (tensor, int)."""
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in CIFAR_NUM_CLASSES:
        raise ValueError(f"name must be one of {sorted(CIFAR_NUM_CLASSES)}, got {name!r}")
    if source == 'npz':
        if path is None:
            raise ValueError("source='npz' needs path=<packed JPEG npz>, e.g. cifar10_jpeg.npz")
        return ArrayDataset(*load_cifar_npz(path, split), transform=transform)
    if source == 'sample':
        if split != 'test' or name != 'cifar10':
            raise ValueError("the embedded sample holds CIFAR-10 test images only: use split='test', name='cifar10'")
        return ArrayDataset(*load_sample(), transform=transform)
    if source == 'torchvision':
        if root is None:
            raise ValueError("source='torchvision' needs root=<folder> (and download=True to fetch the data there)")
        dataset_cls = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100
        try:
            return dataset_cls(os.fspath(root), train=split == 'train', download=download,
                               transform=transform if transform is not None else transforms.ToTensor())
        except RuntimeError as error:  # torchvision: 'Dataset not found or corrupted'
            raise FileNotFoundError(f'no complete {name} download in {root}: pass the folder that holds '
                                    f'{dataset_cls.base_folder}/, or download=True (the --download option) to '
                                    'fetch it there') from error
    raise ValueError(f"source must be 'npz', 'torchvision' or 'sample', got {source!r}")


def holdout_indices(num_samples: int, num_holdout: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: the held-out set is the last ``num_holdout`` entries of a seeded permutation, as
    MSDNet's ``dataloader.py`` carves its 5,000-image validation split out of the CIFAR training set."""
    if not 0 < num_holdout < num_samples:
        raise ValueError(f'num_holdout must be between 1 and {num_samples - 1}, got {num_holdout}')
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:-num_holdout]), np.sort(order[-num_holdout:])


class Cutout:
    """Zero one ``length`` x ``length`` square (clipped at the borders) centred on a uniform random pixel of a CHW
    tensor, as DeVries & Taylor's Cutout that the Self-Distillation recipe uses."""

    def __init__(self, length: int = 16):
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        cy, cx = int(torch.randint(0, height, (1,))), int(torch.randint(0, width, (1,)))
        half = self.length // 2
        image = image.clone()
        image[..., max(0, cy - half):min(height, cy + half), max(0, cx - half):min(width, cx + half)] = 0
        return image

    def __repr__(self) -> str:
        return f'{type(self).__name__}(length={self.length})'


def build_transforms(preset: str = 'cifar', train: bool = False, dataset: str = 'cifar10',
                     input_size: int = 224) -> transforms.Compose:
    """The authors' preprocessing for ``preset`` (a key of ``PRESETS``), training or evaluation.

    CIFAR presets: training = RandomCrop(32, padding 4) + horizontal flip (+ AutoAugment's CIFAR-10 policy and
    Cutout 16 for 'byot_cifar', with crop fill 128 as the authors); evaluation = no resizing. 'imagenet':
    RandomResizedCrop + flip for training, Resize(256/224 of ``input_size``) + CenterCrop for evaluation.
    ``dataset`` picks the normalisation where the authors used one per dataset (MSDNet). dynzoo uses torchvision's
    AutoAugment policy rather than the authors' re-implementation of it, and applies Cutout after normalisation.
    """
    normalize = transforms.Normalize(**normalization(preset, dataset))
    augment = PRESETS[preset]['augment']
    if augment == 'imagenet':
        if train:
            steps = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(int(round(input_size * 256 / 224))), transforms.CenterCrop(input_size)]
        return transforms.Compose(steps + [transforms.ToTensor(), normalize])
    if not train:
        return transforms.Compose([transforms.ToTensor(), normalize])
    if augment == 'crop_flip':
        return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4, fill=128), transforms.RandomHorizontalFlip(),
        transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10), transforms.ToTensor(), normalize, Cutout(16)])


def image_folder(root, train: bool, preset: str = 'imagenet', input_size: int = 224,
                 transform: Optional[Callable] = None) -> datasets.ImageFolder:
    """An ImageNet-style folder (``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``) with the preset's
    training or evaluation transforms (or ``transform``), through torchvision's ``ImageFolder``."""
    folder = Path(root) / ('train' if train else 'val')
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} does not exist: image_folder expects {root}/train/<class>/ and '
                                f'{root}/val/<class>/ sub-folders')
    if transform is None:
        transform = build_transforms(preset, train, input_size=input_size)
    return datasets.ImageFolder(os.fspath(folder), transform=transform)
