"""What every dynzoo multi-exit network shares.

A multi-exit network is a chain of *stages*, each followed by an exit *head*. A subclass implements

* ``forward_stage(k, state)``: the work between exit ``k - 1`` and exit ``k`` (``state`` is the input image for
  ``k == 0``, otherwise what ``forward_stage(k - 1, ...)`` returned: a tensor or a nested list/tuple of tensors),
* ``forward_head(k, state)``: the logits of exit ``k`` from the state after stage ``k``,
* ``exit_heads()``: the exit classifiers (the modules that ``get_classifier``/``reset_classifier`` act on),
* ``valid_input_size(height, width)``: whether the network can take an input of that size,

and sets ``num_exits``, ``in_chans`` and ``default_input_size``. The base class then provides the dynzoo convention:
``forward(x)`` returns a list of logits, shallow exit first; ``iter_exits(x)`` yields them one by one and lets the
caller drop samples between exits (real early exit); MACs counters trace ``forward_stage``/``forward_head`` to
cost any subset of the network.
"""
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from ._inputs import check_input_tensor


# Attribute (in a tensor's ``__dict__``) naming the larger buffer whose first channels the tensor is a view of, with
# the right to append channels in place there (MSDNet's ``concat_channels`` under ``optimize_for_inference``).
SPARE_CHANNELS = '_dynzoo_spare_channels'


def compact_batch(state, rows: torch.Tensor, protected: torch.Tensor):
    """Keep the batch rows ``rows`` (1-D, distinct) of every tensor in a (nested list/tuple) stage state.

    Returns ``(state, order)``: the new state holds the kept samples in the first ``len(rows)`` rows of the same
    tensors (a narrowed view), and its row ``order[i]`` is old row ``rows[i]``. A kept sample already in those first
    rows stays where it is; each of the others is copied once, into a row a leaving sample freed. When a quarter of
    the batch leaves, that moves about a quarter of the kept samples' maps, where gathering them into new tensors
    would copy all of them (and a feature map with spare channels, ``SPARE_CHANNELS``, keeps growing in place in its
    buffer). A tensor that shares memory with ``protected`` (the caller's input) is never written: its kept rows are
    gathered into a new tensor, in the same memory format, in the same order; so is one whose samples share memory
    with each other (a batch expanded from one sample).
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
        if isinstance(tensor, (list, tuple)):
            return type(tensor)(compact(t) for t in tensor)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'cannot select samples from a stage state of type {type(tensor).__name__}')
        row_extent = sum((n - 1) * stride for n, stride in zip(tensor.shape[1:], tensor.stride()[1:])) + 1
        if tensor.untyped_storage().data_ptr() == protected_storage or tensor.stride(0) < row_extent:
            channels_last = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
            gathered = torch.empty((size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device,
                                   memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            return torch.index_select(tensor, 0, source, out=gathered)
        for hole, mover in moves:
            tensor[hole].copy_(tensor[mover])
        kept = tensor[:size]
        spare = tensor.__dict__.get(SPARE_CHANNELS)
        if spare is not None:
            kept.__dict__[SPARE_CHANNELS] = spare[:size]
        return kept

    return compact(state), order


def flatten_tensors(state) -> List[torch.Tensor]:
    """All tensors of a (nested list/tuple) stage state, in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in flatten_tensors(s)]


class MultiExitNetwork(nn.Module):
    """Base class of dynzoo's multi-exit networks (see the module docstring for the contract)."""

    num_exits: int
    in_chans: int = 3
    default_input_size: Sequence[int] = (3, 224, 224)

    def forward_stage(self, k: int, state):
        raise NotImplementedError

    def forward_head(self, k: int, state) -> torch.Tensor:
        raise NotImplementedError

    def exit_heads(self) -> List[nn.Module]:
        raise NotImplementedError

    def valid_input_size(self, height: int, width: int) -> bool:
        return (height, width) == tuple(self.default_input_size[1:])

    def check_input(self, x: torch.Tensor) -> None:
        """Raise an error that states the expected input unless ``x`` is a batch the network can take: a
        ``TypeError`` for a non-tensor or another dtype than the model's (``check_input_tensor``), a ``ValueError``
        for a shape it cannot take."""
        if not torch.jit.is_scripting():
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

    def iter_exits(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the logits of exit 1, 2, ... computing each stage only when the next exit is requested.

        Instead of ``next(gen)``, a caller may ``gen.send(index)`` with a 1-D tensor of the batch positions to keep:
        the next exit (returned by ``send``) and every later stage then run on those samples only. This is what
        ``dynzoo.early_exit`` uses to skip the work of samples that already exited. The stage state is compacted in
        place (``compact_batch``: only kept samples outside the first rows move), so its rows may come to hold the
        samples in another order; the logits are always yielded in the caller's order.
        """
        self.check_input(x)
        state = x
        order: Optional[torch.Tensor] = None  # row of the state that holds each sample, when not the identity
        for k in range(self.num_exits):
            state = self.forward_stage(k, state)
            logits = self.forward_head(k, state)
            keep: Optional[torch.Tensor] = yield logits if order is None else logits.index_select(0, order)
            if keep is not None:
                state, order = compact_batch(state, keep if order is None else order[keep], x)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.iter_exits(x))

    def get_classifier(self) -> nn.ModuleList:
        return nn.ModuleList(self.exit_heads())

    def reset_classifier(self, num_classes: int, **kwargs) -> None:
        for head in self.exit_heads():
            head.reset_classifier(num_classes)
        self.num_classes = num_classes
