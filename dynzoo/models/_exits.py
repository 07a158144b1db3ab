"""What every dynzoo multi-exit network shares.

A multi-exit network is a chain of *stages*, each followed by an exit *head*. A subclass implements

* ``forward_stage(k, state)``: the work between exit ``k - 1`` and exit ``k`` (``state`` is the input image for
  ``k == 0``, otherwise what ``forward_stage(k - 1, ...)`` returned: a tensor or a nested list/tuple of tensors and
  ``GrowingMap``s),
* ``exit_input(k, state)``: the feature map exit ``k``'s head reads in the state after stage ``k`` (by default the
  state itself),
* ``forward_exit_head(k, x, pre_logits=False)``: exit ``k``'s head on that feature map: its logits, or with
  ``pre_logits`` the vector its classifier reads,
* ``exit_classifiers()`` and ``set_exit_classifier(k, num_classes)``: the exits' classifiers (Linear layers) and how
  to replace one (``nn.Identity`` for ``num_classes=0``),
* ``valid_input_size(height, width)``: whether the network can take an input of that size,

and sets ``num_exits``, ``num_classes``, ``in_chans``, ``default_input_size``, ``num_features``, ``head_hidden_size``
and ``feature_info``. The base class then provides the dynzoo convention: ``forward(x)`` returns a list of logits,
shallow exit first; ``iter_exits(x)`` yields them one by one and lets the caller drop samples between exits (real
early exit); ``forward_exit(k, state)`` gives exit ``k``'s logits from a stage state, which MACs counters and the
ONNX export trace with ``forward_stage`` to cost or export any subset of the network.

timm's single-model API maps onto the final exit: ``forward_features(x)`` is the feature map the final exit's head
reads (``num_features`` channels), ``forward_head(x, pre_logits=False)`` that head applied to it (``pre_logits``:
the ``head_hidden_size`` vector its classifier reads), so ``forward_head(forward_features(x))`` is the last entry of
``forward(x)``. ``feature_info`` and ``forward_intermediates`` describe and return the feature map of every exit
(``timm.create_model(name, features_only=True)``), and ``get_classifier``/``reset_classifier`` act on every exit's
classifier.
"""
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from torch import nn

from ._fuse import has_call_hooks
from ._inputs import check_input_tensor, checks_input


class GrowingMap(NamedTuple):
    """A feature map that is a view of the first channels of ``spare[0]``, a larger buffer, in a stage state.

    The next layer that appends channels to ``map`` may write them into the buffer's spare channels instead of
    copying ``map`` (MSDNet's dense layers under ``optimize_for_inference``); it takes the buffer out of ``spare``,
    so only the latest map holds the right to grow and an older one, read again, is copied into a fresh buffer.
    """
    map: torch.Tensor
    spare: List[torch.Tensor]


def feature_map(x: Union[torch.Tensor, GrowingMap]) -> torch.Tensor:
    """The tensor of a stage-state entry: ``x`` itself, or a ``GrowingMap``'s ``map``."""
    return x.map if isinstance(x, GrowingMap) else x


def compact_batch(state, rows: torch.Tensor, protected: torch.Tensor, in_place: bool = True):
    """Keep the batch rows ``rows`` (1-D, distinct) of every tensor in a (nested list/tuple) stage state.

    Returns ``(state, order)``: the new state holds the kept samples in the first ``len(rows)`` rows of the same
    tensors (a narrowed view), and its row ``order[i]`` is old row ``rows[i]``. A kept sample already in those first
    rows stays where it is; each of the others is copied once, into a row a leaving sample freed. When a quarter of
    the batch leaves, that moves about a quarter of the kept samples' maps, where gathering them into new tensors
    would copy all of them (and a ``GrowingMap`` keeps growing in place in its buffer). A tensor that shares memory
    with ``protected`` (the caller's input) is never written: its kept rows are gathered into a new tensor, in the
    same memory format, in the same order; so is one whose samples share memory with each other (a batch expanded
    from one sample), and with ``in_place=False`` every tensor (where others may hold the state's tensors: a
    forward hook that kept a layer's output).
    """
    size = len(rows)
    stays = rows < size
    movers = rows[~stays]
    free = torch.ones(size, dtype=torch.bool, device=rows.device)
    free[rows[stays]] = False
    holes = torch.nonzero(free).squeeze(1)
    order = rows.clone()
    order[~stays] = holes
    # Each sample's maps are one block per tensor: copying block by block moves the data once, where
    # index_select + index_copy_ would move it twice.
    moves = list(zip(holes.tolist(), movers.tolist()))
    source = torch.arange(size, device=rows.device)
    source[holes] = movers
    protected_storage = protected.untyped_storage().data_ptr()

    def compact(tensor):
        if isinstance(tensor, GrowingMap):
            if not in_place:
                return compact(tensor.map)
            kept = compact(tensor.map)  # in place: its rows are the buffer's
            buffer = tensor.spare.pop() if tensor.spare else None
            return GrowingMap(kept, [] if buffer is None else [buffer[:size]])
        if isinstance(tensor, (list, tuple)):
            return type(tensor)(compact(t) for t in tensor)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'cannot select samples from a stage state of type {type(tensor).__name__}')
        row_extent = sum((n - 1) * stride for n, stride in zip(tensor.shape[1:], tensor.stride()[1:])) + 1
        if (not in_place or tensor.untyped_storage().data_ptr() == protected_storage
                or tensor.stride(0) < row_extent):
            channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
            gathered = torch.empty((size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device,
                                   memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            return torch.index_select(tensor, 0, source, out=gathered)
        for hole, mover in moves:
            tensor[hole].copy_(tensor[mover])
        return tensor[:size]

    return compact(state), order


def _check_keep(keep, num_inside: int, device) -> torch.Tensor:
    """``iter_exits``'s ``send(keep)`` argument as a 1-D long tensor of distinct positions among the ``num_inside``
    samples still inside, or a ``ValueError`` that says what ``keep`` must be."""
    what = (f'send(keep) takes the samples to keep among the {num_inside} still inside: a 1-D tensor or sequence of '
            f'distinct positions in 0..{num_inside - 1}, or a boolean mask of length {num_inside}')
    try:
        keep = torch.as_tensor(keep, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f'{what}; got {type(keep).__name__}') from error
    if keep.dim() != 1 or keep.is_floating_point() or keep.is_complex():
        raise ValueError(f'{what}; got a tensor of shape {tuple(keep.shape)} and dtype {keep.dtype}')
    if keep.dtype == torch.bool:
        if len(keep) != num_inside:
            raise ValueError(f'{what}; got a mask of length {len(keep)}')
        return torch.nonzero(keep).squeeze(1)
    keep = keep.long()
    if len(keep) and (keep.min() < 0 or keep.max() >= num_inside):
        raise ValueError(f'{what}; got positions {keep.min().item()}..{keep.max().item()}')
    if len(keep) > 1 and len(torch.unique(keep)) != len(keep):
        raise ValueError(f'{what}; got a position more than once')
    return keep


def flatten_tensors(state) -> List[torch.Tensor]:
    """All tensors of a (nested list/tuple) stage state, in order (a ``GrowingMap``'s map, not its buffer)."""
    if isinstance(state, (torch.Tensor, GrowingMap)):
        return [feature_map(state)]
    return [t for s in state for t in flatten_tensors(s)]


class MultiExitNetwork(nn.Module):
    """Base class of dynzoo's multi-exit networks (see the module docstring for the contract)."""

    num_exits: int
    num_classes: int
    in_chans: int = 3
    default_input_size: Tuple[int, int, int] = (3, 224, 224)
    num_features: int
    head_hidden_size: int
    feature_info: List[Dict[str, Any]]

    def forward_stage(self, k: int, state):
        raise NotImplementedError

    def exit_input(self, k: int, state) -> torch.Tensor:
        return state

    def forward_exit_head(self, k: int, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def exit_classifiers(self) -> List[nn.Module]:
        raise NotImplementedError

    def set_exit_classifier(self, k: int, num_classes: int) -> None:
        raise NotImplementedError

    def valid_input_size(self, height: int, width: int) -> bool:
        return (height, width) == tuple(self.default_input_size[1:])

    def cost_key(self):
        """A hashable that changes when the work of ``forward_stage`` changes while the modules stay the same (MSDNet:
        which blocks run lazily); part of the key under which ``dynzoo.per_exit_macs`` caches the costs."""
        return None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error that states the expected input unless ``x`` is a batch the network can take: a
        ``TypeError`` for a non-tensor or another dtype than the model's (``check_input_tensor``), a ``ValueError``
        for a shape it cannot take. Nothing is checked while ``torch.fx``, ``torch.jit.trace``, ``torch.compile`` or
        ``torch.export`` records the forward (``checks_input``); call it behind ``if not torch.jit.is_scripting()``."""
        if not checks_input(x):
            return
        check_input_tensor(self, x)
        expected = 'x'.join(str(s) for s in self.default_input_size)
        if x.dim() != 4:
            shape = tuple(x.shape)
            expected_shape = ', '.join(map(str, self.default_input_size))
            raise ValueError(
                f'{type(self).__name__} expects a batch of images of shape (N, {expected_shape}), got {shape}. '
                'Add a batch dimension with x.unsqueeze(0) for a single image.')
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f'{type(self).__name__} expects {self.in_chans}-channel input (N x {expected}), got {x.shape[1]} '
                f'channels in a batch of shape {tuple(x.shape)}. '
                + ('Convert grayscale/RGBA images to RGB first.' if self.in_chans == 3 else
                   f'Build the model with in_chans={x.shape[1]} to take such images.'))
        height, width = x.shape[-2:]
        if not self.valid_input_size(height, width):
            raise ValueError(
                f'{type(self).__name__} cannot take {height}x{width} inputs: it expects N x {expected} '
                f'({self.input_size_hint()}). Resize or crop the images to {expected.split("x", 1)[1]}.')

    def input_size_hint(self) -> str:
        """A short description of the input sizes the network takes, used in error messages."""
        return 'its exit heads are built for this size only'

    def forward_exit(self, k: int, state) -> torch.Tensor:
        """The logits of exit ``k`` from the state after stage ``k``."""
        return self.forward_exit_head(k, self.exit_input(k, state))

    def iter_exits(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the logits of exit 1, 2, ... computing each stage only when the next exit is requested.

        Instead of ``next(gen)``, a caller may ``gen.send(keep)`` with the samples to keep, as positions in the
        last logits yielded (a 1-D integer tensor or sequence of distinct positions, or a boolean mask over them):
        the next exit (returned by ``send``) and every later stage then run on those samples only. This is what
        ``dynzoo.early_exit`` uses to skip the work of samples that already exited. The stage state is compacted in
        place (``compact_batch``: only kept samples outside the first rows move), so its rows may come to hold the
        samples in another order; the logits are always yielded in the caller's order. With forward hooks on the
        model's layers, which may have kept a stage's tensors, the kept samples are copied into new tensors instead.
        """
        self.check_input(x)
        state = x
        order: Optional[torch.Tensor] = None  # row of the state that holds each sample, when not the identity
        in_place: Optional[bool] = None  # decided at the first send
        for k in range(self.num_exits):
            state = self.forward_stage(k, state)
            logits = self.forward_exit(k, state)
            keep = yield logits if order is None else logits.index_select(0, order)
            if keep is not None:
                keep = _check_keep(keep, len(logits), logits.device)
                if in_place is None:
                    in_place = not has_call_hooks(self.modules())
                state, order = compact_batch(state, keep if order is None else order[keep], x, in_place)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.iter_exits(x))

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: fail with the alternatives instead of an error deep inside the network.
        raise RuntimeError(
            f'{type(self).__name__} is a multi-exit network, which TorchScript cannot compile (its forward runs the '
            'generator iter_exits). torch.jit.trace(model, x) and torch.export.export(model, (x,)) record every exit; '
            'dynzoo.export writes each stage and its exit as an ONNX or pt2 graph.')

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the feature map of every exit in ``indices`` (``exit_input``; all of
        them by default, an int ``n`` for the last ``n``), and unless ``intermediates_only`` the final one
        (``forward_features``) first. ``norm`` is accepted for timm's API: the exits read their maps unnormalised."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__} returns NCHW feature maps, got output_fmt={output_fmt!r}")
        if not torch.jit.is_scripting():
            self.check_input(x)
        take, max_index = feature_take_indices(self.num_exits, indices)
        last = max_index if stop_early or intermediates_only else self.num_exits - 1
        state, intermediates = x, []
        for k in range(last + 1):
            state = self.forward_stage(k, state)
            if k in take:
                intermediates.append(self.exit_input(k, state).contiguous())
        if intermediates_only:
            return intermediates
        return self.exit_input(last, state).contiguous(), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map the final exit's head reads (``num_features`` channels), contiguous (with autograd off,
        MSDNet's exits read views of the buffers its feature maps grow in)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        state = x
        for k in range(self.num_exits):
            state = self.forward_stage(k, state)
        return self.exit_input(self.num_exits - 1, state).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The final exit's head on ``forward_features(x)``: its logits, or with ``pre_logits`` the
        ``head_hidden_size`` vector its classifier reads. ``forward_head(k, state)``, the per-exit method's former
        name, still works with a ``DeprecationWarning``: use ``forward_exit(k, state)``."""
        if isinstance(x, int):
            warnings.warn('forward_head(k, state) is deprecated: use forward_exit(k, state) (forward_head(x) is '
                          "timm's final head on forward_features(x))", DeprecationWarning, stacklevel=2)
            return self.forward_exit(x, pre_logits)
        return self.forward_exit_head(self.num_exits - 1, x, pre_logits)

    def get_classifier(self) -> nn.ModuleList:
        """The exits' classifiers, shallow first: one ModuleList, the same on every call, that follows
        ``reset_classifier``. It holds the heads' own layers (it is not a submodule: no parameters of its own)."""
        classifiers = self.__dict__.setdefault('_classifiers', nn.ModuleList())
        for k, classifier in enumerate(self.exit_classifiers()):
            if k == len(classifiers):
                classifiers.append(classifier)
            elif classifiers[k] is not classifier:
                classifiers[k] = classifier
        return classifiers

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifiers for ``num_classes`` on every exit; ``num_classes=0`` gives ``nn.Identity`` heads, whose
        outputs are then their pre-logits vectors. The heads' pooling is part of each family's design:
        ``global_pool`` may only be None or ``'avg'``, what they do."""
        if global_pool not in (None, 'avg'):
            raise ValueError(f"{type(self).__name__}'s exit heads average-pool: global_pool must be None or 'avg', "
                             f'got {global_pool!r}')
        for k in range(self.num_exits):
            self.set_exit_classifier(k, num_classes)
        self.num_classes = num_classes
