"""SCAN and Self-Distillation (BYOT) ResNets for CIFAR.

* ``scan_resnet*``: SCAN (Zhang et al., "SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient
  Models", NeurIPS 2019), the authors' ``sresnet.py`` (ArchipLab-LinfengZhang/pytorch-scalable-neural-networks):
  each shallow exit is an attention mask (strided conv, BN, ReLU, transposed conv, BN, sigmoid) that multiplies the
  stage output, a "ScalaNet" bottleneck (1x1 conv to 128, one strided conv down to 4x4, 1x1 conv to 512 x expansion,
  4x4 average pool) and a Linear.
* ``byot_resnet*``: the journal version of Be Your Own Teacher (Zhang, Bao, Ma, "Self-Distillation: Towards
  Efficient and Compact Neural Networks", TPAMI 2021), the authors' ``resnet.py``
  (ArchipLab-LinfengZhang/pytorch-self-distillation-final): the attention mask and the exit bottleneck are built from
  separable convolutions (``SepConv``), one per halving of the feature map, and the mask is upsampled bilinearly.

Both share a CIFAR ResNet backbone (3x3 stem, no max-pool, stages of 32/16/8/4 pixels), exits after ``layer1..3``
and after ``layer4``. The networks are rebuilt from a specification of the authors' code: same layers, same
``state_dict`` keys in the same order, same outputs. Where dynzoo differs:

* exits are returned shallow first (the authors return ``[out4, out3, out2, out1]``, deepest first);
* SCAN's forward computed the feature-distillation loss inside the network; dynzoo returns the exit features instead
  (``model(x, return_features=True)``) and computes the loss in :class:`dynzoo.losses.SCANLoss`;
* the BYOT training script attaches three ``adaptation_layers`` (Linear) to the network and saves them with it; they
  are part of the training loss, so dynzoo keeps them in :class:`dynzoo.losses.BYOTLoss` and the checkpoint filter
  drops them from the network (``BYOTLoss.load_adaptation_layers`` reads them from the same file);
* the heads only work on 32x32 inputs (the authors' fixed 4x4 average pool); other sizes raise a ``ValueError``.

No pretrained weights were released for either family (SCAN's README promises a ResNet-18 that was never uploaded).
"""
import logging
from typing import Dict, List, Tuple, Type, Union

import torch
import torch.fx
from torch import nn
from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck

from ._normalization import normalization
from ._exits import MultiExitNetwork
from ._helpers import build_model, classifier_layer, dynzoo_default_cfgs, init_he_fan_out, make_checkpoint_filter

__all__ = ['ScanResNet', 'SepConv']

_logger = logging.getLogger(__name__)

ADAPTATION_PREFIX = 'adaptation_layers.'
HEAD_WIDTH = 128  # SCAN's ScalaNet bottleneck width, the same for every depth


class SepConv(nn.Module):
    """Separable conv pair of the Self-Distillation code, held in ``op`` as in the authors' keys:
    depthwise 3x3 (``stride``) - 1x1 - BN - ReLU - depthwise 3x3 - 1x1 to ``out_chs`` - BN - ReLU, all convs bias-free.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, stride=stride, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, in_chs, 1, bias=False),
            nn.BatchNorm2d(in_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_chs, in_chs, 3, stride=1, padding=1, groups=in_chs, bias=False),
            nn.Conv2d(in_chs, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def scan_attention(chs: int) -> nn.Sequential:
    """SCAN's mask: 3x3/2 conv, BN, ReLU, 4x4/2 transposed conv back to the input size, BN, sigmoid (convs biased)."""
    return nn.Sequential(
        nn.Conv2d(chs, chs, 3, stride=2, padding=1),
        nn.BatchNorm2d(chs),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(chs, chs, 4, stride=2, padding=1),
        nn.BatchNorm2d(chs),
        nn.Sigmoid(),
    )


def scan_bottleneck(in_chs: int, out_chs: int, reduction: int) -> nn.Sequential:
    """SCAN's ``ScalaNet``: 1x1 conv to 128, ``reduction`` x ``reduction`` conv with the same stride (down to 4x4),
    1x1 conv to ``out_chs`` (each with bias, BN and ReLU), then a 4x4 average pool."""
    return nn.Sequential(
        nn.Conv2d(in_chs, HEAD_WIDTH, 1),
        nn.BatchNorm2d(HEAD_WIDTH),
        nn.ReLU(inplace=True),
        nn.Conv2d(HEAD_WIDTH, HEAD_WIDTH, reduction, stride=reduction),
        nn.BatchNorm2d(HEAD_WIDTH),
        nn.ReLU(inplace=True),
        nn.Conv2d(HEAD_WIDTH, out_chs, 1),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(4, 4),
    )


def byot_attention(chs: int) -> nn.Sequential:
    """Self-Distillation mask: SepConv/2, BN, ReLU, bilinear x2 upsampling, sigmoid."""
    return nn.Sequential(
        SepConv(chs, chs),
        nn.BatchNorm2d(chs),
        nn.ReLU(inplace=True),
        nn.Upsample(scale_factor=2, mode='bilinear'),
        nn.Sigmoid(),
    )


def byot_bottleneck(in_chs: int, num_halvings: int) -> nn.Sequential:
    """Self-Distillation exit bottleneck: ``num_halvings`` SepConvs/2, each doubling the width, then a 4x4 pool."""
    layers: List[nn.Module] = [SepConv(in_chs * 2 ** i, in_chs * 2 ** (i + 1)) for i in range(num_halvings)]
    return nn.Sequential(*layers, nn.AvgPool2d(4, 4))


class ScanResNet(MultiExitNetwork):
    """CIFAR ResNet with three attention exits after ``layer1..3`` and the final exit after ``layer4``.

    ``head_type='scan'`` builds SCAN's heads (``sresnet.py``), ``'byot'`` the Self-Distillation ones (``resnet.py``).
    Every exit ends in a ``512 * expansion``-d feature vector (the ``fc{k}`` input), which
    ``forward(x, return_features=True)`` returns along with the logits.
    """

    def __init__(
            self,
            block: Type[Union[BasicBlock, Bottleneck]],
            layers: Tuple[int, int, int, int],
            head_type: str = 'scan',
            num_classes: int = 100,
            in_chans: int = 3,
    ):
        super().__init__()
        if head_type not in ('scan', 'byot'):
            raise ValueError(f"head_type must be 'scan' or 'byot', got {head_type!r}")
        self.head_type = head_type
        self.num_exits = 4
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, 32, 32)
        expansion = block.expansion
        self.num_features = self.head_hidden_size = 512 * expansion
        self.feature_info = [dict(num_chs=planes * expansion, reduction=2 ** k, module=f'layer{k + 1}')
                             for k, planes in enumerate((64, 128, 256, 512))]

        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_chs = 64
        for index, (planes, num_blocks, stride) in enumerate(zip((64, 128, 256, 512), layers, (1, 2, 2, 2))):
            blocks = []
            for i in range(num_blocks):
                downsample = None
                if i == 0 and (stride != 1 or in_chs != planes * expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(in_chs, planes * expansion, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes * expansion),
                    )
                blocks.append(block(in_chs, planes, stride=stride if i == 0 else 1, downsample=downsample))
                in_chs = planes * expansion
            self.add_module(f'layer{index + 1}', nn.Sequential(*blocks))

        exit_chs = [c * expansion for c in (64, 128, 256)]
        for k, chs in enumerate(exit_chs, start=1):
            if head_type == 'scan':
                bottleneck = scan_bottleneck(chs, self.num_features, reduction=2 ** (4 - k))
            else:
                bottleneck = byot_bottleneck(chs, num_halvings=4 - k)
            self.add_module(f'scala{k}', bottleneck)
        self.scala4 = nn.AvgPool2d(4, 4)
        for k, chs in enumerate(exit_chs, start=1):
            self.add_module(f'attention{k}', scan_attention(chs) if head_type == 'scan' else byot_attention(chs))
        for k in range(1, 5):
            self.add_module(f'fc{k}', classifier_layer(self.num_features, num_classes))
        init_he_fan_out(self, zero_linear_bias=False)  # as the authors: convs only, Linear keeps its init

    def forward_stage(self, k: int, state: torch.Tensor) -> torch.Tensor:
        if k == 0:
            state = self.relu(self.bn1(self.conv1(state)))
        return getattr(self, f'layer{k + 1}')(state)

    def exit_features(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """The feature vector exit ``k`` classifies: the stage output (masked by the attention for shallow exits)
        through the exit bottleneck, flattened."""
        if k < 3:
            state = getattr(self, f'attention{k + 1}')(state) * state
        return getattr(self, f'scala{k + 1}')(state).flatten(1)

    def forward_exit_head(self, k: int, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.exit_features(k, x)
        return features if pre_logits else getattr(self, f'fc{k + 1}')(features)

    def exit_classifiers(self) -> List[nn.Module]:
        return [getattr(self, f'fc{k}') for k in range(1, 5)]

    def set_exit_classifier(self, k: int, num_classes: int) -> None:
        setattr(self, f'fc{k + 1}', classifier_layer(self.num_features, num_classes))

    def input_size_hint(self) -> str:
        return 'the authors\' exit heads end in a fixed 4x4 average pool that needs 32x32 inputs'

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Exit logits, shallow first. With ``return_features=True``: ``(logits, features)``, two lists of four
        tensors, shallow first; ``features[k]`` is the ``(N, 512 * expansion)`` input of ``fc{k+1}``. ``torch.fx``
        traces the default, the logits alone."""
        if isinstance(return_features, torch.fx.Proxy) or not return_features:
            return super().forward(x)
        if not torch.jit.is_scripting():
            self.check_input(x)
        logits, features = [], []
        state = x
        for k in range(self.num_exits):
            state = self.forward_stage(k, state)
            feature = self.exit_features(k, state)
            features.append(feature)
            logits.append(getattr(self, f'fc{k + 1}')(feature))
        return logits, features


def _drop_adaptation_layers(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The BYOT training script saves its ``adaptation_layers`` (loss-side Linear layers) with the network."""
    dropped = [k for k in state_dict if k.startswith(ADAPTATION_PREFIX)]
    if dropped:
        _logger.warning(
            'Dropped %d %s* keys: they belong to the training loss; load them with '
            'dynzoo.losses.BYOTLoss.load_adaptation_layers.', len(dropped), ADAPTATION_PREFIX)
    return {k: v for k, v in state_dict.items() if not k.startswith(ADAPTATION_PREFIX)}


checkpoint_filter_fn = make_checkpoint_filter(_drop_adaptation_layers)


def _create_scan_resnet(variant: str, pretrained: bool = False, **kwargs) -> ScanResNet:
    return build_model(ScanResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(preset: str, **kwargs):
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (4, 4), 'crop_pct': 1.0,
        'interpolation': 'bilinear', **normalization(preset), 'first_conv': 'conv1',
        'classifier': ('fc1', 'fc2', 'fc3', 'fc4'),
        **kwargs,
    }


def _scan_cfg(**kwargs):
    return _cfg(
        'scan_cifar', paper_ids='arXiv:1906.03951',
        paper_name='SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient Models',
        origin_url='https://github.com/ArchipLab-LinfengZhang/pytorch-scalable-neural-networks', **kwargs)


def _byot_cfg():
    return _cfg(
        'byot_cifar', paper_ids='doi:10.1109/TPAMI.2021.3067100',
        paper_name='Self-Distillation: Towards Efficient and Compact Neural Networks',
        origin_url='https://github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final')


_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

default_cfgs = dynzoo_default_cfgs({
    **{f'scan_resnet{depth}': _scan_cfg() for depth in _DEPTHS},
    'scan_resnet18.c10': _scan_cfg(num_classes=10, hf_hub_id='dynzoo/scan_resnet18.c10', license='mit'),
    **{f'byot_resnet{depth}': _byot_cfg() for depth in _DEPTHS},
})


def _build(head_type: str, depth: int, pretrained: bool, kwargs) -> ScanResNet:
    block, layers = _DEPTHS[depth]
    return _create_scan_resnet(
        f'{head_type}_resnet{depth}', pretrained, **dict(dict(block=block, layers=layers, head_type=head_type),
                                                        **kwargs))


@register_model
def scan_resnet18(pretrained: bool = False, **kwargs) -> ScanResNet:
    """SCAN ResNet-18 (CIFAR, 4 exits), 15.16M params at 100 classes."""
    return _build('scan', 18, pretrained, kwargs)


@register_model
def scan_resnet34(pretrained: bool = False, **kwargs) -> ScanResNet:
    """SCAN ResNet-34 (CIFAR, 4 exits)."""
    return _build('scan', 34, pretrained, kwargs)


@register_model
def scan_resnet50(pretrained: bool = False, **kwargs) -> ScanResNet:
    """SCAN ResNet-50 (CIFAR, 4 exits), 61.15M params at 100 classes."""
    return _build('scan', 50, pretrained, kwargs)


@register_model
def scan_resnet101(pretrained: bool = False, **kwargs) -> ScanResNet:
    """SCAN ResNet-101 (CIFAR, 4 exits), 80.14M params at 100 classes."""
    return _build('scan', 101, pretrained, kwargs)


@register_model
def scan_resnet152(pretrained: bool = False, **kwargs) -> ScanResNet:
    """SCAN ResNet-152 (CIFAR, 4 exits), 95.79M params at 100 classes."""
    return _build('scan', 152, pretrained, kwargs)


@register_model
def byot_resnet18(pretrained: bool = False, **kwargs) -> ScanResNet:
    """Self-Distillation (BYOT, journal version) ResNet-18 (CIFAR, 4 exits), 12.28M params at 100 classes."""
    return _build('byot', 18, pretrained, kwargs)


@register_model
def byot_resnet34(pretrained: bool = False, **kwargs) -> ScanResNet:
    """Self-Distillation (BYOT, journal version) ResNet-34 (CIFAR, 4 exits)."""
    return _build('byot', 34, pretrained, kwargs)


@register_model
def byot_resnet50(pretrained: bool = False, **kwargs) -> ScanResNet:
    """Self-Distillation (BYOT, journal version) ResNet-50 (CIFAR, 4 exits), 38.43M params at 100 classes."""
    return _build('byot', 50, pretrained, kwargs)


@register_model
def byot_resnet101(pretrained: bool = False, **kwargs) -> ScanResNet:
    """Self-Distillation (BYOT, journal version) ResNet-101 (CIFAR, 4 exits)."""
    return _build('byot', 101, pretrained, kwargs)


@register_model
def byot_resnet152(pretrained: bool = False, **kwargs) -> ScanResNet:
    """Self-Distillation (BYOT, journal version) ResNet-152 (CIFAR, 4 exits)."""
    return _build('byot', 152, pretrained, kwargs)
