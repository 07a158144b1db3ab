"""Early exit outside PyTorch: every stage of a multi-exit network, with its exit head, as its own graph.

``export_stages(model, folder)`` writes stage k (``forward_stage(k, ...)`` then ``forward_exit(k, ...)``) as one
graph that takes stage k-1's state tensors (the image for stage 0) and returns its own state tensors and exit k's
logits, with a dynamic batch dimension: ``stage_k.onnx`` (``torch.export``, then the dynamo ONNX exporter) or
``stage_k.pt2`` (``torch.export.save``). ``manifest.json`` lists the stages in exit order with their tensor names,
the input size, the normalisation, the cascade multiply-adds of every exit and the thresholds, when given.

``OnnxEarlyExit(folder)`` runs the ONNX stages with ONNX Runtime and does real batch early exit, as
``dynzoo.early_exit`` does in PyTorch: later stages run only on the samples still inside. The graphs need only an
ONNX runtime, the runner numpy and onnxruntime. ONNX needs the ``export`` extra (``pip install dynzoo[export]``:
onnx, onnxscript, onnxruntime).
"""
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._moved import moved_attribute
from .flops import per_exit_macs
from .inference import ALWAYS, NEVER, ExitRule, run_exit_rule
from .models._exits import GrowingMap, MultiExitNetwork, flatten_tensors

__all__ = ['FORMATS', 'MANIFEST', 'export_stages', 'OnnxEarlyExit', 'OnnxEarlyExitResult']

# The command-line handlers moved to dynzoo.cli.
_MOVED = {'add_export_args': 'dynzoo.cli.export', 'run_export': 'dynzoo.cli.export'}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)


FORMATS = ('onnx', 'pt2')
MANIFEST = 'manifest.json'
EXIT_RULE = 'max softmax probability >= threshold (float32); the last exit takes every remaining sample'


def _onnx_missing(modules: Sequence[str]) -> Optional[str]:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f'{", ".join(missing)} not installed: pip install "dynzoo[export]"' if missing else None


class _Stage(nn.Module):
    """Stage ``k`` and head ``k`` of ``model`` on flat state tensors: returns stage k's state tensors, then the logits.
    ``structure`` is the nesting of the incoming state (``_structure``)."""

    def __init__(self, model: MultiExitNetwork, k: int, structure):
        super().__init__()
        self.model, self.k, self.structure = model, k, structure

    def forward(self, *tensors: torch.Tensor):
        state = _unflatten(self.structure, iter(tensors))
        state = self.model.forward_stage(self.k, state)
        return (*flatten_tensors(state), self.model.forward_exit(self.k, state))


class _Cascade(nn.Module):
    """Every stage and head of ``model`` in one graph: returns stage 0's state tensors and logits, then stage 1's..."""

    def __init__(self, model: MultiExitNetwork):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        state, outputs = x, []
        for k in range(self.model.num_exits):
            state = self.model.forward_stage(k, state)
            outputs += [*flatten_tensors(state), self.model.forward_exit(k, state)]
        return tuple(outputs)


def _structure(state):
    """The nesting of a stage state: None for a tensor (a ``GrowingMap`` is its map), else ``(list or tuple,
    [children])``."""
    if isinstance(state, (torch.Tensor, GrowingMap)):
        return None
    return type(state), [_structure(s) for s in state]


def _unflatten(structure, tensors):
    if structure is None:
        return next(tensors)
    kind, children = structure
    return kind(_unflatten(child, tensors) for child in children)


def _check_thresholds(thresholds: Optional[Sequence[float]], num_exits: int) -> Optional[List[float]]:
    if thresholds is None:
        return None
    rule = ExitRule(thresholds)  # the checks of dynzoo.early_exit: one per exit (or one fewer), no NaN
    rule.check(num_exits)
    # An infinity would make the manifest invalid JSON; on a probability, +-1e8 decides the same.
    return [min(max(t, ALWAYS), NEVER) for t in rule.thresholds]


def _prepare_folder(folder: Path, force: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f'{folder} is a file: export writes a folder of stage graphs and a {MANIFEST}')
    existing = list(folder.iterdir()) if folder.exists() else []
    if existing and not force:
        raise FileExistsError(f'{folder} is not empty: export writes into an empty folder (pass force=True, '
                              f'--force on the command line, to replace the stage files and {MANIFEST} there)')
    for path in existing:  # an earlier export's stages would otherwise outlive this one's
        if path.name == MANIFEST or re.fullmatch(r'stage_\d+\.(onnx|onnx\.data|pt2)', path.name):
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _export_stage(model: MultiExitNetwork, k: int, example) -> torch.export.ExportedProgram:
    """``torch.export`` of stage k and head k alone, on the flat tensors of its example input state."""
    tensors = tuple(flatten_tensors(example))
    stage = _Stage(model, k, _structure(example)).eval()
    batch = torch.export.Dim('batch')
    return torch.export.export(stage, tensors, dynamic_shapes=(tuple({0: batch} for _ in tensors),))


def _save_onnx(model: MultiExitNetwork, examples: List, inputs: List[List[str]], outputs: List[List[str]],
               paths: List[Path], opset_version: Optional[int]) -> None:
    """Export the whole cascade once (tracing one stage costs about as much as tracing all of them), then cut out
    each stage's graph between its named inputs and outputs. A stage that needs a value an earlier stage computed
    and does not pass on (an optimised MSDNet reads the batch size off the image's shape) is traced alone."""
    import onnx
    from onnx.utils import Extractor

    def to_onnx(program, input_names, output_names):
        return torch.onnx.export(program, dynamo=True, input_names=input_names, output_names=output_names,
                                 opset_version=opset_version, verbose=False).model_proto

    program = torch.export.export(_Cascade(model).eval(), (examples[0],),
                                  dynamic_shapes=({0: torch.export.Dim('batch')},))
    extractor = Extractor(to_onnx(program, ['x'], sum(outputs, [])))
    for k, path in enumerate(paths):
        stage = extractor.extract_model(inputs[k], outputs[k])
        try:
            onnx.checker.check_model(stage)
        except onnx.checker.ValidationError:
            stage = to_onnx(_export_stage(model, k, examples[k]), inputs[k], outputs[k])
            onnx.checker.check_model(stage)
        onnx.save(stage, str(path))


def export_stages(model: MultiExitNetwork, folder: Union[str, Path], format: str = 'onnx',
                  input_size: Optional[Sequence[int]] = None, thresholds: Optional[Sequence[float]] = None,
                  force: bool = False, opset_version: Optional[int] = None) -> Dict[str, Any]:
    """Write every stage of ``model`` (with its exit head) to ``folder`` as ``stage_k.onnx`` or ``stage_k.pt2``, plus
    ``manifest.json``; returns the manifest.

    ``input_size``: (C, H, W), default the pretrained config's; the graphs take that image size only (the batch
    size is free). ``thresholds``: one per exit (or one fewer), stored for ``OnnxEarlyExit``. The model must be a
    multi-exit network in eval mode; ``folder`` must be empty unless ``force`` (then only the stage files and the
    manifest already there are replaced). Stage tensors are named ``x`` (the image), ``state_k.i`` (the i-th tensor
    of stage k's state, flattened in order) and ``logits_k``.
    """
    if format not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
    if not isinstance(model, MultiExitNetwork):
        raise ValueError(f'export writes the stages of a multi-exit model (MSDNet, SCAN / BYOT, *_mc); '
                         f'{type(model).__name__} has one exit: export it whole with torch.onnx.export or '
                         'torch.export')
    if model.training:
        raise ValueError('export needs the model in eval mode (batch norm would use batch statistics): call '
                         'model.eval() first')
    missing = _onnx_missing(['onnx', 'onnxscript']) if format == 'onnx' else None
    if missing:
        raise ImportError(f'ONNX export needs onnx and onnxscript; {missing}')
    num_exits = model.num_exits
    thresholds = _check_thresholds(thresholds, num_exits)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    input_size = tuple(int(s) for s in (input_size or cfg.get('input_size') or model.default_input_size))
    if len(input_size) != 3:
        raise ValueError(f'input_size must be (channels, height, width), got {input_size}')
    param = next(model.parameters())
    # Batch 2: torch.export specialises a dimension traced at size 1.
    x = torch.zeros(2, *input_size, dtype=param.dtype, device=param.device)
    model.check_input(x)
    folder = Path(folder)
    _prepare_folder(folder, force)
    macs = per_exit_macs(model, input_size=input_size, scope='cascade')

    # Each stage's example input state (plain tensors: an optimised MSDNet's maps are views of larger buffers) and
    # the names of its input and output tensors.
    examples, outputs = [x], []
    with torch.no_grad():
        for k in range(num_exits):
            state = model.forward_stage(k, examples[-1])
            tensors = [t.clone() for t in flatten_tensors(state)]
            examples.append(_unflatten(_structure(state), iter(tensors)))
            outputs.append([f'state_{k}.{i}' for i in range(len(tensors))] + [f'logits_{k}'])
    inputs = [['x']] + [names[:-1] for names in outputs[:-1]]
    files = [f'stage_{k}.{format}' for k in range(num_exits)]
    if format == 'pt2':
        for k, file in enumerate(files):
            torch.export.save(_export_stage(model, k, examples[k]), str(folder / file))
    else:
        _save_onnx(model, examples, inputs, outputs, [folder / f for f in files], opset_version)
    stages = [dict(exit=k, file=files[k], inputs=inputs[k], outputs=outputs[k], macs=int(macs[k]))
              for k in range(num_exits)]

    tag = cfg.get('tag')
    manifest = dict(
        format=format,
        model=f"{cfg['architecture']}.{tag}" if cfg.get('architecture') and tag else cfg.get('architecture'),
        num_exits=num_exits,
        num_classes=getattr(model, 'num_classes', None),
        input_size=list(input_size),
        mean=list(cfg.get('mean', ())) or None,
        std=list(cfg.get('std', ())) or None,
        macs=[int(m) for m in macs],
        macs_scope='cascade',
        exit_rule=EXIT_RULE,
        stages=stages,
    )
    if thresholds is not None:
        manifest['thresholds'] = thresholds
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + '\n')
    return manifest


@dataclass
class OnnxEarlyExitResult:
    """Per-sample outcome of ``OnnxEarlyExit``: the class and the 0-based exit that answered, how many samples ran
    each stage, and the multiply-adds spent (from the manifest's cascade per-exit costs)."""
    predictions: np.ndarray
    exits: np.ndarray
    samples_per_stage: List[int]
    macs: float
    nonfinite: Optional[np.ndarray] = None


class OnnxEarlyExit:
    """Batch early exit over the ONNX stages that ``export_stages`` wrote, with ONNX Runtime.

    ``runner(x)`` (``x``: a float32 numpy batch, normalised as the manifest's mean/std say) runs stage 0 on the whole
    batch, lets every sample whose exit fires leave (``dynzoo.early_exit``'s exit loop and rule; the last exit
    takes every remaining sample) and runs each later stage only on the samples still inside: the same predictions and exits as
    ``dynzoo.early_exit(model, x, thresholds)``, except that a sample whose confidence lies within float rounding of
    a threshold may leave one exit apart (ONNX Runtime's kernels round differently from PyTorch's). ``thresholds``
    default to the manifest's. ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice).
    """

    def __init__(self, folder: Union[str, Path], thresholds: Optional[Sequence[float]] = None,
                 threads: Optional[int] = None, providers: Sequence[str] = ('CPUExecutionProvider',)):
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f'{folder} holds no {MANIFEST}: write one with dynzoo.export.export_stages or '
                                    '`dynzoo export NAME --format onnx --out DIR`')
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if self.manifest['format'] != 'onnx':
            raise ValueError(f'{folder} holds {self.manifest["format"]} stages; OnnxEarlyExit runs ONNX ones '
                             '(export with format="onnx")')
        missing = _onnx_missing(['onnxruntime'])
        if missing:
            raise ImportError(f'OnnxEarlyExit needs onnxruntime; {missing}')
        import onnxruntime

        self.num_exits = self.manifest['num_exits']
        self.input_size = tuple(self.manifest['input_size'])
        self.thresholds = _check_thresholds(
            self.manifest.get('thresholds') if thresholds is None else thresholds, self.num_exits)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.stages = self.manifest['stages']
        self.sessions = [onnxruntime.InferenceSession(str(folder / stage['file']), options, providers=list(providers))
                         for stage in self.stages]
        self.stage_macs = np.diff(self.manifest['macs'], prepend=0).tolist()

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != self.input_size:
            raise ValueError(f'the exported stages take batches of shape (N, {", ".join(map(str, self.input_size))}), '
                             f'got {x.shape}')
        return np.ascontiguousarray(x, dtype=np.float32)

    def run_stage(self, k: int, state: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], np.ndarray]:
        """Stage k and exit k on stage k-1's state tensors (``[x]`` for stage 0): ``(state, logits)``."""
        stage = self.stages[k]
        outputs = self.sessions[k].run(None, dict(zip(stage['inputs'], state)))
        return outputs[:-1], outputs[-1]

    def all_exits(self, x) -> List[np.ndarray]:
        """Every exit's logits for the whole batch, shallow first (as ``model(x)``)."""
        state, logits = [self._check_input(x)], []
        for k in range(self.num_exits):
            state, exit_logits = self.run_stage(k, state)
            logits.append(exit_logits)
        return logits

    def _exit_logits(self, x: np.ndarray) -> Iterator[torch.Tensor]:
        """``model.iter_exits``'s protocol over the ONNX stages: yields exit k's logits for the samples still inside
        and takes ``send(keep)``, the rows to keep, before running the next stage on those rows only."""
        state = [x]
        for k in range(self.num_exits):
            state, logits = self.run_stage(k, state)
            keep = yield torch.from_numpy(logits)
            if keep is not None:
                rows = keep.numpy()
                state = [s[rows] for s in state]

    def __call__(self, x, thresholds: Union[None, Sequence[float], ExitRule] = None) -> OnnxEarlyExitResult:
        """Early exit on ``x`` with ``thresholds`` (default: the runner's): per-exit thresholds on the max softmax
        probability, or any exit policy (``dynzoo.ExitPolicy``) applied exactly as ``dynzoo.early_exit`` applies it
        (the same ``run_exit_rule`` loop)."""
        rule = self.thresholds if thresholds is None else thresholds
        if rule is None:
            raise ValueError('no thresholds: pass them to OnnxEarlyExit(folder, thresholds) or to the call, or export '
                             'with thresholds=...')
        if not isinstance(rule, ExitRule):
            rule = _check_thresholds(rule, self.num_exits)
            rule = ExitRule([*rule, 0.0][:self.num_exits])
        x = self._check_input(x)
        result = run_exit_rule(rule, self._exit_logits(x), self.num_exits, len(x))
        macs = float(sum(n * c for n, c in zip(result.samples_per_stage, self.stage_macs)))
        return OnnxEarlyExitResult(result.predictions.numpy(), result.exits.numpy(), result.samples_per_stage, macs,
                                   result.nonfinite.numpy())
