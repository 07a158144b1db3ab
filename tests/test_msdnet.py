"""MSDNet against the authors' code: keys, outputs, parameter counts, FLOPs (spec ../shared/specs/msdnet.md)."""
import collections
import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dynzoo
from dynzoo.models import CheckpointMismatchError, MSDNet
from dynzoo.models.msdnet import GROW_IN_PLACE_MIN_BATCH, DeferredScales
from parity import deterministic_state_dict, load_keys, load_manifest, load_outputs

MANIFEST = load_manifest('msdnet')

# Spec sections 4 and 10: (name, num_classes) -> total parameters.
PARAMS = {
    ('msdnet_step4', 1000): 23_958_440, ('msdnet_step6', 1000): 56_529_304, ('msdnet_step7', 1000): 62_314_472,
    ('msdnet_cifar_b7', 100): 3_067_960, ('msdnet_cifar_b7', 10): 2_986_690,
    ('msdnet_cifar_lin5', 100): 2_078_924, ('msdnet_cifar_lin5', 10): 2_020_874,
    ('msdnet_cifar_b10', 100): 4_955_644, ('msdnet_cifar_b10', 10): 4_839_544,
    ('msdnet_cifar_lin7', 10): 3_885_394,
}

# Spec 5.2 column A (the authors' op_counter), in M rounded to 2 decimals, for the configs without exact fixtures.
AUTHORS_MFLOPS = {
    ('msdnet_step6', 1000): [514.66, 1171.18, 1844.52, 2501.40, 2742.06],
    ('msdnet_step7', 1000): [615.69, 1436.39, 2283.21, 2967.42, 3253.79],
    ('msdnet_cifar_b7', 10): [15.13, 25.48, 37.06, 46.28, 57.28, 66.89, 75.86],
    ('msdnet_cifar_lin5', 100): [6.86, 14.35, 27.54, 41.71, 58.48],
    ('msdnet_cifar_lin5', 10): [6.85, 14.33, 27.50, 41.67, 58.42],
    ('msdnet_cifar_b10', 100): [15.14, 25.51, 37.79, 52.06, 62.18, 74.07, 87.73, 100.04, 110.12, 121.68],
    ('msdnet_cifar_lin7', 10): [6.85, 14.33, 27.26, 48.40, 76.37, 108.78, 137.20],
}

# Spec 5.2 columns C (cascade), D (standalone), E (lazy) for CIFAR-100 budgeted, 5 exits, in M.
LIN5_FVCORE_MFLOPS = {
    'cascade': [6.79, 14.21, 27.28, 41.37, 58.09],
    'standalone': [6.79, 11.98, 21.94, 33.52, 45.95],
    'lazy': [5.92, 12.65, 24.50, 40.17, 58.09],
}


def _fixture_model(fixture_id):
    entry = MANIFEST[fixture_id]
    model = dynzoo.create_model(entry['dynzoo_name'], **entry['create_kwargs'])
    return model, entry


@pytest.mark.parametrize('fixture_id', sorted(MANIFEST))
def test_state_dict_keys_and_shapes_match_authors(fixture_id):
    model, _ = _fixture_model(fixture_id)
    expected = [(name, tuple(shape)) for name, shape, _ in load_keys('msdnet', fixture_id)]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected


@pytest.mark.parametrize('fixture_id', sorted(MANIFEST))
def test_outputs_match_authors_code(fixture_id):
    model, entry = _fixture_model(fixture_id)
    model = model.double().eval()
    model.load_state_dict(deterministic_state_dict(load_keys('msdnet', fixture_id)))
    ref = load_outputs('msdnet', fixture_id)
    x = torch.from_numpy(ref['x'])
    with torch.no_grad():
        outputs = model(x)
        streamed = list(model.iter_exits(x))
    assert isinstance(outputs, list) and len(outputs) == entry['num_exits'] == model.num_exits
    for k, (out, again) in enumerate(zip(outputs, streamed)):
        expected = torch.from_numpy(ref[f'out{k}'])
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(out, again)


@contextlib.contextmanager
def _whole_blocks(model):
    """The authors' schedule: a hook on every block makes forward_stage run it whole (no LazyBlock), and the cached
    costs follow (MSDNet.cost_key)."""
    handles = [block.register_forward_hook(lambda *args: None) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize('fixture_id', sorted(MANIFEST))
def test_per_exit_macs_and_params_match_manifest(fixture_id):
    model, entry = _fixture_model(fixture_id)
    per_exit = entry['per_exit']
    assert dynzoo.per_exit_macs(model, convention='authors') == [e['official_flops'] for e in per_exit]
    # dynzoo's lazy blocks spend, up to each exit, exactly the work that exit needs: the spec's lazy scope.
    assert dynzoo.per_exit_macs(model) == [e['fvcore_lazy'] for e in per_exit]
    assert dynzoo.per_exit_macs(model, scope='lazy') == [e['fvcore_lazy'] for e in per_exit]
    with _whole_blocks(model):
        assert dynzoo.per_exit_macs(model) == [e['fvcore_cumulative'] for e in per_exit]
        assert dynzoo.per_exit_macs(model, scope='standalone') == [e['fvcore_standalone'] for e in per_exit]
    assert dynzoo.per_exit_params(model) == [e['cumulative_params'] for e in per_exit]
    assert sum(p.numel() for p in model.parameters()) == entry['total_params']


def test_msdnet_step4_authors_flops_to_the_unit():
    model = dynzoo.create_model('msdnet_step4')
    assert dynzoo.per_exit_macs(model, convention='authors') == [
        339_902_824, 685_456_720, 1_008_156_120, 1_254_472_688, 1_360_529_624]


@pytest.mark.parametrize('name,num_classes', sorted(PARAMS))
def test_parameter_totals(name, num_classes):
    model = dynzoo.create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name, num_classes]


@pytest.mark.parametrize('name,num_classes', sorted(AUTHORS_MFLOPS))
def test_authors_flops_every_config(name, num_classes):
    model = dynzoo.create_model(name, num_classes=num_classes)
    flops = dynzoo.per_exit_macs(model, convention='authors')
    assert [round(f / 1e6, 2) for f in flops] == AUTHORS_MFLOPS[name, num_classes]


@pytest.mark.parametrize('scope', sorted(LIN5_FVCORE_MFLOPS))
def test_fvcore_scopes_budgeted_config(scope):
    model = dynzoo.create_model('msdnet_cifar_lin5')
    with _whole_blocks(model):  # the spec counts the authors' whole blocks
        flops = dynzoo.per_exit_macs(model, scope=scope)
    assert [round(f / 1e6, 2) for f in flops] == LIN5_FVCORE_MFLOPS[scope]
    assert [round(f / 1e6, 2) for f in dynzoo.per_exit_macs(model)] == LIN5_FVCORE_MFLOPS['lazy']


@pytest.mark.parametrize('name,optimized,batch', [
    ('msdnet_cifar_b7', False, 3), ('msdnet_cifar_b7', True, GROW_IN_PLACE_MIN_BATCH),
    ('msdnet_cifar_lin5', False, GROW_IN_PLACE_MIN_BATCH), ('msdnet_cifar_b10', True, 2),
    ('msdnet_step4', False, 1)])
def test_lazy_blocks_skip_work_and_keep_outputs(name, optimized, batch):
    """forward_stage runs each block only as far as its exit needs and finishes it when the next stage starts: the
    outputs equal the authors' whole blocks bit for bit, and running to exit 1 costs the lazy scope's MACs."""
    torch.manual_seed(0)
    model = dynzoo.create_model(name, num_classes=10).eval()
    if optimized:
        model = dynzoo.optimize_for_inference(model)
    x = torch.randn(batch, *model.default_input_size)
    with torch.no_grad():
        lazy = model(x)
        state, whole = x, []
        for block, head in zip(model.blocks, model.classifier):  # the authors' order, block modules called whole
            state = block(state)
            whole.append(head(model.exit_input(0, state)))
        with FlopCounterMode(display=False) as counter:
            next(model.iter_exits(x[:1]))
    assert all(torch.equal(a, b) for a, b in zip(lazy, whole))
    lazy_macs = dynzoo.per_exit_macs(model, scope='lazy')
    assert counter.get_total_flops() // 2 == lazy_macs[0] == dynzoo.per_exit_macs(model)[0]
    with _whole_blocks(model):
        assert dynzoo.per_exit_macs(model)[0] > lazy_macs[0]


def _whole_block_logits(model, x):
    state, logits = x, []
    for block, head in zip(model.blocks, model.classifier):
        state = block(state)
        logits.append(head(model.exit_input(0, state)))
    return logits


@pytest.mark.parametrize('change', ['add', 'remove'])
def test_hook_changed_between_stages(change):
    """A stage state says whether its block still has work to finish (DeferredScales), so a hook added or removed
    between two exits changes nothing but the next block's schedule."""
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    handle = model.blocks[0].register_forward_hook(lambda *args: None) if change == 'remove' else None
    with torch.no_grad():
        expected = _whole_block_logits(model, x)
        exits = model.iter_exits(x)
        got = [next(exits)]
        if handle is None:
            handle = model.blocks[0].register_forward_hook(lambda *args: None)
            model.blocks[1][0].register_forward_hook(lambda *args: None)
        else:
            handle.remove()
        got += list(exits)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_stages_take_whole_blocks_and_wrapped_blocks_run_whole():
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)

    class Wrapper(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, state):
            return self.block(state)

    with torch.no_grad():
        expected = _whole_block_logits(model, x)
        state = model.forward_stage(1, model.blocks[0](x))  # a whole block's output needs no finishing
        assert torch.equal(model.forward_exit(1, state), expected[1])
        with pytest.raises(ValueError, match='did not come from forward_stage'):
            model.forward_stage(1, DeferredScales(model.forward_stage(0, x)[1:]))
        model.blocks[2] = Wrapper(model.blocks[2])
        assert all(torch.equal(a, b) for a, b in zip(model(x), expected))
        assert not model.cost_key()[2]


def test_early_exit_charges_what_runs():
    """Hooks on the blocks make them run whole; the costs early_exit charges follow without clearing any cache."""
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    everyone_at_exit_1 = [0.0] * 7
    lazy = dynzoo.early_exit(model, x, thresholds=everyone_at_exit_1).macs
    with _whole_blocks(model):
        whole = dynzoo.early_exit(model, x, thresholds=everyone_at_exit_1).macs
    assert whole == 2 * 14955776 and lazy == 2 * 13244672  # exit 1's whole-block and lazy MACs, 10 classes
    assert dynzoo.early_exit(model, x, thresholds=everyone_at_exit_1).macs == lazy


def test_hooked_block_runs_whole():
    """A hook on a block (or one of its layers) sees the block run as the authors run it: whole, once."""
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    outputs = []
    model.blocks[0].register_forward_hook(lambda module, args, output: outputs.append(output))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        assert len(outputs) == 1 and [t.shape[1] for t in outputs[0]] == [40, 80, 160]
        torch.testing.assert_close(model.blocks[1](outputs[0])[-1], model.forward_stage(1, outputs[0])[-1])
    assert logits[0].shape == (2, 10)


def _authors_file(model, path):
    """A checkpoint laid out as the authors' main.py writes it (DataParallel ``module.`` keys, float32)."""
    state = {f'module.{k}': v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({'epoch': 300, 'arch': 'msdnet', 'state_dict': state, 'best_prec1': 75.0,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'momentum': 0.9, 'params': [0, 1]}]}}, path)


def test_authors_checkpoint_loads(tmp_path):
    source = dynzoo.create_model('msdnet_cifar_b7').double()
    source.load_state_dict(deterministic_state_dict(load_keys('msdnet', 'msdnet_cifar_b7_c100')))
    _authors_file(source, tmp_path / 'msdnet.pth.tar')
    model = dynzoo.create_model('msdnet_cifar_b7', pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'msdnet.pth.tar')))
    ref = load_outputs('msdnet', 'msdnet_cifar_b7_c100')
    with torch.no_grad():
        outputs = model.double().eval()(torch.from_numpy(ref['x']))
    for k, out in enumerate(outputs):
        torch.testing.assert_close(out, torch.from_numpy(ref[f'out{k}']), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('edit,message', [
    (lambda sd: sd.pop('module.classifier.3.linear.weight'), 'missing key.*classifier.3.linear.weight'),
    (lambda sd: sd.update({'module.extra.weight': torch.zeros(1)}), 'unexpected key.*extra.weight'),
    (lambda sd: sd.update({'module.classifier.0.linear.bias': torch.zeros(10)}), 'shape mismatch.*classifier.0'),
])
def test_checkpoint_that_does_not_fit_is_named(tmp_path, edit, message):
    path = tmp_path / 'bad.pth'
    _authors_file(dynzoo.create_model('msdnet_cifar_b7'), path)
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint['state_dict'])
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointMismatchError, match=message):
        dynzoo.create_model('msdnet_cifar_b7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path):
    path = tmp_path / 'old.pth'
    source = dynzoo.create_model('msdnet_cifar_lin5')
    _authors_file(source, path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['state_dict'] = {k: v for k, v in checkpoint['state_dict'].items() if 'num_batches' not in k}
    torch.save(checkpoint, path)
    model = dynzoo.create_model('msdnet_cifar_lin5', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys() and any('num_batches_tracked' in k for k in loaded)
    for key, value in expected.items():
        if 'num_batches_tracked' not in key:
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize('name,shape,message', [
    ('msdnet_cifar_b7', (1, 3, 64, 64), 'cannot take 64x64 inputs.*3x32x32'),
    ('msdnet_cifar_b7', (1, 3, 224, 224), 'cannot take 224x224'),
    ('msdnet_cifar_b7', (1, 1, 32, 32), 'expects 3-channel input'),
    ('msdnet_cifar_b7', (3, 32, 32), 'batch of images'),
    ('msdnet_step4', (1, 3, 32, 32), 'cannot take 32x32 inputs.*3x224x224'),
    ('msdnet_step4', (1, 3, 448, 448), 'cannot take 448x448'),
])
def test_wrong_input_raises_clear_error(name, shape, message):
    model = dynzoo.create_model(name).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape))


def test_other_sizes_the_heads_can_pool_work():
    model = dynzoo.create_model('msdnet_step4').eval()
    with torch.no_grad():
        assert [o.shape for o in model(torch.zeros(1, 3, 256, 256))] == [(1, 1000)] * 5


def test_iter_exits_computes_lazily_and_can_drop_samples():
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    calls = []
    model.blocks[1].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        full = model(x)
        calls.clear()
        exits = model.iter_exits(x)
        first = next(exits)
        assert calls == []  # block 2 has not run yet
        second = exits.send(torch.tensor([1, 3]))
        assert calls == [1]
    torch.testing.assert_close(first, full[0])
    torch.testing.assert_close(second, full[1][[1, 3]])


def test_classifier_reset_and_get():
    model = dynzoo.create_model('msdnet_cifar_b7')
    classifiers = model.get_classifier()
    assert len(classifiers) == 7 and classifiers is model.get_classifier()
    assert list(classifiers) == [head.linear for head in model.classifier]
    model.reset_classifier(10)
    assert model.get_classifier() is classifiers and list(classifiers) == [head.linear for head in model.classifier]
    assert all(linear.out_features == 10 for linear in classifiers)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 32, 32))[-1].shape == (1, 10)


def test_intended_init_and_authors_effective_init():
    model = dynzoo.create_model('msdnet_cifar_b7')
    conv = model.classifier[0].m[0].net[0]
    expected_std = math.sqrt(2.0 / (3 * 3 * conv.out_channels))
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    assert all(torch.count_nonzero(linear.bias) == 0 for linear in model.get_classifier())
    torch_default = dynzoo.create_model('msdnet_cifar_b7', msdnet_init='torch')
    assert torch.count_nonzero(torch_default.classifier[0].linear.bias) > 0


def test_configurable_class_prune_min():
    model = MSDNet(n_blocks=3, base=2, step=2, channels=8, growth_rate=4, gr_factor='1-2-4', bn_factor='1-2-4',
                   prune='min', stem='cifar', num_classes=10).eval()
    with torch.no_grad():
        assert [o.shape for o in model(torch.zeros(2, 3, 32, 32))] == [(2, 10)] * 3


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 not really a zip', b'\x80\x02garbage'])
def test_corrupt_checkpoint_file_is_named(tmp_path, content):
    path = tmp_path / 'msdnet.pth.tar'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='msdnet.pth.tar.*(corrupt|truncated)'):
        dynzoo.create_model('msdnet_cifar_b7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_with_other_num_classes_keeps_backbone(tmp_path):
    source = dynzoo.create_model('msdnet_cifar_b7')
    _authors_file(source, tmp_path / 'c100.pth')
    model = dynzoo.create_model('msdnet_cifar_b7', pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'c100.pth')))
    assert all(linear.out_features == 10 for linear in model.get_classifier())
    torch.testing.assert_close(model.blocks[3][0].layers[0].conv_normal.net[0].weight,
                               source.blocks[3][0].layers[0].conv_normal.net[0].weight)


def test_own_file_with_other_class_count_than_config_keeps_its_classifier(tmp_path):
    source = dynzoo.create_model('msdnet_cifar_b7', num_classes=10)  # registered config says 100 classes
    _authors_file(source, tmp_path / 'c10.pth')
    model = dynzoo.create_model('msdnet_cifar_b7', pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / 'c10.pth')))
    torch.testing.assert_close(model.classifier[6].linear.weight, source.classifier[6].linear.weight)


def test_inference_path_grows_maps_in_place_and_matches_the_authors_path():
    """With autograd off and a batch of at least GROW_IN_PLACE_MIN_BATCH, the dense layers append into spare
    channels (no torch.cat) and the 1x1 convs run as matrix products; with autograd on, or one image, the layers
    concatenate as the authors'. Same outputs."""
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    x = torch.randn(GROW_IN_PLACE_MIN_BATCH, 3, 32, 32)
    reference = model(x)
    ops = collections.Counter()

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CountOps():
        logits = model(x)
    assert ops['cat'] == 0 and ops['bmm'] > 0
    for got, expected in zip(logits, reference):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        features = model.forward_features(x)
        ops.clear()
        with CountOps():
            one = model(x[:1])
    assert ops['cat'] > 0  # one image: torch.cat costs less than growing in place
    torch.testing.assert_close(one[-1], reference[-1][:1].detach(), rtol=1e-4, atol=1e-5)
    assert features.is_contiguous()  # not a view of a growing buffer
    torch.testing.assert_close(features, model.forward_features(x).detach(), rtol=1e-4, atol=1e-5)


def test_inference_path_allocates_each_growing_map_once():
    """Each scale's growing buffer is allocated at the width the scale reaches before the next transition, so the
    dense layers of later blocks append into it without re-allocating and copying the map."""
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()
    with torch.no_grad():
        after_block_0 = model.forward_stage(0, torch.randn(GROW_IN_PLACE_MIN_BATCH, 3, 32, 32))
        buffers = [entry.spare[0] for entry in after_block_0]
        after_block_1 = model.forward_stage(1, after_block_0)
    # 16/32/64 stem channels, growth 6/12/24 per layer: 4 layers in block 0, 2 in block 1, then block 2's first layer
    # grows scales 1 and 2 once more and drops scale 0 before its transition.
    assert [b.shape[1] for b in buffers] == [52, 116, 232]
    # block 1 leaves its last layer's scales 0 and 1 for stage 2 (LazyBlock): 40 and 92 channels for now
    assert [entry.map.shape[1] for entry in after_block_1] == [40, 92, 208]
    assert [entry.map.data_ptr() for entry in after_block_1] == [b.data_ptr() for b in buffers]
