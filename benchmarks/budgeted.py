"""Budgeted batch on the same logits: exit criteria against each other (``--compare criteria``, the default), or
MSDNet's geometric thresholds against dynzoo's genetic threshold search (``--compare genetic``).

``--compare criteria``: for each model (shipped CIFAR-10 weights), the logits of every exit on the 10,000 CIFAR-10
test images are computed once per weights and cached in ``--out``; the test set is cut in two seeded halves (as
``dynzoo eval --heldout-from test``): temperatures and thresholds are fitted on one, accuracy and MACs measured on
the other. Per criterion (max probability, entropy, margin, patience; the first three also after per-exit
temperature scaling): the MSDNet geometric curve (q = p/20) and thresholds fitted to common MACs budgets
(``fit_to_budget``); for patience also PABEE's points (one patience at every exit); and the expected calibration
error of every exit before and after temperature scaling. Writes ``policies.json``, ``policies.md`` and
``policies.png`` to ``--out``.

``--compare genetic``: for each geometric operating point q, thresholds are fitted on the held-out logits (MSDNet
protocol); the genetic search then gets the held-out expected MACs of that point as its budget. Both sets of
thresholds are applied to the test logits. Logits come from a model (``--model``, random weights unless
``--checkpoint``) or from ``--synthetic`` exits whose confidence tells right from wrong, which is what a trained
model provides.

    python benchmarks/budgeted.py --out docs/policies
    python benchmarks/budgeted.py --compare genetic --synthetic
    python benchmarks/budgeted.py --compare genetic --model msdnet_cifar_b7 --checkpoint CKPT --data npz
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import dynzoo
from dynzoo.data import cifar_dataset, holdout_indices
from dynzoo.evaluate import collect_logits, eval_transform
from dynzoo.inference import evaluate_budgeted, genetic_threshold_search, simulate_early_exit
from dynzoo.policies import CRITERIA, ExitPolicy, expected_calibration_error, fit_temperatures, fit_to_budget

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10_jpeg.npz'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--compare', choices=('criteria', 'genetic'), default='criteria')
    parser.add_argument('--models', nargs='+', default=['msdnet_cifar_b7.c10', 'scan_resnet18.c10'],
                        help='criteria: pretrained models, evaluated on the CIFAR-10 test set (--data-path)')
    parser.add_argument('--budgets', type=float, nargs='+', default=[0.05, 0.1, 0.2, 0.35, 0.5, 0.75],
                        help='criteria: MACs budgets, as fractions of the way from the first exit\'s cascade MACs '
                             'to the last\'s')
    parser.add_argument('--out', default='docs/policies', help='criteria: output folder (and logits cache)')
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


def weights_fingerprint(model) -> str:
    """A digest of the model's weights: cached logits of other weights are recomputed, never reused."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_logits(name, path, out):
    """Every exit's logits on the whole CIFAR-10 test set, in order, computed once per weights and data file and kept
    in ``out``."""
    cache = Path(out) / f'logits_{name}.pt'
    model = dynzoo.create_model(name, pretrained=True).eval()
    fingerprint = weights_fingerprint(model)
    data = str(Path(path).resolve())
    saved = torch.load(cache) if cache.is_file() else None
    if saved is None or (saved.get('weights'), saved.get('data')) != (fingerprint, data):
        test = cifar_dataset('test', source='npz', path=path, transform=eval_transform(model))
        logits, labels = collect_logits(model, DataLoader(test, batch_size=200), progress=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        saved = dict(model=name, weights=fingerprint, data=data, logits=torch.stack(logits), labels=labels)
        torch.save(saved, cache)
    return list(saved['logits']), saved['labels']


def compare_model(name, args):
    logits, labels = cached_logits(name, args.data_path or DEFAULT_NPZ, args.out)
    test_index, heldout_index = (torch.as_tensor(i) for i in holdout_indices(len(labels), len(labels) // 2,
                                                                             args.seed))
    val_logits, val_labels = [l[heldout_index] for l in logits], labels[heldout_index]
    test_logits, test_labels = [l[test_index] for l in logits], labels[test_index]
    macs = dynzoo.per_exit_macs(dynzoo.create_model(name), scope='cascade')
    temperatures = fit_temperatures(val_logits, val_labels)
    result = dict(model=name, heldout=len(val_labels), test=len(test_labels), macs_cascade=macs,
                  top1=[(l.argmax(1) == test_labels).double().mean().item() for l in test_logits],
                  temperatures=temperatures,
                  ece_before=[expected_calibration_error(l, test_labels) for l in test_logits],
                  ece_after=[expected_calibration_error(l / t, test_labels) for l, t in zip(test_logits, temperatures)],
                  budgets=[macs[0] + f * (macs[-1] - macs[0]) for f in args.budgets], policies={})
    for criterion in CRITERIA:
        for calibrated in (False, True) if criterion != 'patience' else (False,):  # temperatures keep the arg-max
            policy = ExitPolicy(criterion, temperatures=temperatures if calibrated else None)
            label = criterion + (' + T' if calibrated else '')
            curve = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs, policy=policy)
            at_budget = []
            for budget in result['budgets']:
                try:
                    fitted = fit_to_budget(val_logits, macs, budget, policy)
                except ValueError:  # below this criterion's cheapest point
                    at_budget.append(None)
                    continue
                measured = simulate_early_exit(test_logits, fitted, macs)
                at_budget.append(dict(accuracy=measured.accuracy(test_labels), mean_macs=measured.mean_macs,
                                      thresholds=fitted.thresholds))
            result['policies'][label] = dict(
                curve=[dict(q=r['q'], accuracy=r['accuracy'], expected_macs=r['expected_macs']) for r in curve],
                at_budget=at_budget)
            print(f'{name}: {label} done', flush=True)
    result['pabee'] = []  # PABEE's operating points: one patience p at every exit
    for p in range(1, len(macs)):
        measured = simulate_early_exit(test_logits, ExitPolicy('patience', [p] * (len(macs) - 1)), macs)
        result['pabee'].append(dict(patience=p, accuracy=measured.accuracy(test_labels),
                                    expected_macs=measured.mean_macs))
    return result


def markdown(results):
    lines = []
    for r in results:
        lines += [f'### {r["model"]}', '', f'Fit on {r["heldout"]:,} CIFAR-10 test images, measured on the other '
                  f'{r["test"]:,}. Accuracy (%) at thresholds fitted to each budget on the fitting half, with the '
                  'mean MMACs they spent on the measuring half; "-" where the criterion cannot get that cheap.', '',
                  '| criterion | ' + ' | '.join(f'{b / 1e6:.1f} MMACs' for b in r['budgets']) + ' |',
                  '|---|' + '---|' * len(r['budgets'])]
        for label, policy in r['policies'].items():
            cells = ['-' if p is None else f'{100 * p["accuracy"]:.2f} ({p["mean_macs"] / 1e6:.1f})'
                     for p in policy['at_budget']]
            lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        lines += ['', 'Patience as PABEE sets it, one p at every exit (measuring half): ' + '; '.join(
            f'p = {p["patience"]}: {100 * p["accuracy"]:.2f}% at {p["expected_macs"] / 1e6:.1f} MMACs'
            for p in r['pabee']) + '.']
        exits = range(1, len(r['macs_cascade']) + 1)
        lines += ['', 'Expected calibration error (%, 15 bins, measuring half) per exit, before and after per-exit '
                  'temperature scaling:', '', '| exit | ' + ' | '.join(map(str, exits)) + ' |',
                  '|---|' + '---|' * len(exits),
                  '| top-1 (%) | ' + ' | '.join(f'{100 * a:.2f}' for a in r['top1']) + ' |',
                  '| temperature | ' + ' | '.join(f'{t:.3f}' for t in r['temperatures']) + ' |',
                  '| ECE before | ' + ' | '.join(f'{100 * e:.2f}' for e in r['ece_before']) + ' |',
                  '| ECE after | ' + ' | '.join(f'{100 * e:.2f}' for e in r['ece_after']) + ' |', '']
    return '\n'.join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8))
    for ax, r in zip(np.atleast_1d(axes), results):
        for i, (label, policy) in enumerate(r['policies'].items()):
            curve = policy['curve']
            ax.plot([c['expected_macs'] / 1e6 for c in curve], [100 * c['accuracy'] for c in curve],
                    linestyle='--' if label.endswith('+ T') else '-', color=f'C{CRITERIA.index(label.split()[0])}',
                    marker='o', markersize=2, label=label)
        ax.plot([p['expected_macs'] / 1e6 for p in r['pabee']], [100 * p['accuracy'] for p in r['pabee']],
                linestyle=':', color=f'C{CRITERIA.index("patience")}', marker='s', markersize=3,
                label='patience, one p (PABEE)')
        ax.set_title(f'{r["model"]}: budgeted batch by exit criterion', fontsize=9)
        ax.set_xlabel('expected MMACs (multiply-adds) per image')
        ax.set_ylabel('top-1 (%)')
        ax.set_ylim(100 * min(r['top1']) - 1.5, 100 * max(r['top1']) + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_criteria(args):
    results = [compare_model(name, args) for name in args.models]
    out = Path(args.out)
    (out / 'policies.json').write_text(json.dumps(results, indent=1))
    (out / 'policies.md').write_text(markdown(results))
    plot(results, out / 'policies.png')
    print(markdown(results))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.compare == 'criteria':
        compare_criteria(args)
        return
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
