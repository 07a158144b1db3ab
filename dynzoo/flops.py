"""Per-exit cost of multi-exit networks: fvcore multiply-adds, parameters, and the authors' own counters.

Every count is for a batch of one image at the model's default input size (``pretrained_cfg['input_size']``)
with the model in eval mode. fvcore counts one per multiply-add; ``per_exit_flops`` keeps convolutions (transposed
ones included) and linear layers only, so batch norm, pooling and element-wise ops are not counted.
"""
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

import torch
from torch import nn

from .models._exits import MultiExitNetwork, flatten_tensors

__all__ = ['per_exit_flops', 'per_exit_params', 'per_exit_table', 'count_macs', 'SCOPES']

SCOPES = ('cascade', 'standalone', 'lazy')
CONV_LINEAR_OPS = ('conv', 'linear', 'addmm', 'matmul', 'bmm', 'einsum')


class _ExitGraph(nn.Module):
    """Runs stages 0..k and the heads in ``heads``; returns their logits, plus the stage state if ``keep_state``.

    Returning the state keeps every tensor of stage k alive in the traced graph (the full block cost); without it,
    the tracer's dead-code elimination drops the work no returned head needs (the lazy-evaluation cost).
    """

    def __init__(self, model: MultiExitNetwork, k: int, heads: Iterable[int], keep_state: bool):
        super().__init__()
        self.model, self.k, self.heads, self.keep_state = model, k, set(heads), keep_state

    def forward(self, x: torch.Tensor):
        state, outputs = x, []
        for i in range(self.k + 1):
            state = self.model.forward_stage(i, state)
            if i in self.heads:
                outputs.append(self.model.forward_head(i, state))
        if self.keep_state:
            outputs += flatten_tensors(state)
        return tuple(outputs)


def count_macs(module: nn.Module, inputs, ops: Optional[Sequence[str]] = CONV_LINEAR_OPS) -> int:
    """fvcore multiply-adds of ``module(*inputs)``: conv + linear only by default, every fvcore op if ``ops=None``."""
    with warnings.catch_warnings():  # fvcore's import uses the deprecated torch.jit.script
        warnings.simplefilter('ignore', FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    analysis = FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    if ops is None:
        return int(analysis.total())
    return int(sum(v for op, v in analysis.by_operator().items() if op in ops))


def _example_input(model: nn.Module, input_size: Optional[Sequence[int]]) -> torch.Tensor:
    """A batch of one zero image at ``input_size`` (default: the pretrained config's), with the model's channels."""
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size') or model.default_input_size
    in_chans = getattr(model, 'in_chans', input_size[0] if len(input_size) == 3 else 3)
    param = next(model.parameters())
    return torch.zeros(1, in_chans, *input_size[-2:], dtype=param.dtype, device=param.device)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def per_exit_flops(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None, scope: str = 'cascade',
                   convention: str = 'fvcore') -> List[int]:
    """Multiply-adds per exit, one integer per exit, shallow first (a single-exit model has one exit: the whole
    network).

    scope (fvcore convention):
      * ``'cascade'``: stages 1..k plus heads 1..k, the cost of a sample tried at every earlier exit;
      * ``'standalone'``: stages 1..k plus head k only;
      * ``'lazy'``: heads 1..k and only the stage work those heads need (work that only later exits use, such as
        MSDNet's finer scales in its last layers, is left out).
    convention:
      * ``'fvcore'``: conv + linear multiply-adds counted by fvcore (``scope`` applies);
      * ``'authors'``: the original authors' own counter, reproduced to the unit (MSDNet: ``op_counter.py``,
        cumulative with earlier heads; ``scope`` is ignored).
    """
    x = _example_input(model, input_size)
    if isinstance(model, MultiExitNetwork):
        model.check_input(x)
    if convention == 'authors':
        counter = AUTHORS_COUNTERS.get(getattr(model, 'flops_convention', None))
        if counter is None:
            raise ValueError(f'{type(model).__name__} has no authors\' FLOPs convention; use convention="fvcore"')
        with _eval_mode(model):
            return counter(model, x)
    if convention != 'fvcore':
        raise ValueError(f"convention must be 'fvcore' or 'authors', got {convention!r}")
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    if not isinstance(model, MultiExitNetwork):
        with _eval_mode(model):
            return [count_macs(model, x)]
    flops = []
    with _eval_mode(model):
        for k in range(model.num_exits):
            heads = [k] if scope == 'standalone' else range(k + 1)
            flops.append(count_macs(_ExitGraph(model, k, heads, keep_state=scope != 'lazy'), x))
    return flops


@contextmanager
def _track_called_modules(called: Set[nn.Module]):
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: called.add(module))
    try:
        yield
    finally:
        handle.remove()


def per_exit_params(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None) -> List[int]:
    """Cumulative parameters per exit: everything that stages 1..k and heads 1..k use."""
    if not isinstance(model, MultiExitNetwork):
        return [sum(p.numel() for p in model.parameters())]
    x = _example_input(model, input_size)
    called: Set[nn.Module] = set()
    counts = []
    with _eval_mode(model), _track_called_modules(called):
        state = x
        for k in range(model.num_exits):
            state = model.forward_stage(k, state)
            model.forward_head(k, state)
            params = {id(p): p for m in called for p in m.parameters(recurse=False)}
            counts.append(sum(p.numel() for p in params.values()))
    return counts


def _msdnet_op_counter(model: nn.Module, x: torch.Tensor) -> List[int]:
    """The MSDNet authors' ``op_counter.py``: conv MACs (no bias) + ReLU input elements + pooling (output elements x
    kernel area) + Linear (weights + biases), accumulated over one full forward and recorded each time a Linear fires,
    so exit k includes heads 1..k-1."""
    total, per_exit = 0, []

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += (module.in_channels * module.out_channels * kh * kw * output.shape[2] * output.shape[3]
                      // module.groups)
        elif isinstance(module, nn.ReLU):
            total += inputs[0].numel()
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            k = module.kernel_size
            area = k * k if isinstance(k, int) else k[0] * k[1]
            total += output.numel() * area
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            per_exit.append(total)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return per_exit


AUTHORS_COUNTERS: Dict[str, Callable[[nn.Module, torch.Tensor], List[int]]] = {
    'msdnet_op_counter': _msdnet_op_counter,
}



def per_exit_table(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None) -> List[Dict[str, int]]:
    """One row per exit: cumulative ``params`` and multiply-adds for every scope (``flops_cascade``,
    ``flops_standalone``, ``flops_lazy``), plus ``flops_authors`` where the authors had their own counter."""
    params = per_exit_params(model, input_size)
    by_scope = {scope: per_exit_flops(model, input_size, scope=scope) for scope in SCOPES}
    authors = (per_exit_flops(model, input_size, convention='authors')
               if getattr(model, 'flops_convention', None) in AUTHORS_COUNTERS else None)
    rows = []
    for k in range(len(params)):
        row = {'exit': k + 1, 'params': params[k], **{f'flops_{scope}': by_scope[scope][k] for scope in SCOPES}}
        if authors is not None:
            row['flops_authors'] = authors[k]
        rows.append(row)
    return rows
