"""Confidence-based early exit: the MSDNet budgeted-batch protocol, a genetic threshold search, the SCAN rule, and
real early exit that stops computing for samples once they exit.

The exit rule (MSDNet, ``dynamic_eval_with_threshold``): a sample leaves at the first exit ``k`` whose maximum
softmax probability is ``>= thresholds[k]``; the last exit takes every remaining sample. The SCAN rule (its
authors' ``inference.py``) uses ``>`` and, when no exit fires, predicts with the mean of all exits' logits.

Every function here takes logits shallow exit first, as ``model(x)`` returns them.
"""
import ctypes
import ctypes.util
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .flops import per_exit_flops
from .models import MultiExitNetwork

__all__ = [
    'EarlyExitResult', 'ThresholdSearchResult', 'SCAN_THRESHOLDS', 'SCAN_RELATIVE_COSTS', 'geometric_fractions',
    'fit_thresholds', 'simulate_early_exit', 'early_exit', 'evaluate_budgeted', 'genetic_threshold_search',
    'scan_predict', 'stage_flops', 'retain_freed_memory',
]

NEVER, ALWAYS = 1e8, -1e8  # the authors' "nobody exits here" and "everybody exits here" thresholds

# SCAN ``inference.py``: thresholds of exits 1..4 and the relative cost of exits 1..4 and of the ensemble.
SCAN_THRESHOLDS = (0.98, 0.97, 0.98, 0.95)
SCAN_RELATIVE_COSTS = (0.32, 0.53, 0.76, 1.0, 1.07)


@dataclass
class EarlyExitResult:
    """Per-sample outcome of (real or simulated) early exit.

    ``exits`` holds the 0-based exit that answered; with ``fallback='ensemble'`` the value ``num_exits`` means that
    no exit fired and the mean of all exits' logits answered. ``flops`` is the total multiply-adds spent on the batch
    (None when no per-exit costs were given to a simulation); ``samples_per_stage[k]`` how many samples ran stage k.
    """
    predictions: torch.Tensor
    exits: torch.Tensor
    flops: Optional[float] = None
    samples_per_stage: List[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.predictions)

    @property
    def mean_flops(self) -> Optional[float]:
        return None if self.flops is None else self.flops / max(1, self.num_samples)

    def exit_fractions(self, num_outcomes: int) -> List[float]:
        counts = torch.bincount(self.exits, minlength=num_outcomes)[:num_outcomes]
        return (counts.double() / max(1, self.num_samples)).tolist()

    def accuracy(self, labels: torch.Tensor) -> float:
        return (self.predictions == labels.to(self.predictions.device)).double().mean().item()


@dataclass
class ThresholdSearchResult:
    """Output of ``genetic_threshold_search``: thresholds and their accuracy, expected FLOPs and exit fractions on the
    split they were searched on, plus the fitness history (best per generation)."""
    thresholds: List[float]
    accuracy: float
    expected_flops: float
    exit_fractions: List[float]
    fitness: float
    history: List[float]


def _as_logit_list(logits) -> List[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f'stacked logits must be num_exits x N x C, got shape {tuple(logits.shape)}')
        logits = list(logits)
    logits = [torch.as_tensor(l) for l in logits]
    if not logits or any(l.dim() != 2 for l in logits) or len({tuple(l.shape) for l in logits}) != 1:
        raise ValueError('logits must be a non-empty list with one N x C tensor per exit, all of the same shape; got '
                         f'{[tuple(l.shape) for l in logits]}')
    return logits


def _confidence(logits: torch.Tensor):
    """Max softmax probability and arg-max class per row (float32 softmax, as the authors compute it)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1)


def _check_thresholds(thresholds: Sequence[float], num_exits: int) -> List[float]:
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) not in (num_exits - 1, num_exits):
        raise ValueError(f'expected {num_exits} thresholds (or {num_exits - 1}: the last exit takes every remaining '
                         f'sample), got {len(thresholds)}')
    return thresholds + [ALWAYS] * (num_exits - len(thresholds))


def geometric_fractions(q: float, num_exits: int) -> List[float]:
    """MSDNet's exit distribution: share of exit k proportional to ``q ** k`` (k = 1..num_exits), normalised.
    ``q < 1`` favours early exits, ``q > 1`` late ones."""
    if q <= 0:
        raise ValueError(f'q must be positive, got {q}')
    weights = np.power(float(q), np.arange(1, num_exits + 1, dtype=np.float64))
    return (weights / weights.sum()).tolist()


def fit_thresholds(logits, fractions: Sequence[float]) -> List[float]:
    """Thresholds that send the share ``fractions[k]`` of the (held-out) samples to exit k, as the MSDNet authors'
    ``dynamic_eval_find_threshold``.

    For k < K-1: among the samples that have not exited yet, sorted by confidence at exit k (descending), ``T[k]``
    is the confidence of the ``floor(N * fractions[k])``-th; every sample with confidence ``>= T[k]`` exits there.
    If that count is 0 (or fewer samples remain), ``T[k] = 1e8`` and nobody exits at k. ``T[K-1] = -1e8``.
    """
    logits = _as_logit_list(logits)
    num_exits, num_samples = len(logits), logits[0].shape[0]
    if len(fractions) != num_exits:
        raise ValueError(f'need one target fraction per exit ({num_exits}), got {len(fractions)}')
    fractions = np.asarray(fractions, dtype=np.float64)
    if (fractions < 0).any() or not math.isclose(fractions.sum(), 1.0, rel_tol=1e-6):
        raise ValueError(f'fractions must be non-negative and sum to 1, got {fractions.tolist()}')
    exited = torch.zeros(num_samples, dtype=torch.bool)
    thresholds = [NEVER] * (num_exits - 1) + [ALWAYS]
    for k in range(num_exits - 1):
        confidence = _confidence(logits[k]).values
        target = math.floor(num_samples * fractions[k])
        order = torch.argsort(confidence, descending=True, stable=True)
        remaining = order[~exited[order]]
        if 0 < target <= len(remaining):
            thresholds[k] = confidence[remaining[target - 1]].item()
            exited |= confidence >= thresholds[k]
    return thresholds


def _decide(logits: torch.Tensor, threshold: float, strict: bool):
    confidence, prediction = _confidence(logits)
    passed = confidence > threshold if strict else confidence >= threshold
    return passed, prediction


def stage_flops(cascade_flops: Sequence[float]) -> List[float]:
    """Cost of stage k plus head k for one sample, from cascade per-exit FLOPs (stages and heads 1..k)."""
    return [float(c) - float(p) for c, p in zip(cascade_flops, [0.0, *cascade_flops[:-1]])]


def simulate_early_exit(logits, thresholds: Sequence[float], flops: Optional[Sequence[float]] = None,
                        fallback: str = 'last', strict: bool = False) -> EarlyExitResult:
    """The exit rule applied to precomputed logits of every exit (what the authors' evaluation code does).

    ``fallback='last'``: the last exit answers for every remaining sample (its threshold, if given, is ignored);
    ``'ensemble'``: the last exit must pass its threshold too, otherwise the mean of all logits answers (SCAN).
    ``strict``: exit when confidence ``> threshold`` (SCAN) instead of ``>=`` (MSDNet). ``flops``: cascade per-exit
    costs (``per_exit_flops(model, scope='cascade')``), to fill ``.flops``.
    """
    logits = _as_logit_list(logits)
    num_exits, num_samples = len(logits), logits[0].shape[0]
    thresholds = _check_thresholds(thresholds, num_exits)
    _check_fallback(fallback)
    predictions = torch.full((num_samples,), -1, dtype=torch.long)
    exits = torch.full((num_samples,), -1, dtype=torch.long)
    active = torch.ones(num_samples, dtype=torch.bool)
    samples_per_stage = []
    for k in range(num_exits):
        samples_per_stage.append(int(active.sum()))
        passed, prediction = _decide(logits[k], thresholds[k], strict)
        if k == num_exits - 1 and fallback == 'last':
            passed = torch.ones_like(passed)
        leaving = active & passed
        predictions[leaving], exits[leaving] = prediction[leaving], k
        active &= ~passed
        if not active.any():
            break
    if active.any():
        predictions[active] = torch.stack(logits).float().mean(0)[active].argmax(1)
        exits[active] = num_exits
    total = None
    if flops is not None:
        total = sum(n * c for n, c in zip(samples_per_stage, stage_flops(_check_flops(flops, num_exits))))
    return EarlyExitResult(predictions, exits, total, samples_per_stage)


def _check_fallback(fallback: str) -> None:
    if fallback not in ('last', 'ensemble'):
        raise ValueError(f"fallback must be 'last' or 'ensemble', got {fallback!r}")


def _check_flops(flops: Sequence[float], num_exits: int) -> List[float]:
    flops = [float(f) for f in flops]
    if len(flops) != num_exits:
        raise ValueError(f'need one cascade FLOPs value per exit ({num_exits}), got {len(flops)}')
    if any(b < a for a, b in zip(flops, flops[1:])):
        raise ValueError(f'flops must be cascade costs (non-decreasing with the exit), got {flops}')
    return flops


@torch.no_grad()
def early_exit(model, x: torch.Tensor, thresholds: Sequence[float], flops: Optional[Sequence[float]] = None,
               fallback: str = 'last', strict: bool = False) -> EarlyExitResult:
    """Real early exit: run the exits in order through ``model.iter_exits(x)`` and drop each sample from the batch
    as soon as it exits, so later stages run only on the samples still inside.

    Same rule and arguments as ``simulate_early_exit``; predictions are identical. ``.flops`` counts the multiply-adds
    actually spent: for each stage k, (samples that ran stage k) x (stage k + head k), from ``per_exit_flops(model,
    scope='cascade')`` differences. Cascade is the right scope because ``iter_exits`` computes each stage's whole
    state (for MSDNet, every scale of the block, including finer scales that only later exits use) and every head
    of the exits a sample was tried at; 'lazy' would leave out work that does run, 'standalone' the earlier heads.
    Pass ``flops`` (cascade, at ``x``'s image size) to skip recounting them on every call. The model must be in
    eval mode.
    """
    if not isinstance(model, MultiExitNetwork):
        raise ValueError(f'early_exit needs a multi-exit model (MSDNet, SCAN / BYOT, *_mc); {type(model).__name__} '
                         'has one exit')
    if model.training:
        raise ValueError('early_exit needs the model in eval mode (batch statistics would change as samples leave): '
                         'call model.eval() first')
    num_exits = model.num_exits
    thresholds = _check_thresholds(thresholds, num_exits)
    _check_fallback(fallback)
    if flops is None:
        flops = per_exit_flops(model, input_size=tuple(x.shape[1:]), scope='cascade')
    costs = stage_flops(_check_flops(flops, num_exits))
    num_samples = x.shape[0]
    predictions = torch.full((num_samples,), -1, dtype=torch.long, device=x.device)
    exits = torch.full((num_samples,), -1, dtype=torch.long, device=x.device)
    inside = torch.arange(num_samples, device=x.device)
    logit_sum = None
    samples_per_stage = []
    exit_iterator = model.iter_exits(x)
    logits = next(exit_iterator)
    try:
        for k in range(num_exits):
            samples_per_stage.append(len(inside))
            passed, prediction = _decide(logits, thresholds[k], strict)
            if fallback == 'ensemble':
                logit_sum = logits.float() if logit_sum is None else logit_sum + logits.float()
            elif k == num_exits - 1:
                passed = torch.ones_like(passed)
            predictions[inside[passed]], exits[inside[passed]] = prediction[passed], k
            keep = torch.nonzero(~passed).squeeze(1)
            inside = inside[keep]
            if logit_sum is not None:
                logit_sum = logit_sum[keep]
            if len(inside) == 0 or k == num_exits - 1:
                break
            logits = exit_iterator.send(keep if len(keep) < len(passed) else None)  # no copy when all stay
    finally:
        exit_iterator.close()
    if len(inside):
        predictions[inside], exits[inside] = logit_sum.argmax(1), num_exits
    total = sum(n * c for n, c in zip(samples_per_stage, costs))
    return EarlyExitResult(predictions, exits, total, samples_per_stage)


def evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, flops: Sequence[float],
                      qs: Optional[Sequence[float]] = None) -> List[Dict]:
    """MSDNet's budgeted-batch evaluation: for each ``q`` (default ``p / 20`` for p = 1..39) fit thresholds on the
    held-out logits for the geometric exit distribution, apply them to the test logits, and report accuracy and
    expected FLOPs ``sum_k (n_k / N) * flops[k]`` (``flops``: cascade per-exit costs, e.g. ``per_exit_flops(model)``;
    the MSDNet authors used their own counter, ``per_exit_flops(model, convention='authors')``).

    Returns one dict per operating point: ``q``, ``accuracy``, ``expected_flops``, ``exit_fractions`` (realised on
    the test split), ``target_fractions``, ``val_exit_fractions`` and ``thresholds``.
    """
    val_logits, test_logits = _as_logit_list(val_logits), _as_logit_list(test_logits)
    num_exits = len(val_logits)
    if len(test_logits) != num_exits:
        raise ValueError(f'held-out logits have {num_exits} exits, test logits {len(test_logits)}')
    flops = _check_flops(flops, num_exits)
    val_labels, test_labels = torch.as_tensor(val_labels), torch.as_tensor(test_labels)
    qs = [p / 20 for p in range(1, 40)] if qs is None else qs
    rows = []
    for q in qs:
        target = geometric_fractions(q, num_exits)
        thresholds = fit_thresholds(val_logits, target)
        val_result = simulate_early_exit(val_logits, thresholds)
        result = simulate_early_exit(test_logits, thresholds, flops)
        rows.append(dict(q=q, accuracy=result.accuracy(test_labels), expected_flops=result.mean_flops,
                         exit_fractions=result.exit_fractions(num_exits), target_fractions=target,
                         val_exit_fractions=val_result.exit_fractions(num_exits), thresholds=thresholds))
    return rows


def genetic_threshold_search(logits, labels, flops: Sequence[float], budget: Optional[float] = None,
                             trade_off: float = 0.1, population_size: int = 64, generations: int = 60,
                             mutation_scale: float = 0.05, elite: int = 2, seed: int = 0) -> ThresholdSearchResult:
    """Search exit thresholds with a genetic algorithm, as the SCAN paper proposes. The SCAN authors never released
    theirs: this is dynzoo's own implementation, reproducible for a given ``seed``.

    A genome holds the thresholds of exits 1..K-1 in [0, 1.01] (above 1: nobody exits there); the last exit takes
    every remaining sample (MSDNet's ``>=`` rule). Fitness on (``logits``, ``labels``), with ``flops`` the cascade
    per-exit costs:

    * with ``budget`` (expected FLOPs per sample): accuracy when the expected cost is within the budget, otherwise
      ``-(cost / budget)`` (every over-budget genome ranks below every feasible one);
    * without: ``accuracy - trade_off * expected_flops / flops[-1]``.

    The first generation holds the K single-exit policies (everyone leaves at exit k) and random genomes; tournament
    selection (3), uniform crossover, Gaussian mutation and ``elite`` survivors per generation. Because of the seeded
    single-exit genomes and elitism, the result is never worse than the best single exit under the same budget.
    """
    logits = _as_logit_list(logits)
    num_exits = len(logits)
    flops = np.asarray(_check_flops(flops, num_exits))
    labels = torch.as_tensor(labels).numpy()
    if budget is not None and budget <= 0:
        raise ValueError(f'budget must be a positive number of FLOPs per sample, got {budget}')
    if population_size < max(num_exits, elite + 2):
        raise ValueError(f'population_size must be at least {max(num_exits, elite + 2)}, got {population_size}')
    confidence_and_class = [_confidence(l) for l in logits]
    confidence = np.stack([c.values.numpy() for c in confidence_and_class])
    correct = np.stack([c.indices.numpy() == labels for c in confidence_and_class])
    top = 1.01
    rng = np.random.default_rng(seed)

    def assess(genomes: np.ndarray):
        passed = confidence[None, :-1] >= genomes[:, :, None]
        passed = np.concatenate([passed, np.ones_like(passed[:, :1])], axis=1)
        exits = passed.argmax(axis=1)
        accuracy = np.take_along_axis(correct[None], exits[:, None], axis=1)[:, 0].mean(axis=1)
        cost = flops[exits].mean(axis=1)
        if budget is None:
            fitness = accuracy - trade_off * cost / flops[-1]
        else:
            fitness = np.where(cost <= budget * (1 + 1e-12), accuracy, -cost / budget)
        return fitness, accuracy, cost, exits

    genes = num_exits - 1
    single_exit = np.full((num_exits, genes), top)
    for k in range(genes):
        single_exit[k, k] = 0.0
    population = np.concatenate([single_exit, rng.uniform(0, top, (population_size - num_exits, genes))])
    fitness = assess(population)[0]
    history = []
    for _ in range(generations):
        order = np.argsort(-fitness, kind='stable')
        history.append(float(fitness[order[0]]))
        contenders = rng.integers(0, population_size, (2, population_size - elite, 3))
        parents = np.take_along_axis(contenders, fitness[contenders].argmax(axis=2)[..., None], axis=2)[..., 0]
        mix = rng.random((population_size - elite, genes)) < 0.5
        children = np.where(mix, population[parents[0]], population[parents[1]])
        mutate = rng.random(children.shape) < max(1.0 / genes, 0.2)
        children = np.clip(children + mutate * rng.normal(0, mutation_scale, children.shape), 0, top)
        population = np.concatenate([population[order[:elite]], children])
        fitness = assess(population)[0]
    fitness, accuracy, cost, exits = assess(population)
    best = int(np.argmax(fitness))
    history.append(float(fitness[best]))
    thresholds = [float(t) if t <= 1 else NEVER for t in population[best]] + [ALWAYS]
    fractions = (np.bincount(exits[best], minlength=num_exits) / exits.shape[1]).tolist()
    return ThresholdSearchResult(thresholds, float(accuracy[best]), float(cost[best]), fractions,
                                 float(fitness[best]), history)


def scan_predict(logits_or_model, x: Optional[torch.Tensor] = None,
                 thresholds: Sequence[float] = SCAN_THRESHOLDS,
                 relative_costs: Sequence[float] = SCAN_RELATIVE_COSTS) -> EarlyExitResult:
    """The SCAN authors' scalable inference (``inference.py``): softmax per exit, shallow to deep; a sample exits at
    the first exit whose max probability is ``> thresholds[k]``; if none fires, the mean of all exits' logits
    predicts (``exits == num_exits``). Defaults are the authors' hard-coded thresholds (0.98, 0.97, 0.98, 0.95).

    Pass a list of logits (what the authors do: every exit computed, then the rule applied) or a model and a batch
    ``x`` (real early exit through ``iter_exits``, same predictions). ``.flops`` is the authors' relative cost
    (0.32 / 0.53 / 0.76 / 1.0 per exit, 1.07 for the ensemble, summed over samples), so ``1 / result.mean_flops``
    is their "acceleration ratio"; for multiply-adds, use ``early_exit(..., fallback='ensemble', strict=True)``.
    """
    if x is None:
        result = simulate_early_exit(logits_or_model, thresholds, fallback='ensemble', strict=True)
    else:
        result = early_exit(logits_or_model, x, thresholds, flops=[0.0] * logits_or_model.num_exits,
                            fallback='ensemble', strict=True)
    num_outcomes = len(thresholds) + 1
    if len(relative_costs) != num_outcomes:
        raise ValueError(f'relative_costs needs one value per exit plus one for the ensemble ({num_outcomes}), '
                         f'got {len(relative_costs)}')
    result.flops = float(torch.as_tensor(relative_costs, dtype=torch.float64)[result.exits.cpu()].sum())
    return result


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of returning it to the operating system.

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps
    it on free, so each CPU forward touches its large feature maps for the first time again: a page fault per 4 KiB
    (one MSDNet CIFAR forward at batch 256 faults about 0.7 GB, 186k times). Those faults cost time in proportion to
    the bytes a stage allocates, not to its multiply-adds, which penalises the large early maps of a multi-scale
    network and with them the time saved by early exit. This sets ``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD`` to
    2 GiB for the whole process, the effect that PyTorch's CPU tuning guide gets from jemalloc or tcmalloc (the same
    as starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``); the price is a process that
    keeps its peak memory. Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
