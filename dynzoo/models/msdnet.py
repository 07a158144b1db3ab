"""MSDNet: Multi-Scale Dense Networks (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification", ICLR 2018).

The network is the authors' PyTorch port (kalviny/MSDNet-PyTorch, ``models/msdnet.py``) rebuilt from its
specification: same layers, same ``state_dict`` keys and shapes, same outputs, same parameter counts, so the authors'
released checkpoints load as they are. ImageNet weights: the authors' own (``msdnet_step4.in1k``,
``msdnet_step7.in1k``: files in a shared folder, loaded with ``file=``) and those released with L2W-DEN (direct
downloads, ``l2w_e300_in1k`` / ``l2w_e100_in1k``; the 300-epoch ones are the bare names' default). Where dynzoo
differs:

* ``forward`` returns the list of exit logits like the authors' code, and ``iter_exits`` computes them one block at a
  time so that samples can leave early for real (the authors only simulate early exit);
* blocks run lazily (``LazyBlock``): the finer scales of a block's last layers, which only later exits read, are
  computed when the next stage starts, so a sample that leaves never pays for them (same outputs);
* ``num_classes`` is an argument (the authors derive it from the dataset name);
* initialisation is the one the authors intended (He-normal convs, BN weight 1 / bias 0, zero Linear bias). Their
  PyTorch ``_init_weights`` loop only visits the top-level containers, so it never reaches a Conv/BN/Linear and their
  models silently trained from PyTorch's default init (``msdnet_init='torch'`` reproduces that).
* wrong input sizes raise a ``ValueError`` up front instead of a shape error inside a head;
* with autograd off, the dense layers append into spare channels instead of concatenating, and the 1x1 convs run
  as batched matrix products that read those maps without copying them (``concat_channels``, ``MatmulConv1x1``):
  same outputs within float rounding, same ``state_dict``.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.models import register_model

from ._normalization import normalization
from ._exits import GrowingMap, MultiExitNetwork, feature_map
from ._fuse import FoldedBatchNorm, FunctionalSequential, MatmulConv1x1, has_call_hooks, is_plain_conv
from ._helpers import (CheckpointMismatchError, build_model, check_state_dict, classifier_layer, dynzoo_default_cfgs,
                       init_he_fan_out, unwrap_state_dict)

__all__ = ['MSDNet', 'checkpoint_filter_fn', 'msdnet_op_counter']


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """A conv without bias; 1x1 ones run as matrix products with autograd off (``MatmulConv1x1``)."""
    if (kernel_size, stride, padding) == (1, 1, 0):
        return MatmulConv1x1(in_chs, out_chs, bias=False)
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False)


class ConvBnAct(nn.Module):
    """Conv (no bias) - BN - ReLU, held in ``net`` as in the authors' key layout."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = FunctionalSequential(
            _conv(in_chs, out_chs, kernel_size, stride, padding),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BottleneckConv(nn.Module):
    """Optional 1x1 bottleneck (width ``min(in_chs, bn_width * out_chs)``) then a 3x3 conv, stride 1 or 2."""

    def __init__(self, in_chs: int, out_chs: int, downsample: bool, bottleneck: bool, bn_width: int):
        super().__init__()
        layers: List[nn.Module] = []
        inner_chs = in_chs
        if bottleneck:
            inner_chs = min(in_chs, bn_width * out_chs)
            layers += [_conv(in_chs, inner_chs, 1), nn.BatchNorm2d(inner_chs), nn.ReLU(inplace=True)]
        layers += [
            _conv(inner_chs, out_chs, 3, stride=2 if downsample else 1, padding=1),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        ]
        self.net = FunctionalSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Below this batch size torch.cat's copies cost less than growing in place (CPU, docs/benchmarks.md).
GROW_IN_PLACE_MIN_BATCH = 8


def concat_channels(tensors: Sequence[Union[torch.Tensor, GrowingMap]],
                    final_width: int = 0) -> Union[torch.Tensor, GrowingMap]:
    """``torch.cat`` of the feature maps along the channels, as the authors' dense layers; with autograd off (dynzoo's
    inference path; not while ``torch.fx`` traces) and at least ``GROW_IN_PLACE_MIN_BATCH`` samples, a ``GrowingMap``
    instead: the result is a view of a buffer with spare channels after it, and the next call that appends to it
    writes only its new channels there, where ``torch.cat`` would copy the whole map at every layer.

    The first entry's buffer is used when it is a ``GrowingMap`` that still holds one with room; otherwise a new buffer
    with ``final_width`` channels (the width this scale reaches before a transition or its exit drops it, so that it
    is allocated and filled once), or twice the result's width when that is unknown or too small. Dense layers never
    modify their input, so every earlier view stays valid."""
    maps = [feature_map(t) for t in tensors]
    base = maps[0]
    if torch.is_grad_enabled() or isinstance(base, torch.fx.Proxy) or base.shape[0] < GROW_IN_PLACE_MIN_BATCH:
        return torch.cat(maps, dim=1)
    width = sum(t.shape[1] for t in maps)
    first = tensors[0]
    buffer = first.spare.pop() if isinstance(first, GrowingMap) and first.spare else None
    if buffer is None or buffer.shape[1] < width:
        n, c, h, w = base.shape
        buffer = base.new_empty((n, final_width if final_width >= width else 2 * width, h, w))
        buffer[:, :c].copy_(base)
    offset = base.shape[1]
    for t in maps[1:]:
        buffer[:, offset:offset + t.shape[1]].copy_(t)
        offset += t.shape[1]
    return GrowingMap(buffer[:, :width], [buffer])


class SameScaleDenseLayer(nn.Module):
    """Dense layer at one scale: ``[x, conv(x)]``."""

    def __init__(self, in_chs: int, growth: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.conv_normal = BottleneckConv(in_chs, growth, False, bottleneck, bn_width)
        self.out_chs = in_chs + growth
        self.final_width = 0  # set by MSDNet: see concat_channels

    def forward(self, same_scale: Union[torch.Tensor, GrowingMap]) -> Union[torch.Tensor, GrowingMap]:
        return concat_channels([same_scale, self.conv_normal(feature_map(same_scale))], self.final_width)


class TwoScaleDenseLayer(nn.Module):
    """Dense layer fed by two scales: ``[x_s, strided_conv(x_{s-1}), conv(x_s)]``, half the growth from each conv."""

    def __init__(self, finer_chs: int, same_chs: int, growth: int, bottleneck: bool, finer_bn_width: int,
                 same_bn_width: int):
        super().__init__()
        self.conv_down = BottleneckConv(finer_chs, growth // 2, True, bottleneck, finer_bn_width)
        self.conv_normal = BottleneckConv(same_chs, growth // 2, False, bottleneck, same_bn_width)
        self.out_chs = same_chs + growth // 2 * 2
        self.final_width = 0  # set by MSDNet: see concat_channels

    def forward(self, finer: Union[torch.Tensor, GrowingMap],
                same_scale: Union[torch.Tensor, GrowingMap]) -> Union[torch.Tensor, GrowingMap]:
        return concat_channels([same_scale, self.conv_down(feature_map(finer)),
                                self.conv_normal(feature_map(same_scale))], self.final_width)


class MultiScaleStem(nn.Module):
    """The stem: one feature map per scale, each scale a stride-2 ConvBnAct of the previous one."""

    def __init__(self, in_chans: int, channels: int, gr_factor: Sequence[int], imagenet_stem: bool):
        super().__init__()
        widths = [channels * f for f in gr_factor]
        if imagenet_stem:
            # The authors' ImageNet stem conv keeps PyTorch's default bias (their Lua code had none).
            first: nn.Module = FunctionalSequential(
                nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            first = ConvBnAct(in_chans, widths[0], 3, stride=1, padding=1)
        self.layers = nn.ModuleList(
            [first] + [ConvBnAct(widths[s - 1], widths[s], 3, stride=2, padding=1) for s in range(1, len(widths))])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales


class MultiScaleDenseLayer(nn.Module):
    """One MSDNet layer: takes ``in_scales`` feature maps (finest first), returns ``out_scales`` (``in_scales`` or one
    fewer, when the finest scale is dropped). ``in_chs`` is the base width; scale ``s`` has ``in_chs * gr_factor[s]``
    channels and grows by ``growth * gr_factor[s]``."""

    def __init__(self, in_chs: int, growth: int, in_scales: int, out_scales: int, gr_factor: Sequence[int],
                 bn_factor: Sequence[int], bottleneck: bool):
        super().__init__()
        num_scales = len(gr_factor)
        self.discard = in_scales - out_scales
        offset = num_scales - out_scales
        layers: List[nn.Module] = []
        for k in range(out_scales):
            s = offset + k
            if k == 0 and self.discard == 0:
                layers.append(SameScaleDenseLayer(
                    in_chs * gr_factor[s], growth * gr_factor[s], bottleneck, bn_factor[s]))
            else:
                layers.append(TwoScaleDenseLayer(
                    in_chs * gr_factor[s - 1], in_chs * gr_factor[s], growth * gr_factor[s],
                    bottleneck, bn_factor[s - 1], bn_factor[s]))
        self.layers = nn.ModuleList(layers)
        self.defers_outputs = False  # set by MSDNet: whether LazyBlock computes some outputs after the exit

    def inference_form(self) -> nn.Module:
        """What ``optimize_for_inference`` puts in this layer's place after ``fuse_conv_bn``: a
        ``SharedBottleneckLayer`` when every bottleneck is a folded 1x1 conv + ReLU; otherwise (no bottlenecks, a
        BatchNorm that could not be folded, or outputs that ``LazyBlock`` computes after the exit, which a shared
        bottleneck would compute before it) this layer itself."""
        nets = [conv.net for layer in self.layers for conv in (getattr(layer, 'conv_down', None), layer.conv_normal)
                if conv is not None]
        if self.defers_outputs or not all(_is_folded_bottleneck(net) for net in nets):
            return self
        return SharedBottleneckLayer(self)

    def forward(self, scales: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for k, layer in enumerate(self.layers):
            same = k + self.discard
            if isinstance(layer, SameScaleDenseLayer):
                out.append(layer(scales[same]))
            else:
                out.append(layer(scales[same - 1], scales[same]))
        return out


class SharedBottleneckLayer(nn.Module):
    """The inference form of an eval-mode, BN-folded ``MultiScaleDenseLayer`` (``dynzoo.optimize_for_inference``).

    Most input scales are read by two bottleneck 1x1 convs: that scale's own conv and the next scale's strided conv
    (the coarsest scale, and a finest scale about to be dropped, by one). Here the convs reading a scale run as one
    1x1 conv with all their output widths, so every feature map is read once per layer instead of twice (the largest
    cost of MSDNet's small-channel 32x32 layers on CPU); each 3x3 conv then reads its share of the channels. The
    dense layers append their outputs in place (``concat_channels``). Same outputs within float rounding;
    ``state_dict`` keys differ from the training layer's."""

    def __init__(self, layer: MultiScaleDenseLayer):
        super().__init__()
        self.discard = layer.discard
        readers: List[List[nn.Sequential]] = [[] for _ in range(layer.discard + len(layer.layers))]
        branches = []  # per output scale, per conv: (input scale, its channels in the merged bottleneck, its net)
        for k, dense in enumerate(layer.layers):
            same = k + layer.discard
            convs = [(same - 1, dense.conv_down)] if isinstance(dense, TwoScaleDenseLayer) else []
            convs.append((same, dense.conv_normal))
            branches.append([])
            for scale, conv in convs:
                start = sum(net[0].out_channels for net in readers[scale])
                readers[scale].append(conv.net)
                branches[-1].append((scale, start, start + conv.net[0].out_channels, conv.net))
        self.bottlenecks = nn.ModuleList(_merged_pointwise([net[0] for net in nets]) for nets in readers)
        self.final_widths = [dense.final_width for dense in layer.layers]
        self.branch_channels = [[(scale, start, end) for scale, start, end, _ in row] for row in branches]
        self.branch_convs = nn.ModuleList(nn.ModuleList(FunctionalSequential(*net[3:]) for *_, net in row)
                                          for row in branches)

    def forward(self, scales: List[torch.Tensor]) -> List[torch.Tensor]:
        inner = [bottleneck(feature_map(x)) for bottleneck, x in zip(self.bottlenecks, scales)]
        out = []
        for k, (convs, channels) in enumerate(zip(self.branch_convs, self.branch_channels)):
            parts = [scales[k + self.discard]]
            parts += [conv(inner[s][:, start:end]) for conv, (s, start, end) in zip(convs, channels)]
            out.append(concat_channels(parts, self.final_widths[k]))
        return out


def _is_folded_bottleneck(net: nn.Sequential) -> bool:
    """Whether a ``BottleneckConv.net`` starts with a 1x1 conv whose BatchNorm ``fuse_conv_bn`` folded, then ReLU."""
    conv = net[0]
    return (len(net) == 6 and is_plain_conv(conv) and conv.kernel_size == (1, 1)
            and conv.bias is not None and isinstance(net[1], FoldedBatchNorm) and type(net[2]) is nn.ReLU)


def _merged_pointwise(convs: Sequence[nn.Conv2d]) -> nn.Sequential:
    """One 1x1 conv (+ ReLU) computing the outputs of BN-folded 1x1 convs that read the same input, stacked; a
    ``FoldedBatchNorm`` keeps count of their BatchNorms."""
    weight = convs[0].weight
    merged = nn.Conv2d(convs[0].in_channels, sum(c.out_channels for c in convs), 1, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([c.weight for c in convs]))
        merged.bias.copy_(torch.cat([c.bias for c in convs]))
    merged.requires_grad_(weight.requires_grad)
    return FunctionalSequential(merged, FoldedBatchNorm(merged.out_channels, folded=len(convs)).eval(),
                                nn.ReLU(inplace=True))


class ScaleTransition(nn.Module):
    """Applies ``m[i]`` to the ``i``-th feature map (the authors' transition: 1x1 ConvBnAct per kept scale)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, scales: List[torch.Tensor]) -> List[torch.Tensor]:
        return [m(feature_map(x)) for m, x in zip(self.m, scales)]


class ExitHead(nn.Module):
    """Exit head on the coarsest scale: two stride-2 ConvBnAct, 2x2 average pool, Linear."""

    def __init__(self, in_chs: int, inner_chs: int, num_classes: int):
        super().__init__()
        self.m = nn.Sequential(
            ConvBnAct(in_chs, inner_chs, 3, stride=2, padding=1),
            ConvBnAct(inner_chs, inner_chs, 3, stride=2, padding=1),
            nn.AvgPool2d(2),
        )
        self.hidden_size = inner_chs
        self.linear = classifier_layer(inner_chs, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.m(x).flatten(1)
        return x if pre_logits else self.linear(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.linear = classifier_layer(self.hidden_size, num_classes)


class DeferredScales(list):
    """The state after a block that ``LazyBlock`` ran up to its exit: its frontier maps. The next stage finishes the
    block first; a plain list (a block run whole) needs no finishing. Being a list, it passes through
    ``compact_batch`` and ``dynzoo.export`` as the other states do."""


class LazyBlock:
    """How ``MSDNet.forward_stage`` runs one block lazily: before the block's exit, only the work that exit needs;
    the rest when the next stage starts.

    An exit reads the coarsest scale of its block's last layer. That output reads two scales of the layer before
    (its own and the next finer one), which read three of the layer before that, and so on: the finer-scale outputs
    of a block's last layers feed only later blocks. The authors compute every scale of a block before its exit;
    here those outputs wait for the next stage, so a sample that leaves at the exit never pays for them, and the
    last block's are never computed. The outputs are the same, and so is the work for a sample that runs on.

    Scales are numbered from 0 (the finest) to ``num_scales - 1``. A ``MultiScaleDenseLayer``'s output at scale
    ``s`` reads scales ``s - 1`` and ``s`` of its input (``s`` alone at the finest scale it keeps), a
    ``ScaleTransition``'s reads scale ``s``; the stem and a ``SharedBottleneckLayer`` (``optimize_for_inference``)
    run whole. The state after the block (``frontier``) holds the latest map of every scale that the deferred work
    reads, and the coarsest scale last: the map the exit reads.
    """

    def __init__(self, modules: Sequence[nn.Module], num_scales: int):
        self.modules = tuple(modules)
        self.num_scales = num_scales
        self.scales = [self.module_scales(m, num_scales) for m in self.modules]  # per module: (inputs, outputs)
        needed = {num_scales - 1}  # the scales of the current module's output that the rest of the block reads
        self.before_exit: List[Optional[List[int]]] = []  # per module: scales computed before the exit (None: all)
        self.after_exit: List[List[int]] = []  # per module: scales computed when the next stage starts
        for module, (inputs, outputs) in zip(reversed(self.modules), reversed(self.scales)):
            if isinstance(module, (MultiScaleDenseLayer, ScaleTransition)):
                self.before_exit.insert(0, sorted(needed))
                self.after_exit.insert(0, sorted(set(outputs) - needed))
                needed = {r for s in needed for r in self._reads(module, s)}
            else:
                self.before_exit.insert(0, None)
                self.after_exit.insert(0, [])
                needed = set(inputs)
        self.outputs = self.scales[-1][1]
        produced, frontier = set(), set()
        for module, later in zip(self.modules, self.after_exit):
            frontier |= {r for s in later for r in self._reads(module, s)} - produced
            produced |= set(later)
        self.frontier = sorted(frontier | (set(self.outputs) - produced))
        self.defers = any(self.after_exit)

    @staticmethod
    def module_scales(module: nn.Module, num_scales: int):
        """(input scales, output scales) of a block module; the stem's input (the image) has none. ``TypeError`` for
        a module of another kind."""
        if isinstance(module, MultiScaleStem):
            return [], list(range(num_scales))
        if isinstance(module, ScaleTransition):
            scales = list(range(num_scales - len(module.m), num_scales))
            return scales, scales
        if isinstance(module, (MultiScaleDenseLayer, SharedBottleneckLayer)):
            kept = len(module.layers) if isinstance(module, MultiScaleDenseLayer) else len(module.branch_convs)
            return (list(range(num_scales - kept - module.discard, num_scales)),
                    list(range(num_scales - kept, num_scales)))
        raise TypeError(f'{type(module).__name__} is not an MSDNet block module')

    def _reads(self, module: nn.Module, scale: int) -> List[int]:
        if isinstance(module, MultiScaleDenseLayer):
            layer = module.layers[scale - (self.num_scales - len(module.layers))]
            return [scale - 1, scale] if isinstance(layer, TwoScaleDenseLayer) else [scale]
        return [scale]

    def _compute(self, module: nn.Module, scale: int, maps: Dict[int, Any]):
        """``module``'s output at ``scale``, from its input ``maps`` (by scale)."""
        if isinstance(module, ScaleTransition):
            return module.m[scale - (self.num_scales - len(module.m))](feature_map(maps[scale]))
        layer = module.layers[scale - (self.num_scales - len(module.layers))]
        if isinstance(layer, TwoScaleDenseLayer):
            return layer(maps[scale - 1], maps[scale])
        return layer(maps[scale])

    def run(self, state) -> DeferredScales:
        """The block up to its exit, from the previous block's output maps (the image for the first block): the
        frontier maps."""
        maps: Dict[int, Any] = {}
        if isinstance(state, (list, tuple)):
            maps.update(zip(range(self.num_scales - len(state), self.num_scales), state))
        for module, (inputs, outputs), scales in zip(self.modules, self.scales, self.before_exit):
            if scales is None:
                maps.update(zip(outputs, module([maps[s] for s in inputs] if inputs else state)))
            else:
                maps.update({s: self._compute(module, s, maps) for s in scales})
        return DeferredScales(maps[s] for s in self.frontier)

    def complete(self, state: Sequence[Any]) -> List[Any]:
        """The block's output maps (every scale, as the authors' block returns them) from ``run``'s frontier."""
        maps = dict(zip(self.frontier, state))
        for module, scales in zip(self.modules, self.after_exit):
            if scales:
                maps.update({s: self._compute(module, s, maps) for s in scales})
        return [maps[s] for s in self.outputs]


def _set_final_widths(blocks: nn.ModuleList, num_scales: int) -> None:
    """Give every dense layer the width its scale reaches before the next transition or the end of the network (or
    before a later layer drops the scale), so that ``concat_channels`` allocates each growing map once."""
    chains: Dict[int, List[nn.Module]] = {}  # scale -> the dense layers that grew its current map, in order

    def close_chains():
        for chain in chains.values():
            for layer in chain:
                layer.final_width = chain[-1].out_chs
        chains.clear()

    for block in blocks:
        for module in block:
            if isinstance(module, ScaleTransition):
                close_chains()
            elif isinstance(module, MultiScaleDenseLayer):
                for k, layer in enumerate(module.layers):
                    chains.setdefault(num_scales - len(module.layers) + k, []).append(layer)
    close_chains()


def _parse_factor(value) -> List[int]:
    return [int(v) for v in value.split('-')] if isinstance(value, str) else [int(v) for v in value]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MSDNet(MultiExitNetwork):
    """Multi-Scale Dense Network with one exit per block.

    Arguments follow the authors' flags: ``n_blocks`` (exits), ``base`` (layers before exit 1), ``step_mode``
    ('even': ``step`` layers per later block; 'lin_grow': block i has ``step * i + 1``), ``channels`` (``nChannels``),
    ``growth_rate``, ``gr_factor`` / ``bn_factor`` (per-scale width and bottleneck factors, as '1-2-4' or a list;
    the number of scales is their length), ``bottleneck``, ``prune`` ('max' or 'min' scale dropping), ``reduction``
    (transition compression, 0 disables transitions) and ``stem`` ('imagenet': 7x7/2 conv + max-pool and
    ``channels``-wide heads; 'cifar': 3x3 conv and 128-wide heads).
    """

    def __init__(
            self,
            n_blocks: int = 5,
            base: int = 4,
            step_mode: str = 'even',
            step: int = 4,
            channels: int = 32,
            growth_rate: int = 16,
            gr_factor='1-2-4-4',
            bn_factor='1-2-4-4',
            bottleneck: bool = True,
            prune: str = 'max',
            reduction: float = 0.5,
            stem: str = 'imagenet',
            num_classes: int = 1000,
            in_chans: int = 3,
            msdnet_init: str = 'intended',
    ):
        super().__init__()
        if step_mode not in ('even', 'lin_grow'):
            raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
        if prune not in ('max', 'min'):
            raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")
        if stem not in ('imagenet', 'cifar'):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if msdnet_init not in ('intended', 'torch'):
            raise ValueError(f"msdnet_init must be 'intended' or 'torch', got {msdnet_init!r}")
        gr_factor, bn_factor = _parse_factor(gr_factor), _parse_factor(bn_factor)
        if len(bn_factor) != len(gr_factor):
            raise ValueError(f'gr_factor {gr_factor} and bn_factor {bn_factor} must have one entry per scale')
        self.num_exits = n_blocks
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = stem
        self.num_scales = len(gr_factor)
        self.default_input_size = (in_chans, 224, 224) if stem == 'imagenet' else (in_chans, 32, 32)
        if step_mode == 'even':
            self.steps = [base] + [step] * (n_blocks - 1)
        else:
            self.steps = [base] + [step * i + 1 for i in range(1, n_blocks)]

        n_layers_total = sum(self.steps)
        interval = math.ceil(n_layers_total / self.num_scales)
        width = channels
        layer_index = 0
        blocks, heads = [], []
        self.feature_info: List[Dict[str, Any]] = []  # the coarsest scale of every block, which its exit reads
        coarsest_stride = 2 ** (self.num_scales - 1) * (4 if stem == 'imagenet' else 1)
        for n_layers in self.steps:
            block: List[nn.Module] = []
            if layer_index == 0:
                block.append(MultiScaleStem(in_chans, channels, gr_factor, stem == 'imagenet'))
            for _ in range(n_layers):
                layer_index += 1
                if prune == 'max':
                    in_scales = self.num_scales - max(0, layer_index - 2) // interval
                    out_scales = self.num_scales - (layer_index - 1) // interval
                    transition = in_scales > out_scales
                else:
                    in_scales = min(self.num_scales, n_layers_total - layer_index + 2)
                    out_scales = min(self.num_scales, n_layers_total - layer_index + 1)
                    transition = layer_index in (n_layers_total // 3, 2 * n_layers_total // 3)
                block.append(MultiScaleDenseLayer(
                    width, growth_rate, in_scales, out_scales, gr_factor, bn_factor, bottleneck))
                width += growth_rate
                if transition and reduction > 0:
                    reduced = math.floor(reduction * width)
                    offset = self.num_scales - out_scales
                    block.append(ScaleTransition([
                        ConvBnAct(width * gr_factor[offset + i], reduced * gr_factor[offset + i], 1, 1, 0)
                        for i in range(out_scales)]))
                    width = reduced
            blocks.append(nn.Sequential(*block))
            head_chs = width * gr_factor[-1]
            heads.append(ExitHead(head_chs, head_chs if stem == 'imagenet' else 128, num_classes))
            self.feature_info.append(
                dict(num_chs=head_chs, reduction=coarsest_stride, module=f'blocks.{len(blocks) - 1}'))
        self.num_features = self.feature_info[-1]['num_chs']
        self.head_hidden_size = heads[-1].hidden_size
        self.blocks = nn.ModuleList(blocks)
        _set_final_widths(self.blocks, self.num_scales)
        for block in self.blocks:
            lazy = LazyBlock(tuple(block), self.num_scales)
            for module, later in zip(lazy.modules, lazy.after_exit):
                if isinstance(module, MultiScaleDenseLayer):
                    module.defers_outputs = bool(later)
        self.classifier = nn.ModuleList(heads)
        self._lazy_blocks: Dict[int, Tuple[tuple, Optional[LazyBlock]]] = {}  # block modules and their plan
        if msdnet_init == 'intended':
            init_he_fan_out(self)

    def forward_stage(self, k: int, state):
        """Block ``k`` up to its exit (``LazyBlock``), after finishing the block before when its state is
        ``DeferredScales``. A block with a hook on it or on one of its modules, or one that is not an
        ``nn.Sequential`` of the modules ``LazyBlock`` knows, runs whole, as the authors run it; so does
        ``model.blocks[k](state)``. Hooks deeper in a block fire when their module runs: for the finer scales of its
        last layers, in the next stage."""
        if isinstance(state, DeferredScales):
            state = self._finish_block(k - 1, state)
        block = self.blocks[k]
        lazy = self._lazy_block(k, block)
        return block(state) if lazy is None else lazy.run(state)

    def _finish_block(self, k: int, state: DeferredScales) -> List[Any]:
        """Block ``k``'s output from its ``DeferredScales``, with the plan that made them."""
        planned = self._lazy_blocks.get(k, (None, None))[1]
        if planned is None or len(planned.frontier) != len(state):
            raise ValueError(f'this state did not come from forward_stage({k}, ...) of this model: pass stage '
                             f'{k}\'s output, or the output of model.blocks[{k}] (a whole block)')
        return planned.complete(state)

    def _lazy_block(self, k: int, block: nn.Module) -> Optional[LazyBlock]:
        """The ``LazyBlock`` of ``block`` (``self.blocks[k]``), None where it runs whole; planned once per set of
        block modules."""
        if type(block) is not nn.Sequential:  # a wrapper (torch.compile's, a user's) runs whole
            return None
        modules = tuple(block._modules.values())
        if has_call_hooks((block, *modules), include_global=False):
            return None
        planned_for, plan = self._lazy_blocks.get(k, (None, None))
        if planned_for != modules:
            try:
                plan = LazyBlock(modules, self.num_scales)
            except TypeError:  # a module LazyBlock does not know
                plan = None
            self._lazy_blocks[k] = modules, plan
        return plan if plan is not None and plan.defers else None

    def cost_key(self) -> Tuple[bool, ...]:
        """Which blocks run lazily now (a hook makes a block run whole, and cost more): part of the key under
        which ``dynzoo.per_exit_macs`` caches the costs."""
        return tuple(self._lazy_block(k, block) is not None for k, block in enumerate(self.blocks))

    def exit_input(self, k: int, state) -> torch.Tensor:
        return feature_map(state[-1])  # the coarsest scale

    def forward_exit_head(self, k: int, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.classifier[k](x, pre_logits)

    def exit_classifiers(self) -> List[nn.Module]:
        return [head.linear for head in self.classifier]

    def set_exit_classifier(self, k: int, num_classes: int) -> None:
        self.classifier[k].reset_classifier(num_classes)

    def _coarsest_size(self, size: int) -> int:
        if self.stem == 'imagenet':
            size = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
        for _ in range(self.num_scales - 1):
            size = _conv_out(size, 3, 2, 1)
        return size

    def valid_input_size(self, height: int, width: int) -> bool:
        # Each head halves the coarsest map twice, then a 2x2 average pool must leave exactly 1x1 for its Linear.
        def head_output(size: int) -> int:
            return _conv_out(_conv_out(self._coarsest_size(size), 3, 2, 1), 3, 2, 1) // 2
        return head_output(height) == 1 and head_output(width) == 1

    def input_size_hint(self) -> str:
        sizes = [s for s in range(1, 1025) if self.valid_input_size(s, s)]
        return f'its exit heads need the coarsest feature map to pool to 1x1: sides {sizes[0]}..{sizes[-1]} work'


def _block_sizes(state_dict: Dict[str, torch.Tensor]) -> List[int]:
    """Modules per block (``blocks.<b>.<i>``), which ``base``, ``step`` and ``n_blocks`` set."""
    modules: Dict[int, set] = {}
    for key in state_dict:
        parts = key.split('.')
        if parts[0] == 'blocks' and len(parts) > 2:
            modules.setdefault(int(parts[1]), set()).add(parts[2])
    return [len(modules[b]) for b in sorted(modules)]


def checkpoint_filter_fn(state_dict, model: MSDNet) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: unwrap and check strictly. When the checkpoint's blocks hold other module counts
    than the model's (another ``base`` / ``step``: the L2W-DEN step 6 weights are assumed to use base 6), the error
    says so."""
    state_dict = unwrap_state_dict(state_dict)
    try:
        return check_state_dict(state_dict, model)
    except CheckpointMismatchError as e:
        theirs, ours = _block_sizes(state_dict), _block_sizes(model.state_dict())
        if theirs == ours:
            raise
        raise CheckpointMismatchError(
            f'{e} Its blocks hold {theirs} modules (stem, layers, transitions), this model\'s {ours}: the checkpoint '
            'was built with another base, step or n_blocks; build the model with those it was trained with.') from None


def _create_msdnet(variant: str, pretrained: bool = False, **kwargs) -> MSDNet:
    return build_model(
        MSDNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(num_exits: int, url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'min_input_size': (3, 129, 129),
        'pool_size': (7, 7), 'crop_pct': 0.875, 'interpolation': 'bilinear', **normalization('imagenet'),
        'first_conv': 'blocks.0.0.layers.0.0',
        'classifier': tuple(f'classifier.{k}.linear' for k in range(num_exits)),
        'license': 'mit', 'paper_ids': 'arXiv:1703.09844', 'paper_name': 'Multi-Scale Dense Networks for Resource '
        'Efficient Image Classification', 'origin_url': 'https://github.com/kalviny/MSDNet-PyTorch',
        **kwargs,
    }


def _cifar_cfg(num_exits: int, **kwargs):
    kwargs = {'num_classes': 100, 'input_size': (3, 32, 32), 'min_input_size': (3, 17, 17), 'pool_size': (8, 8),
              'crop_pct': 1.0,
              **normalization('msdnet_cifar'),
              'first_conv': 'blocks.0.0.layers.0.net.0', **kwargs}
    return _cfg(num_exits, **kwargs)


# The MSDNet authors' ImageNet weights (kalviny/MSDNet-PyTorch README) sit in a Dropbox shared folder, not behind a
# direct link: ``file=`` (or the download cache) loads them.
_DROPBOX_FOLDER = 'https://www.dropbox.com/sh/7p758wfcq4wm6lf/AACU4hFtV1_4UQavexrsSs1Ba?dl=0'
# "Learning to Weight Samples for Dynamic Early-exiting Networks" (ECCV 2022) released MSDNets trained with its
# sample weighting (LeapLabTHU/L2W-DEN README), direct downloads. The repository has no licence file: dynzoo links
# to the files and does not redistribute them.
_L2W = dict(paper_ids='arXiv:2209.08310', paper_name='Learning to Weight Samples for Dynamic Early-exiting Networks',
            origin_url='https://github.com/LeapLabTHU/L2W-DEN', license=None)
_L2W_URLS = {  # (step, epochs) -> Tsinghua Cloud file id; 300 epochs used label smoothing 0.1
    (4, 100): '469af5c3b186439b84cd', (6, 100): '66e2ed9a4d9241a79602', (7, 100): '0f018f3024c74f2494d2',
    (4, 300): '496543cfbbc741e380dd', (6, 300): 'af63fdd6418d4cee8eba', (7, 300): 'b1b706e7b7984051b10a',
}
_L2W_TOP1 = {
    (4, 100): (59.54, 67.22, 71.03, 72.33, 73.93), (6, 100): (60.05, 69.13, 73.33, 75.19, 76.30),
    (7, 100): (59.24, 69.65, 73.94, 75.66, 76.72), (4, 300): (61.64, 67.89, 71.61, 73.82, 75.03),
    (6, 300): (61.41, 70.70, 74.38, 75.80, 76.66), (7, 300): (60.94, 71.88, 75.13, 76.03, 76.82),
}


def _l2w_name(step: int, epochs: int) -> str:
    return f'msdnet_step{step}.l2w_e{epochs}_in1k'


def _l2w_cfg(step: int, epochs: int):
    """The URL has no file name (``.../f/<id>/?dl=1``): the cfg's ``(url, file name)`` names the cached file."""
    url = f'https://cloud.tsinghua.edu.cn/f/{_L2W_URLS[step, epochs]}/?dl=1'
    return _cfg(5, url=(url, f'{_l2w_name(step, epochs)}.pth.tar'), **_L2W)


# Per architecture the best weights come first: the bare name loads them.
default_cfgs = dynzoo_default_cfgs({
    **{_l2w_name(step, epochs): _l2w_cfg(step, epochs) for step in (4, 6, 7) for epochs in (300, 100)},
    'msdnet_step4.in1k': _cfg(5, origin_url=_DROPBOX_FOLDER),
    'msdnet_step7.in1k': _cfg(5, origin_url=_DROPBOX_FOLDER),
    'msdnet_cifar_b7': _cifar_cfg(7),
    'msdnet_cifar_b7.c10': _cifar_cfg(7, num_classes=10, hf_hub_id='dynzoo/msdnet_cifar_b7.c10'),
    'msdnet_cifar_b10': _cifar_cfg(10),
    'msdnet_cifar_lin5': _cifar_cfg(5),
    'msdnet_cifar_lin7': _cifar_cfg(7),
}, reported_top1={_l2w_name(*key): ('ImageNet val', top1) for key, top1 in _L2W_TOP1.items()},
    file_only={'msdnet_step4.in1k': 'msdnet-step=4-block=5.pth.tar',
               'msdnet_step7.in1k': 'msdnet-step=7-block=5.pth.tar'})

_IMAGENET_ARGS = dict(n_blocks=5, step_mode='even', channels=32, growth_rate=16, gr_factor='1-2-4-4',
                      bn_factor='1-2-4-4', stem='imagenet')
_CIFAR_ARGS = dict(channels=16, growth_rate=6, gr_factor='1-2-4', bn_factor='1-2-4', stem='cifar')


@register_model
def msdnet_step4(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, 5 exits, 4 layers per block (``--step 4 --base 4``), 23.96M params."""
    return _create_msdnet('msdnet_step4', pretrained, **{**_IMAGENET_ARGS, 'base': 4, 'step': 4, **kwargs})


@register_model
def msdnet_step6(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, 5 exits, 6 layers per block (``--step 6 --base 6``), 56.53M params."""
    return _create_msdnet('msdnet_step6', pretrained, **{**_IMAGENET_ARGS, 'base': 6, 'step': 6, **kwargs})


@register_model
def msdnet_step7(pretrained: bool = False, **kwargs) -> MSDNet:
    """ImageNet MSDNet, 5 exits, 7 layers per block (``--step 7 --base 7``), 62.31M params."""
    return _create_msdnet('msdnet_step7', pretrained, **{**_IMAGENET_ARGS, 'base': 7, 'step': 7, **kwargs})


def _cifar_kwargs(kwargs, **flags):
    return {**_CIFAR_ARGS, **flags, **kwargs}


@register_model
def msdnet_cifar_b7(pretrained: bool = False, **kwargs) -> MSDNet:
    """CIFAR anytime MSDNet, 7 exits (``--nBlocks 7 --step 2 --base 4``), 3.07M params at 100 classes."""
    return _create_msdnet('msdnet_cifar_b7', pretrained,
                          **_cifar_kwargs(kwargs, n_blocks=7, step_mode='even', step=2, base=4))


@register_model
def msdnet_cifar_b10(pretrained: bool = False, **kwargs) -> MSDNet:
    """CIFAR anytime MSDNet, 10 exits (the Lua CIFAR-10 recipe), 4.96M params at 100 classes."""
    return _create_msdnet('msdnet_cifar_b10', pretrained,
                          **_cifar_kwargs(kwargs, n_blocks=10, step_mode='even', step=2, base=4))


@register_model
def msdnet_cifar_lin5(pretrained: bool = False, **kwargs) -> MSDNet:
    """CIFAR budgeted-batch MSDNet, 5 exits, blocks of 1..5 layers (``--stepmode lin_grow``), 2.08M params."""
    return _create_msdnet('msdnet_cifar_lin5', pretrained,
                          **_cifar_kwargs(kwargs, n_blocks=5, step_mode='lin_grow', step=1, base=1))


@register_model
def msdnet_cifar_lin7(pretrained: bool = False, **kwargs) -> MSDNet:
    """CIFAR budgeted-batch MSDNet, 7 exits, blocks of 1..7 layers (the Lua CIFAR-10 recipe), 3.89M params at 10."""
    return _create_msdnet('msdnet_cifar_lin7', pretrained,
                          **_cifar_kwargs(kwargs, n_blocks=7, step_mode='lin_grow', step=1, base=1))


def msdnet_op_counter(model: nn.Module, x: torch.Tensor) -> List[int]:
    """MACs per exit as the MSDNet authors' ``op_counter.py`` counts them (``dynzoo.per_exit_macs(model,
    convention='authors')``): conv MACs (no bias) + ReLU input elements + pooling (output elements x kernel area) +
    Linear (weights + biases), accumulated over one full forward and recorded each time a Linear fires, so exit k
    includes heads 1..k-1. The paper calls these counts FLOPs."""
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
