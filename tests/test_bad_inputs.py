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
from dynzoo.cli.train import add_train_args, main as train_main
from dynzoo.train.distributed import rng_state


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
# This section's imports, kept here so that the sections merge cleanly.
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import dynzoo  # noqa: E402
from dynzoo import hub, train  # noqa: E402
from dynzoo.cli import main as cli_main  # noqa: E402

_CKPT_TMP = tempfile.TemporaryDirectory(prefix='dynzoo-bad-inputs-')  # removed at exit
_TINY_MSDNET = dict(n_blocks=2, base=1, step=1, channels=4, growth_rate=2)


def _without_num_features(model):
    del model.num_features  # a user's MultiExitNetwork subclass that does not set it
    return model


def _ckpt_tmp() -> Path:
    return Path(tempfile.mkdtemp(dir=_CKPT_TMP.name))


def _tiny_msdnet():
    torch.manual_seed(0)
    return dynzoo.create_model('msdnet_cifar_b7', num_classes=10, **_TINY_MSDNET).eval()


def _saved(checkpoint) -> Path:
    path = _ckpt_tmp() / 'checkpoint.pth'
    torch.save(checkpoint, path)
    return path


def _garbage(data: bytes) -> Path:
    path = _ckpt_tmp() / 'garbage.pth'
    path.write_bytes(data)
    return path


def _load(name: str = 'msdnet_cifar_b7', **overlay):
    kwargs = _TINY_MSDNET if name == 'msdnet_cifar_b7' else {}
    return dynzoo.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _with_tensor(key: str, dtype):
    """The tiny MSDNet's state dict with one weight stored as another dtype (as a corrupt or quantized file holds)."""
    state = _tiny_msdnet().state_dict()
    state[key] = state[key].to(dtype)
    return state


def _has_weights_of_tiny_msdnet(model):
    expected = _tiny_msdnet().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def _trainers_last_pth(model) -> Path:
    """``last.pth`` as dynzoo's trainer writes it: the weights under ``model``, beside the run's state."""
    path = _ckpt_tmp() / 'last.pth'
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train.save_checkpoint(path, dict(
        epoch=1, global_step=10, model=model.state_dict(), criterion={}, optimizer=optimizer.state_dict(),
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1).state_dict(), rng=[rng_state()],
        history=[dict(epoch=1, train_loss=2.0)], train_time=1.0, config=dict(epochs=1), model_name='msdnet'))
    return path


def _eval_trainers_last_pth():
    last = _trainers_last_pth(dynzoo.create_model('sdpoint_preresnet_cifar'))
    return cli_main(['eval', 'sdpoint_preresnet_cifar', '--checkpoint', str(last), '--limit', '20',
                     '--batch-size', '20'])


def _resume_from_garbage():
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    return train.run_train(parser.parse_args([
        '--model', 'msdnet_cifar_lin5', '--dataset', 'synthetic', '--output', str(_ckpt_tmp() / 'run'),
        '--resume', str(_garbage(b'\x80\x02h\x00.')), '--no-progress']))


def _export_killed_while_writing():
    """The export folder after a process dies while ``save_pretrained`` writes the weights: a forked child killed by
    the kernel (SIGXFSZ) on passing a file-size limit, as kill -9 would kill it, with no handler run."""
    folder = _ckpt_tmp() / 'export'
    model = dynzoo.create_model('sdpoint_preresnet_cifar')
    pid = os.fork()
    if pid == 0:  # the child: Python ignores SIGXFSZ, restore the kernel's default (terminate)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        dynzoo.save_pretrained(model, folder, model_card=False)
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ, status
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _only_final_files(names):
    assert set(names) <= {'model.safetensors', 'config.json', 'README.md'}, names


CASES += [
    Case('state_dict overlay keeps the exit heads of a 10-class checkpoint',
         lambda: dynzoo.create_model('msdnet_cifar_b7', num_classes=10, pretrained=True, **_TINY_MSDNET,
                                     pretrained_cfg_overlay=dict(state_dict=_tiny_msdnet().state_dict())),
         check=_has_weights_of_tiny_msdnet),
    Case('integer tensor in a checkpoint is refused on load, not cast',
         lambda: _load(file=_saved(_with_tensor('classifier.0.linear.weight', torch.int64))),
         raises=dynzoo.CheckpointMismatchError,
         match=r'another kind.*classifier\.0\.linear\.weight: checkpoint torch\.int64 vs model torch\.float32'),
    Case('bool tensor in a checkpoint is refused by dynzoo convert, not cast',
         lambda: hub.convert_checkpoint('msdnet', _saved(_with_tensor('blocks.0.0.layers.0.net.1.weight', torch.bool)),
                                        _ckpt_tmp() / 'out', model_name='msdnet_cifar_b7', model_kwargs=_TINY_MSDNET),
         raises=dynzoo.CheckpointMismatchError, match=r'another kind.*torch\.bool vs model torch\.float32'),
    Case('save_pretrained of an optimized (fused) model',
         lambda: dynzoo.save_pretrained(dynzoo.optimize_for_inference(_tiny_msdnet()), _ckpt_tmp() / 'export'),
         raises=ValueError, match='optimized for inference.*save the model before optimizing it'),
    Case('save_pretrained of a model without num_features',
         lambda: dynzoo.save_pretrained(_without_num_features(_tiny_msdnet()), _ckpt_tmp() / 'export'),
         raises=ValueError, match='has no num_features.*set it in __init__'),
    Case('garbage checkpoint whose unpickling raises KeyError', lambda: _load(file=_garbage(b'\x80\x02h\x00.')),
         raises=dynzoo.CheckpointFileError, match='not a readable PyTorch checkpoint'),
    Case('garbage checkpoint whose unpickling raises IndexError', lambda: _load(file=_garbage(b'\x80\x02.')),
         raises=dynzoo.CheckpointFileError, match='not a readable PyTorch checkpoint'),
    Case('garbage checkpoint as the --resume file', _resume_from_garbage,
         raises=dynzoo.CheckpointFileError, match='not a readable PyTorch checkpoint'),
    Case("the trainer's own last.pth loads with create_model(file=)",
         lambda: _load(file=_trainers_last_pth(_tiny_msdnet())), check=_has_weights_of_tiny_msdnet),
    Case("the trainer's own last.pth loads with dynzoo eval --checkpoint", _eval_trainers_last_pth,
         check=lambda status: None if status == 0 else pytest.fail(f'exit status {status}')),
    Case('a list saved as a checkpoint', lambda: _load(file=_saved(list(_tiny_msdnet().state_dict().values()))),
         raises=dynzoo.CheckpointMismatchError, match=r'expected a state dict.*got a list'),
    Case('pretrained=True on an architecture without default weights names its tags',
         lambda: dynzoo.create_model('msdnet_cifar_b7', pretrained=True),
         raises=dynzoo.PretrainedWeightsNotFoundError, match=r'msdnet_cifar_b7\.c10'),
    Case("pretrained=True on an architecture with no weights at all names its family's tags",
         lambda: dynzoo.create_model('scan_resnet34', pretrained=True),
         raises=dynzoo.PretrainedWeightsNotFoundError, match=r'scan_resnet18\.c10'),
    Case('create_model(None)', lambda: dynzoo.create_model(None),
         raises=TypeError, match=r'model_name must be a string.*got NoneType None'),
    Case('kill -9 during export leaves no temporary file in the export folder', _export_killed_while_writing,
         check=_only_final_files),
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
    return main(['--debug', 'export', *argv])  # --debug: the error itself, not the one-line report


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
import functools  # noqa: E402 (imported here: each section keeps its own imports, so sections merge cleanly)

import torch  # noqa: E402

import timm  # noqa: E402

import dynzoo  # noqa: E402
from dynzoo.inference import NEVER, simulate_early_exit  # noqa: E402


@functools.lru_cache(maxsize=None)
def _lin5():
    torch.manual_seed(0)
    return dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).eval()


def _scan():
    torch.manual_seed(0)
    return dynzoo.create_model('scan_resnet18', num_classes=10).eval()


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
    Case('early-exit-numpy-input', lambda: dynzoo.early_exit(_lin5(), np.zeros((2, 3, 32, 32), np.float32),
                                                             [0.5] * 4),
         raises=TypeError, match=r'got a numpy array: convert it with torch\.from_numpy\(x\)'),
    Case('early-exit-input-size', lambda: dynzoo.early_exit(_lin5(), torch.zeros(2, 3, 64, 64), [0.5] * 4),
         raises=ValueError, match=r'cannot take 64x64 inputs'),
    Case('scan-predict-numpy-input',
         lambda: dynzoo.inference.scan_predict(_scan(), np.zeros((2, 3, 32, 32), np.float32)), raises=TypeError,
         match=r'got a numpy array: convert it with torch\.from_numpy\(x\)'),
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
    Case('fit-thresholds-nan-logits', lambda: dynzoo.fit_thresholds(
        [torch.full((4, 10), float('nan'))] * 3, [0.5, 0.3, 0.2]), raises=ValueError,
         match='held-out logits without NaN'),
    Case('early-exit-without-classifiers', lambda: dynzoo.early_exit(
        dynzoo.create_model('scan_resnet18', num_classes=0).eval(), torch.zeros(2, 3, 32, 32), [0.9] * 3),
         raises=ValueError, match=r'no classifiers \(num_classes=0.*reset_classifier\(n\)'),
    Case('early-exit-torch-compile-wrapper', lambda: dynzoo.early_exit(torch.compile(_lin5()),
                                                                       torch.zeros(2, 3, 32, 32), [0.5] * 4),
         raises=ValueError, match=r'torch\.compile wrapper.*model\._orig_mod'),
    Case('early-exit-scalar-threshold', lambda: dynzoo.early_exit(_lin5(), torch.zeros(2, 3, 32, 32), 0.9),
         raises=TypeError, match=r'one number per exit.*\[0\.9\] \* \(model\.num_exits - 1\); got 0\.9'),
    Case('iter-exits-send-duplicate-positions', lambda: _send(torch.tensor([1, 1])), raises=ValueError,
         match=r'distinct positions in 0\.\.1.*got a position more than once'),
    Case('iter-exits-send-position-out-of-range', lambda: _send([5]), raises=ValueError,
         match=r'among the 2 still inside.*got positions 5\.\.5'),
    Case('iter-exits-send-float-positions', lambda: _send(torch.tensor([0.0])), raises=ValueError,
         match=r'boolean mask of length 2; got a tensor of shape \(1,\) and dtype torch\.float32'),
    Case('iter-exits-send-mask-of-other-length', lambda: _send(torch.tensor([True, False, True])), raises=ValueError,
         match='got a mask of length 3'),
    Case('iter-exits-send-mask', lambda: _send(torch.tensor([False, True])),
         check=lambda logits: torch.testing.assert_close(logits, _lin5()(torch.arange(2.0).view(2, 1, 1, 1).expand(
             2, 3, 32, 32))[1][1:])),
    Case('exit-fractions-fewer-outcomes-than-exits', lambda: simulate_early_exit(
        _exit_logits(), [NEVER, NEVER]).exit_fractions(2), raises=ValueError, match='more than 2 outcomes'),
    Case('macs-nan', lambda: simulate_early_exit(_exit_logits(), [0.5, 0.5], macs=[1, float('nan'), 3]),
         raises=ValueError, match='macs must be finite non-negative costs'),
    Case('macs-negative', lambda: simulate_early_exit(_exit_logits(), [0.5, 0.5], macs=[-3, -2, -1]),
         raises=ValueError, match='macs must be finite non-negative costs'),
    Case('genetic-search-nan-budget', lambda: dynzoo.inference.genetic_threshold_search(
        _exit_logits(), torch.arange(20) % 10, [1, 2, 3], budget=float('nan'), generations=1), raises=ValueError,
         match='budget must be a positive number of MACs per sample, got nan'),
    Case('budgeted-classes-differ', lambda: dynzoo.evaluate_budgeted(
        _exit_logits(), torch.arange(20) % 5, [l[:, :5] for l in _exit_logits(seed=1)], torch.arange(20) % 5,
        [1, 2, 3], qs=[1.0]), raises=ValueError, match='held-out logits have 10 classes, test logits 5'),
    Case('calibration-error-of-every-exit', lambda: dynzoo.policies.expected_calibration_error(
        _exit_logits(), torch.arange(20) % 10), raises=ValueError, match="one exit's N x C logits.*one call per exit"),
    Case('export-nan-threshold', lambda: _export('msdnet_cifar_lin5', thresholds=[0.5, float('nan'), 0.5, 0.5]),
         raises=ValueError, match='thresholds must not be NaN'),
    Case('overlay-file-without-pretrained', lambda: _warns_not_loaded(dynzoo.create_model)),
    Case('overlay-file-without-pretrained-timm', lambda: _warns_not_loaded(timm.create_model)),
]


def _warns_not_loaded(create_model):
    with pytest.warns(UserWarning, match=r'scan_resnet18: pretrained_cfg_overlay names weights, but '
                                         r'pretrained=False, so they are not loaded.*pass pretrained=True') as record:
        model = create_model('scan_resnet18', pretrained_cfg_overlay=dict(file='/missing/weights.pth'))
    assert record[0].filename == __file__  # the warning points at the caller's line
    return model


def _send(keep):
    """Exit 2's logits after ``send(keep)`` at exit 1 on two images of different constant values."""
    with torch.no_grad():
        exits = _lin5().iter_exits(torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 32, 32).contiguous())
        next(exits)
        return exits.send(keep)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def _train(*argv):
    from dynzoo import train
    parser = argparse.ArgumentParser()
    add_train_args(parser)
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
                      '--output', _file('run', lambda p: None), main=train_main),
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
