"""Build ``dynzoo/assets/cifar10_test_sample.npz``: a balanced CIFAR-10 test sample shipped inside the package.

The JPEG bytes are copied unchanged from the packed npz of ``../shared/data/`` (no re-encoding), so the sample
decodes to exactly the pixels of that copy. The choice is deterministic: for each class, ``per_class`` test images
drawn without replacement by ``numpy.random.default_rng(seed)``, kept in test-set order.

    python tools/make_cifar_sample.py --src /work/shared/data/cifar10_jpeg.npz --per-class 100
"""
import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'dynzoo' / 'assets' / 'cifar10_test_sample.npz'


def build_sample(src: Path, out: Path, per_class: int = 100, seed: int = 0) -> np.ndarray:
    with np.load(src) as packed:
        jpeg, offsets, labels = packed['test_jpeg'], packed['test_offsets'], packed['test_labels']
        classes = packed['classes']
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(len(classes))]))
    pieces = [jpeg[offsets[i]:offsets[i + 1]] for i in chosen]
    sample_offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, test_jpeg=np.concatenate(pieces), test_offsets=sample_offsets, test_labels=labels[chosen],
             test_source_index=chosen.astype(np.int64), classes=classes)
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--src', type=Path, default=Path('/work/shared/data/cifar10_jpeg.npz'))
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT)
    parser.add_argument('--per-class', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    chosen = build_sample(args.src, args.out, args.per_class, args.seed)
    print(f'{len(chosen)} images -> {args.out} ({args.out.stat().st_size / 1e6:.3f} MB)')


if __name__ == '__main__':
    main()
