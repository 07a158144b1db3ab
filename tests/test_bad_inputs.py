"""Bad or unusual inputs, one row per case: each gives the right result or an error that names the cause and the fix.

A row is ``Case(id, call, raises=..., match=...)`` for an expected error (``match``: a regular expression the message
must contain), or ``Case(id, call, check=...)`` for a call that must succeed (``check`` asserts on its result).
Rows are grouped by area; a new case costs one row.
"""
import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Type

import pytest


@dataclass
class Case:
    id: str
    call: Callable[[], Any]
    raises: Optional[Type[BaseException]] = None
    match: str = ''
    check: Optional[Callable[[Any], None]] = None


CASES = []

# ---------------------------------------------------------------------------------------------------------------------
# Models and their inputs
# ---------------------------------------------------------------------------------------------------------------------
CASES += [
]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, pretrained weights and export folders
# ---------------------------------------------------------------------------------------------------------------------
CASES += [
]


# ---------------------------------------------------------------------------------------------------------------------
# Early exit, thresholds and budgeted evaluation
# ---------------------------------------------------------------------------------------------------------------------
import functools  # noqa: E402 (imported here: each section keeps its own imports, so sections merge cleanly)

import torch  # noqa: E402

import dynzoo  # noqa: E402
from dynzoo.inference import NEVER, simulate_early_exit  # noqa: E402


@functools.lru_cache(maxsize=None)
def _lin5():
    torch.manual_seed(0)
    return dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).eval()


def _exit_logits(num_samples=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(num_samples, 10, generator=generator) for _ in range(3)]


def _budgeted(val_labels, test_labels):
    return lambda: dynzoo.evaluate_budgeted(_exit_logits(), val_labels, _exit_logits(seed=1), test_labels,
                                            [1, 2, 3], qs=[1.0])


def _warns_and_flags(call, flagged):
    """``call()`` warns about non-finite logits and its result flags exactly the samples ``flagged``."""
    def run():
        with pytest.warns(RuntimeWarning, match='non-finite logits.*result.nonfinite'):
            return call()
    return Case(f'nonfinite-{call.__name__}', run, check=lambda result: _flags(result, flagged))


def _flags(result, flagged):
    assert torch.nonzero(result.nonfinite).squeeze(1).tolist() == flagged


def early_exit_nan_and_inf_inputs():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[1, 0, 5, 5], x[3, 2] = float('nan'), float('inf')
    return dynzoo.early_exit(_lin5(), x, thresholds=[0.5] * 4)


def simulated_nan_logits():
    logits = _exit_logits(4)
    logits[-1][2, 3] = float('nan')
    logits[0][0, 1] = float('-inf')  # one -inf logit is a valid probability of 0: not flagged
    return simulate_early_exit(logits, [NEVER, NEVER])


CASES += [
    Case('budgeted-single-test-label', _budgeted(torch.arange(20) % 10, torch.tensor(3)), raises=ValueError,
         match=r'test_labels must hold one class index per sample \(20\), got shape \(\)'),
    Case('budgeted-val-labels-wrong-length', _budgeted(torch.arange(19) % 10, torch.arange(20) % 10),
         raises=ValueError, match=r'val_labels must hold one class index per sample \(20\), got shape \(19,\)'),
    Case('budgeted-float-labels', _budgeted(torch.arange(20) % 10, (torch.arange(20) % 10).float()),
         raises=ValueError, match='integer class indices, got dtype torch.float32.*long'),
    Case('budgeted-labels-out-of-range', _budgeted(torch.arange(20) % 10, torch.arange(20)), raises=ValueError,
         match=r'test_labels must lie in 0..9 \(the logits have 10 classes\), got 0..19'),
    Case('accuracy-single-label', lambda: simulate_early_exit(_exit_logits(), [0.5, 0.5]).accuracy(torch.tensor(1)),
         raises=ValueError, match='one class index per sample'),
    Case('early-exit-nan-threshold', lambda: dynzoo.early_exit(_lin5(), torch.zeros(2, 3, 32, 32),
                                                               [0.5, float('nan'), 0.5, 0.5]),
         raises=ValueError, match='thresholds must not be NaN'),
    Case('simulated-nan-threshold', lambda: simulate_early_exit(_exit_logits(), [float('nan'), 0.5]),
         raises=ValueError, match='thresholds must not be NaN'),
    _warns_and_flags(early_exit_nan_and_inf_inputs, [1, 3]),
    _warns_and_flags(simulated_nan_logits, [2]),
    Case('policy-unknown-criterion', lambda: dynzoo.ExitPolicy('max_probability'), raises=ValueError,
         match="unknown exit criterion 'max_probability': choose one of max_prob, entropy, margin, patience"),
    Case('policy-zero-temperature', lambda: dynzoo.ExitPolicy('entropy', temperatures=[1.0, 0.0, 1.0]),
         raises=ValueError, match=r'temperatures must be positive and finite \(one per exit\), got \[1.0, 0.0, 1.0\]'),
    Case('policy-negative-temperature', lambda: dynzoo.ExitPolicy(temperatures=[-1.0, 1.0, 1.0]), raises=ValueError,
         match='temperatures must be positive and finite'),
    Case('policy-nan-temperature', lambda: dynzoo.ExitPolicy(temperatures=[1.0, float('nan'), 1.0]),
         raises=ValueError, match='temperatures must be positive and finite'),
    Case('policy-temperatures-wrong-count', lambda: simulate_early_exit(
        _exit_logits(), dynzoo.ExitPolicy('margin', [0.5, 0.5], temperatures=[1.0, 2.0])), raises=ValueError,
         match=r'expected one temperature per exit \(3\), got 2'),
    Case('policy-temperatures-wrong-count-fit', lambda: dynzoo.ExitPolicy('entropy', temperatures=[1.0]).fit(
        _exit_logits(), [0.5, 0.3, 0.2]), raises=ValueError, match=r'expected one temperature per exit \(3\), got 1'),
    Case('policy-patience-zero', lambda: simulate_early_exit(_exit_logits(), dynzoo.ExitPolicy('patience', [0, 2])),
         raises=ValueError, match='patience thresholds are whole numbers >= 1'),
    Case('policy-patience-fraction', lambda: simulate_early_exit(_exit_logits(), dynzoo.ExitPolicy('patience',
                                                                                                   [1.5, 2])),
         raises=ValueError, match='patience thresholds are whole numbers >= 1'),
    Case('policy-thresholds-wrong-length', lambda: simulate_early_exit(_exit_logits(), dynzoo.ExitPolicy(
        'margin', [0.5] * 4)), raises=ValueError, match=r'the margin policy needs 3 thresholds \(or 2.*got 4'),
    Case('policy-positive-entropy-threshold', lambda: simulate_early_exit(_exit_logits(), dynzoo.ExitPolicy(
        'entropy', [0.5, 0.5])), raises=ValueError, match='to leave when the entropy is <= h, pass -h'),
    Case('policy-without-thresholds', lambda: dynzoo.early_exit(_lin5(), torch.zeros(2, 3, 32, 32),
                                                                dynzoo.ExitPolicy('entropy')),
         raises=ValueError, match='has no thresholds: pass thresholds= or fit them'),
    Case('fit-to-budget-negative', lambda: dynzoo.fit_to_budget(_exit_logits(), [1, 2, 3], -1.0), raises=ValueError,
         match='budget must be a positive number of MACs per sample, got -1.0'),
    Case('fit-temperatures-nan-logits', lambda: dynzoo.fit_temperatures(
        [torch.full((4, 10), float('nan'))] * 2, torch.arange(4)), raises=ValueError,
         match='fit_temperatures needs finite logits'),
]


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def _train(*argv):
    from dynzoo import train
    parser = argparse.ArgumentParser()
    train.add_train_args(parser)
    return train.run_train(parser.parse_args(['--model', 'msdnet_cifar_b7', '--dataset', 'synthetic', '--workers', '0',
                                              '--output', '/nonexistent/dynzoo-run', *argv]))


CASES += [
    Case('train --epochs 0', lambda: _train('--epochs', '0'), ValueError, '--epochs must be a positive whole number'),
    Case('train --epochs -3', lambda: _train('--epochs', '-3'), ValueError, '--epochs must be a positive'),
    Case('train --batch-size 0', lambda: _train('--batch-size', '0'), ValueError, '--batch-size must be a positive'),
    Case('train --batch-size -8', lambda: _train('--batch-size', '-8'), ValueError, '--batch-size must be a posit'),
]


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------
CASES += [
]


@pytest.mark.parametrize('case', CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case):
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match or None):
            case.call()
    else:
        result = case.call()
        if case.check is not None:
            case.check(result)
