"""Exit policies: which criterion decides that a sample leaves, optional per-exit temperatures, and thresholds fitted
to an exit distribution or to a MACs budget.

MSDNet and SCAN exit on the max softmax probability. BranchyNet (Teerapittayanon et al., 2016) exits when the
entropy of the softmax is low; the gap between the two largest probabilities (margin) is a common alternative;
PABEE (Zhou et al., 2020) exits once enough consecutive exits agree on the class. Guo et al. (2017) fit one
temperature per classifier on held-out logits; here every exit gets its own, applied before any criterion.

Every criterion is a score where higher leaves sooner, compared with a per-exit threshold (``>=``, or ``>`` with
``strict``), so that one exit loop (``dynzoo.inference.run_exit_rule``) and one threshold fit serve them all:

* ``max_prob``: the max softmax probability (the default; identical to ``ExitRule``);
* ``entropy``: minus the entropy of the softmax, in nats: a threshold ``-h`` lets a sample leave when its
  entropy is ``<= h`` (positive thresholds are refused: they would read as entropy bounds and let nobody out);
* ``margin``: top-1 minus top-2 probability;
* ``patience``: how many consecutive earlier exits predicted the class that this exit predicts (PABEE's counter:
  0 at the first exit, reset to 0 when the class changes). A threshold is a patience, a whole number ``>= 1``:
  patience p leaves once p + 1 consecutive exits agree. PABEE uses one patience for all layers; dynzoo allows
  one per exit. Temperatures do not change it (they keep the arg-max).

The class a sample leaves with is always the arg-max of that exit's softmax.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .inference import (ALWAYS, NEVER, ExitRule, _as_logit_list, _check_labels, _check_macs, fit_thresholds,
                        geometric_fractions, max_probability, simulate_early_exit)

__all__ = ['CRITERIA', 'ExitPolicy', 'fit_temperatures', 'fit_to_budget', 'expected_calibration_error']

CRITERIA = ('max_prob', 'entropy', 'margin', 'patience')


class ExitPolicy(ExitRule):
    """An ``ExitRule`` with a choice of ``criterion`` (see the module docstring) and optional per-exit
    ``temperatures`` (logits are divided by ``temperatures[k]`` at exit k before the criterion; one positive value
    per exit). ``thresholds``, ``fallback`` and ``strict`` as ``ExitRule``; a policy without thresholds can be
    fitted (``fit``: the MSDNet geometric protocol on its score; ``fit_to_budget``) but not run. A fitted patience is
    at least 1 (agreement is required), so early exits can take less than their share.

    ``decide(k, logits, memory)`` takes torch tensors or numpy arrays (rows: the samples still inside) and answers in
    the same kind, so a runner outside torch (ONNX Runtime) applies the same rule; ``to_dict`` / ``ExitPolicy(**d)``
    carry it as JSON.
    """

    def __init__(self, criterion: str = 'max_prob', thresholds: Sequence[float] = (),
                 temperatures: Optional[Sequence[float]] = None, fallback: str = 'last', strict: bool = False):
        if criterion not in CRITERIA:
            raise ValueError(f'unknown exit criterion {criterion!r}: choose one of {", ".join(CRITERIA)}')
        super().__init__(thresholds, fallback, strict)
        self.criterion = criterion
        self.min_threshold = 1.0 if criterion == 'patience' else -math.inf
        self.temperatures = None
        if temperatures is not None:
            self.temperatures = [float(t) for t in temperatures]
            if not all(math.isfinite(t) and t > 0 for t in self.temperatures):
                raise ValueError(f'temperatures must be positive and finite (one per exit), got {self.temperatures}')

    def __repr__(self) -> str:
        return (f'ExitPolicy({self.criterion!r}, thresholds={self.thresholds}, temperatures={self.temperatures}, '
                f'fallback={self.fallback!r}, strict={self.strict})')

    def to_dict(self) -> Dict[str, Any]:
        return dict(criterion=self.criterion, thresholds=list(self.thresholds), temperatures=self.temperatures,
                    fallback=self.fallback, strict=self.strict)

    def with_thresholds(self, thresholds: Sequence[float]) -> 'ExitPolicy':
        return ExitPolicy(self.criterion, thresholds, self.temperatures, self.fallback, self.strict)

    def check(self, num_exits: int) -> None:
        if not self.thresholds:
            raise ValueError(f'this {self.criterion} policy has no thresholds: pass thresholds= or fit them '
                             '(policy.fit, dynzoo.policies.fit_to_budget)')
        self._check_temperatures(num_exits)
        if len(self.thresholds) not in (num_exits - 1, num_exits):
            raise ValueError(f'the {self.criterion} policy needs {num_exits} thresholds (or {num_exits - 1}: the '
                             f'last exit takes every remaining sample), got {len(self.thresholds)}')
        super().check(num_exits)
        applied = self.thresholds[:num_exits - (self.fallback == 'last')]
        if self.criterion == 'entropy' and any(0 < t < NEVER for t in applied):
            raise ValueError(f'entropy thresholds bound minus the entropy (higher leaves sooner), so they are <= 0: '
                             f'to leave when the entropy is <= h, pass -h; got {self.thresholds}')
        if self.criterion == 'patience' and not all(t >= 1 and float(t).is_integer() for t in applied):
            raise ValueError(f'patience thresholds are whole numbers >= 1 (consecutive earlier exits that must agree '
                             f'with this one), got {self.thresholds}')

    def _check_temperatures(self, num_exits: int) -> None:
        if self.temperatures is not None and len(self.temperatures) != num_exits:
            raise ValueError(f'expected one temperature per exit ({num_exits}), got {len(self.temperatures)}')

    def _scaled(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.temperatures is None else logits.float() / self.temperatures[k]

    def _score(self, k: int, logits: torch.Tensor, memory) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        logits = self._scaled(k, logits)
        if self.criterion == 'max_prob':
            score, prediction = max_probability(logits)
            return score, prediction, memory
        probabilities = torch.softmax(logits.float(), dim=1)
        prediction = probabilities.argmax(dim=1)
        if self.criterion == 'entropy':
            return torch.special.xlogy(probabilities, probabilities).sum(dim=1), prediction, memory
        if self.criterion == 'margin':
            top = probabilities.topk(min(2, probabilities.shape[1]), dim=1).values
            return top[:, 0] - top[:, -1], prediction, memory
        agree = torch.zeros_like(prediction) if memory is None else torch.where(prediction == memory[0],
                                                                                memory[1] + 1, 0)
        return agree.float(), prediction, (prediction, agree)

    def score(self, k: int, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.criterion == 'patience':
            raise ValueError('a patience score depends on the earlier exits: use decide() or exit_scores()')
        return self._score(k, logits, None)[:2]

    def exit_scores(self, logits: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self._check_temperatures(len(logits))
        scores, memory = [], None
        for k, exit_logits in enumerate(logits):
            score, _, memory = self._score(k, exit_logits, memory)
            scores.append(score)
        return scores

    def decide(self, k: int, logits, memory: Any = None):
        """For the samples still inside (the rows of exit ``k``'s ``logits``, torch or numpy): which leave, with
        which class, and the memory to carry to exit ``k + 1`` (None, or a tuple of per-sample rows: keep the rows
        of the samples that stay)."""
        if isinstance(logits, np.ndarray):
            memory = None if memory is None else tuple(torch.from_numpy(np.asarray(m)) for m in memory)
            leave, prediction, memory = self.decide(k, torch.from_numpy(logits), memory)
            return leave.numpy(), prediction.numpy(), None if memory is None else tuple(m.numpy() for m in memory)
        score, prediction, memory = self._score(k, logits, memory)
        threshold = self.thresholds[k] if k < len(self.thresholds) else ALWAYS
        return (score > threshold if self.strict else score >= threshold), prediction, memory


def fit_temperatures(logits, labels, max_iter: int = 100) -> List[float]:
    """One temperature per exit, minimising the negative log-likelihood of ``softmax(logits[k] / T)`` on held-out
    ``logits`` (Guo et al.'s temperature scaling, per exit): L-BFGS on ``log T`` (so T stays positive), in float64,
    from T = 1."""
    logits = _as_logit_list(logits)
    labels = _check_labels(labels, len(logits[0]), logits[0].shape[1])
    if not all(torch.isfinite(l).all() for l in logits):
        raise ValueError('fit_temperatures needs finite logits (a NaN or Inf would make every temperature NaN)')
    temperatures = []
    with torch.enable_grad():
        for exit_logits in logits:
            exit_logits = exit_logits.detach().double()
            log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn='strong_wolfe')

            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(exit_logits / log_t.exp(), labels)
                loss.backward()
                return loss

            optimizer.step(closure)
            temperatures.append(float(log_t.detach().exp()))
    return temperatures


def fit_to_budget(logits, macs: Sequence[float], budget: float, policy: Optional[ExitPolicy] = None,
                  q_range: Tuple[float, float] = (1e-3, 1e3), points: int = 49, steps: int = 20) -> ExitPolicy:
    """``policy`` (default max probability) with thresholds whose expected cost on the held-out ``logits`` is at
    most ``budget`` MACs per sample, and as close to it as the search finds (``macs``: cascade per-exit costs).

    dynzoo's protocol, for any criterion: MSDNet's geometric exit distribution (``policy.fit``) at ``points``
    log-spaced q in ``q_range``; the q whose held-out cost is the highest within the budget is refined by bisection
    on ``log q`` towards the next grid q (``steps`` halvings). The cost need not grow with q (with patience it does
    not: shares the first exits cannot take fall to the last), hence the grid. This matches a cost, it does not
    search for the most accurate thresholds at that cost (``genetic_threshold_search`` does, for max probability).
    Below the grid, the point where every sample leaves at exit 1 (q = 0: the geometric shares round one sample
    per exit short of it) is tried first; a budget below every point's cost is refused.
    """
    logits = _as_logit_list(logits)
    macs = _check_macs(macs, len(logits))
    policy = ExitPolicy() if policy is None else policy
    if not budget > 0:
        raise ValueError(f'budget must be a positive number of MACs per sample, got {budget}')

    num_exits = len(logits)

    def fitted(log_q: float) -> Tuple[ExitPolicy, float]:
        shares = [1.0] + [0.0] * (num_exits - 1) if log_q == -math.inf else geometric_fractions(math.exp(log_q),
                                                                                                num_exits)
        rule = policy.fit(logits, shares)
        return rule, simulate_early_exit(logits, rule, macs).mean_macs

    grid = [-math.inf, *np.linspace(math.log(q_range[0]), math.log(q_range[1]), points)]
    fits = [fitted(log_q) for log_q in grid]
    within = [i for i, (_, cost) in enumerate(fits) if cost <= budget]
    if not within:
        raise ValueError(f'budget {budget:.4g} MACs is below the cheapest {policy.criterion} operating point on '
                         f'these logits ({min(cost for _, cost in fits):.4g} MACs per sample)')
    i = max(within, key=lambda j: fits[j][1])
    best, best_cost = fits[i]
    if 0 < i < len(grid) - 1 and fits[i + 1][1] > budget:
        low, high = grid[i], grid[i + 1]
        for _ in range(steps):
            middle = (low + high) / 2
            rule, cost = fitted(middle)
            if cost <= budget:
                low = middle
                if cost > best_cost:
                    best, best_cost = rule, cost
            else:
                high = middle
    return best


def expected_calibration_error(logits: torch.Tensor, labels, bins: int = 15) -> float:
    """ECE of one exit (Guo et al.): the sample-weighted mean, over ``bins`` equal-width bins of the max softmax
    probability, of |accuracy - mean confidence| in the bin."""
    if not isinstance(logits, (list, tuple)):
        logits = torch.as_tensor(logits)
    if isinstance(logits, (list, tuple)) or logits.dim() != 2:
        raise ValueError('expected_calibration_error takes one exit\'s N x C logits: for a multi-exit model, one call '
                         'per exit, e.g. [expected_calibration_error(l, labels) for l in logits]')
    labels = _check_labels(labels, len(logits), logits.shape[1])
    confidence, prediction = max_probability(logits)
    confidence, correct = confidence.double(), (prediction == labels).double()
    which = torch.clamp((confidence * bins).ceil().long() - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.double().mean().item() * abs(correct[members].mean().item()
                                                          - confidence[members].mean().item())
    return error
