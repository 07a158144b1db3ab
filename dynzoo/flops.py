"""Per-exit cost of multi-exit networks: fvcore multiply-adds (MACs), parameters, and the authors' own counters.

Every count is for a batch of one image at the model's default input size (``pretrained_cfg['input_size']``)
with the model in eval mode. fvcore counts one per multiply-add; ``per_exit_macs`` keeps convolutions (transposed
ones included) and linear layers only, so batch norm, pooling and element-wise ops are not counted. The cascade and
standalone scopes come from one forward that counts every stage and head (torch's ``FlopCounterMode``, which counts
the same operations); the lazy scope needs fvcore's trace per exit, whose dead-code elimination drops the work no
exit up to k uses. dynzoo says
MACs for these counts everywhere; the older ``*_flops`` names are deprecated aliases.

Counts are cached per model, input size, scope and convention, so that per-batch calls (``early_exit``) trace the
network once. The cache lives beside the model (a copy, e.g. ``optimize_for_inference``'s, starts empty) and is
dropped when a module, parameter or buffer is assigned to one of the model's modules (``reset_classifier``, a
replaced layer). Changes that assign nothing are not seen (deleting a layer, a conv's ``stride`` set in place): call
``clear_macs_cache(model)`` after them.
"""
import warnings
import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .families import family_of
from .models._exits import MultiExitNetwork

__all__ = ['per_exit_macs', 'per_exit_flops', 'per_exit_params', 'per_exit_table', 'count_macs', 'clear_macs_cache',
           'SCOPES']

SCOPES = ('cascade', 'standalone', 'lazy')
CONV_LINEAR_OPS = ('conv', 'linear', 'addmm', 'matmul', 'bmm', 'einsum')


class _ExitGraph(nn.Module):
    """Runs stages 0..k and heads 0..k and returns only the logits, so that the tracer's dead-code elimination drops
    the stage work no exit up to k needs (the lazy-evaluation cost)."""

    def __init__(self, model: MultiExitNetwork, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: torch.Tensor):
        state, outputs = x, []
        for i in range(self.k + 1):
            state = self.model.forward_stage(i, state)
            outputs.append(self.model.forward_exit(i, state))
        return tuple(outputs)


def _deprecated(old: str, new: str, note: str = '', stacklevel: int = 3) -> None:
    warnings.warn(f'{old} is deprecated: use {new} (dynzoo counts multiply-adds, MACs){note}', DeprecationWarning,
                  stacklevel=stacklevel)


class MacsRow(dict):
    """A result row (dict) whose deprecated ``*flops*`` keys still read, with a warning, as the ``*macs*`` ones."""

    def __missing__(self, key):
        renamed = key.replace('flops', 'macs') if isinstance(key, str) else key
        if renamed == key or renamed not in self:
            raise KeyError(key)
        _deprecated(f'the {key!r} key', f'{renamed!r}')
        return self[renamed]


# Counts per model: {model: dict(modules=ids of its modules when counted, counts={key: per-exit list})}. Assigning a
# module, parameter or buffer to any of those modules drops the model's entry (registration hooks, process-wide).
_CACHE: 'weakref.WeakKeyDictionary[nn.Module, Dict]' = weakref.WeakKeyDictionary()


def _drop_changed(module: nn.Module, *args) -> None:
    for model, entry in list(_CACHE.items()):
        if id(module) in entry['modules']:
            del _CACHE[model]


for _register in (nn.modules.module.register_module_module_registration_hook,
                  nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook):
    _register(_drop_changed)


def clear_macs_cache(model: nn.Module) -> None:
    """Forget the cached counts of ``model`` (needed only after a change that assigns nothing, module docstring)."""
    _CACHE.pop(model, None)


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


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> tuple:
    """(channels, height, width) of ``input_size`` (default: the pretrained config's), with the model's channels."""
    if input_size is None:
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        input_size = cfg.get('input_size') or model.default_input_size
    in_chans = getattr(model, 'in_chans', input_size[0] if len(input_size) == 3 else 3)
    return (int(in_chans), *(int(s) for s in input_size[-2:]))


def _example_input(model: nn.Module, input_size: Optional[Sequence[int]]) -> torch.Tensor:
    """A batch of one zero image at ``input_size`` (default: the pretrained config's), with the model's channels."""
    param = next(model.parameters())
    return torch.zeros(1, *_input_size(model, input_size), dtype=param.dtype, device=param.device)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def per_exit_macs(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None, scope: str = 'cascade',
                  convention: str = 'fvcore') -> List[int]:
    """Multiply-adds (MACs) per exit, one integer per exit, shallow first (a single-exit model has one exit: the whole
    network).

    scope (fvcore convention):
      * ``'cascade'``: stages 1..k plus heads 1..k as ``forward_stage`` runs them, the cost of a sample tried at
        every earlier exit (MSDNet's stages are lazy, ``dynzoo.models.msdnet.LazyBlock``, so for its registered
        configurations this equals ``'lazy'``; the authors' whole blocks cost more, ``convention='authors'``);
      * ``'standalone'``: stages 1..k (as ``forward_stage`` runs them) plus head k only;
      * ``'lazy'``: heads 1..k and only the stage work those heads need (work that only later exits use, such as
        MSDNet's finer scales in its last layers, is left out).
    convention:
      * ``'fvcore'``: conv + linear multiply-adds counted by fvcore (``scope`` applies);
      * ``'authors'``: the original authors' own counter, reproduced to the unit, as the model's family names it
        (``dynzoo.families``; MSDNet: ``msdnet_op_counter``, which also counts ReLU and pooling and which the paper
        calls FLOPs; cumulative with earlier heads); ``scope`` is ignored.
    Counted once per model, input size, scope, convention and ``model.cost_key()`` (MSDNet: a hook on a block makes it
    run whole), then taken from the cache (module docstring).
    """
    if convention not in ('fvcore', 'authors'):
        raise ValueError(f"convention must be 'fvcore' or 'authors', got {convention!r}")
    if convention == 'fvcore' and scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    key = _cache_key(model, input_size, scope, convention)
    counts = _cached_per_exit_macs(model, input_size, scope, convention, key)
    if counts is None:
        x = _example_input(model, input_size)
        if isinstance(model, MultiExitNetwork):
            model.check_input(x)
        counts = _count_per_exit(model, x, scope, convention)
        entry = _CACHE.setdefault(model, dict(modules=frozenset(id(m) for m in model.modules()), counts={}))
        entry['counts'][key] = counts
    return list(counts)


def _cache_key(model: nn.Module, input_size: Optional[Sequence[int]], scope: str, convention: str) -> tuple:
    return (convention, scope if convention == 'fvcore' else None, _input_size(model, input_size),
            model.cost_key() if isinstance(model, MultiExitNetwork) else None)


def _cached_per_exit_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None, scope: str = 'cascade',
                         convention: str = 'fvcore', key: Optional[tuple] = None) -> Optional[List[int]]:
    """``per_exit_macs`` when it has counted them for the model as it is now, else None (counts nothing)."""
    entry = _CACHE.get(model)
    if entry is None:
        return None
    counts = entry['counts'].get(_cache_key(model, input_size, scope, convention) if key is None else key)
    return None if counts is None else list(counts)


def _authors_counter(model: nn.Module):
    family = family_of(model)
    return family.authors_macs if family is not None else None


def _count_per_exit(model: nn.Module, x: torch.Tensor, scope: str, convention: str) -> List[int]:
    if convention == 'authors':
        counter = _authors_counter(model)
        if counter is None:
            raise ValueError(f'{type(model).__name__} has no authors\' counting convention; use convention="fvcore"')
        with _eval_mode(model):
            return counter(model, x)
    with _eval_mode(model):
        if not isinstance(model, MultiExitNetwork):
            return [count_macs(model, x)]
        if scope == 'lazy':
            # Traced with autograd on, where MSDNet's dense layers concatenate their maps instead of growing them in
            # place: an in-place write would keep alive the work that dead-code elimination must drop.
            with torch.enable_grad():
                return [count_macs(_ExitGraph(model, k), x) for k in range(model.num_exits)]
        stages, heads = _stage_and_head_macs(model, x)
        if scope == 'standalone':
            return [sum(stages[:k + 1]) + heads[k] for k in range(model.num_exits)]
        return [sum(stages[:k + 1]) + sum(heads[:k + 1]) for k in range(model.num_exits)]


def _stage_and_head_macs(model: MultiExitNetwork, x: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Every stage's and every exit head's multiply-adds, in one forward under torch's ``FlopCounterMode``, which
    counts convolutions and matrix products only, two FLOPs per multiply-add: the count fvcore gives with
    ``CONV_LINEAR_OPS`` for the same work."""
    stages, heads = [], []
    with FlopCounterMode(display=False) as counter:
        state = x
        for k in range(model.num_exits):
            before = counter.get_total_flops()
            state = model.forward_stage(k, state)
            after_stage = counter.get_total_flops()
            model.forward_exit(k, state)
            stages.append((after_stage - before) // 2)
            heads.append((counter.get_total_flops() - after_stage) // 2)
    return stages, heads


def per_exit_flops(*args, **kwargs) -> List[int]:
    """Deprecated alias of ``per_exit_macs`` (same counts: dynzoo's "FLOPs" were always multiply-adds)."""
    _deprecated('per_exit_flops', 'per_exit_macs')
    return per_exit_macs(*args, **kwargs)


@contextmanager
def _track_called_modules(model: nn.Module, called: Set[nn.Module]):
    """Record in ``called`` every module of ``model`` that runs. The hooks sit on the modules, so networks whose
    stages run lazily unless hooked (MSDNet's ``LazyBlock``) run their stages whole, as their authors did."""
    handles = [m.register_forward_pre_hook(lambda module, args: called.add(module)) for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_exit_params(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None) -> List[int]:
    """Cumulative parameters per exit: everything that stages 1..k and heads 1..k use, with the stages run whole
    (MSDNet: its blocks 1..k, as the papers count them)."""
    if not isinstance(model, MultiExitNetwork):
        return [sum(p.numel() for p in model.parameters())]
    x = _example_input(model, input_size)
    called: Set[nn.Module] = set()
    counts = []
    with _eval_mode(model), _track_called_modules(model, called):
        state = x
        for k in range(model.num_exits):
            state = model.forward_stage(k, state)
            model.forward_exit(k, state)
            params = {id(p): p for m in called for p in m.parameters(recurse=False)}
            counts.append(sum(p.numel() for p in params.values()))
    return counts


def per_exit_table(model: MultiExitNetwork, input_size: Optional[Sequence[int]] = None) -> List[Dict[str, int]]:
    """One row per exit: cumulative ``params`` and multiply-adds for every scope (``macs_cascade``,
    ``macs_standalone``, ``macs_lazy``), plus ``macs_authors`` where the authors had their own counter."""
    params = per_exit_params(model, input_size)
    by_scope = {scope: per_exit_macs(model, input_size, scope=scope) for scope in SCOPES}
    authors = per_exit_macs(model, input_size, convention='authors') if _authors_counter(model) else None
    rows = []
    for k in range(len(params)):
        row = {'exit': k + 1, 'params': params[k], **{f'macs_{scope}': by_scope[scope][k] for scope in SCOPES}}
        if authors is not None:
            row['macs_authors'] = authors[k]
        rows.append(row)
    return rows
