"""dynzoo.data: packed-JPEG npz decoding, the embedded sample, transform presets, ImageFolder, held-out split."""
import configparser
import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynzoo import data


def _jpeg(color, size=32):
    buffer = io.BytesIO()
    Image.new('RGB', (size, size), color).save(buffer, format='JPEG', quality=95)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _packed_npz(path, colors, labels, size=32):
    pieces = [_jpeg(c, size) for c in colors]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    np.savez(path, test_jpeg=np.concatenate(pieces), test_offsets=offsets, test_labels=np.array(labels, np.uint8),
             classes=np.array(['a', 'b', 'c']))
    return path


def test_load_cifar_npz_decodes(tmp_path):
    colors = [(255, 0, 0), (0, 128, 255), (40, 200, 90)]
    path = _packed_npz(tmp_path / 'tiny.npz', colors, [2, 0, 1])
    images, labels = data.load_cifar_npz(path, 'test')
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]
    for image, color in zip(images, colors):  # flat colours survive JPEG within a few levels
        assert np.abs(image.astype(int) - np.array(color)).max() <= 3
    dataset = data.cifar_dataset('test', source='npz', path=path)
    image, label = dataset[1]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and label == 0
    assert image[2].mean().item() == pytest.approx(1.0, abs=0.02)  # ToTensor scales 255 to 1


def test_load_cifar_npz_errors(tmp_path):
    path = _packed_npz(tmp_path / 'tiny.npz', [(0, 0, 0)], [0])
    with pytest.raises(ValueError, match='no train split'):
        data.load_cifar_npz(path, 'train')
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_cifar_npz(path, 'val')
    with pytest.raises(FileNotFoundError, match='cifar10_jpeg.npz'):
        data.load_cifar_npz(tmp_path / 'missing.npz')
    with pytest.raises(ValueError, match='32x32'):
        data.load_cifar_npz(_packed_npz(tmp_path / 'big.npz', [(0, 0, 0)], [0], size=40), 'test')
    with pytest.raises(ValueError, match='path='):
        data.cifar_dataset('test', source='npz')


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bytes_file(path, content: bytes):
    path.write_bytes(content)
    return path


def _npy_file(path, array):
    with open(path, 'wb') as f:
        np.save(f, array)
    return path


@pytest.mark.parametrize('make, problem', [
    (lambda p: _bytes_file(p, b'plain text, not an npz'), 'neither a zip archive of arrays nor an .npy file'),
    (lambda p: _bytes_file(p, pickle.dumps({'test_jpeg': 1})), 'neither a zip archive of arrays nor an .npy file'),
    (lambda p: _bytes_file(p, _packed_npz(p.with_name('whole.npz'), [(0, 0, 0)], [0]).read_bytes()[:300]),
     'neither a zip archive'),  # truncated
    (lambda p: _npy_file(p, np.zeros(3)), r'a single float64 array of shape \(3,\) \(\.npy\)'),
    (lambda p: _write_npz(p, test_jpeg=np.array([object()]), test_offsets=np.array([0, 1]),
                          test_labels=np.array([0])), 'pickled Python objects, which dynzoo never loads'),
    (lambda p: _write_npz(p, test_jpeg=_jpeg((0, 0, 0)), test_offsets=np.array([0, 10 ** 6]),
                          test_labels=np.array([0])), r'test_offsets must be rising positions in test_jpeg'),
    (lambda p: _write_npz(p, test_jpeg=_jpeg((0, 0, 0)), test_offsets=np.array([7, 300]),
                          test_labels=np.array([0])), r'test image 0 \(bytes 7..300 of test_jpeg\) is not an image'),
    (lambda p: _write_npz(p, test_jpeg=_jpeg((0, 0, 0)).astype(np.float32), test_offsets=np.array([0, 10]),
                          test_labels=np.array([0])), 'test_jpeg is a float32 array'),
    (lambda p: _write_npz(p, images=np.zeros((1, 32, 32, 3), np.uint8)), r"has no test split .*it holds \['images'\]"),
], ids=['text', 'pickle', 'truncated', 'npy', 'object-arrays', 'offsets-past-the-end', 'offsets-mid-image',
        'float-bytes', 'other-keys'])
def test_a_file_that_is_not_a_packed_npz_names_itself_and_the_format(tmp_path, make, problem):
    path = make(tmp_path / 'bad.npz')
    with pytest.raises(data.PackedCifarError) as error:
        data.load_cifar_npz(path, 'test')
    message = str(error.value)
    assert message.startswith(str(path)) and 'allow_pickle' not in message
    assert '_offsets (int, one entry more than images' in message  # the format
    assert re.search(problem, message), message


def test_embedded_sample_balanced_and_small():
    assert data.SAMPLE_PATH.stat().st_size < 2_000_000
    images, labels = data.load_sample()
    assert images.shape == (1000, 32, 32, 3)
    assert np.bincount(labels).tolist() == [100] * 10
    with np.load(data.SAMPLE_PATH) as packed:
        assert packed['classes'][0] == 'airplane' and len(np.unique(packed['test_source_index'])) == 1000
    assert len(data.cifar_dataset('test', source='sample')) == 1000
    with pytest.raises(ValueError, match='test images only'):
        data.cifar_dataset('train', source='sample')
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[1] / 'setup.cfg')
    assert 'assets/*' in setup['options.package_data']['dynzoo']


def test_transform_presets_normalise_with_the_authors_values():
    gray = Image.new('RGB', (32, 32), (128, 128, 128))
    expected = {'scan_cifar': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                'msdnet_cifar': ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616))}
    for preset, (mean, std) in expected.items():
        out = data.build_transforms(preset, train=False)(gray)
        assert out[:, 0, 0].tolist() == pytest.approx([(128 / 255 - m) / s for m, s in zip(mean, std)], rel=1e-5)
    cifar100 = data.build_transforms('msdnet_cifar', train=False, dataset='cifar100')(gray)
    assert cifar100[0, 0, 0].item() == pytest.approx((128 / 255 - 0.5071) / 0.2675, rel=1e-5)
    for preset in data.PRESETS:
        if preset != 'imagenet':
            assert data.build_transforms(preset, train=True)(gray).shape == (3, 32, 32)
    with pytest.raises(ValueError, match='unknown preset'):
        data.build_transforms('resnet', train=True)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    out = data.Cutout(16)(torch.ones(3, 32, 32))
    zeroed = (out == 0).all(dim=0)
    rows, cols = zeroed.any(dim=1).sum().item(), zeroed.any(dim=0).sum().item()
    assert 0 < zeroed.sum().item() == rows * cols <= 256 and rows <= 16 and cols <= 16


def test_image_folder(tmp_path):
    for split in ('train', 'val'):
        for name, color in (('cat', (200, 10, 10)), ('dog', (10, 10, 200))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.new('RGB', (48, 40), color).save(folder / 'a.png')
    dataset = data.image_folder(tmp_path, train=False, input_size=32)
    image, label = dataset[1]
    assert dataset.classes == ['cat', 'dog'] and label == 1 and image.shape == (3, 32, 32)
    assert data.image_folder(tmp_path, train=True, input_size=32)[0][0].shape == (3, 32, 32)
    as_tensor = data.image_folder(tmp_path, train=True, transform=lambda image: torch.tensor(image.size))
    assert as_tensor[0][0].tolist() == [48, 40]  # the given transform, not the preset's
    with pytest.raises(FileNotFoundError, match='val'):
        data.image_folder(tmp_path / 'nowhere', train=False)


def test_holdout_indices():
    kept, heldout = data.holdout_indices(100, 20, seed=0)
    assert len(kept) == 80 and len(heldout) == 20 and not set(kept) & set(heldout)
    assert data.holdout_indices(100, 20, seed=0)[1].tolist() == heldout.tolist()
    with pytest.raises(ValueError, match='num_holdout'):
        data.holdout_indices(10, 10)
