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
CASES += [
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
