"""ResNet^MC: a CIFAR ResNet with a classifier after every stage, the multi-classifier ResNet baseline of the MSDNet
paper (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018).

The backbone is the CIFAR ResNet of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2):
a 3x3 conv with 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels (``depth = 6n + 2``), the
first block of stages 2 and 3 with stride 2, and parameter-free shortcuts (option A: subsample, pad channels with
zeros). ``resnet_mc_cifar`` is ResNet-110 (n = 18, 1.73M backbone params). Every exit is the network's own classifier
form, global average pooling and a Linear layer, on the output of a stage (``exits='stages'``); a sequence of block
indices (1-based, counted over the whole network, the last one ``3n``) places exits anywhere, e.g. inside stages as
the MSDNet paper's ResNet^MC did. No weights were released; the MSDNet authors did not publish this baseline's code.
"""
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models import register_model

from ._normalization import normalization
from ._exits import MultiExitNetwork
from ._helpers import build_model, checkpoint_filter, classifier_layer, dynzoo_default_cfgs, init_he_fan_out

__all__ = ['ResNetMC', 'BasicBlock']


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a parameter-free shortcut (strided subsampling, zero channels appended)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.stride = stride
        self.extra_chs = out_chs - in_chs

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_chs:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_chs))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class PoolLinearHead(nn.Module):
    """Global average pooling then a Linear classifier."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__()
        self.in_chs = in_chs
        self.reset_classifier(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = classifier_layer(self.in_chs, num_classes)


class ResNetMC(MultiExitNetwork):
    """CIFAR ResNet (``depth = 6n + 2``) with exits after every stage, or after the blocks listed in ``exits``."""

    def __init__(
            self,
            depth: int = 110,
            exits: Union[str, Sequence[int]] = 'stages',
            widths: Sequence[int] = (16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f'depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 62, 110, ...), got {depth}')
        blocks_per_stage = (depth - 2) // 6
        num_blocks = blocks_per_stage * len(widths)
        if exits == 'stages':
            exits = [blocks_per_stage * (s + 1) for s in range(len(widths))]
        exits = list(exits)
        if not exits or exits != sorted(set(exits)) or exits[0] < 1 or exits[-1] != num_blocks:
            raise ValueError(f"exits must be 'stages' or increasing block indices in 1..{num_blocks} ending with "
                             f'{num_blocks} (the final classifier), got {exits}')
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, chs = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(chs, width, stride=2 if stage > 0 and i == 0 else 1))
                chs = width
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList([PoolLinearHead(self.blocks[i - 1].bn2.num_features, num_classes) for i in exits])
        self.feature_info = [dict(num_chs=self.blocks[i - 1].bn2.num_features, module=f'blocks.{i - 1}',
                                  reduction=2 ** sum(block.stride > 1 for block in self.blocks[:i])) for i in exits]
        self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        self._stage_bounds = list(zip([0] + exits[:-1], exits))
        self.exit_blocks = exits
        self.num_exits = len(exits)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = (in_chans, 32, 32)
        init_he_fan_out(self, zero_linear_bias=False)

    def forward_stage(self, k: int, state: torch.Tensor) -> torch.Tensor:
        if k == 0:
            state = self.stem(state)
        start, end = self._stage_bounds[k]
        for block in self.blocks[start:end]:
            state = block(state)
        return state

    def forward_exit_head(self, k: int, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.heads[k](x, pre_logits)

    def exit_classifiers(self) -> List[nn.Module]:
        return [head.fc for head in self.heads]

    def set_exit_classifier(self, k: int, num_classes: int) -> None:
        self.heads[k].reset_classifier(num_classes)

    def valid_input_size(self, height: int, width: int) -> bool:
        return height >= 1 and width >= 1

    def input_size_hint(self) -> str:
        return 'its heads pool globally, so any size works'


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
        'interpolation': 'bilinear', **normalization('cifar'), 'first_conv': 'stem.0',
        'classifier': tuple(f'heads.{k}.fc' for k in range(3)),
        'paper_ids': 'arXiv:1703.09844', 'paper_name': 'Multi-Scale Dense Networks for Resource Efficient Image '
        'Classification (ResNet^MC baseline)',
        **kwargs,
    }


default_cfgs = dynzoo_default_cfgs({
    'resnet_mc_cifar': _cfg(),
    'resnet_mc_cifar.c10': _cfg(num_classes=10, hf_hub_id='dynzoo/resnet_mc_cifar.c10', license='mit'),
})


@register_model
def resnet_mc_cifar(pretrained: bool = False, **kwargs) -> ResNetMC:
    """ResNet^MC: CIFAR ResNet-110 with a classifier after each of its 3 stages (pass ``depth=6n+2`` to change)."""
    return build_model(ResNetMC, 'resnet_mc_cifar', pretrained, pretrained_filter_fn=checkpoint_filter, **kwargs)
