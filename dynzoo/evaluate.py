"""Anytime, budgeted-batch and early-exit evaluation of dynzoo models, their result tables, and the handlers of the
``dynzoo bench`` / ``dynzoo eval`` commands.

The MSDNet authors evaluate every exit on every sample and simulate exiting afterwards (their code needs a GPU);
dynzoo does the same on CPU for the budgeted protocol (``collect_logits`` + ``evaluate_budgeted``) and also runs
real early exit (``dynzoo.early_exit``).
"""
import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .cli import positive_int
from .data import CIFAR_NUM_CLASSES, cifar_dataset, holdout_indices
from .factory import create_model
from .flops import MacsRow, per_exit_macs, per_exit_params, per_exit_table
from .inference import early_exit, evaluate_budgeted, geometric_fractions
from .models import MultiExitNetwork
from .policies import CRITERIA, ExitPolicy, fit_temperatures, fit_to_budget

__all__ = ['ResultTable', 'check_labels', 'collect_logits', 'evaluate_anytime', 'eval_transform', 'add_bench_args',
           'run_bench', 'add_eval_args', 'run_eval']


class ResultTable:
    """Rows of results (dicts) that print as a text table, save as JSON and plot as accuracy vs MACs. A row's
    deprecated ``*flops*`` keys read as its ``*macs*`` ones."""

    def __init__(self, title: str, rows: List[Dict], x: str, y: str, meta: Optional[Dict] = None):
        self.title, self.rows, self.x, self.y = title, [MacsRow(row) for row in rows], x, y
        self.meta = MacsRow(meta or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict:
        return self.rows[index]

    def column(self, name: str) -> List:
        return [row[name] for row in self.rows]

    @staticmethod
    def _format(value) -> str:
        if isinstance(value, (list, tuple)):
            return ' '.join(ResultTable._format(v) for v in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return f'{value:,}'
        if isinstance(value, float):
            if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
                return f'{value:.4g}'
            return f'{value:.4f}'
        return str(value)

    def __str__(self) -> str:
        if not self.rows:
            return f'{self.title}\n(no rows)'
        columns = list(self.rows[0])
        cells = [columns] + [[self._format(row.get(c, '')) for c in columns] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
        lines = ['  '.join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
        return '\n'.join([self.title, lines[0], '-' * len(lines[0])] + lines[1:])

    __repr__ = __str__

    def to_dict(self) -> Dict:
        return dict(title=self.title, meta=self.meta, rows=self.rows)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def plot(self, path, label: Optional[str] = None) -> Path:
        """Save a PNG of ``y`` (accuracy) against ``x`` (MACs, in millions) with matplotlib."""
        return plot_tables([self], path, self.title, labels=[label] if label else None)


def plot_tables(tables: Sequence[ResultTable], path, title: str, labels: Optional[Sequence[str]] = None) -> Path:
    """One PNG with a curve per table (``y`` against ``x``, MACs in millions), labelled by model by default: e.g.
    the budgeted-batch curves of a network and its baseline."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, table in enumerate(tables):
        is_accuracy = table.y in ('top1', 'top5', 'accuracy')
        ax.plot(np.asarray(table.column(table.x), dtype=float) / 1e6,
                np.asarray(table.column(table.y), dtype=float) * (100 if is_accuracy else 1e-6),
                marker='o', markersize=3, label=labels[i] if labels else table.meta.get('model'))
    first = tables[0]
    ax.set_xlabel(f'{first.x} (MMACs, multiply-adds)')
    ax.set_ylabel(f'{first.y} (%)' if first.y in ('top1', 'top5', 'accuracy') else f'{first.y} (M)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_labels(labels, num_samples: int, num_classes: int) -> torch.Tensor:
    """``labels`` as an int64 tensor if they are ``num_samples`` class indices of a ``num_classes``-way classifier;
    a ``ValueError`` otherwise (labels from data with more classes would silently count as wrong answers)."""
    labels = torch.as_tensor(labels)
    if labels.shape != (num_samples,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f'labels must be {num_samples} integer class indices, one per image, got a {labels.dtype} '
                         f'tensor of shape {tuple(labels.shape)}')
    labels = labels.long()
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(f'label {labels[outside][0].item()} is not a class of this {num_classes}-class model '
                         f'(0..{num_classes - 1}): the data has other classes than the classifier. Evaluate on data '
                         'with its classes, or a model trained on this data')
    return labels


@torch.no_grad()
def collect_logits(model, loader, progress: bool = False) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Logits of every exit for every sample of ``loader`` (model in eval mode): ([N x C per exit], labels). Labels
    that are not class indices of the model raise a ``ValueError`` (``check_labels``)."""
    model.eval()
    device = _device_of(model)
    per_exit, labels = None, []
    for images, targets in tqdm(loader, desc='logits', disable=not progress, leave=False):
        outputs = model(images.to(device))
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs  # single-exit models
        labels.append(check_labels(targets, len(images), outputs[0].shape[1]))
        per_exit = [[] for _ in outputs] if per_exit is None else per_exit
        for store, logits in zip(per_exit, outputs):
            store.append(logits.float().cpu())
    if per_exit is None:
        raise ValueError('the loader yielded no batches')
    return [torch.cat(store) for store in per_exit], torch.cat(labels)


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()


def evaluate_anytime(model, loader, progress: bool = False) -> ResultTable:
    """Top-1/top-5 of every exit on ``loader`` (no ensembling, as MSDNet's anytime mode), with per-exit fvcore MACs
    (cascade and standalone scopes) and cumulative parameters."""
    logits, labels = collect_logits(model, loader, progress)
    images = next(iter(loader))[0]
    input_size = tuple(images.shape[1:])
    cascade = per_exit_macs(model, input_size, scope='cascade')
    standalone = per_exit_macs(model, input_size, scope='standalone')
    params = per_exit_params(model, input_size)
    rows = [dict(exit=k + 1, top1=_topk_accuracy(l, labels, 1), top5=_topk_accuracy(l, labels, 5),
                 macs_cascade=cascade[k], macs_standalone=standalone[k], params=params[k])
            for k, l in enumerate(logits)]
    name = _model_name(model)
    return ResultTable(f'anytime: {name} on {len(labels)} images', rows, x='macs_cascade', y='top1',
                       meta=dict(model=name, num_samples=len(labels)))


def _model_name(model) -> str:
    """The registered name, with its pretrained tag (``msdnet_cifar_b7.c10``) when the model has one."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture', type(model).__name__)
    return f"{name}.{cfg['tag']}" if cfg.get('tag') else name


def eval_transform(model):
    """The model's evaluation preprocessing from its pretrained config (timm's ``resolve_data_config``)."""
    from timm.data import create_transform, resolve_data_config
    return create_transform(**resolve_data_config(model=model))


# ---------------------------------------------------------------- command line


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
    if args.calibrate:
        if val_logits is None:
            raise ValueError('--calibrate fits temperatures on held-out images: use it with --q or --budget, or give '
                             '--temperature with --thresholds')
        temperatures = fit_temperatures(val_logits, val_labels)
    return ExitPolicy(args.policy, temperatures=temperatures)


def _policy_meta(policy: ExitPolicy) -> Dict:
    return dict(policy=policy.criterion, temperatures=policy.temperatures)


def _eval_budget(model, args, transform) -> ResultTable:
    heldout, test = _split_heldout_test(args, transform, args.holdout)
    val_logits, val_labels = collect_logits(model, _loader(heldout, args), progress=True)
    test_logits, test_labels = collect_logits(model, _loader(test, args), progress=True)
    macs = per_exit_macs(model, scope='cascade')
    policy = _policy(args, model.num_exits, val_logits, val_labels)
    rows = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs, policy=policy)
    rows = [dict(q=r['q'], accuracy=r['accuracy'], expected_macs=r['expected_macs'],
                 exit_fractions=r['exit_fractions'], thresholds=r['thresholds']) for r in rows]
    name = _model_name(model)
    return ResultTable(f'budgeted batch: {name}, {args.policy}, thresholds on {len(val_labels)} held-out, '
                       f'{len(test_labels)} test', rows, x='expected_macs', y='accuracy',
                       meta=dict(model=name, macs_cascade=macs, **_policy_meta(policy)))


def _eval_early_exit(model, args, transform) -> ResultTable:
    macs = per_exit_macs(model, scope='cascade')
    if args.thresholds is not None:
        test = _limited(_dataset(args, 'test', transform), args.limit)
        policy = _policy(args, model.num_exits)
        points = [('given', policy.with_thresholds(args.thresholds))]
    else:
        heldout, test = _split_heldout_test(args, transform, args.holdout)
        val_logits, val_labels = collect_logits(model, _loader(heldout, args), progress=True)
        policy = _policy(args, model.num_exits, val_logits, val_labels)
        if args.budget is not None:
            points = [(f'budget {b:g}', fit_to_budget(val_logits, macs, b, policy)) for b in args.budget]
        else:
            points = [(q, policy.fit(val_logits, geometric_fractions(q, model.num_exits))) for q in args.q]
    loader = _loader(test, args)
    rows = []
    with torch.no_grad():
        for q, rule in points:
            correct, spent, seen, elapsed = 0, 0.0, 0, 0.0
            exit_counts = torch.zeros(model.num_exits, dtype=torch.long)
            for images, labels in tqdm(loader, desc=f'early exit q={q}', leave=False):
                labels = check_labels(labels, len(images), model.num_classes)
                start = time.perf_counter()
                result = early_exit(model, images.to(_device_of(model)), rule)
                elapsed += time.perf_counter() - start
                correct += (result.predictions.cpu() == labels).sum().item()
                spent, seen = spent + result.macs, seen + len(labels)
                exit_counts += torch.bincount(result.exits.cpu(), minlength=model.num_exits)
            rows.append(dict(q=q, accuracy=correct / seen, mean_macs=spent / seen, macs_ratio=spent / seen / macs[-1],
                             exit_fractions=(exit_counts.double() / seen).tolist(), seconds=elapsed,
                             thresholds=list(rule.thresholds)))
    name = _model_name(model)
    return ResultTable(f'real early exit: {name}, {args.policy}, on {len(test)} images', rows, x='mean_macs',
                       y='accuracy', meta=dict(model=name, macs_cascade=macs, **_policy_meta(policy)))
