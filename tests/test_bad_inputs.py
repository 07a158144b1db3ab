"""Bad or unusual inputs, one row per case: each gives the right result or an error that names the cause and the fix.

A row is ``Case(id, call, raises=..., match=...)`` for an expected error (``match``: a regular expression the message
must contain), or ``Case(id, call, check=...)`` for a call that must succeed (``check`` asserts on its result).
Rows are grouped by area; a new case costs one row.
"""
import argparse
import contextlib
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Type

import numpy as np
import pytest
import torch
from PIL import Image

import dynzoo
from dynzoo import cli
from dynzoo import train as dtrain


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
_FILES = []  # temporary folders of the files the rows below write, removed at exit


def _file(name: str, write: Callable[[Path], Any]) -> Path:
    if not _FILES:
        _FILES.append(tempfile.TemporaryDirectory(prefix='dynzoo-bad-inputs-'))
    path = Path(_FILES[0].name) / name
    write(path)
    return path


def _packed_npz(offsets=None, labels=(3, 1)):
    """A two-image packed-JPEG npz (``tests/test_data.py`` holds the format's own tests)."""
    def write(path):
        pieces = []
        for color in ((250, 0, 0), (0, 0, 250)):
            buffer = io.BytesIO()
            Image.new('RGB', (32, 32), color).save(buffer, format='JPEG')
            pieces.append(np.frombuffer(buffer.getvalue(), np.uint8))
        np.savez(path, test_jpeg=np.concatenate(pieces), test_labels=np.array(labels),
                 test_offsets=np.array(offsets or [0, len(pieces[0]), len(pieces[0]) + len(pieces[1])]))
    return write


def _cli(*argv, main=cli.main) -> Tuple[Any, str]:
    """``dynzoo ARGV`` (or another ``main``): its exit status and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_info:
            status = exit_info.code
    return status, err.getvalue()


def _error_line(pattern: str, prog: str = 'dynzoo'):
    """Check: status 2 and, as the last line of stderr (after any progress bar), ``PROG: error:`` and a message
    matching ``pattern``, with no traceback."""
    def check(result):
        status, err = result
        lines = [line for line in err.replace('\r', '\n').splitlines() if line.strip()]
        assert status == 2 and 'Traceback' not in err, err
        assert re.match(f'{re.escape(prog)}( \\w+)?: error: .*{pattern}', lines[-1]), err
    return check


CASES += [
    Case('cli-unknown-model', lambda: _cli('eval', 'msdnet_cifar_b77'),
         check=_error_line("Unknown dynzoo model 'msdnet_cifar_b77'")),
    Case('cli-missing-checkpoint', lambda: _cli('eval', 'resnet_mc_cifar', '--checkpoint', '/no/such/file.pth'),
         check=_error_line('/no/such/file.pth')),
    Case('cli-debug-keeps-the-traceback', lambda: _cli('eval', 'msdnet_cifar_b77', '--debug'),
         raises=ValueError, match="Unknown dynzoo model 'msdnet_cifar_b77'"),
    Case('cli-npz-not-an-npz', lambda: _cli('eval', 'resnet_mc_cifar', '--data', 'npz', '--data-path',
                                            _file('text.npz', lambda p: p.write_text('not an npz'))),
         check=_error_line(r'text\.npz is not a packed-JPEG CIFAR npz: .*\{split\}_offsets')),
    Case('cli-npz-garbage-offsets', lambda: _cli('eval', 'resnet_mc_cifar', '--data', 'npz', '--data-path',
                                                 _file('offsets.npz', _packed_npz(offsets=[9, 200, 400]))),
         check=_error_line(r'offsets\.npz is not a packed-JPEG CIFAR npz: test image 0 .*is not an image file')),
    Case('cli-labels-out-of-range', lambda: _cli('eval', 'resnet_mc_cifar', '--data', 'npz', '--data-path',
                                                 _file('cifar100.npz', _packed_npz(labels=(3, 57)))),
         check=_error_line(r'label 57 is not a class of this 10-class model')),
    Case('cli-early-exit-labels-out-of-range',
         lambda: _cli('eval', 'resnet_mc_cifar', '--mode', 'early-exit', '--thresholds', 0.5, 0.5, '--data', 'npz',
                      '--data-path', _file('negative.npz', _packed_npz(labels=(-1, 2)))),
         check=_error_line(r'label -1 is not a class of this 10-class model')),
    Case('cli-threads-zero', lambda: _cli('eval', 'resnet_mc_cifar', '--threads', '0'),
         check=_error_line('argument --threads: must be a positive integer')),
    Case('cli-torchvision-folder-without-cifar', lambda: _cli('eval', 'resnet_mc_cifar', '--data', 'torchvision',
                                                              '--data-root', '/no/such/folder'),
         check=_error_line('no complete cifar10 download in /no/such/folder')),
    Case('train-module-unknown-model-keyword',
         lambda: _cli('--model', 'resnet_mc_cifar', '--model-kwargs', 'depth_typo=3', '--dataset', 'synthetic',
                      '--output', _file('run', lambda p: None), main=dtrain.main),
         check=_error_line("unexpected keyword argument 'depth_typo'", prog='python -m dynzoo.train')),
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
