"""Bad or unusual inputs, one row per case: each gives the right result or an error that names the cause and the fix.

A row is ``Case(id, call, raises=..., match=...)`` for an expected error (``match``: a regular expression the message
must contain), or ``Case(id, call, check=...)`` for a call that must succeed (``check`` asserts on its result).
Rows are grouped by area; a new case costs one row.
"""
import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional, Type

import numpy as np
import pytest
import torch

import dynzoo


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
TINY_MSDNET = dict(n_blocks=2, base=1, step=1, channels=4, growth_rate=2)


def _model(name: str, **kwargs) -> torch.nn.Module:
    return dynzoo.create_model(name, num_classes=10, **kwargs).eval()


def _images(dtype: torch.dtype = torch.float32, size: int = 32) -> torch.Tensor:
    return torch.zeros(2, 3, size, size, dtype=dtype)


CASES += [
    Case('fp16-input-msdnet', lambda: _model('msdnet_cifar_b7', **TINY_MSDNET)(_images(torch.float16)),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.float16.*x\.to\(torch\.float32\)'),
    Case('bf16-input-scan-iter-exits', lambda: next(_model('scan_resnet18').iter_exits(_images(torch.bfloat16))),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.bfloat16.*model\.to\('),
    Case('fp64-input-resnet-mc', lambda: _model('resnet_mc_cifar')(_images(torch.float64)),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.float64'),
    Case('fp64-input-densenet-mc', lambda: _model('densenet_bc_100_k12_mc')(_images(torch.float64)),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.float64'),
    Case('uint8-input-densenet', lambda: _model('densenet_bc_100_k12')(_images(torch.uint8)),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.uint8: images must be float'),
    Case('fp16-input-sdpoint', lambda: _model('sdpoint_preresnet_cifar')(_images(torch.float16), instance=(3, 0.5)),
         raises=TypeError, match=r'torch\.float32 weights but the input is torch\.float16'),
    Case('fp32-input-fp64-model', lambda: _model('resnet_mc_cifar').double()(_images()),
         raises=TypeError, match=r'torch\.float64 weights but the input is torch\.float32.*x\.to\(torch\.float64\)'),
    Case('numpy-input-densenet', lambda: _model('densenet_bc_100_k12')(np.zeros((2, 3, 32, 32), np.float32)),
         raises=TypeError, match=r'got a numpy array: convert it with torch\.from_numpy\(x\)'),
    Case('numpy-input-msdnet', lambda: _model('msdnet_cifar_b7', **TINY_MSDNET)(np.zeros((2, 3, 32, 32), np.float32)),
         raises=TypeError, match=r'torch\.from_numpy'),
    Case('numpy-input-sdpoint', lambda: _model('sdpoint_preresnet_cifar')(np.zeros((2, 3, 32, 32), np.float32)),
         raises=TypeError, match=r'torch\.from_numpy'),
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
