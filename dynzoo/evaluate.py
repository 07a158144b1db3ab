"""Anytime and real early-exit evaluation of dynzoo models, and result tables (``dynzoo bench`` / ``dynzoo eval``:
``dynzoo.cli.evaluate``).

The MSDNet authors evaluate every exit on every sample and simulate exiting afterwards (their code needs a GPU);
dynzoo does the same on CPU for the budgeted protocol (``collect_logits`` + ``evaluate_budgeted``) and also runs
real early exit (``dynzoo.early_exit``).
"""
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.utils import accuracy
from tqdm.auto import tqdm

from ._moved import moved_attribute
from .flops import MacsRow, per_exit_macs, per_exit_params
from .inference import ExitRule, early_exit

__all__ = ['ResultTable', 'check_labels', 'collect_logits', 'evaluate_anytime', 'measure_early_exit', 'eval_transform',
           'model_name', 'plot_tables', 'topk_correct']

# The command-line handlers moved to dynzoo.cli.
_MOVED = {name: 'dynzoo.cli.evaluate' for name in ('add_bench_args', 'run_bench', 'add_eval_args', 'run_eval')}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)


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
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('plots need matplotlib: pip install "dynzoo[plot]"') from e
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
    """Logits of every exit for every sample of ``loader``, the model in eval mode (its mode is restored after):
    ([N x C per exit], labels). Labels that are not class indices of the model raise a ``ValueError``
    (``check_labels``)."""
    was_training = model.training
    model.eval()
    try:
        return _collect_logits(model, loader, progress)
    finally:
        model.train(was_training)


def _collect_logits(model, loader, progress: bool) -> Tuple[List[torch.Tensor], torch.Tensor]:
    device = next(model.parameters()).device
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


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1,)) -> List[int]:
    """How many of ``labels`` are among the top-k of ``logits``, per k (k above the classes counts every class), by
    ``timm.utils.accuracy``."""
    return [round(float(percent) * len(labels) / 100) for percent in accuracy(logits, labels, topk=tuple(topk))]


def evaluate_anytime(model, loader, progress: bool = False) -> ResultTable:
    """Top-1/top-5 of every exit on ``loader`` (no ensembling, as MSDNet's anytime mode), with per-exit fvcore MACs
    (cascade and standalone scopes) and cumulative parameters."""
    logits, labels = collect_logits(model, loader, progress)
    images = next(iter(loader))[0]
    input_size = tuple(images.shape[1:])
    cascade = per_exit_macs(model, input_size, scope='cascade')
    standalone = per_exit_macs(model, input_size, scope='standalone')
    params = per_exit_params(model, input_size)
    correct = [topk_correct(l, labels, topk=(1, 5)) for l in logits]
    rows = [dict(exit=k + 1, top1=top1 / len(labels), top5=top5 / len(labels), macs_cascade=cascade[k],
                 macs_standalone=standalone[k], params=params[k]) for k, (top1, top5) in enumerate(correct)]
    name = model_name(model)
    return ResultTable(f'anytime: {name} on {len(labels)} images', rows, x='macs_cascade', y='top1',
                       meta=dict(model=name, num_samples=len(labels)))


@torch.no_grad()
def measure_early_exit(model, loader, rule: ExitRule, progress: bool = False) -> Dict:
    """Real early exit (``dynzoo.early_exit``) with ``rule`` over every batch of ``loader``: accuracy, mean MACs per
    image and their ratio to the full network's, the fraction of images leaving at each exit, the seconds spent in
    the early-exit calls, and the rule's thresholds. With ``fallback='ensemble'`` the fractions have one more entry:
    the images no exit took, answered by the ensemble."""
    device = next(model.parameters()).device
    correct, spent, full, seen, elapsed = 0, 0.0, 0.0, 0, 0.0
    num_outcomes = model.num_exits + (rule.fallback == 'ensemble')
    exit_counts = torch.zeros(num_outcomes, dtype=torch.long)
    for images, labels in tqdm(loader, desc='early exit', leave=False, disable=not progress):
        labels = check_labels(labels, len(images), model.num_classes)
        start = time.perf_counter()
        result = early_exit(model, images.to(device), rule)
        elapsed += time.perf_counter() - start
        correct += (result.predictions.cpu() == labels).sum().item()
        spent, seen = spent + result.macs, seen + len(labels)
        full += len(labels) * per_exit_macs(model, tuple(images.shape[1:]), scope='cascade')[-1]
        exit_counts += torch.bincount(result.exits.cpu(), minlength=num_outcomes)
    if seen == 0:
        raise ValueError('the loader yielded no batches')
    return dict(accuracy=correct / seen, mean_macs=spent / seen, macs_ratio=spent / full,
                exit_fractions=(exit_counts.double() / seen).tolist(), seconds=elapsed,
                thresholds=list(rule.thresholds))


def model_name(model) -> str:
    """The registered name, with its pretrained tag (``msdnet_cifar_b7.c10``) when the model has one."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture', type(model).__name__)
    return f"{name}.{cfg['tag']}" if cfg.get('tag') else name


def eval_transform(model):
    """The model's evaluation preprocessing from its pretrained config (timm's ``resolve_data_config``)."""
    from timm.data import create_transform, resolve_data_config
    return create_transform(**resolve_data_config(model=model))
