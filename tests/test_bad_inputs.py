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
    Case('export a single-exit DenseNet-BC', lambda: _export('densenet_bc_100_k12'), ValueError,
         r'multi-exit model .*DenseNet has one exit: export it whole'),
    Case('export a single-exit SDPoint ResNet', lambda: _export('sdpoint_preresnet_cifar'), ValueError,
         'SDPointResNet has one exit'),
    Case('export a model in training mode', lambda: _export('msdnet_cifar_lin5', train=True), ValueError,
         r'eval mode .*call model.eval\(\) first'),
    Case('export at an input size MSDNet cannot take', lambda: _export('msdnet_cifar_lin5', input_size=(3, 64, 64)),
         ValueError, r'cannot take 64x64 inputs.*sides 17\.\.48 work'),
    Case('export at an input size SCAN cannot take', lambda: _export('scan_resnet18', input_size=(3, 40, 40)),
         ValueError, 'cannot take 40x40 inputs.*needs 32x32'),
    Case('export with thresholds for another model', lambda: _export('msdnet_cifar_lin5', thresholds=[0.9] * 2),
         ValueError, 'expected 5 thresholds'),
    Case('export in an unknown format', lambda: _export('msdnet_cifar_lin5', format='tflite'), ValueError,
         r"format must be one of \('onnx', 'pt2'\)"),
    Case('export into a non-empty folder', lambda: _export('msdnet_cifar_lin5', folder=_export_dir_with_a_file()),
         FileExistsError, r'is not empty: .*pass force=True'),
    Case('dynzoo export into a non-empty folder', lambda: _export_cli('msdnet_cifar_lin5', '--format', 'pt2', '--out',
                                                                        _export_dir_with_a_file()),
         FileExistsError, '--force on the command line'),
    Case('OnnxEarlyExit on a folder without a manifest', lambda: _export_runner(_export_dir()), FileNotFoundError,
         'holds no manifest.json: write one with'),
]


# The export rows' imports and helpers, kept here so that the sections merge cleanly (rows call them when they run).
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

_EXPORT_TMP = tempfile.TemporaryDirectory(prefix='dynzoo-export-cases-')  # removed when the tests end


def _export_dir() -> str:
    return tempfile.mkdtemp(dir=_EXPORT_TMP.name)


def _export(name, *, train=False, folder=None, format='pt2', **kwargs):
    import dynzoo
    from dynzoo.export import export_stages
    model = dynzoo.create_model(name).train(train)
    return export_stages(model, folder or _export_dir(), format=format, **kwargs)


def _export_cli(*argv):
    from dynzoo.cli import main
    return main(['export', *argv])


def _export_dir_with_a_file() -> str:
    folder = Path(_export_dir())
    (folder / 'notes.txt').write_text('not an export')
    return str(folder)


def _export_runner(folder):
    from dynzoo.export import OnnxEarlyExit
    return OnnxEarlyExit(folder)


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
