"""Confidence-based early exit: the MSDNet budgeted-batch protocol, a genetic threshold search, the SCAN rule, and
real early exit that stops computing for samples once they exit.

The exit rule (MSDNet, ``dynamic_eval_with_threshold``): a sample leaves at the first exit ``k`` whose maximum
softmax probability is ``>= thresholds[k]``; the last exit takes every remaining sample. The SCAN rule (its
authors' ``inference.py``) uses ``>`` and, when no exit fires, predicts with the mean of all exits' logits. Both are
one ``ExitRule``, which simulated and real early exit share (``run_exit_rule``).

Every function here takes logits shallow exit first, as ``model(x)`` returns them. Costs are multiply-adds (MACs,
``dynzoo.per_exit_macs``); the older ``flops`` names are deprecated aliases.
"""
import copy
import ctypes
import ctypes.util
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .flops import MacsRow, _deprecated, _cached_per_exit_macs, per_exit_macs
from .models import MultiExitNetwork

__all__ = [
    'EarlyExitResult', 'ThresholdSearchResult', 'ExitRule', 'SCAN_THRESHOLDS', 'SCAN_RELATIVE_COSTS',
    'geometric_fractions', 'max_probability', 'fit_thresholds', 'run_exit_rule', 'simulate_early_exit', 'early_exit',
    'evaluate_budgeted', 'genetic_threshold_search', 'scan_predict', 'stage_macs', 'stage_flops',
    'retain_freed_memory',
]

NEVER, ALWAYS = 1e8, -1e8  # the authors' "nobody exits here" and "everybody exits here" thresholds

# SCAN ``inference.py``: thresholds of exits 1..4 and the relative cost of exits 1..4 and of the ensemble.
SCAN_THRESHOLDS = (0.98, 0.97, 0.98, 0.95)
SCAN_RELATIVE_COSTS = (0.32, 0.53, 0.76, 1.0, 1.07)


@dataclass
class EarlyExitResult:
    """Per-sample outcome of (real or simulated) early exit.

    ``exits`` holds the 0-based exit that answered; with ``fallback='ensemble'`` the value ``num_exits`` means that
    no exit fired and the mean of all exits' logits answered. ``macs`` is the total multiply-adds spent on the batch
    (None when no per-exit costs were given to a simulation); ``samples_per_stage[k]`` how many samples ran stage k.
    ``nonfinite[i]`` is True when the logits that answered for sample i held a NaN or +Inf, or were all -Inf (a
    non-finite input, or an overflow): its prediction means nothing (a ``RuntimeWarning`` says so too).
    """
    predictions: torch.Tensor
    exits: torch.Tensor
    macs: Optional[float] = None
    samples_per_stage: List[int] = field(default_factory=list)
    nonfinite: Optional[torch.Tensor] = None

    @property
    def num_samples(self) -> int:
        return len(self.predictions)

    @property
    def mean_macs(self) -> Optional[float]:
        return None if self.macs is None else self.macs / max(1, self.num_samples)

    @property
    def flops(self) -> Optional[float]:
        _deprecated('EarlyExitResult.flops', 'EarlyExitResult.macs')
        return self.macs

    @property
    def mean_flops(self) -> Optional[float]:
        _deprecated('EarlyExitResult.mean_flops', 'EarlyExitResult.mean_macs')
        return self.mean_macs

    def exit_fractions(self, num_outcomes: int) -> List[float]:
        """The share of samples that each of ``num_outcomes`` outcomes answered: the model's exits, plus one for the
        ensemble with ``fallback='ensemble'``."""
        counts = torch.bincount(self.exits, minlength=num_outcomes)
        if len(counts) > num_outcomes:
            raise ValueError(f'exit {len(counts) - 1} answered some samples, so there are more than {num_outcomes} '
                             'outcomes: pass the model\'s num_exits (plus one with fallback=\'ensemble\')')
        return (counts.double() / max(1, self.num_samples)).tolist()

    def accuracy(self, labels: torch.Tensor) -> float:
        labels = _check_labels(labels, self.num_samples)
        return (self.predictions == labels.to(self.predictions.device)).double().mean().item()


@dataclass
class ThresholdSearchResult:
    """Output of ``genetic_threshold_search``: thresholds and their accuracy, expected MACs and exit fractions on the
    split they were searched on, plus the fitness history (best per generation)."""
    thresholds: List[float]
    accuracy: float
    expected_macs: float
    exit_fractions: List[float]
    fitness: float
    history: List[float]

    @property
    def expected_flops(self) -> float:
        _deprecated('ThresholdSearchResult.expected_flops', 'ThresholdSearchResult.expected_macs')
        return self.expected_macs


def _renamed(macs, flops, where: str):
    """The ``macs`` argument, or the deprecated ``flops`` one (with a warning)."""
    if flops is None:
        return macs
    if macs is not None:
        raise ValueError(f'{where} got both macs= and its deprecated alias flops=: pass macs= only')
    _deprecated(f'{where}(flops=...)', f'{where}(macs=...)', stacklevel=4)
    return flops


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


def _check_labels(labels, num_samples: int, num_classes: Optional[int] = None, name: str = 'labels') -> torch.Tensor:
    """``labels`` as a 1-D integer tensor of one class index per sample, or a ``ValueError`` saying what is wrong."""
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f'{name} must be integer class indices, got dtype {labels.dtype} (convert with .long() if '
                         'they are whole numbers)')
    if labels.dim() != 1 or len(labels) != num_samples:
        raise ValueError(f'{name} must hold one class index per sample ({num_samples}), got shape '
                         f'{tuple(labels.shape)}')
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'{name} must lie in 0..{num_classes - 1} (the logits have {num_classes} classes), got '
                         f'{labels.min().item()}..{labels.max().item()}')
    return labels


def max_probability(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and arg-max class per row (float32 softmax, as the authors compute it)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1)


def _threshold_list(thresholds) -> List[float]:
    """``thresholds`` as a list of floats, or a ``TypeError`` for a scalar or anything but one number per exit."""
    try:
        if isinstance(thresholds, (str, bytes)):
            raise TypeError
        return [float(t) for t in thresholds]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f'thresholds must be a sequence with one number per exit (or one fewer: the last exit takes '
                        f'every remaining sample), e.g. [0.9] * (model.num_exits - 1); got {thresholds!r}') from None


class ExitRule:
    """Which samples leave at exit k, and with which class: the one exit rule of dynzoo's simulated and real early
    exit, budgeted evaluation and ``scan_predict``.

    The default is MSDNet's: a sample leaves at the first exit whose ``score`` (the max softmax probability) is
    ``>= thresholds[k]`` (``>`` with ``strict``, as SCAN). ``thresholds`` has one value per exit, or one fewer (the
    last exit's is then ``ALWAYS``); NaN is refused. ``fallback`` answers for the samples that no exit took:
    ``'last'``, the last exit (its threshold is ignored), or ``'ensemble'``, the mean of all exits' logits (SCAN).

    Another criterion subclasses this and overrides ``score`` (a per-sample confidence, higher leaves sooner: e.g.
    negative entropy, the top-2 margin, temperature-scaled logits) or ``decide`` (a rule that carries per-sample
    ``memory`` from exit to exit, e.g. patience); ``check`` validates its parameters for a model's exit count.
    ``dynzoo.policies.ExitPolicy`` is the one dynzoo ships (entropy, margin, patience, per-exit temperatures).
    """

    min_threshold = -math.inf  # the lowest threshold the score admits: fitted ones are raised to it

    def __init__(self, thresholds: Sequence[float], fallback: str = 'last', strict: bool = False):
        if fallback not in ('last', 'ensemble'):
            raise ValueError(f"fallback must be 'last' or 'ensemble', got {fallback!r}")
        self.thresholds = _threshold_list(thresholds)
        self.fallback, self.strict = fallback, strict

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.thresholds}, fallback={self.fallback!r}, strict={self.strict})'

    def check(self, num_exits: int) -> None:
        """Raise a ``ValueError`` unless the rule fits a model with ``num_exits`` exits."""
        if len(self.thresholds) not in (num_exits - 1, num_exits):
            raise ValueError(f'expected {num_exits} thresholds (or {num_exits - 1}: the last exit takes every '
                             f'remaining sample), got {len(self.thresholds)}')
        if any(math.isnan(t) for t in self.thresholds):
            raise ValueError(f'thresholds must not be NaN, got {self.thresholds}: use {NEVER:g} for "nobody exits '
                             f'here" and {ALWAYS:g} for "everybody exits here"')

    def score(self, k: int, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sample confidence at exit ``k`` and the class it predicts."""
        return max_probability(logits)

    def decide(self, k: int, logits: torch.Tensor, memory: Any = None) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """For the samples still inside (the rows of ``logits``, exit ``k``'s): which leave, with which class, and
        the memory to carry to exit ``k + 1`` (tensors with a row per sample; the caller keeps the rows of the
        samples that stay)."""
        score, prediction = self.score(k, logits)
        threshold = self.thresholds[k] if k < len(self.thresholds) else ALWAYS
        return (score > threshold if self.strict else score >= threshold), prediction, memory

    def exit_scores(self, logits: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Every sample's score at every exit, as if none had left (what threshold fitting sorts)."""
        return [self.score(k, l)[0] for k, l in enumerate(logits)]

    def with_thresholds(self, thresholds: Sequence[float]) -> 'ExitRule':
        """The same rule with other thresholds."""
        rule = copy.copy(self)
        rule.thresholds = _threshold_list(thresholds)
        return rule

    def fit(self, logits, fractions: Sequence[float]) -> 'ExitRule':
        """The same rule with thresholds fitted on held-out ``logits`` to send ``fractions[k]`` of them to exit k
        (``fit_thresholds``)."""
        return self.with_thresholds(fit_thresholds(logits, fractions, self))


def _as_rule(thresholds: Union[Sequence[float], ExitRule], fallback: str, strict: bool) -> ExitRule:
    if not isinstance(thresholds, ExitRule):
        return ExitRule(thresholds, fallback, strict)
    if (fallback, strict) != ('last', False):
        raise ValueError('pass fallback and strict to the ExitRule, not next to it')
    return thresholds


def _keep_rows(memory, keep: torch.Tensor):
    if memory is None:
        return None
    if isinstance(memory, torch.Tensor):
        return memory[keep]
    return type(memory)(_keep_rows(m, keep) for m in memory)


def _answer(answers, flagged: List[int], rows: Optional[torch.Tensor], prediction: torch.Tensor, k: int,
            logits: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Record that the samples at batch positions ``rows`` leave at exit ``k`` with ``prediction``, answered by
    ``logits``; ``rows`` None: every sample, none of which left before (``answers`` is None then). Returns the
    predictions and exits (``answers``, updated, or new tensors) and adds the samples whose logits are not finite to
    ``flagged``."""
    maxima = logits.amax(1).tolist()
    if rows is None:
        flagged += [i for i, m in enumerate(maxima) if not math.isfinite(m)]
        predictions = prediction.to(device=device, dtype=torch.long)  # no copy when it is one already
        return predictions, torch.full((len(maxima),), k, dtype=torch.long, device=device)
    predictions, exits = answers
    predictions[rows], exits[rows] = prediction, k
    if not all(map(math.isfinite, maxima)):
        flagged += [i for i, m in zip(rows.tolist(), maxima) if not math.isfinite(m)]
    return predictions, exits


def run_exit_rule(rule: ExitRule, exit_logits: Iterator[torch.Tensor], num_exits: int,
                  num_samples: Optional[int] = None, device=None) -> EarlyExitResult:
    """Apply ``rule`` exit by exit: the one loop behind ``simulate_early_exit`` and ``early_exit``.

    ``exit_logits`` is a generator like ``model.iter_exits(x)``: it yields exit k's logits for the samples still
    inside, in their original order, and takes ``send(keep)`` (the rows to keep, ``None`` when all stay) before the
    next exit. ``num_samples`` and ``device`` default to the first exit's logits'. Returns predictions, exits,
    samples per stage and non-finite flags; ``.macs`` is left to the caller.
    """
    rule.check(num_exits)
    # Right after a stage, each small tensor op costs many times what it costs alone (the stage has evicted it from
    # the caches): at batch 1 the bookkeeping between exits sums to a visible share of a stage. So it runs few ops:
    # counts and finiteness are read from Python lists, ``inside`` (the batch positions of the samples still inside,
    # in order) and ``answers`` (predictions and exits) wait until the first samples leave, and nothing is indexed
    # at an exit that no sample leaves.
    logits = next(exit_logits)
    num_samples = len(logits) if num_samples is None else num_samples
    device = logits.device if device is None else device
    inside = answers = None
    remaining = num_samples
    flagged = []  # batch positions whose answering logits hold a NaN or +Inf, or are all -Inf
    logit_sum = memory = None
    samples_per_stage = []
    try:
        for k in range(num_exits):
            samples_per_stage.append(remaining)
            last = k == num_exits - 1
            leave, prediction, memory = rule.decide(k, logits, memory)
            if rule.fallback == 'ensemble':
                logit_sum = logits.float() if logit_sum is None else logit_sum + logits.float()
            leaving = remaining if last and rule.fallback == 'last' else sum(leave.tolist())
            if leaving == remaining:
                answers = _answer(answers, flagged, inside, prediction, k, logits, device)
                remaining = 0
                break
            keep = None
            if leaving:
                if inside is None:
                    inside = torch.arange(num_samples, device=device)
                    unanswered = torch.full((num_samples,), -1, dtype=torch.long, device=device)
                    answers = unanswered, unanswered.clone()  # predictions, exits
                answers = _answer(answers, flagged, inside[leave], prediction[leave], k, logits[leave], device)
                keep = torch.nonzero(~leave).squeeze(1)
                inside, remaining = inside[keep], remaining - leaving
                memory, logit_sum = _keep_rows(memory, keep), _keep_rows(logit_sum, keep)
            if last:
                break
            logits = exit_logits.send(keep)  # None when all stay: no copy
    finally:
        exit_logits.close()
    if remaining:
        answers = _answer(answers, flagged, inside, logit_sum.argmax(1), num_exits, logit_sum, device)
    predictions, exits = answers
    nonfinite = torch.zeros(num_samples, dtype=torch.bool, device=device)
    if flagged:
        flagged.sort()
        nonfinite[flagged] = True
        warnings.warn(f'{len(flagged)} of {num_samples} samples got non-finite logits (NaN or Inf: check the input) '
                      f'at the exit that answered, e.g. batch positions {flagged[:10]}; their predictions mean '
                      'nothing (result.nonfinite flags them)', RuntimeWarning, stacklevel=3)
    return EarlyExitResult(predictions, exits, None, samples_per_stage, nonfinite)


def _precomputed_exits(logits: List[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``iter_exits`` over logits computed beforehand: yields each exit's rows of the samples still inside."""
    rows = None
    for exit_logits in logits:
        keep = yield exit_logits if rows is None else exit_logits[rows]
        if keep is not None:
            rows = keep if rows is None else rows[keep]


def geometric_fractions(q: float, num_exits: int) -> List[float]:
    """MSDNet's exit distribution: share of exit k proportional to ``q ** k`` (k = 1..num_exits), normalised.
    ``q < 1`` favours early exits, ``q > 1`` late ones."""
    if q <= 0:
        raise ValueError(f'q must be positive, got {q}')
    weights = np.power(float(q), np.arange(1, num_exits + 1, dtype=np.float64))
    return (weights / weights.sum()).tolist()


def fit_thresholds(logits, fractions: Sequence[float], policy: Optional[ExitRule] = None) -> List[float]:
    """Thresholds that send the share ``fractions[k]`` of the (held-out) samples to exit k, as the MSDNet authors'
    ``dynamic_eval_find_threshold``.

    For k < K-1: among the samples that have not exited yet, sorted by confidence at exit k (descending), ``T[k]``
    is the confidence of the ``floor(N * fractions[k])``-th; every sample with confidence ``>= T[k]`` exits there.
    If that count is 0 (or fewer samples remain), ``T[k] = 1e8`` and nobody exits at k. ``T[K-1] = -1e8``.
    The confidence is the max softmax probability (the authors'), or ``policy``'s score (``ExitRule.exit_scores``,
    e.g. a ``dynzoo.policies.ExitPolicy``'s), and a threshold is at least ``policy.min_threshold``; with a discrete
    score (patience) the realised shares can differ from the targets.
    """
    logits = _as_logit_list(logits)
    num_exits, num_samples = len(logits), logits[0].shape[0]
    if any(torch.isnan(l).any() for l in logits):
        raise ValueError('fit_thresholds needs held-out logits without NaN (a NaN score sorts arbitrarily and shifts '
                         'every threshold after it): check the model and the data they came from')
    if len(fractions) != num_exits:
        raise ValueError(f'need one target fraction per exit ({num_exits}), got {len(fractions)}')
    fractions = np.asarray(fractions, dtype=np.float64)
    if (fractions < 0).any() or not math.isclose(fractions.sum(), 1.0, rel_tol=1e-6):
        raise ValueError(f'fractions must be non-negative and sum to 1, got {fractions.tolist()}')
    exited = torch.zeros(num_samples, dtype=torch.bool)
    thresholds = [NEVER] * (num_exits - 1) + [ALWAYS]
    policy = ExitRule(()) if policy is None else policy
    scores = policy.exit_scores(logits)
    for k in range(num_exits - 1):
        confidence = scores[k]
        target = math.floor(num_samples * fractions[k])
        order = torch.argsort(confidence, descending=True, stable=True)
        remaining = order[~exited[order]]
        if 0 < target <= len(remaining):
            thresholds[k] = max(policy.min_threshold, confidence[remaining[target - 1]].item())
            exited |= confidence >= thresholds[k]
    return thresholds


def stage_macs(cascade_macs: Sequence[float]) -> List[float]:
    """Cost of stage k plus head k for one sample, from cascade per-exit MACs (stages and heads 1..k)."""
    return [float(c) - float(p) for c, p in zip(cascade_macs, [0.0, *cascade_macs[:-1]])]


def stage_flops(cascade_flops: Sequence[float]) -> List[float]:
    """Deprecated alias of ``stage_macs``."""
    _deprecated('stage_flops', 'stage_macs')
    return stage_macs(cascade_flops)


def _spent(samples_per_stage: Sequence[int], cascade_macs: Sequence[float]) -> float:
    return sum(n * c for n, c in zip(samples_per_stage, stage_macs(cascade_macs)))


def simulate_early_exit(logits, thresholds: Union[Sequence[float], ExitRule], macs: Optional[Sequence[float]] = None,
                        fallback: str = 'last', strict: bool = False,
                        flops: Optional[Sequence[float]] = None) -> EarlyExitResult:
    """The exit rule applied to precomputed logits of every exit (what the authors' evaluation code does).

    ``thresholds``: per-exit thresholds, or an ``ExitRule`` (which then carries fallback and strictness).
    ``fallback='last'``: the last exit answers for every remaining sample (its threshold, if given, is ignored);
    ``'ensemble'``: the last exit must pass its threshold too, otherwise the mean of all logits answers (SCAN).
    ``strict``: exit when confidence ``> threshold`` (SCAN) instead of ``>=`` (MSDNet). ``macs``: cascade per-exit
    costs (``per_exit_macs(model, scope='cascade')``), to fill ``.macs``; ``flops`` is its deprecated alias.
    """
    macs = _renamed(macs, flops, 'simulate_early_exit')
    logits = _as_logit_list(logits)
    num_exits, num_samples = len(logits), logits[0].shape[0]
    rule = _as_rule(thresholds, fallback, strict)
    if macs is not None:
        macs = _check_macs(macs, num_exits)
    result = run_exit_rule(rule, _precomputed_exits(logits), num_exits, num_samples, logits[0].device)
    if macs is not None:
        result.macs = _spent(result.samples_per_stage, macs)
    return result


def _check_macs(macs: Sequence[float], num_exits: int) -> List[float]:
    macs = [float(m) for m in macs]
    if len(macs) != num_exits:
        raise ValueError(f'need one cascade MACs value per exit ({num_exits}), got {len(macs)}')
    if not all(math.isfinite(m) and m >= 0 for m in macs):
        raise ValueError(f'macs must be finite non-negative costs, got {macs}')
    if any(b < a for a, b in zip(macs, macs[1:])):
        raise ValueError(f'macs must be cascade costs (non-decreasing with the exit), got {macs}')
    return macs


def _check_early_exit_model(model) -> None:
    if isinstance(getattr(model, '_orig_mod', None), MultiExitNetwork):
        raise ValueError('early exit runs the model stage by stage (iter_exits), which a torch.compile wrapper does '
                         'not expose: pass the uncompiled model (model._orig_mod)')
    if not isinstance(model, MultiExitNetwork):
        raise ValueError(f'early_exit needs a multi-exit model (MSDNet, SCAN / BYOT, *_mc); {type(model).__name__} '
                         'has one exit')
    if model.training:
        raise ValueError('early_exit needs the model in eval mode (batch statistics would change as samples leave): '
                         'call model.eval() first')
    if model.num_classes == 0:
        raise ValueError('early exit needs class logits, but this model has no classifiers (num_classes=0: its exits '
                         'return pre-logit features); build it with num_classes or call model.reset_classifier(n)')


@torch.no_grad()
def early_exit(model, x: torch.Tensor, thresholds: Union[Sequence[float], ExitRule],
               macs: Optional[Sequence[float]] = None, fallback: str = 'last', strict: bool = False,
               flops: Optional[Sequence[float]] = None) -> EarlyExitResult:
    """Real early exit: run the exits in order through ``model.iter_exits(x)`` and drop each sample from the batch
    as soon as it exits, so later stages run only on the samples still inside.

    Same rule and arguments as ``simulate_early_exit``, and the same predictions and exits as it gives on
    ``model(x)``, up to float rounding: later stages run on fewer samples, whose kernels may round differently, so a
    sample whose score lies within rounding (about 1e-6) of a threshold may leave one exit apart. ``.macs`` counts the multiply-adds
    actually spent: for each stage k, (samples that ran stage k) x (stage k + head k), from ``per_exit_macs(model,
    scope='cascade')`` differences: the stages as ``iter_exits`` runs them (MSDNet's lazily: work that only later
    exits use runs when the next stage starts) and the head of every exit a sample was tried at.
    The per-exit costs are counted on the first call for a model and input size and cached (``dynzoo.flops``): the
    count runs the model on one image, which forward hooks see too; ``macs`` (cascade, at ``x``'s image size)
    overrides them. The model must be in eval mode and have classifiers.
    """
    macs = _renamed(macs, flops, 'early_exit')
    _check_early_exit_model(model)
    rule = _as_rule(thresholds, fallback, strict)
    if macs is not None:
        macs = _check_macs(macs, model.num_exits)
    elif isinstance(x, torch.Tensor):  # looked up before the stages run, which evict the lookup from the CPU caches
        macs = _cached_per_exit_macs(model, input_size=tuple(x.shape[1:]))
    # run_exit_rule checks the rule and iter_exits the input, each once, before any work: the input is known to
    # fit the model before its costs are counted (on the first call for a model and size).
    result = run_exit_rule(rule, model.iter_exits(x), model.num_exits)
    if macs is None:
        macs = per_exit_macs(model, input_size=tuple(x.shape[1:]), scope='cascade')
    result.macs = _spent(result.samples_per_stage, macs)
    return result


def evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs: Optional[Sequence[float]] = None,
                      qs: Optional[Sequence[float]] = None, flops: Optional[Sequence[float]] = None,
                      policy: Optional[ExitRule] = None) -> List[Dict]:
    """MSDNet's budgeted-batch evaluation: for each ``q`` (default ``p / 20`` for p = 1..39) fit thresholds on the
    held-out logits for the geometric exit distribution, apply them to the test logits, and report accuracy and
    expected MACs ``sum_k (n_k / N) * macs[k]`` (``macs``: cascade per-exit costs, e.g. ``per_exit_macs(model)``;
    the MSDNet authors used their own counter, ``per_exit_macs(model, convention='authors')``; ``flops`` is the
    deprecated alias). Labels must be one class index per sample of their split. ``policy``: the exit criterion
    (a ``dynzoo.policies.ExitPolicy``: entropy, margin, patience, temperatures; its thresholds are refitted per q);
    default the max softmax probability, as the authors.

    Returns one dict per operating point: ``q``, ``accuracy``, ``expected_macs``, ``exit_fractions`` (realised on
    the test split), ``target_fractions``, ``val_exit_fractions`` and ``thresholds``.
    """
    macs = _renamed(macs, flops, 'evaluate_budgeted')
    if macs is None:
        raise TypeError('evaluate_budgeted needs the cascade per-exit costs: macs=dynzoo.per_exit_macs(model)')
    val_logits, test_logits = _as_logit_list(val_logits), _as_logit_list(test_logits)
    num_exits = len(val_logits)
    if len(test_logits) != num_exits:
        raise ValueError(f'held-out logits have {num_exits} exits, test logits {len(test_logits)}')
    macs = _check_macs(macs, num_exits)
    num_classes = test_logits[0].shape[1]
    if val_logits[0].shape[1] != num_classes:
        raise ValueError(f'held-out logits have {val_logits[0].shape[1]} classes, test logits {num_classes}: both '
                         'must come from the same model')
    val_labels = _check_labels(val_labels, len(val_logits[0]), val_logits[0].shape[1], 'val_labels')
    test_labels = _check_labels(test_labels, len(test_logits[0]), num_classes, 'test_labels')
    qs = [p / 20 for p in range(1, 40)] if qs is None else qs
    rows = []
    policy = ExitRule(()) if policy is None else policy
    outcomes = num_exits + (policy.fallback == 'ensemble')
    for q in qs:
        target = geometric_fractions(q, num_exits)
        rule = policy.fit(val_logits, target)
        val_result = simulate_early_exit(val_logits, rule)
        result = simulate_early_exit(test_logits, rule, macs)
        rows.append(MacsRow(q=q, accuracy=result.accuracy(test_labels), expected_macs=result.mean_macs,
                           exit_fractions=result.exit_fractions(outcomes), target_fractions=target,
                           val_exit_fractions=val_result.exit_fractions(outcomes), thresholds=rule.thresholds))
    return rows


def genetic_threshold_search(logits, labels, macs: Optional[Sequence[float]] = None, budget: Optional[float] = None,
                             trade_off: float = 0.1, population_size: int = 64, generations: int = 60,
                             mutation_scale: float = 0.05, elite: int = 2, seed: int = 0,
                             flops: Optional[Sequence[float]] = None) -> ThresholdSearchResult:
    """Search exit thresholds with a genetic algorithm, as the SCAN paper proposes. The SCAN authors never released
    theirs: this is dynzoo's own implementation, reproducible for a given ``seed``.

    A genome holds the thresholds of exits 1..K-1 in [0, 1.01] (above 1: nobody exits there); the last exit takes
    every remaining sample (``ExitRule``'s default ``>=`` rule, evaluated for the whole population at once). Fitness
    on (``logits``, ``labels``), with ``macs`` the cascade per-exit costs (``flops``: deprecated alias):

    * with ``budget`` (expected MACs per sample): accuracy when the expected cost is within the budget, otherwise
      ``-(cost / budget)`` (every over-budget genome ranks below every feasible one);
    * without: ``accuracy - trade_off * expected_macs / macs[-1]``.

    The first generation holds the K single-exit policies (everyone leaves at exit k) and random genomes; tournament
    selection (3), uniform crossover, Gaussian mutation and ``elite`` survivors per generation. Because of the seeded
    single-exit genomes and elitism, the result is never worse than the best single exit under the same budget.
    """
    macs = _renamed(macs, flops, 'genetic_threshold_search')
    if macs is None:
        raise TypeError('genetic_threshold_search needs the cascade per-exit costs: macs=dynzoo.per_exit_macs(model)')
    logits = _as_logit_list(logits)
    num_exits = len(logits)
    macs = np.asarray(_check_macs(macs, num_exits))
    labels = _check_labels(labels, len(logits[0]), logits[0].shape[1]).cpu().numpy()
    if budget is not None and not budget > 0:
        raise ValueError(f'budget must be a positive number of MACs per sample, got {budget}')
    if population_size < max(num_exits, elite + 2):
        raise ValueError(f'population_size must be at least {max(num_exits, elite + 2)}, got {population_size}')
    confidence_and_class = [max_probability(l) for l in logits]
    confidence = np.stack([c.values.numpy() for c in confidence_and_class])
    correct = np.stack([c.indices.numpy() == labels for c in confidence_and_class])
    top = 1.01
    rng = np.random.default_rng(seed)

    def assess(genomes: np.ndarray):
        passed = confidence[None, :-1] >= genomes[:, :, None]
        passed = np.concatenate([passed, np.ones_like(passed[:, :1])], axis=1)
        exits = passed.argmax(axis=1)
        accuracy = np.take_along_axis(correct[None], exits[:, None], axis=1)[:, 0].mean(axis=1)
        cost = macs[exits].mean(axis=1)
        if budget is None:
            fitness = accuracy - trade_off * cost / macs[-1]
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
    ``x`` (real early exit through ``iter_exits``, same predictions). ``.macs`` holds the authors' relative cost,
    not multiply-adds (0.32 / 0.53 / 0.76 / 1.0 per exit, 1.07 for the ensemble, summed over samples), so
    ``1 / result.mean_macs`` is their "acceleration ratio"; for multiply-adds, use ``early_exit(...,
    fallback='ensemble', strict=True)``.
    """
    rule = ExitRule(thresholds, fallback='ensemble', strict=True)
    if x is None:
        logits_or_model = _as_logit_list(logits_or_model)
        num_exits = len(logits_or_model)
    else:
        _check_early_exit_model(logits_or_model)
        num_exits = logits_or_model.num_exits
    if len(thresholds) != num_exits:  # one fewer would make the last exit take everyone: no ensemble ever
        raise ValueError(f'scan_predict needs thresholds for all {num_exits} exits (the ensemble answers where none '
                         f'fires), got {len(thresholds)}')
    if len(relative_costs) != num_exits + 1:
        raise ValueError(f'relative_costs needs one value per exit plus one for the ensemble ({num_exits + 1}), '
                         f'got {len(relative_costs)}')
    if x is None:
        result = simulate_early_exit(logits_or_model, rule)
    else:
        with torch.no_grad():
            result = run_exit_rule(rule, logits_or_model.iter_exits(x), num_exits)
    result.macs = float(torch.as_tensor(relative_costs, dtype=torch.float64)[result.exits.cpu()].sum())
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
