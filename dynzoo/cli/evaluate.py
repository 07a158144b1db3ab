"""``dynzoo bench`` and ``dynzoo eval``: per-exit tables, anytime, budgeted-batch and real early-exit evaluation."""
import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import positive_int
from ..data import CIFAR_NUM_CLASSES, cifar_dataset, holdout_indices
from ..evaluate import (ResultTable, collect_logits, eval_transform, evaluate_anytime, measure_early_exit, model_name,
                        plot_tables)
from ..factory import create_model
from ..flops import per_exit_macs, per_exit_table
from ..inference import evaluate_budgeted, geometric_fractions
from ..models import MultiExitNetwork
from ..policies import CRITERIA, ExitPolicy, fit_temperatures, fit_to_budget

__all__ = ['add_bench_args', 'run_bench', 'add_eval_args', 'run_eval']


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model')
    group.add_argument('--pretrained', action='store_true', help='load the registered pretrained weights')
    group.add_argument('--checkpoint', default=None, help='local checkpoint file (the authors\' format works too)')
    group.add_argument('--num-classes', type=int, default=None,
                       help='classifier size (default: the model\'s; eval gives random weights the dataset\'s)')
    group = parser.add_argument_group('data')
    group.add_argument('--data', choices=('sample', 'npz', 'torchvision'), default='sample',
                       help='sample: CIFAR-10 test images shipped with dynzoo (default); npz: packed JPEG file; '
                            'torchvision: CIFAR download folder')
    group.add_argument('--data-path', default=None, help='packed JPEG npz file (--data npz)')
    group.add_argument('--data-root', default=None, help='torchvision CIFAR folder (--data torchvision)')
    group.add_argument('--dataset', choices=sorted(CIFAR_NUM_CLASSES), default='cifar10')
    group.add_argument('--download', action='store_true', help='download CIFAR with torchvision into --data-root')
    group.add_argument('--limit', type=positive_int, default=None, help='evaluate at most this many test images')
    group.add_argument('--batch-size', type=positive_int, default=100)
    group.add_argument('--workers', type=int, default=0)
    group.add_argument('--threads', type=positive_int, default=None, help='torch CPU threads')
    group.add_argument('--out', default=None, help='folder for the JSON results and PNG plots')


def _build_model(args, name: str):
    kwargs = {}
    num_classes = args.num_classes
    if num_classes is None and not (args.pretrained or args.checkpoint):
        num_classes = CIFAR_NUM_CLASSES[args.dataset]
    if args.checkpoint:
        kwargs['pretrained_cfg_overlay'] = dict(file=os.fspath(args.checkpoint))
    model = create_model(name, pretrained=bool(args.pretrained or args.checkpoint), num_classes=num_classes,
                         **kwargs)
    _check_classes(model, args, name)
    return model.eval()


def _check_classes(model, args, name: str) -> None:
    """Refuse to report accuracy of a classifier whose classes are not the data's."""
    classes = 10 if args.data == 'sample' else CIFAR_NUM_CLASSES[args.dataset]
    if model.num_classes != classes:
        data = 'the embedded CIFAR-10 sample' if args.data == 'sample' else f'--dataset {args.dataset}'
        raise ValueError(f'{name} has {model.num_classes} classes but {data} has {classes}: evaluate it on data with '
                         f'its classes (--dataset), or load weights trained on this data')


def _dataset(args, split: str, transform) -> Dataset:
    return cifar_dataset(split, source=args.data, root=args.data_root, path=args.data_path, name=args.dataset,
                         download=args.download, transform=transform)


def _limited(dataset: Dataset, limit: Optional[int]) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def _loader(dataset: Dataset, args) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)


def _split_heldout_test(args, transform, holdout: int, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """Held-out split for threshold fitting and test split, all with evaluation preprocessing: ``holdout`` training
    images (MSDNet: 5,000, which its authors leave out of training) against the test split; or, with
    ``--heldout-from test`` and for the embedded sample, a seeded cut of the test split in two (for weights trained
    on every training image)."""
    if args.data == 'sample' or args.heldout_from == 'test':
        test = _dataset(args, 'test', transform)
        test_index, heldout_index = holdout_indices(len(test), min(holdout, len(test) // 2), seed)
        return Subset(test, heldout_index.tolist()), _limited(Subset(test, test_index.tolist()), args.limit)
    train = _dataset(args, 'train', transform)
    heldout_index = holdout_indices(len(train), holdout, seed)[1]
    return Subset(train, heldout_index.tolist()), _limited(_dataset(args, 'test', transform), args.limit)


def _save(table: ResultTable, out: Optional[str], stem: str) -> None:
    if out:
        json_path = table.to_json(Path(out) / f'{stem}.json')
        png_path = table.plot(Path(out) / f'{stem}.png')
        print(f'saved {json_path} and {png_path}')


def _plot_together(tables: Sequence[ResultTable], out: Optional[str], stem: str) -> None:
    if out and len(tables) > 1:
        title = tables[0].title.split(':')[0] + ': ' + ' vs '.join(t.meta['model'] for t in tables)
        print(f'saved {plot_tables(tables, Path(out) / f"{stem}.png", title)}')


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``dynzoo bench MODEL [MODEL ...]``: per-exit parameters, MACs (all scopes) and, with weights, accuracy."""
    parser.add_argument('models', nargs='+', help='dynzoo model names (see dynzoo.list_models())')
    parser.add_argument('--no-accuracy', action='store_true', help='MACs and parameters only, even with weights')
    _add_common_args(parser)
    return parser


def run_bench(args) -> List[ResultTable]:
    """Per model, one row per exit: cumulative parameters, multiply-adds (cascade, standalone, lazy and the authors'
    count where one exists) and, when weights are loaded (``--pretrained`` / ``--checkpoint``), top-1/top-5 on the
    chosen data. Random weights get no accuracy column: it would only measure chance."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    for name in args.models:
        has_weights = bool(args.pretrained or args.checkpoint)
        kwargs = dict(pretrained_cfg_overlay=dict(file=os.fspath(args.checkpoint))) if args.checkpoint else {}
        model = create_model(name, pretrained=has_weights, num_classes=args.num_classes, **kwargs).eval()
        if has_weights and not args.no_accuracy:
            _check_classes(model, args, name)
        size = 'x'.join(map(str, model.pretrained_cfg['input_size']))
        title = f'bench: {name} ({model.num_classes} classes, input {size}, {getattr(model, "num_exits", 1)} exits)'
        rows = per_exit_table(model)
        y = 'params'
        if has_weights and not args.no_accuracy:
            accuracy = evaluate_anytime(model, _loader(_limited(_dataset(args, 'test', eval_transform(model)),
                                                                args.limit), args), progress=True)
            for row, measured in zip(rows, accuracy.rows):
                row.update(top1=measured['top1'], top5=measured['top5'])
            title += f', accuracy on {accuracy.meta["num_samples"]} {args.data} images'
            y = 'top1'
        table = ResultTable(title, rows, x='macs_cascade', y=y, meta=dict(model=name))
        print(table, end='\n\n')
        if args.out:
            _save(table, args.out, f'bench_{name}')
        tables.append(table)
    return tables


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``dynzoo eval MODEL [MODEL ...] --mode anytime|budget|early-exit``."""
    parser.add_argument('models', nargs='+', help='dynzoo model names; several are evaluated on the same images '
                                                  'and, with --out, plotted together')
    parser.add_argument('--mode', choices=('anytime', 'budget', 'early-exit'), default='anytime',
                        help='anytime: every exit on every image; budget: MSDNet budgeted batch (thresholds fitted '
                             'on a held-out split, q = p/20); early-exit: real early exit at given operating points')
    parser.add_argument('--holdout', type=int, default=5000,
                        help='held-out images for threshold fitting (training split; half the sample at most)')
    parser.add_argument('--heldout-from', choices=('train', 'test'), default='train',
                        help='take the held-out images from the training split (the MSDNet protocol, for weights '
                             'trained without them) or from the test split (evaluating on the rest)')
    parser.add_argument('--q', type=float, nargs='+', default=[0.25, 0.5, 1.0, 2.0],
                        help='early-exit: geometric exit distributions to fit thresholds for')
    parser.add_argument('--thresholds', type=float, nargs='+', default=None,
                        help='early-exit: explicit per-exit thresholds instead of --q (for --policy entropy: minus '
                             'the entropy bound; for patience: whole numbers >= 1)')
    parser.add_argument('--budget', type=float, nargs='+', default=None,
                        help='early-exit: fit thresholds to these mean MACs per image on the held-out images '
                             'instead of --q')
    group = parser.add_argument_group('exit policy (budget and early-exit modes)')
    group.add_argument('--policy', choices=CRITERIA, default='max_prob',
                       help='exit criterion: max softmax probability (MSDNet, SCAN), entropy (BranchyNet), top-2 '
                            'margin, or patience (PABEE: consecutive exits that agree)')
    calibration = group.add_mutually_exclusive_group()
    calibration.add_argument('--temperature', type=float, nargs='+', default=None,
                             help='divide exit k\'s logits by this temperature before the criterion (one value for '
                                  'every exit, or one per exit)')
    calibration.add_argument('--calibrate', action='store_true',
                             help='fit one temperature per exit on the held-out images (minimum NLL) first')
    _add_common_args(parser)
    return parser


def run_eval(args) -> List[ResultTable]:
    """One table per model; with ``--out``, ``MODE.json``/``.png`` for one model, ``MODE_NAME.json``/``.png`` per model
    and ``MODE.png`` with every curve for several."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = []
    for name in args.models:
        model = _build_model(args, name)
        if args.mode != 'anytime' and not isinstance(model, MultiExitNetwork):
            raise ValueError(f'--mode {args.mode} needs a multi-exit model (MSDNet, SCAN / BYOT, *_mc); {name} has '
                             'one exit: use --mode anytime')
        transform = eval_transform(model)
        if args.mode == 'anytime':
            loader = _loader(_limited(_dataset(args, 'test', transform), args.limit), args)
            table = evaluate_anytime(model, loader, progress=True)
        elif args.mode == 'budget':
            table = _eval_budget(model, args, transform)
        else:
            table = _eval_early_exit(model, args, transform)
        print(table)
        _save(table, args.out, args.mode if len(args.models) == 1 else f'{args.mode}_{name}')
        tables.append(table)
    _plot_together(tables, args.out, args.mode)
    return tables


def _policy(args, num_exits: int, val_logits=None, val_labels=None) -> ExitPolicy:
    """The ``--policy`` criterion with ``--temperature`` (one for all exits or one per exit), or temperatures fitted
    on the held-out logits (``--calibrate``); no thresholds yet."""
    temperatures = args.temperature
    if temperatures is not None and len(temperatures) == 1:
        temperatures = temperatures * num_exits
    if temperatures is not None and len(temperatures) != num_exits:
        raise ValueError(f'--temperature takes one value for every exit or one per exit ({num_exits}), got '
                         f'{len(temperatures)}')
    if args.calibrate:
        if val_logits is None:
            raise ValueError('--calibrate fits temperatures on held-out images: use it with --q or --budget, or give '
                             '--temperature with --thresholds')
        temperatures = fit_temperatures(val_logits, val_labels)
    return ExitPolicy(args.policy, temperatures=temperatures)


def _policy_meta(policy: ExitPolicy) -> Dict:
    return dict(policy=policy.criterion, temperatures=policy.temperatures)


def _eval_budget(model, args, transform) -> ResultTable:
    policy = None if args.calibrate else _policy(args, model.num_exits)  # bad arguments fail before any image runs
    heldout, test = _split_heldout_test(args, transform, args.holdout)
    val_logits, val_labels = collect_logits(model, _loader(heldout, args), progress=True)
    test_logits, test_labels = collect_logits(model, _loader(test, args), progress=True)
    macs = per_exit_macs(model, scope='cascade')
    policy = policy or _policy(args, model.num_exits, val_logits, val_labels)
    rows = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs, policy=policy)
    rows = [dict(q=r['q'], accuracy=r['accuracy'], expected_macs=r['expected_macs'],
                 exit_fractions=r['exit_fractions'], thresholds=r['thresholds']) for r in rows]
    name = model_name(model)
    return ResultTable(f'budgeted batch: {name}, {args.policy}, thresholds on {len(val_labels)} held-out, '
                       f'{len(test_labels)} test', rows, x='expected_macs', y='accuracy',
                       meta=dict(model=name, macs_cascade=macs, **_policy_meta(policy)))


def _eval_early_exit(model, args, transform) -> ResultTable:
    macs = per_exit_macs(model, scope='cascade')
    if args.thresholds is not None:
        policy = _policy(args, model.num_exits)
        given = policy.with_thresholds(args.thresholds)
        given.check(model.num_exits)  # before any image runs
        points = [('given', given)]
        test = _limited(_dataset(args, 'test', transform), args.limit)
    else:
        policy = None if args.calibrate else _policy(args, model.num_exits)
        heldout, test = _split_heldout_test(args, transform, args.holdout)
        val_logits, val_labels = collect_logits(model, _loader(heldout, args), progress=True)
        policy = policy or _policy(args, model.num_exits, val_logits, val_labels)
        if args.budget is not None:
            points = [(f'budget {b:g}', fit_to_budget(val_logits, macs, b, policy)) for b in args.budget]
        else:
            points = [(q, policy.fit(val_logits, geometric_fractions(q, model.num_exits))) for q in args.q]
    rows = [dict(q=q, **measure_early_exit(model, _loader(test, args), rule, progress=True)) for q, rule in points]
    name = model_name(model)
    return ResultTable(f'real early exit: {name}, {args.policy}, on {len(test)} images', rows, x='mean_macs',
                       y='accuracy', meta=dict(model=name, macs_cascade=macs, **_policy_meta(policy)))
