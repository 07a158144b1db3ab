"""Bad or unusual inputs, one row per case: each gives the right result or an error that names the cause and the fix.

A row is ``Case(id, call, raises=..., match=...)`` for an expected error (``match``: a regular expression the message
must contain), or ``Case(id, call, check=...)`` for a call that must succeed (``check`` asserts on its result).
Rows are grouped by area; a new case costs one row.
"""
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
CASES += [
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
