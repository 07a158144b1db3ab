"""SDPoint: Stochastic Downsampling Point networks (Kuen et al., "Stochastic Downsampling for Cost-Adjustable
Inference and Improved Regularization in Convolutional Networks", CVPR 2018).

One set of weights, many networks: an *instance* ``(point, ratio)`` average-pools the feature map by ``ratio``
(0.5 or 0.75) right after residual block ``point``, so every later layer runs on a smaller map. The networks are the
authors' ResNet / ResNeXt / PreResNet (xternalz/SDPoint, ``models/*.py``) rebuilt from their specification: same
``state_dict`` keys and shapes, same parameter counts, same logits for every instance, so the authors' checkpoints
(``{'epoch', 'arch', 'state_dict', 'optimizer'}`` with ``module.`` keys, with or without ``num_batches_tracked``)
load as they are. These are single-exit networks: ``model(x)`` returns one logits tensor.

Instances (``model.instances()`` lists them in the authors' evaluation order):

* ``(None, None)``: no extra downsampling, the full-cost network;
* ``(p, r)`` for ``p`` in ``0..N-1``: after the residual add of block ``p`` (global index over all stages) and before
  the block's final ReLU where it has one, the map is average-pooled to ``round(H * r) x round(W * r)``;
* ``(N, r)``: the stem point; the stem's 3x3/2 max-pool is replaced by an adaptive max-pool to ``round(S * r)``,
  ``S`` being the size the max-pool would have produced (for the CIFAR stem, which has no max-pool, ``S = H``).

``model(x, instance=(p, r))`` runs one instance. Without ``instance``, eval runs ``(None, None)`` and train samples an
instance per call (per mini-batch) with torch's global generator. Under DDP each process draws its own instance
(dynzoo's trainer seeds ranks differently), as the authors' ``nn.DataParallel`` replicas each drew their own with
Python's ``random``.

Where dynzoo differs from the authors' code:

* training-time sampling is uniform: each of ``nil, 0..N`` with probability ``1/(N+2)``, then the ratio uniformly. The
  authors' ``blockID is None and random.randint(-1, N) or blockID`` turns a draw of 0 into "no block", so block 0 is
  never trained with downsampling and nil gets ``2/(N+2)``; ``sampling='authors'`` reproduces that;
* pooled sizes come from the actual input (the authors cache the stem size of the first batch they see, wrong for any
  later batch of another size) and each side is pooled on its own (the authors use ``H`` for both sides);
* the BasicBlock networks (``*18``, ``*34``) downsample at every block: the authors only set the ratio on Bottleneck
  modules, so their BasicBlock points never fire, and their PreResNet BasicBlock sizes ``bn1`` by the block's output
  width instead of its input width, so ``preresnet18/34`` crash; dynzoo sizes it by the input width;
* per-instance batch-norm statistics are stored in the model. The authors re-estimate BN statistics before each
  instance's evaluation by running the whole training set in train mode (an EMA with momentum 0.1) and keep nothing.
  ``dynzoo.sdpoint.recalibrate_bn`` estimates them once per instance (cumulative average) and stores them as one
  ``(2, C)`` buffer per instance (``instance_bn_stats.<name>``, ``C`` = the total BN channels), saved and loaded with
  the ``state_dict`` and used whenever that instance runs in eval mode. At float32 this costs ``8 * C`` bytes per
  instance: 0.21 MB for ResNet-50 (``C`` = 26,560), 0.55 MB for ResNeXt-101 32x4d (68,928 channels, 38 MB for all 69
  instances, against 177 MB of weights). Checkpoints without them (the authors') load as usual.
"""
import math
import numbers
import re
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from timm.layers import create_classifier
from timm.models import register_model
from timm.models._features import feature_take_indices

from ._normalization import normalization
from ._helpers import (build_model, check_state_dict, classifier_layer, dynzoo_default_cfgs, init_he_fan_out,
                       unwrap_state_dict)
from ._inputs import check_input_tensor, checks_input, is_fx_tracing

__all__ = ['SDPointResNet', 'Instance', 'RATIOS', 'sdpoint_checkpoint_filter']

RATIOS = (0.5, 0.75)
STATS_PREFIX = 'instance_bn_stats.'
SAMPLING_MODES = ('uniform', 'authors')



class Instance(NamedTuple):
    """An SDPoint instance: downsample by ``ratio`` after block ``point`` (``(None, None)``: no downsampling)."""
    point: Optional[int]
    ratio: Optional[float]

    @property
    def name(self) -> str:
        """``'nil'`` or ``'p{point}_r{ratio*100:03d}'``, the naming of the parity fixtures and state_dict keys."""
        return 'nil' if self.point is None else f'p{self.point}_r{round(self.ratio * 100):03d}'

    @classmethod
    def from_name(cls, name: str) -> 'Instance':
        """The instance a ``name`` (``'nil'``, ``'p8_r050'``) stands for."""
        if name == 'nil':
            return cls(None, None)
        match = re.fullmatch(r'p(\d+)_r(\d{3})', name)
        if match is None:
            raise ValueError(f"{name!r} is not an SDPoint instance name: 'nil' or 'p<point>_r<ratio x 100, 3 digits>', "
                             "e.g. 'p8_r050'")
        return cls(int(match.group(1)), int(match.group(2)) / 100)


NIL = Instance(None, None)


def _pooled_size(size: int, ratio: float) -> int:
    # Round half to even (Python's round(), torch.round), as in the authors' code: 14 * 0.75 -> 10, 7 * 0.5 -> 4.
    pooled = int(round(int(size) * ratio))
    if pooled < 1:
        raise ValueError(f'a {int(size)}-pixel feature map is too small to downsample by {ratio}: use a larger input')
    return pooled


def _downsample(x: torch.Tensor, ratio: Optional[float]) -> torch.Tensor:
    if ratio is None:
        return x
    return F.adaptive_avg_pool2d(x, [_pooled_size(x.shape[-2], ratio), _pooled_size(x.shape[-1], ratio)])


def _shortcut(in_chs: int, out_chs: int, stride: int) -> Optional[nn.Sequential]:
    """1x1 conv + BN projection (``downsample.{0,1}``) where the shape changes; identity (None) otherwise."""
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """Two 3x3 convs, each followed by BN; the SDPoint pooling sits between the residual add and the last ReLU."""
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError('BasicBlock supports only groups=1 and base_width=64 (use the bottleneck for ResNeXt)')
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = _shortcut(in_chs, planes, stride)

    def forward(self, x: torch.Tensor, ratio: Optional[float] = None) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(_downsample(out, ratio))


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride, ``groups`` for ResNeXt) - 1x1 with BN after each conv; pooling before the final ReLU.

    The inner width is ``floor(planes * base_width / 64) * groups`` (ResNet: ``planes``; ResNeXt-32x4d: ``2 * planes``).
    """
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        width = math.floor(planes * base_width / 64) * groups
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor, ratio: Optional[float] = None) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(_downsample(out, ratio))


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block: (BN-ReLU-3x3 conv) x 2; the projection shortcut reads the first pre-activation.

    The authors size ``bn1`` by ``planes`` although it normalises the block input (``in_chs`` channels), which crashes
    at the first widening block; dynzoo uses ``in_chs``.
    """
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError('PreActBasicBlock supports only groups=1 and base_width=64')
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = _shortcut(in_chs, planes, stride)

    def forward(self, x: torch.Tensor, ratio: Optional[float] = None) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = out + (x if self.downsample is None else self.downsample(pre))
        return _downsample(out, ratio)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: (BN-ReLU-conv) x 3 (1x1, 3x3 with the stride, 1x1); the projection shortcut reads
    the first pre-activation; pooling right after the residual add (there is no ReLU there)."""
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        width = math.floor(planes * base_width / 64) * groups
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = norm_layer(in_chs)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_chs, out_chs, stride)

    def forward(self, x: torch.Tensor, ratio: Optional[float] = None) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        out = out + (x if self.downsample is None else self.downsample(pre))
        return _downsample(out, ratio)


BLOCKS = {
    ('basic', False): BasicBlock,
    ('bottleneck', False): Bottleneck,
    ('basic', True): PreActBasicBlock,
    ('bottleneck', True): PreActBottleneck,
}


class SDPointStage(nn.Sequential):
    """The residual blocks of one stage; ``forward(x, point, ratio)`` downsamples after block ``point`` of the stage
    (no downsampling when ``point`` is None or outside the stage). ``first_point`` is the network's point index of
    its first block."""

    def __init__(self, *blocks: nn.Module, first_point: int = 0):
        super().__init__(*blocks)
        self.first_point = first_point

    def forward(self, x: torch.Tensor, point: Optional[int] = None, ratio: Optional[float] = None) -> torch.Tensor:
        for index, block in enumerate(self):
            block_ratio: Optional[float] = None
            if point is not None and index == point:
                block_ratio = ratio
            x = block(x, block_ratio)
        return x


class InstanceBNStats(nn.Module):
    """Per-instance BN running statistics: one ``(2, C)`` buffer per stored instance (row 0 the running means, row 1
    the running variances of every BN layer in ``model.modules()`` order), registered when first stored or loaded."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self._buffers.get(name)

    def put(self, name: str, stats: torch.Tensor) -> None:
        if name in self._buffers:
            self._buffers[name].copy_(stats)
        else:
            self.register_buffer(name, stats.detach().clone())

    def clear(self) -> None:
        self._buffers.clear()

    def extra_repr(self) -> str:
        return f'num_channels={self.num_channels}, instances=[{", ".join(self._buffers)}]'


def _check_bn_channels(layers: List[nn.BatchNorm2d], expected: int) -> None:
    """Per-instance statistics span every BN channel: BatchNorms folded by ``fuse_conv_bn`` (which keeps them once
    statistics are stored) would shift them."""
    channels = sum(bn.num_features for bn in layers)
    if channels != expected:
        raise RuntimeError(
            f'per-instance BN statistics span {expected} channels but this model\'s BatchNorms have {channels}: they '
            'were folded into the convolutions (dynzoo.fuse_conv_bn / optimize_for_inference) before the statistics '
            'were stored or loaded. Store or load them in the unfused model, then fuse it.')


class SDPointResNet(nn.Module):
    """ResNet / ResNeXt / PreResNet with stochastic downsampling points.

    Args:
        block: ``'basic'`` (two 3x3 convs) or ``'bottleneck'`` (1x1-3x3-1x1, expansion 4).
        layers: blocks per stage (4 stages for the ImageNet stem, any number for the CIFAR stem).
        preact: pre-activation blocks, a final BN-ReLU before pooling (the authors' PreResNet).
        groups, base_width: ResNeXt cardinality and per-group width (ResNeXt-32x4d: 32, 4).
        stem: ``'imagenet'`` (7x7/2 conv-BN-ReLU, 3x3/2 max-pool, stages of 64/128/256/512 planes) or ``'cifar'``
            (3x3 conv-BN-ReLU, stages of ``stem_width * 2**i`` planes).
        stem_width: channels of the stem (64 for ImageNet, 16 for CIFAR).
        sampling: training-time instance sampling, ``'uniform'`` or ``'authors'`` (see the module docstring).
        global_pool: timm's pooling type before the classifier (``''``: none).
    """

    def __init__(
            self,
            block: str = 'bottleneck',
            layers: Sequence[int] = (3, 4, 6, 3),
            preact: bool = False,
            groups: int = 1,
            base_width: int = 64,
            stem: str = 'imagenet',
            stem_width: int = 64,
            sampling: str = 'uniform',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
    ):
        super().__init__()
        if (block, preact) not in BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ('imagenet', 'cifar'):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f'sampling must be one of {SAMPLING_MODES}, got {sampling!r}')
        block_cls = BLOCKS[(block, preact)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.preact = preact
        self.sampling = sampling
        self.default_input_size = (in_chans, 224, 224) if stem == 'imagenet' else (in_chans, 32, 32)

        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == 'imagenet' else nn.Identity()
        self.stem_pools = stem == 'imagenet'
        self.feature_info: List[Dict[str, Any]] = [
            dict(num_chs=stem_width, reduction=2 if stem == 'imagenet' else 1, module='relu')]
        reduction = 4 if stem == 'imagenet' else 1  # of the first stage

        self.stage_names = [f'layer{i + 1}' for i in range(len(layers))]
        in_chs = stem_width
        for i, (name, num_blocks) in enumerate(zip(self.stage_names, layers)):
            planes = stem_width * 2 ** i
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block_cls(in_chs, planes, stride, groups, base_width))
                in_chs = planes * block_cls.expansion
            self.add_module(name, SDPointStage(*stage, first_point=sum(layers[:i])))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction * 2 ** i, module=name))
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs
        self.bn2 = nn.BatchNorm2d(in_chs) if preact else None
        if preact:
            self.feature_info[-1]['module'] = 'bn2'  # the last map goes through the final BN-ReLU
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)

        self.num_blocks = sum(layers)
        self.stem_point = self.num_blocks
        self.instance_bn_stats = InstanceBNStats(sum(bn.num_features for bn in self.bn_layers()))
        init_he_fan_out(self)  # the authors' init

    # ----------------------------------------------------------------------------------------------- instances
    def block_names(self) -> List[str]:
        """The residual blocks' module names in point order: point ``p`` downsamples after ``block_names()[p]``."""
        return [f'{name}.{i}' for name in self.stage_names for i in range(len(getattr(self, name)))]

    def instances(self) -> List[Instance]:
        """Every instance in the authors' evaluation order: nil, the stem point, then blocks ``0..N-1``; each point
        with ratio 0.5 then 0.75."""
        points = [self.stem_point] + list(range(self.num_blocks))
        return [NIL] + [Instance(p, r) for p in points for r in RATIOS]

    def check_instance(self, instance) -> Instance:
        """``instance`` as an ``Instance`` if this model has it; a ``ValueError`` naming the valid ones otherwise."""
        try:
            point, ratio = instance
        except (TypeError, ValueError):
            point, ratio = object(), None
        if point is None and ratio is None:
            return NIL
        if isinstance(point, numbers.Integral) and not isinstance(point, bool) and 0 <= point <= self.stem_point \
                and ratio in RATIOS:
            return Instance(int(point), float(ratio))
        raise ValueError(
            f'{instance!r} is not an instance of this {type(self).__name__}. Valid instances are (None, None) (no '
            f'extra downsampling), (p, r) with p in 0..{self.num_blocks - 1} (after residual block p) or '
            f'p={self.stem_point} (the stem), and r in {RATIOS}: {len(self.instances())} in all, listed by '
            f'model.instances().')

    def sample_instance(self, generator: Optional[torch.Generator] = None) -> Instance:
        """Draw a training instance: nil, the stem and every block point with equal probability, then the ratio
        uniformly. With ``sampling='authors'``, a draw of block 0 becomes nil, as the authors' code does."""
        draw = int(torch.randint(-1, self.stem_point + 1, (1,), generator=generator))
        ratio = RATIOS[int(torch.randint(len(RATIOS), (1,), generator=generator))]
        if draw == -1 or (draw == 0 and self.sampling == 'authors'):
            return NIL
        return Instance(draw, ratio)

    # ------------------------------------------------------------------------------------ per-instance BN stats
    def bn_layers(self) -> List[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def store_bn_stats(self, instance) -> None:
        """Store the current BN running statistics as the statistics of ``instance``."""
        instance = self.check_instance(instance)
        layers = self.bn_layers()
        _check_bn_channels(layers, self.instance_bn_stats.num_channels)
        means = torch.cat([bn.running_mean for bn in layers])
        stats = torch.stack([means, torch.cat([bn.running_var for bn in layers])])
        self.instance_bn_stats.put(instance.name, stats)

    def unfoldable_batch_norms(self) -> List[nn.BatchNorm2d]:
        """Every BN layer while per-instance statistics are stored (``dynzoo.models.fuse_conv_bn`` keeps them: they
        take each instance's statistics in turn), none otherwise."""
        return self.bn_layers() if len(self.instance_bn_stats._buffers) else []

    def bn_stats(self, instance) -> Optional[torch.Tensor]:
        """The stored ``(2, C)`` BN statistics of ``instance``, or None."""
        return self.instance_bn_stats.get(self.check_instance(instance).name)

    def clear_bn_stats(self) -> None:
        """Forget every stored per-instance BN statistic (the shared running statistics are kept)."""
        self.instance_bn_stats.clear()

    @contextmanager
    def _bn_stats_of(self, stats: torch.Tensor):
        """Point every BN layer's running statistics at a slice of ``stats`` (no copy), restore them afterwards."""
        layers = self.bn_layers()
        _check_bn_channels(layers, stats.shape[1])
        saved = [(bn.running_mean, bn.running_var) for bn in layers]
        offset = 0
        for bn in layers:
            bn.running_mean = stats[0, offset:offset + bn.num_features]
            bn.running_var = stats[1, offset:offset + bn.num_features]
            offset += bn.num_features
        try:
            yield
        finally:
            for bn, (mean, var) in zip(layers, saved):
                bn.running_mean, bn.running_var = mean, var

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Register the per-instance statistics a checkpoint holds before the store module loads them.
        known = {inst.name for inst in self.instances()}
        reference = self.conv1.weight
        for key in state_dict:
            name = key[len(prefix + STATS_PREFIX):] if key.startswith(prefix + STATS_PREFIX) else None
            if name in known and self.instance_bn_stats.get(name) is None:
                self.instance_bn_stats.put(
                    name, torch.zeros(2, self.instance_bn_stats.num_channels, dtype=reference.dtype,
                                      device=reference.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------------------------- forward
    def _resolve_instance(self, instance) -> Instance:
        if instance is not None:
            return self.check_instance(instance)
        return self.sample_instance() if self.training else NIL

    def _check_input(self, x: torch.Tensor) -> None:
        if not checks_input(x):
            return
        check_input_tensor(self, x)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape)
            raise ValueError(
                f'{type(self).__name__} expects a batch of {self.in_chans}-channel images of shape '
                f'(N, {", ".join(map(str, self.default_input_size))}), got {shape}.')

    def _eager_instance(self, x: torch.Tensor, instance) -> Tuple[Instance, Optional[torch.Tensor]]:
        """Check ``x``; the instance to run and its stored BN statistics (eval mode), if any. ``torch.fx`` traces
        the full network without per-instance statistics: a graph cannot sample an instance per call."""
        self._check_input(x)
        if isinstance(instance, torch.fx.Proxy) or (instance is None and is_fx_tracing()):
            return NIL, None
        instance = self._resolve_instance(instance)
        return instance, None if self.training else self.instance_bn_stats.get(instance.name)

    def _stages(self, x: torch.Tensor, point: Optional[int], ratio: Optional[float],
                taps: List[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The network up to the final feature map for the instance ``(point, ratio)``, and the ``feature_info`` maps
        in ``taps``."""
        intermediates: List[torch.Tensor] = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in taps:
            intermediates.append(x)
        if point is not None and ratio is not None and point == self.stem_point:
            height, width = int(x.shape[-2]), int(x.shape[-1])
            if self.stem_pools:  # the size the max-pool would have produced
                height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
            x = F.adaptive_max_pool2d(x, [_pooled_size(height, ratio), _pooled_size(width, ratio)])
        else:
            x = self.maxpool(x)
        index = 0
        for stage in self.children():
            if hasattr(stage, 'first_point'):  # an SDPointStage (TorchScript resolves this when compiling)
                x = stage(x, None if point is None else point - stage.first_point, ratio)
                index += 1
                if self.bn2 is not None and index == self.num_stages:
                    x = self.relu(self.bn2(x))
                if index in taps:
                    intermediates.append(x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor, instance: Optional[Tuple[int, float]] = None) -> torch.Tensor:
        """The last feature map of ``instance`` (see ``forward``)."""
        if torch.jit.is_scripting():
            point: Optional[int] = None
            ratio: Optional[float] = None
            if instance is not None:
                point, ratio = instance[0], instance[1]
            return self._stages(x, point, ratio, [])[0]
        else:
            (point, ratio), stats = self._eager_instance(x, instance)
            with nullcontext() if stats is None else self._bn_stats_of(stats):
                return self._stages(x, point, ratio, [])[0]

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False, instance=None):
        """timm's ``forward_intermediates`` for ``instance`` (see ``forward``): the ``feature_info`` maps in
        ``indices`` (the stem's output, then every stage's; the last one as ``forward_features`` returns it), and
        unless ``intermediates_only`` the final feature map first. The whole network runs (``stop_early`` is
        accepted for timm's API)."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__} returns NCHW feature maps, got output_fmt={output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        (point, ratio), stats = self._eager_instance(x, instance)
        with nullcontext() if stats is None else self._bn_stats_of(stats):
            x, intermediates = self._stages(x, point, ratio, take)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor, instance: Optional[Tuple[int, float]] = None) -> torch.Tensor:
        """Logits of ``instance`` (a ``(point, ratio)`` pair from ``instances()``). Without it, eval runs the full
        network and train samples an instance (``sample_instance``). In eval mode the instance's stored BN statistics
        (``dynzoo.sdpoint.recalibrate_bn``) are used when there are some, the shared running statistics otherwise.
        A ``torch.fx`` graph runs the full network; TorchScript runs the given instance or the full network, both
        with the shared statistics."""
        return self.forward_head(self.forward_features(x, instance))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        else:
            self.fc = classifier_layer(self.num_features, num_classes)


def sdpoint_checkpoint_filter(state_dict, model: SDPointResNet) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: the authors' files (``state_dict`` entry, ``module.`` prefix, no
    ``num_batches_tracked`` from PyTorch 0.4) and dynzoo's (with or without ``instance_bn_stats.*``)."""
    state_dict = unwrap_state_dict(state_dict)
    stats = {k: v for k, v in state_dict.items() if k.startswith(STATS_PREFIX)}
    weights = check_state_dict({k: v for k, v in state_dict.items() if k not in stats}, model)
    return {**weights, **stats}


def _create_sdpoint(variant: str, pretrained: bool, model_args: dict, **kwargs) -> SDPointResNet:
    return build_model(
        SDPointResNet, variant, pretrained,
        pretrained_filter_fn=sdpoint_checkpoint_filter,
        **{**model_args, **kwargs},
    )


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', **normalization('imagenet'),
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'mit', 'paper_ids': 'arXiv:1801.09335', 'paper_name': 'Stochastic Downsampling for Cost-Adjustable '
        'Inference and Improved Regularization in Convolutional Networks',
        'origin_url': 'https://github.com/xternalz/SDPoint',
        **kwargs,
    }


default_cfgs = dynzoo_default_cfgs({
    'sdpoint_resnet18': _cfg(),
    'sdpoint_resnet34': _cfg(),
    'sdpoint_resnet50': _cfg(),
    'sdpoint_resnet101': _cfg(),
    'sdpoint_resnet152': _cfg(),
    'sdpoint_resnext50_32x4d': _cfg(),
    'sdpoint_resnext101_32x4d': _cfg(),
    'sdpoint_preresnet18': _cfg(),
    'sdpoint_preresnet34': _cfg(),
    'sdpoint_preresnet50': _cfg(),
    'sdpoint_preresnet101': _cfg(),
    'sdpoint_preresnet152': _cfg(),
    'sdpoint_preresnet200': _cfg(),
    'sdpoint_preresnet_cifar': _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                                    **normalization('cifar')),
    'sdpoint_preresnet_cifar.c10': _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                                        **normalization('cifar'),
                                        hf_hub_id='dynzoo/sdpoint_preresnet_cifar.c10'),
})


@register_model
def sdpoint_resnet18(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNet-18 (8 block points, 19 instances), 11.69M params."""
    return _create_sdpoint('sdpoint_resnet18', pretrained, dict(block='basic', layers=(2, 2, 2, 2)), **kwargs)


@register_model
def sdpoint_resnet34(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNet-34 (16 block points, 35 instances), 21.80M params."""
    return _create_sdpoint('sdpoint_resnet34', pretrained, dict(block='basic', layers=(3, 4, 6, 3)), **kwargs)


@register_model
def sdpoint_resnet50(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNet-50 (16 block points, 35 instances), 25.56M params."""
    return _create_sdpoint('sdpoint_resnet50', pretrained, dict(block='bottleneck', layers=(3, 4, 6, 3)), **kwargs)


@register_model
def sdpoint_resnet101(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNet-101 (33 block points, 69 instances), 44.55M params."""
    return _create_sdpoint('sdpoint_resnet101', pretrained, dict(block='bottleneck', layers=(3, 4, 23, 3)), **kwargs)


@register_model
def sdpoint_resnet152(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNet-152 (50 block points, 103 instances), 60.19M params."""
    return _create_sdpoint('sdpoint_resnet152', pretrained, dict(block='bottleneck', layers=(3, 8, 36, 3)), **kwargs)


@register_model
def sdpoint_resnext50_32x4d(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNeXt-50 32x4d (the authors' ``resnext50``; 16 block points, 35 instances), 25.03M params."""
    return _create_sdpoint(
        'sdpoint_resnext50_32x4d', pretrained,
        dict(block='bottleneck', layers=(3, 4, 6, 3), groups=32, base_width=4), **kwargs)


@register_model
def sdpoint_resnext101_32x4d(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint ResNeXt-101 32x4d (the paper's ResNeXt-d101-c32; 33 block points, 69 instances), 44.18M params."""
    return _create_sdpoint(
        'sdpoint_resnext101_32x4d', pretrained,
        dict(block='bottleneck', layers=(3, 4, 23, 3), groups=32, base_width=4), **kwargs)


@register_model
def sdpoint_preresnet18(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-18 (8 block points, 19 instances); the authors' version crashes (see the module notes)."""
    return _create_sdpoint(
        'sdpoint_preresnet18', pretrained, dict(block='basic', layers=(2, 2, 2, 2), preact=True), **kwargs)


@register_model
def sdpoint_preresnet34(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-34 (16 block points, 35 instances); the authors' version crashes (see the module notes)."""
    return _create_sdpoint(
        'sdpoint_preresnet34', pretrained, dict(block='basic', layers=(3, 4, 6, 3), preact=True), **kwargs)


@register_model
def sdpoint_preresnet50(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-50 (16 block points, 35 instances)."""
    return _create_sdpoint(
        'sdpoint_preresnet50', pretrained, dict(block='bottleneck', layers=(3, 4, 6, 3), preact=True), **kwargs)


@register_model
def sdpoint_preresnet101(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-101 (the paper's PreResNet-d101; 33 block points, 69 instances), 44.55M params."""
    return _create_sdpoint(
        'sdpoint_preresnet101', pretrained, dict(block='bottleneck', layers=(3, 4, 23, 3), preact=True), **kwargs)


@register_model
def sdpoint_preresnet152(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-152 (50 block points, 103 instances)."""
    return _create_sdpoint(
        'sdpoint_preresnet152', pretrained, dict(block='bottleneck', layers=(3, 8, 36, 3), preact=True), **kwargs)


@register_model
def sdpoint_preresnet200(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """SDPoint PreResNet-200 (66 block points, 135 instances)."""
    return _create_sdpoint(
        'sdpoint_preresnet200', pretrained, dict(block='bottleneck', layers=(3, 24, 36, 3), preact=True), **kwargs)


@register_model
def sdpoint_preresnet_cifar(pretrained: bool = False, **kwargs) -> SDPointResNet:
    """CIFAR SDPoint PreResNet-20: 3x3 stem, three stages of 3 pre-activation basic blocks (16/32/64 channels) at
    32x32 (9 block points, 21 instances); ``layers=(9, 9, 9)`` gives PreResNet-56. No authors' counterpart: their code
    is ImageNet only."""
    return _create_sdpoint(
        'sdpoint_preresnet_cifar', pretrained,
        dict(block='basic', layers=(3, 3, 3), preact=True, stem='cifar', stem_width=16), **kwargs)
