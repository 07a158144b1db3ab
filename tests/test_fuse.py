"""fuse_conv_bn: BatchNorm folded into convs keeps every exit's output, and real early exit on the fused model."""
import pytest
import torch
from torch import nn

import dynzoo
from dynzoo.inference import NEVER, early_exit, fit_thresholds, geometric_fractions
from dynzoo.models import FoldedBatchNorm, fuse_conv_bn


def _model_with_running_stats(name: str) -> nn.Module:
    """Eval-mode model whose BatchNorms are far from identity, so that folding them is not a no-op."""
    torch.manual_seed(0)
    model = dynzoo.create_model(name, num_classes=10).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 2.0),
                                      (module.weight.data, 0.5, 1.5), (module.bias.data, -0.2, 0.2)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


def _num_batch_norms(model: nn.Module) -> int:
    return sum(type(m) is nn.BatchNorm2d for m in model.modules())


@pytest.mark.parametrize('name, expected_folded', [
    ('msdnet_cifar_b7', 128),  # every Conv -> BN of ConvBasic / ConvBN (stem, layers, transitions, heads)
    ('resnet_mc_cifar', 109),  # stem (Sequential) + 54 blocks x bn1(conv1) / bn2(conv2), found by torch.fx
])
def test_fused_outputs_equal_unfused(name, expected_folded):
    model = _model_with_running_stats(name)
    assert _num_batch_norms(model) == expected_folded
    fused = fuse_conv_bn(model)
    assert fused.folded_batch_norms == expected_folded and _num_batch_norms(fused) == 0
    assert _num_batch_norms(model) == expected_folded  # the original is left as it was
    assert not any('running_mean' in key for key in fused.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model(x), fused(x)
    assert len(got) == model.num_exits
    for exit_expected, exit_got in zip(expected, got):
        scale = exit_expected.abs().max()
        assert (exit_got - exit_expected).abs().max() <= 1e-5 * scale
        assert not torch.equal(exit_got, exit_expected)  # the convs really changed


def test_only_conv_fed_batch_norms_are_folded():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    fused = fuse_conv_bn(model)
    assert fused.folded_batch_norms == 1
    assert [type(m).__name__ for m in fused] == ['BatchNorm2d', 'Conv2d', 'ReLU', 'BatchNorm2d', 'Conv2d',
                                                 'FoldedBatchNorm']


def test_training_mode_is_refused():
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10)
    with pytest.raises(ValueError, match='model.eval'):
        fuse_conv_bn(model)
    fused = fuse_conv_bn(model.eval(), inplace=True)
    assert fused is model and isinstance(model.blocks[0][0].layers[0].net[1], FoldedBatchNorm)
    with pytest.raises(RuntimeError, match='inference only'):
        fused.train()(torch.randn(2, 3, 32, 32))


def test_early_exit_on_fused_model_equals_unfused():
    model = _model_with_running_stats('msdnet_cifar_b7').double()
    fused = fuse_conv_bn(model)
    x_val, x_test = torch.randn(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        thresholds = fit_thresholds(model(x_val), geometric_fractions(0.5, model.num_exits))
    plain, folded = early_exit(model, x_test, thresholds), early_exit(fused, x_test, thresholds)
    assert torch.equal(folded.predictions, plain.predictions) and torch.equal(folded.exits, plain.exits)
    assert folded.samples_per_stage == plain.samples_per_stage and len(set(plain.exits.tolist())) > 2
    assert folded.flops == plain.flops  # folding adds no counted multiply-adds
    everyone_to_the_end = early_exit(fused, x_test, [NEVER] * (model.num_exits - 1))
    with torch.no_grad():
        assert torch.equal(everyone_to_the_end.predictions, model(x_test)[-1].argmax(1))
    assert everyone_to_the_end.samples_per_stage == [16] * model.num_exits
