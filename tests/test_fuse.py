"""fuse_conv_bn and optimize_for_inference keep every exit's output, and real early exit on the faster models."""
import collections

import pytest
import torch
from PIL import Image
from torch import nn

import dynzoo
from timm.layers import freeze_batch_norm_2d
from dynzoo.data import load_sample
from dynzoo.evaluate import eval_transform
from dynzoo.inference import NEVER, early_exit, fit_thresholds, geometric_fractions
from dynzoo.models import (FoldedBatchNorm, PointwiseConv, compact_batch, folded_batch_norms, fuse_conv_bn,
                           optimize_for_inference)
from dynzoo.models._exits import GrowingMap, feature_map
from dynzoo.models._fuse import FunctionalSequential, MatmulConv1x1
from dynzoo.models.msdnet import (GROW_IN_PLACE_MIN_BATCH, MultiScaleDenseLayer, SameScaleDenseLayer,
                                   ScaleTransition, SharedBottleneckLayer, TwoScaleDenseLayer, msdnet_op_counter)


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
    assert folded_batch_norms(fused) == expected_folded and _num_batch_norms(fused) == 0
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
    assert folded_batch_norms(fused) == 1
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


@pytest.mark.parametrize('speed_up', [fuse_conv_bn, optimize_for_inference])
def test_early_exit_on_faster_model_equals_plain(speed_up):
    model = _model_with_running_stats('msdnet_cifar_b7').double()
    fast = speed_up(model)
    x_val, x_test = torch.randn(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        thresholds = fit_thresholds(model(x_val), geometric_fractions(0.5, model.num_exits))
    plain, faster = early_exit(model, x_test, thresholds), early_exit(fast, x_test, thresholds)
    assert torch.equal(faster.predictions, plain.predictions) and torch.equal(faster.exits, plain.exits)
    assert faster.samples_per_stage == plain.samples_per_stage and len(set(plain.exits.tolist())) > 2
    assert faster.macs == plain.macs  # folding and matmuls add no counted multiply-adds
    everyone_to_the_end = early_exit(fast, x_test, [NEVER] * (model.num_exits - 1))
    with torch.no_grad():
        assert torch.equal(everyone_to_the_end.predictions, model(x_test)[-1].argmax(1))
    assert everyone_to_the_end.samples_per_stage == [16] * model.num_exits


def test_optimized_model_equals_unfused_and_grows_feature_maps_in_place():
    model = _model_with_running_stats('msdnet_cifar_b7').double()
    optimized = optimize_for_inference(model)
    pointwise = [m for m in optimized.modules() if isinstance(m, (PointwiseConv, MatmulConv1x1))]
    dense_layers = [m for m in model.modules() if isinstance(m, MultiScaleDenseLayer)]
    transitions = [m for m in model.modules() if isinstance(m, ScaleTransition)]
    # Every dense layer becomes a SharedBottleneckLayer but those whose finer outputs LazyBlock computes after the
    # exit (a shared bottleneck would compute them before it): 9 of the 16.
    merged = [m for m in dense_layers if not m.defers_outputs]
    assert sum(isinstance(m, SharedBottleneckLayer) for m in optimized.modules()) == len(merged) == 9
    assert len(dense_layers) == 16 and all(m.defers_outputs for m in optimized.modules()
                                           if isinstance(m, MultiScaleDenseLayer))

    def bottlenecks(layers):  # two per scale a layer reads, one for its coarsest and a dropped finest
        return sum(len(m.layers) + len([l for l in m.layers if isinstance(l, TwoScaleDenseLayer)]) for m in layers)

    # the merged layers' bottleneck 1x1 convs become one per scale read
    scales_read = sum(m.discard + len(m.layers) for m in merged)
    assert (bottlenecks(dense_layers), bottlenecks(merged), scales_read) == (54, 25, 18)
    unmerged = bottlenecks(dense_layers) - bottlenecks(merged)
    assert len(pointwise) == scales_read + unmerged + sum(len(t.m) for t in transitions) == 50
    assert folded_batch_norms(optimized) == 128
    assert _num_batch_norms(model) == 128 and not any(isinstance(m, SharedBottleneckLayer) for m in model.modules())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):  # a second call on the same model must not reuse the first call's buffers wrongly
            for exit_expected, exit_got in zip(expected, optimized(x)):
                assert (exit_got - exit_expected).abs().max() <= 1e-10 * exit_expected.abs().max()
        first = optimized.forward_stage(0, x)
        # the finest scale after the block's second layer: the last two layers' finest outputs are computed later
        assert isinstance(first[0], GrowingMap) and first[0].map.shape[1] == 28
        assert first[0].spare[0].shape[1] > 28 and first[0].map.data_ptr() == first[0].spare[0].data_ptr()
        again, twice = optimized.forward_stage(1, first), optimized.forward_stage(1, first)
        assert not first[0].spare  # the first call took the buffer: the second one copied into a fresh one
        kept = [feature_map(t).clone() for t in again]
        optimized.forward_stage(2, again)  # appends into again's spare channels: again itself must not change
        for a, b, c in zip(map(feature_map, again), map(feature_map, twice), kept):
            assert torch.equal(a, b) and torch.equal(a, c) and a.data_ptr() != b.data_ptr()
    # with autograd on, the optimized layers fall back to torch.cat and gradients flow
    optimized(x.requires_grad_())[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


SMALL = dict(channels=8, growth_rate=4)


@pytest.mark.parametrize('kwargs, size, shared', [
    (dict(bottleneck=False, **SMALL), 32, False),
    (dict(prune='min', **SMALL), 32, True),
    # 4 scales in blocks of 3 and 2 layers: every layer has a finer output computed after its block's exit
    (dict(gr_factor='1-2-4-4', bn_factor='1-1-2-2', n_blocks=2, base=3, step=2, **SMALL), 64, False),
    (dict(step_mode='lin_grow', step=1, n_blocks=4, **SMALL), 32, True),
    (dict(stem='imagenet', n_blocks=3, base=2, step=2, **SMALL), 96, True),
])
def test_msdnet_variants_inference_paths_equal_the_authors(kwargs, size, shared):
    """The plain model with autograd off (maps grown in place, in buffers of each scale's final width) and the
    optimized one give the authors' path's outputs (autograd on: torch.cat) at a batch that grows maps in place."""
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10, **kwargs).eval()
    optimized = optimize_for_inference(model)
    assert any(isinstance(m, SharedBottleneckLayer) for m in optimized.modules()) == shared
    kept = [m for m in optimized.modules() if isinstance(m, (SameScaleDenseLayer, TwoScaleDenseLayer))]
    assert shared or kept
    x = torch.randn(GROW_IN_PLACE_MIN_BATCH, 3, size, size)
    with torch.enable_grad():
        expected = [e.detach() for e in model(x)]
    grown_in = {}  # buffer address -> (buffer, widest map grown in it); the buffers are kept alive

    def record(layer, inputs, outputs):
        for entry in outputs:
            buffer = entry.spare[0]
            widest = grown_in.get(buffer.data_ptr(), (buffer, 0))[1]
            grown_in[buffer.data_ptr()] = (buffer, max(widest, entry.map.shape[1]))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, MultiScaleDenseLayer)]
    with torch.no_grad():
        plain = model(x)
    for hook in hooks:
        hook.remove()
    # each map grows in one buffer, allocated at exactly the width its scale reaches
    buffers, widest = zip(*grown_in.values())
    assert [buffer.shape[1] for buffer in buffers] == list(widest)
    with torch.no_grad():
        for got in (plain, optimized(x)):
            for exit_expected, exit_got in zip(expected, got):
                assert (exit_got - exit_expected).abs().max() <= 1e-4 * exit_expected.abs().max()


def test_unfoldable_bottleneck_norm_keeps_the_layer_and_its_norm():
    model = _model_with_running_stats('msdnet_cifar_b7')
    model.blocks[0][1] = freeze_batch_norm_2d(model.blocks[0][1]).eval()  # fuse_conv_bn leaves FrozenBatchNorm2d
    optimized = optimize_for_inference(model, inplace=False)
    first_layer = optimized.blocks[0][1]
    assert isinstance(first_layer, MultiScaleDenseLayer)
    assert isinstance(optimized.blocks[0][2], SharedBottleneckLayer)
    assert not any(m.training for m in optimized.modules())
    folded = folded_batch_norms(optimized)
    again = optimize_for_inference(optimized, inplace=True)  # optimizing twice changes nothing
    assert again is optimized and isinstance(again.blocks[0][2], SharedBottleneckLayer)
    assert folded_batch_norms(again) == folded > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for exit_expected, exit_got in zip(model(x), again(x)):
            torch.testing.assert_close(exit_got, exit_expected, rtol=1e-4, atol=2e-4)  # logits of order 1


def test_compacted_samples_move_in_place_keep_spare_channels_and_grow_in_place():
    first, second = SameScaleDenseLayer(4, 3, False, 1).eval(), SameScaleDenseLayer(7, 3, False, 1).eval()
    x = torch.randn(12, 4, 6, 6)  # maps grow in place from GROW_IN_PLACE_MIN_BATCH samples on
    x_before = x.clone()
    rows = torch.tensor([11, 0, 3, 1, 2, 4, 5, 6, 7])
    with torch.no_grad():
        grown = first(x)
        original = grown.map.clone()
        buffer = grown.spare[0]
        (compacted,), order = compact_batch([grown], rows, x)
        assert order.tolist() == [8, 0, 3, 1, 2, 4, 5, 6, 7]  # 11 fills the row 8 left, the others stay
        assert torch.equal(compacted.map[order], original[rows])
        assert compacted.map.data_ptr() == buffer.data_ptr()  # compacted in place, no new tensor
        assert compacted.spare[0].shape == (9, 14, 6, 6) and not grown.spare  # the right to grow moved on
        appended = second(compacted)
        assert appended.map.data_ptr() == buffer.data_ptr()  # the next layer still appends in place
        assert torch.equal(appended.map, torch.cat([compacted.map, second.conv_normal(compacted.map)], 1))
        (from_input, view_of_input), order = compact_batch([x, x[:, :2]], torch.tensor([4, 0, 3]), x)
        overlapping = torch.arange(12.0).as_strided((5, 4), (2, 1))  # sample i is elements 2i .. 2i + 3
        expected = overlapping[[4, 0, 3]]
        compacted_overlapping, order = compact_batch(overlapping, torch.tensor([4, 0, 3]), x)
    assert torch.equal(x, x_before)  # the caller's input is gathered, never written
    assert torch.equal(from_input[order], x[[4, 0, 3]]) and torch.equal(view_of_input[order], x[[4, 0, 3], :2])
    assert torch.equal(compacted_overlapping[order], expected)  # samples sharing memory are gathered too


@pytest.mark.parametrize('speed_up', [lambda model: model, optimize_for_inference])
def test_iter_exits_after_repeated_drops_matches_full_forward(speed_up):
    model = speed_up(_model_with_running_stats('msdnet_cifar_b7').double())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_before = x.clone()
    with torch.no_grad():
        full = model(x)
        exits = model.iter_exits(x)
        assert torch.equal(next(exits), full[0])
        inside = torch.arange(8)
        for k, keep in enumerate([[1, 2, 5, 6, 7], [0, 3, 4], [2, 0], None, [1], None], start=1):
            keep = None if keep is None else torch.tensor(keep)
            logits = exits.send(keep)
            inside = inside if keep is None else inside[keep]
            torch.testing.assert_close(logits, full[k][inside], rtol=1e-10, atol=1e-10)
    assert inside.tolist() == [1]
    assert torch.equal(x, x_before)


def test_pointwise_conv_equals_conv_in_both_memory_formats():
    conv = nn.Conv2d(8, 5, 1)
    pointwise = PointwiseConv(conv)
    x = torch.randn(3, 8, 6, 7)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = pointwise(x.contiguous(memory_format=layout))
        assert torch.allclose(got, conv(x), atol=1e-6) and got.shape == (3, 5, 6, 7)
    assert not PointwiseConv.applies_to(nn.Conv2d(8, 5, 1, stride=2))
    assert not PointwiseConv.applies_to(nn.Conv2d(8, 8, 1, groups=2))
    assert not PointwiseConv.applies_to(nn.Conv2d(8, 5, 3))


def test_sdpoint_instances_keep_their_stored_batch_norm_statistics():
    """The shipped SDPoint weights store BN statistics per instance: every instance's logits stay the same."""
    model = dynzoo.create_model('sdpoint_preresnet_cifar.c10', pretrained=True).eval()
    images, labels = load_sample()
    assert len(set(labels[::25].tolist())) == 10
    transform = eval_transform(model)
    x = torch.stack([transform(Image.fromarray(image)) for image in images[::25]])
    fast = optimize_for_inference(model)
    assert folded_batch_norms(fast) == 0 and _num_batch_norms(fast) == _num_batch_norms(model)
    with torch.no_grad():
        for instance in model.instances():
            torch.testing.assert_close(fast(x, instance=instance), model(x, instance=instance), rtol=1e-5, atol=1e-5)


def test_sdpoint_without_instance_statistics_is_folded_and_refuses_to_store_them():
    model = _model_with_running_stats('sdpoint_preresnet_cifar')
    fused = fuse_conv_bn(model)
    assert folded_batch_norms(fused) == 2  # the projection shortcuts' conv -> BN
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(fused(x, instance=(3, 0.5)), model(x, instance=(3, 0.5)), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match='unfused model'):
        fused.store_bn_stats((3, 0.5))


def test_functional_sequential_skips_module_calls_only_where_nothing_is_lost(monkeypatch):
    """With autograd off, MSDNet's conv - BN - ReLU sequences run as functional ops, bit-identical to the module calls;
    a hook on a layer or on every module, and a BatchNorm in training mode, still get their module calls."""
    model = _model_with_running_stats('msdnet_cifar_b7')
    num_norms = _num_batch_norms(model)
    x = torch.randn(2, 3, 32, 32)
    reference = [logits.detach() for logits in model(x)]  # autograd on: nn.Sequential's module calls
    calls = collections.Counter()
    norm_forward = nn.BatchNorm2d.forward

    def counted_norm_forward(self, input):
        calls[self] += 1
        return norm_forward(self, input)

    monkeypatch.setattr(nn.BatchNorm2d, 'forward', counted_norm_forward)
    with torch.no_grad():
        direct = model(x)
    assert not calls
    assert all(torch.equal(got, expected) for got, expected in zip(direct, reference))

    hooked = model.blocks[0][1].layers[0].conv_normal.net  # the first dense layer's finest-scale conv sequence
    assert type(hooked) is FunctionalSequential
    seen = []
    handle = hooked[4].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        with_hook = model(x)
    handle.remove()
    assert seen == [(2, 6, 32, 32)] and list(calls) == [hooked[1], hooked[4]]  # that sequence's two BatchNorms
    assert all(torch.equal(got, expected) for got, expected in zip(with_hook, reference))

    calls.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert len(calls) == num_norms
    counted_with_autograd = msdnet_op_counter(model, x)  # the authors' op counter hooks every Conv2d and ReLU
    with torch.no_grad():
        assert msdnet_op_counter(model, x) == counted_with_autograd

    model.train()
    norm = hooked[1]
    before = norm.running_mean.clone()
    with torch.no_grad():
        model(x)
    assert not torch.equal(norm.running_mean, before)  # batch statistics, running averages updated


def test_functional_sequential_keeps_the_module_checks_and_fx_graphs():
    """The direct path refuses what nn.Sequential refuses (BatchNorm2d's 4-D check: a 3-D map whose height equals its
    channel count would otherwise be normalised along the wrong axis), and torch.fx records module calls, so a
    traced graph switched to training mode still uses batch statistics."""
    torch.manual_seed(0)
    layers = FunctionalSequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    layers[1].running_mean.normal_()
    with torch.no_grad(), pytest.raises(ValueError, match='expected 4D input'):
        layers(torch.randn(3, 8, 8))
    with torch.no_grad():
        graph = torch.fx.symbolic_trace(layers)
    assert [node.op for node in graph.graph.nodes] == ['placeholder'] + ['call_module'] * 3 + ['output']
    x = torch.randn(4, 3, 8, 8)
    graph.train(), layers.train()
    with torch.no_grad():
        assert torch.equal(graph(x), layers(x))


def test_functional_sequential_calls_parametrized_layers():
    """A parametrized layer (another class than nn.Conv2d, its weight computed) runs as a module call."""
    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.manual_seed(0)
    layers = FunctionalSequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  MatmulConv1x1(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = layers(x)
        for layer in (layers[0], layers[3]):
            nn.utils.parametrize.register_parametrization(layer, 'weight', Doubled())
        doubled = layers(x)
        assert torch.equal(doubled, nn.Sequential.forward(layers, x)) and not torch.equal(doubled, plain)
