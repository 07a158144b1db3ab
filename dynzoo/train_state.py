"""A training run's resume state, in two forms.

* The **full state** (``OUTPUT/last.pth``, ``torch.save``): model, EMA, loss, optimizer and scheduler at full
  precision, every rank's RNG states, epoch and history. ``--resume`` from it continues bit-exactly.
* The **compact state** (``--compact-dir``, ``state.safetensors``): the same run in a file small enough to commit to
  a repository between sessions: float16 model, EMA and loss weights, bfloat16 optimizer buffers; the scheduler,
  optimizer hyper-parameters, epoch and history in the safetensors metadata; no RNG state. Resuming from it continues
  the same schedule at the same epoch and step, with the weights rounded to float16.

Both are written atomically (a temporary file in the same folder, then ``os.replace``): a stop at any moment leaves
the previous complete state.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import safetensors.torch
import torch

__all__ = ['COMPACT_NAME', 'atomic_write', 'save_checkpoint', 'save_compact_state', 'load_compact_state',
           'find_resume_state']

COMPACT_NAME = 'state.safetensors'
_METADATA_KEY = 'dynzoo_train_state'
_WEIGHT_GROUPS = ('model', 'model_ema', 'criterion')  # state dicts stored as float16


def atomic_write(path: Path, write: Callable) -> None:
    """``write(file)`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """The full state, ``torch.save``d atomically: a reader never sees a partly written checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def _lowered(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating point and stays finite there (else unchanged), contiguous."""
    if tensor.is_floating_point():
        low = tensor.detach().to(dtype)
        if bool(torch.isfinite(low).all()) or not bool(torch.isfinite(tensor).all()):
            tensor = low
    return tensor.detach().cpu().contiguous()


def save_compact_state(path: Path, state: Dict[str, Any]) -> None:
    """The compact form of a full state (as ``dynzoo.train`` saves it) written to ``path``."""
    tensors: Dict[str, torch.Tensor] = {}
    for group in _WEIGHT_GROUPS:
        for key, value in (state.get(group) or {}).items():
            tensors[f'{group}.{key}'] = _lowered(value, torch.float16)
    for index, buffers in state['optimizer']['state'].items():
        for name, value in buffers.items():
            if isinstance(value, torch.Tensor):  # per-parameter buffers in bfloat16, step counts as they are
                low = value.numel() > 1
                tensors[f'optimizer.{index}.{name}'] = _lowered(value, torch.bfloat16) if low else value.cpu()
    meta = {k: state[k] for k in ('epoch', 'global_step', 'history', 'train_time', 'config', 'model_name',
                                  'scheduler')}
    meta['optimizer_param_groups'] = state['optimizer']['param_groups']
    meta['groups'] = [g for g in _WEIGHT_GROUPS if state.get(g) is not None]
    metadata = {_METADATA_KEY: json.dumps(meta)}
    atomic_write(Path(path), lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))


def load_compact_state(path: Path) -> Dict[str, Any]:
    """A compact state read back into the layout of the full state (weights as float32, no ``rng`` entry)."""
    path = Path(path)
    with safetensors.safe_open(os.fspath(path), framework='pt') as f:
        meta = json.loads((f.metadata() or {}).get(_METADATA_KEY, 'null'))
        if meta is None:
            raise ValueError(f'{path} is a safetensors file but not a dynzoo compact training state (no '
                             f'{_METADATA_KEY!r} metadata)')
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    state = {k: v for k, v in meta.items() if k not in ('optimizer_param_groups', 'groups')}
    for group in meta['groups']:
        prefix = group + '.'
        state[group] = {k[len(prefix):]: v.float() if v.is_floating_point() else v
                        for k, v in tensors.items() if k.startswith(prefix)}
    buffers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith('optimizer.'):
            _, index, name = key.split('.', 2)
            buffers.setdefault(int(index), {})[name] = value.float() if value.is_floating_point() else value
    state['optimizer'] = dict(state=buffers, param_groups=meta['optimizer_param_groups'])
    return state


def find_resume_state(output: Path, compact_dir: Optional[Path], load_full: Callable[[Path], Dict[str, Any]]
                      ) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """``(state, path)`` to resume from: the full state ``output/last.pth`` if it exists, else the compact state in
    ``compact_dir``, else ``(None, None)``."""
    full = Path(output) / 'last.pth'
    if full.is_file():
        return load_full(full), full
    compact = Path(compact_dir) / COMPACT_NAME if compact_dir else None
    if compact is not None and compact.is_file():
        return load_compact_state(compact), compact
    return None, None
