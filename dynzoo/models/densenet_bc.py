"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017) with the memory-efficient
implementation of Pleiss et al. ("Memory-Efficient Implementation of DenseNets", 2017) and the multi-classifier
DenseNet^MC baseline of the MSDNet paper.

Layouts and outputs follow the reference code, so weights move both ways:

* ImageNet (``densenet_bc_121/161/169/201``): torchvision's ``densenet121/161/169/201``, same ``state_dict`` keys and
  outputs, and timm's ``densenet*`` has the same keys too. ``pretrained=True`` (tag ``tv_in1k``, the default) loads
  torchvision's weights from timm's Hub repositories (``timm/densenet121.tv_in1k``, ...), falling back to
  torchvision's own files, which use an old key style inside dense layers (``norm.1.weight``, ``conv.2.weight``,
  ...): ``checkpoint_filter_fn`` renames those keys.
  ``densenet_bc_264`` is the (6, 12, 64, 48) network of the memory-efficient report (not in torchvision, no weights).
* CIFAR (``densenet_bc_100_k12``, ``densenet_bc_250_k24``, ``densenet_bc_190_k40``): gpleiss/efficient_densenet_pytorch
  (3x3 stem without BN or pooling, final norm named ``features.norm_final``). Its ``demo.py`` builds
  ``(depth - 4) // 6`` layers per block; dynzoo registers the three depths of the paper, which that formula gives.

Where dynzoo differs from both references:

* ``memory_efficient=True`` (the default) does not wrap concat + BN + ReLU + 1x1 conv in ``torch.utils.checkpoint``.
  A custom autograd function keeps only the block's existing feature maps and the per-channel batch statistics,
  recomputes concat + BN + ReLU in the backward pass from those statistics and does not re-run the 1x1 convolution.
  Its BN therefore updates the running statistics (and ``num_batches_tracked``) once per step, as the plain network
  does; under checkpointing the references update them twice. Outputs, gradients and running statistics equal the
  plain implementation's (bit for bit in the CPU tests).
* ``exits='blocks'`` builds :class:`DenseNetMC`, a :class:`MultiExitNetwork` with a classifier (BN-ReLU-pool-Linear,
  like the final one) after every dense block: the DenseNet^MC baseline. Without ``exits`` the model is a
  single-exit :class:`DenseNet` whose ``forward`` returns one logits tensor, like timm and torchvision.
* Convolutions are He-normal initialised with fan-in (torchvision) for ImageNet and fan-out (gpleiss) for CIFAR.
"""
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import create_classifier
from timm.models import register_model
from timm.models._features import feature_take_indices

from ._normalization import normalization
from ._exits import MultiExitNetwork
from ._helpers import build_model, classifier_layer, dynzoo_default_cfgs, make_checkpoint_filter
from ._inputs import check_input_tensor, checks_input, is_fx_tracing

__all__ = ['DenseNet', 'DenseNetMC', 'DenseLayer', 'checkpoint_filter_fn']



def _needs_batch_stats(norm: nn.BatchNorm2d) -> bool:
    """Whether ``norm`` normalises with the statistics of the batch (training, or no running statistics)."""
    return norm.training or (norm.running_mean is None and norm.running_var is None)


class _EfficientBottleneck(torch.autograd.Function):
    """``conv(relu(norm(cat(features))))`` for a 1x1 ``conv`` that saves neither the concatenation nor the BN output.

    Forward runs ``norm`` itself, so its running statistics move exactly once per step, and saves only the input
    feature maps (alive anyway: the dense block holds them) and the weights. Backward rebuilds concat + BN + ReLU from
    those without touching the running statistics (batch statistics recomputed from the same input, or the unchanged
    running ones in eval mode), back-propagates the 1x1 convolution from its output gradient without running it again,
    and lets autograd differentiate the cheap concat + BN + ReLU.
    """

    @staticmethod
    def forward(ctx, norm: nn.BatchNorm2d, norm_weight, norm_bias, conv_weight, *features):
        ctx.eps = norm.eps
        ctx.running_stats = None if _needs_batch_stats(norm) else (norm.running_mean, norm.running_var)
        activations = F.relu(norm(torch.cat(features, 1)), inplace=True)
        device_type = activations.device.type
        ctx.conv_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                          else activations.dtype)
        ctx.save_for_backward(norm_weight, norm_bias, conv_weight, *features)
        return F.conv2d(activations, conv_weight)

    @staticmethod
    def backward(ctx, grad_out):
        norm_weight, norm_bias, conv_weight, *features = ctx.saved_tensors
        needs_grad = ctx.needs_input_grad
        with torch.enable_grad():
            weight = norm_weight.detach().requires_grad_(needs_grad[1])
            bias = norm_bias.detach().requires_grad_(needs_grad[2])
            inputs = [f.detach().requires_grad_(n) for f, n in zip(features, needs_grad[4:])]
            running_mean, running_var = ctx.running_stats or (None, None)
            activations = F.relu(F.batch_norm(
                torch.cat(inputs, 1), running_mean, running_var, weight, bias,
                training=ctx.running_stats is None, momentum=0.0, eps=ctx.eps), inplace=True)
        conv_input = activations.detach().to(ctx.conv_dtype)
        grad_out = grad_out.to(ctx.conv_dtype)
        grad_conv_weight = None
        if needs_grad[3]:
            grad_conv_weight = torch.nn.grad.conv2d_weight(conv_input, conv_weight.shape, grad_out)
            grad_conv_weight = grad_conv_weight.to(conv_weight.dtype)
        leaves = [t for t in (weight, bias, *inputs) if t.requires_grad]
        grads = iter(())
        if leaves:
            grad_activations = torch.nn.grad.conv2d_input(conv_input.shape, conv_weight.to(ctx.conv_dtype), grad_out)
            grads = iter(torch.autograd.grad(activations, leaves, grad_activations.to(activations.dtype)))
        grad_weight = next(grads) if needs_grad[1] else None
        grad_bias = next(grads) if needs_grad[2] else None
        grad_features = [next(grads) if n else None for n in needs_grad[4:]]
        return (None, grad_weight, grad_bias, grad_conv_weight, *grad_features)


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-Conv1x1 (``bn_size * growth_rate`` channels) on the concatenation of every earlier
    feature map of the block, then BN-ReLU-Conv3x3 (``growth_rate`` channels) and optional dropout."""

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4, drop_rate: float = 0.,
                 memory_efficient: bool = True):
        super().__init__()
        bottleneck_chs = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, bottleneck_chs, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck_chs)
        self.conv2 = nn.Conv2d(bottleneck_chs, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def bottleneck(self, features: List[torch.Tensor]) -> torch.Tensor:
        """The 1x1 bottleneck output; memory-efficient only when a backward pass can follow (else nothing is saved)
        and not under ``torch.jit.trace`` or ``torch.fx`` tracing (fvcore and fx graphs get the plain, identical
        path)."""
        if not torch.jit.is_scripting() and self._saves_memory(features):
            return _EfficientBottleneck.apply(self.norm1, self.norm1.weight, self.norm1.bias, self.conv1.weight,
                                              *features)
        return self.conv1(F.relu(self.norm1(torch.cat(features, 1)), inplace=True))

    @torch.jit.unused
    def _saves_memory(self, features: List[torch.Tensor]) -> bool:
        params = (self.norm1.weight, self.norm1.bias, self.conv1.weight)
        return (self.memory_efficient and torch.is_grad_enabled() and not torch.jit.is_tracing()
                and not is_fx_tracing() and any(t.requires_grad for t in (*params, *features)))

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        out = self.conv2(F.relu(self.norm2(self.bottleneck(features)), inplace=True))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers (``denselayer1``...); returns the block input and all layer outputs concatenated."""

    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool):
        super().__init__({
            f'denselayer{i + 1}': DenseLayer(
                in_chs + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient)
            for i in range(num_layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 (compression) then 2x2 average pooling, between dense blocks."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(OrderedDict([
            ('norm', nn.BatchNorm2d(in_chs)),
            ('relu', nn.ReLU(inplace=True)),
            ('conv', nn.Conv2d(in_chs, out_chs, 1, bias=False)),
            ('pool', nn.AvgPool2d(2, stride=2)),
        ]))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class _DenseFeatures:
    """Builds the stem, dense blocks and transitions shared by :class:`DenseNet` and :class:`DenseNetMC`."""

    def _build_features(self, block_config: Sequence[int], growth_rate: int, num_init_features: Optional[int],
                        bn_size: int, compression: float, drop_rate: float, stem: str, in_chans: int,
                        memory_efficient: bool) -> Tuple['OrderedDict[str, nn.Module]', List[int], List[int]]:
        """Return the named feature modules (no final norm), the index after each dense block, its channels; set
        ``feature_info`` to the stem's output and every dense block's."""
        if stem not in ('imagenet', 'cifar'):
            raise ValueError(
                f"stem must be 'imagenet' (7x7/2 conv, BN, ReLU, max-pool) or 'cifar' (3x3 conv), got {stem!r}")
        if not 0 < compression <= 1:
            raise ValueError(f'compression must be in (0, 1], got {compression}')
        self.stem = stem
        chs = num_init_features or 2 * growth_rate
        if stem == 'imagenet':
            modules = OrderedDict([
                ('conv0', nn.Conv2d(in_chans, chs, 7, stride=2, padding=3, bias=False)),
                ('norm0', nn.BatchNorm2d(chs)),
                ('relu0', nn.ReLU(inplace=True)),
                ('pool0', nn.MaxPool2d(3, stride=2, padding=1)),
            ])
        else:
            modules = OrderedDict([('conv0', nn.Conv2d(in_chans, chs, 3, padding=1, bias=False))])
        self.feature_info: List[Dict[str, Any]] = [dict(
            num_chs=chs, reduction=2 if stem == 'imagenet' else 1,
            module='features.relu0' if stem == 'imagenet' else 'features.conv0')]
        reduction = 4 if stem == 'imagenet' else 1  # of the first dense block
        block_ends, block_chs = [], []
        for i, num_layers in enumerate(block_config):
            modules[f'denseblock{i + 1}'] = DenseBlock(
                num_layers, chs, growth_rate, bn_size, drop_rate, memory_efficient)
            chs += num_layers * growth_rate
            block_ends.append(len(modules))
            block_chs.append(chs)
            self.feature_info.append(
                dict(num_chs=chs, reduction=reduction * 2 ** i, module=f'features.denseblock{i + 1}'))
            if i != len(block_config) - 1:
                out_chs = int(chs * compression)
                modules[f'transition{i + 1}'] = Transition(chs, out_chs)
                chs = out_chs
        return modules, block_ends, block_chs

    def _feature_taps(self) -> List[int]:
        """The index in ``features`` of the module whose output is each ``feature_info`` entry."""
        names = list(self.features._modules)
        return [names.index(info['module'].split('.', 1)[1]) for info in self.feature_info]

    def _init_weights(self) -> None:
        mode = 'fan_in' if self.stem == 'imagenet' else 'fan_out'
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=mode)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def set_memory_efficient(self, enable: bool = True) -> None:
        """Switch every dense layer between the memory-efficient and the plain implementation (same weights)."""
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = enable

    def _final_size(self, size: int) -> int:
        if self.stem == 'imagenet':
            size = _conv_out(_conv_out(size, 7, 2, 3), 3, 2, 1)
        for _ in range(self.num_transitions):
            size //= 2
        return size


class DenseNet(_DenseFeatures, nn.Module):
    """Single-exit DenseNet-BC: ``forward`` returns the logits tensor (timm's single-model API).

    ``block_config`` layers per dense block, ``growth_rate`` k, ``num_init_features`` stem width (default 2k),
    ``bn_size`` bottleneck width factor (4k channels), ``compression`` transition factor, ``stem`` 'imagenet' or
    'cifar', ``memory_efficient`` (see the module docstring), ``global_pool`` timm's pooling type (``''``: none).
    """

    def __init__(
            self,
            block_config: Sequence[int] = (6, 12, 24, 16),
            growth_rate: int = 32,
            num_init_features: Optional[int] = None,
            bn_size: int = 4,
            compression: float = 0.5,
            drop_rate: float = 0.,
            stem: str = 'imagenet',
            num_classes: int = 1000,
            in_chans: int = 3,
            memory_efficient: bool = True,
            global_pool: str = 'avg',
    ):
        super().__init__()
        modules, _, block_chs = self._build_features(
            block_config, growth_rate, num_init_features, bn_size, compression, drop_rate, stem, in_chans,
            memory_efficient)
        self.num_features = self.head_hidden_size = block_chs[-1]
        self.num_transitions = len(block_config) - 1
        norm = 'norm5' if stem == 'imagenet' else 'norm_final'
        modules[norm] = nn.BatchNorm2d(self.num_features)
        self.feature_info[-1]['module'] = f'features.{norm}'  # the last map goes through the final norm and ReLU
        self.features = nn.Sequential(modules)
        self.global_pool, self.classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self._init_weights()

    def _check_input(self, x: torch.Tensor) -> None:
        if not checks_input(x):
            return
        check_input_tensor(self, x)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'{type(self).__name__} expects a batch of {self.in_chans}-channel images (N, '
                             f'{self.in_chans}, H, W), got shape {tuple(x.shape)}')
        if min(self._final_size(x.shape[-2]), self._final_size(x.shape[-1])) < 1:
            raise ValueError(f'{x.shape[-2]}x{x.shape[-1]} inputs are too small for {type(self).__name__}: '
                             f'the last dense block would get an empty feature map; use larger images')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        return F.relu(self.features(x), inplace=True)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the ``feature_info`` maps in ``indices`` (the stem's output, then every
        dense block's; the last one normalised as ``forward_features`` returns it), and unless
        ``intermediates_only`` the final feature map first."""
        if output_fmt != 'NCHW':
            raise ValueError(f"{type(self).__name__} returns NCHW feature maps, got output_fmt={output_fmt!r}")
        if not torch.jit.is_scripting():
            self._check_input(x)
        taps = self._feature_taps()
        take, max_index = feature_take_indices(len(taps), indices)
        last = taps[max_index] if stop_early or intermediates_only else len(self.features) - 1
        intermediates = []
        for i, module in enumerate(self.features[:last + 1]):
            x = module(x)
            if i == taps[-1]:
                x = F.relu(x, inplace=True)
            if i in taps and taps.index(i) in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool, self.classifier = create_classifier(self.num_features, num_classes,
                                                                  pool_type=global_pool)
        else:
            self.classifier = classifier_layer(self.num_features, num_classes)


class ExitHead(nn.Module):
    """A DenseNet^MC classifier: BN-ReLU, global average pooling, Linear (the same form as DenseNet's final one)."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.fc = classifier_layer(in_chs, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = classifier_layer(self.norm.num_features, num_classes)


class DenseNetMC(_DenseFeatures, MultiExitNetwork):
    """DenseNet^MC, the multi-classifier baseline of the MSDNet paper: DenseNet-BC with an :class:`ExitHead` after
    every dense block (``exits='blocks'``), a :class:`MultiExitNetwork` (``forward`` returns the logits list, shallow
    first; ``iter_exits``, ``per_exit_macs``). Same arguments as :class:`DenseNet`; the backbone keys are the same
    (``features.*``), the final norm and classifier become ``heads.{last}.norm`` / ``heads.{last}.fc``.

    The MSDNet paper's CIFAR DenseNet^MC placed its classifiers inside the blocks as well; dynzoo exits after blocks.
    """

    def __init__(
            self,
            block_config: Sequence[int] = (16, 16, 16),
            growth_rate: int = 12,
            num_init_features: Optional[int] = None,
            bn_size: int = 4,
            compression: float = 0.5,
            drop_rate: float = 0.,
            stem: str = 'cifar',
            num_classes: int = 100,
            in_chans: int = 3,
            memory_efficient: bool = True,
            exits: str = 'blocks',
    ):
        super().__init__()
        if exits != 'blocks':
            raise ValueError(f"exits must be 'blocks' (a classifier after every dense block), got {exits!r}")
        modules, block_ends, block_chs = self._build_features(
            block_config, growth_rate, num_init_features, bn_size, compression, drop_rate, stem, in_chans,
            memory_efficient)
        self.features = nn.Sequential(modules)
        self.heads = nn.ModuleList([ExitHead(chs, num_classes) for chs in block_chs])
        self.feature_info = self.feature_info[1:]  # the maps the exits read: every dense block's output
        self.num_features = self.head_hidden_size = block_chs[-1]
        self._stage_bounds = list(zip([0] + block_ends[:-1], block_ends))
        self.num_transitions = len(block_config) - 1
        self.num_exits = len(block_config)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, 224, 224) if stem == 'imagenet' else (in_chans, 32, 32)
        self._init_weights()

    def forward_stage(self, k: int, state: torch.Tensor) -> torch.Tensor:
        start, end = self._stage_bounds[k]
        for module in list(self.features)[start:end]:
            state = module(state)
        return state

    def forward_exit_head(self, k: int, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.heads[k](x, pre_logits)

    def exit_classifiers(self) -> List[nn.Module]:
        return [head.fc for head in self.heads]

    def set_exit_classifier(self, k: int, num_classes: int) -> None:
        self.heads[k].reset_classifier(num_classes)

    def valid_input_size(self, height: int, width: int) -> bool:
        return min(self._final_size(height), self._final_size(width)) >= 1

    def input_size_hint(self) -> str:
        smallest = next(s for s in range(1, 1025) if self.valid_input_size(s, s))
        return f'its heads pool globally, so any side of at least {smallest} works'


_LEGACY_DENSE_LAYER_KEY = re.compile(r'(denselayer\d+\.(?:norm|conv))\.([12])\.')


def _rename_legacy_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """torchvision's released files name dense-layer modules ``norm.1`` / ``conv.2``; the model has ``norm1``..."""
    return {_LEGACY_DENSE_LAYER_KEY.sub(r'\1\2.', k): v for k, v in state_dict.items()}


checkpoint_filter_fn = make_checkpoint_filter(_rename_legacy_keys)


def _create_densenet(variant: str, pretrained: bool = False, **kwargs):
    """Build :class:`DenseNet`, or :class:`DenseNetMC` when ``exits`` is given (``exits=None`` means single exit)."""
    exits = kwargs.pop('exits', None)
    if exits is None:
        return build_model(DenseNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    return build_model(
        DenseNetMC, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, exits=exits, **kwargs)


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', **normalization('imagenet'),
        'first_conv': 'features.conv0', 'classifier': 'classifier',
        'paper_ids': 'arXiv:1608.06993', 'paper_name': 'Densely Connected Convolutional Networks',
        **kwargs,
    }


def _tv_cfg(timm_name: str, torchvision_file: str):
    """torchvision's weights: timm's Hub repository (the same tensors as safetensors, and timm's ``densenet*`` has
    dynzoo's keys), with torchvision's own file as the fallback ``url``."""
    return _cfg(url=f'https://download.pytorch.org/models/{torchvision_file}', hf_hub_id=f'timm/{timm_name}.tv_in1k',
                license='bsd-3-clause', origin_url='https://github.com/pytorch/vision')


def _cifar_cfg(**kwargs):
    return _cfg(**{'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
                   **normalization('densenet_cifar'), 'license': 'mit',
                   'origin_url': 'https://github.com/gpleiss/efficient_densenet_pytorch', **kwargs})


default_cfgs = dynzoo_default_cfgs({
    'densenet_bc_121.tv_in1k': _tv_cfg('densenet121', 'densenet121-a639ec97.pth'),
    'densenet_bc_161.tv_in1k': _tv_cfg('densenet161', 'densenet161-8d451a50.pth'),
    'densenet_bc_169.tv_in1k': _tv_cfg('densenet169', 'densenet169-b2777c0a.pth'),
    'densenet_bc_201.tv_in1k': _tv_cfg('densenet201', 'densenet201-c1103571.pth'),
    'densenet_bc_264': _cfg(),
    'densenet_bc_100_k12': _cifar_cfg(),
    'densenet_bc_100_k12.c10': _cifar_cfg(num_classes=10, hf_hub_id='dynzoo/densenet_bc_100_k12.c10'),
    'densenet_bc_250_k24': _cifar_cfg(),
    'densenet_bc_190_k40': _cifar_cfg(),
    'densenet_bc_100_k12_mc': _cifar_cfg(
        classifier=tuple(f'heads.{k}.fc' for k in range(3)), paper_ids='arXiv:1703.09844',
        paper_name='Multi-Scale Dense Networks for Resource Efficient Image Classification (DenseNet^MC baseline)'),
}, reported_top1={f'densenet_bc_{depth}.tv_in1k': ('ImageNet val', (top1,)) for depth, top1 in (
    (121, 74.43), (161, 77.14), (169, 75.60), (201, 76.90))})

_CIFAR_ARGS = dict(stem='cifar', bn_size=4, compression=0.5)


@register_model
def densenet_bc_121(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-121 (6, 12, 24, 16), k=32: torchvision ``densenet121``, 7.98M params."""
    return _create_densenet(
        'densenet_bc_121', pretrained, **{**dict(block_config=(6, 12, 24, 16), growth_rate=32), **kwargs})


@register_model
def densenet_bc_161(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-161 (6, 12, 36, 24), k=48, 96 stem channels: torchvision ``densenet161``, 28.68M params."""
    return _create_densenet('densenet_bc_161', pretrained, **{**dict(
        block_config=(6, 12, 36, 24), growth_rate=48, num_init_features=96), **kwargs})


@register_model
def densenet_bc_169(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-169 (6, 12, 32, 32), k=32: torchvision ``densenet169``, 14.15M params."""
    return _create_densenet(
        'densenet_bc_169', pretrained, **{**dict(block_config=(6, 12, 32, 32), growth_rate=32), **kwargs})


@register_model
def densenet_bc_201(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-201 (6, 12, 48, 32), k=32: torchvision ``densenet201``, 20.01M params."""
    return _create_densenet(
        'densenet_bc_201', pretrained, **{**dict(block_config=(6, 12, 48, 32), growth_rate=32), **kwargs})


@register_model
def densenet_bc_264(pretrained: bool = False, **kwargs) -> DenseNet:
    """DenseNet-264 (6, 12, 64, 48), k=32, the deepest network of the memory-efficient report; no weights."""
    return _create_densenet(
        'densenet_bc_264', pretrained, **{**dict(block_config=(6, 12, 64, 48), growth_rate=32), **kwargs})


@register_model
def densenet_bc_100_k12(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, depth 100, k=12 (16 layers per block), 0.80M params at 100 classes (0.77M at 10)."""
    return _create_densenet('densenet_bc_100_k12', pretrained, **{**dict(
        _CIFAR_ARGS, block_config=(16, 16, 16), growth_rate=12), **kwargs})


@register_model
def densenet_bc_250_k24(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, depth 250, k=24 (41 layers per block), 15.48M params at 100 classes (15.32M at 10)."""
    return _create_densenet('densenet_bc_250_k24', pretrained, **{**dict(
        _CIFAR_ARGS, block_config=(41, 41, 41), growth_rate=24), **kwargs})


@register_model
def densenet_bc_190_k40(pretrained: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet-BC, depth 190, k=40 (31 layers per block), 25.82M params at 100 classes (25.62M at 10)."""
    return _create_densenet('densenet_bc_190_k40', pretrained, **{**dict(
        _CIFAR_ARGS, block_config=(31, 31, 31), growth_rate=40), **kwargs})


@register_model
def densenet_bc_100_k12_mc(pretrained: bool = False, **kwargs) -> DenseNetMC:
    """DenseNet^MC: CIFAR DenseNet-BC-100 (k=12) with a classifier after each of its 3 dense blocks."""
    return _create_densenet('densenet_bc_100_k12_mc', pretrained, **{**dict(
        _CIFAR_ARGS, block_config=(16, 16, 16), growth_rate=12, exits='blocks'), **kwargs})
