"""Budgeted batch: MSDNet's geometric thresholds against dynzoo's genetic threshold search, on the same logits.

For each geometric operating point q, thresholds are fitted on the held-out logits (MSDNet protocol); the genetic
search then gets the held-out expected MACs of that point as its budget. Both sets of thresholds are applied to the
test logits. Logits come from a model (``--model``, random weights unless ``--checkpoint``) or from
``--synthetic`` exits whose confidence tells right from wrong, which is what a trained model provides.

    python benchmarks/budgeted.py --synthetic
    python benchmarks/budgeted.py --model msdnet_cifar_b7 --checkpoint CKPT --data npz --data-path cifar10_jpeg.npz
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import dynzoo
from dynzoo.data import cifar_dataset, holdout_indices
from dynzoo.evaluate import collect_logits, eval_transform
from dynzoo.inference import evaluate_budgeted, genetic_threshold_search, simulate_early_exit

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10_jpeg.npz'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--synthetic', action='store_true', help='synthetic 5-exit logits instead of a model')
    parser.add_argument('--model', default='msdnet_cifar_b7')
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--data', choices=('npz', 'torchvision', 'sample'), default=None)
    parser.add_argument('--data-path', default=None)
    parser.add_argument('--data-root', default=None)
    parser.add_argument('--holdout', type=int, default=1000)
    parser.add_argument('--test', type=int, default=1000, help='test images (npz / torchvision)')
    parser.add_argument('--every', type=int, default=4, help='compare at every n-th of the 39 operating points')
    parser.add_argument('--generations', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    return parser.parse_args()


def synthetic_logits(num_samples, seed, skills=(0.3, 0.45, 0.6, 0.72, 0.8), num_classes=10):
    """Exits that get better with depth; a sample's difficulty is shared across exits, its margin sets confidence."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=generator)
    difficulty = torch.rand(num_samples, generator=generator)
    logits = []
    for skill in skills:
        margin = 4 * (skill - difficulty) + 0.7 * torch.randn(num_samples, generator=generator)
        wrong = (labels + 1 + torch.randint(0, num_classes - 1, (num_samples,), generator=generator)) % num_classes
        predicted = torch.where(margin > 0, labels, wrong)
        out = 0.5 * torch.randn(num_samples, num_classes, generator=generator)
        out[torch.arange(num_samples), predicted] += 1 + 2 * margin.abs()
        logits.append(out)
    return logits, labels


def model_logits(args):
    kwargs = dict(pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else dict(num_classes=10)
    model = dynzoo.create_model(args.model, pretrained=bool(args.checkpoint), **kwargs).eval()
    transform = eval_transform(model)
    path = args.data_path or (DEFAULT_NPZ if DEFAULT_NPZ.is_file() else None)
    source = args.data or ('npz' if path is not None else 'sample')
    if source == 'sample':
        test = cifar_dataset('test', source='sample', transform=transform)
        test_index, heldout_index = holdout_indices(len(test), len(test) // 2, args.seed)
        heldout, test = Subset(test, heldout_index.tolist()), Subset(test, test_index.tolist())
    else:
        train = cifar_dataset('train', source=source, root=args.data_root, path=path, transform=transform)
        test = cifar_dataset('test', source=source, root=args.data_root, path=path, transform=transform)
        heldout = Subset(train, holdout_indices(len(train), args.holdout, args.seed)[1].tolist())
        test_index = np.sort(np.random.default_rng(args.seed).permutation(len(test))[:args.test])
        test = Subset(test, test_index.tolist())
    val_logits, val_labels = collect_logits(model, DataLoader(heldout, batch_size=250), progress=True)
    test_logits, test_labels = collect_logits(model, DataLoader(test, batch_size=250), progress=True)
    macs = dynzoo.per_exit_macs(model, scope='cascade')
    name = f'{args.model} ({"checkpoint" if args.checkpoint else "random weights"}, {source})'
    return name, val_logits, val_labels, test_logits, test_labels, macs


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        val_logits, val_labels = synthetic_logits(2000, args.seed)
        test_logits, test_labels = synthetic_logits(2000, args.seed + 1)
        macs = [float(f) for f in np.cumsum([20, 20, 20, 20, 20])]
        name = 'synthetic 5-exit logits'
    else:
        name, val_logits, val_labels, test_logits, test_labels, macs = model_logits(args)
    single = [(l.argmax(1) == test_labels).double().mean().item() for l in test_logits]
    print(f'{name}: {len(val_labels)} held-out, {len(test_labels)} test; cascade MACs per exit (M): '
          f'{" ".join(f"{f / 1e6:.2f}" if f > 1e3 else f"{f:g}" for f in macs)}')
    print(f'single-exit test top-1: {" ".join(f"{a:.3f}" for a in single)}')
    rows = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs)[::args.every]
    print('| q | budget (held-out MACs) | geometric: top-1 | geometric: MACs | GA: top-1 | GA: MACs | '
          'held-out top-1: geometric | held-out top-1: GA |')
    print('|---|---|---|---|---|---|---|---|')
    for row in rows:
        fitted = simulate_early_exit(val_logits, row['thresholds'], macs)
        budget = fitted.mean_macs
        search = genetic_threshold_search(val_logits, val_labels, macs, budget=budget,
                                          generations=args.generations, seed=args.seed)
        test = simulate_early_exit(test_logits, search.thresholds, macs)
        print(f'| {row["q"]:.2f} | {budget:.4g} | {row["accuracy"]:.3f} | {row["expected_macs"]:.4g} | '
              f'{test.accuracy(test_labels):.3f} | {test.mean_macs:.4g} | {fitted.accuracy(val_labels):.3f} | '
              f'{search.accuracy:.3f} |')


if __name__ == '__main__':
    main()
