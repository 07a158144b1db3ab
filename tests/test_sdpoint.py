"""SDPoint: parity with the authors' code per instance, FLOPs per instance, sampling, per-instance BN statistics."""
import numpy as np
import pytest
import torch

import dynzoo
from dynzoo.models import CheckpointMismatchError
from dynzoo.models.sdpoint import Instance, SDPointResNet
from dynzoo.sdpoint import instance_macs, recalibrate_bn, select_instance
from parity import deterministic_state_dict, load_keys, load_manifest, load_outputs

torch.set_num_threads(1)

FIXTURE = 'sdpoint_resnet50'
NIL = (None, None)


def _instance(entry) -> tuple:
    return NIL if entry['p'] == -1 else (entry['p'], entry['r'])


@pytest.fixture(scope='module')
def manifest():
    return load_manifest('sdpoint')[FIXTURE]


@pytest.fixture(scope='module')
def resnet50_fp64():
    model = dynzoo.create_model('sdpoint_resnet50').double().eval()
    model.load_state_dict(deterministic_state_dict(load_keys('sdpoint', FIXTURE)))
    return model


def _cifar(**kwargs) -> SDPointResNet:
    torch.manual_seed(0)
    return dynzoo.create_model('sdpoint_preresnet_cifar', **kwargs)


def test_parity_every_fixture_instance(resnet50_fp64, manifest):
    outputs = load_outputs('sdpoint', FIXTURE)
    x = torch.from_numpy(outputs['x'])
    assert len(manifest['outputs']) == 8
    with torch.no_grad():
        for name, entry in manifest['outputs'].items():
            logits = resnet50_fp64(x, instance=_instance(entry)).numpy()
            ref = outputs[name]
            assert np.abs(logits - ref).max() <= 1e-12 * np.abs(ref).max(), name


def test_keys_params_and_instances(manifest):
    with torch.device('meta'):
        model = dynzoo.create_model('sdpoint_resnet50')
    assert [k for k, _, _ in load_keys('sdpoint', FIXTURE)] == list(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == manifest['total_params']
    assert model.num_blocks == manifest['num_blocks'] and model.stem_point == manifest['stem_point']
    assert model.block_names() == manifest['block_modules']
    assert [tuple(i) for i in model.instances()] == [_instance(e) for e in manifest['instances']]
    assert [i.name for i in model.instances()] == [e['name'] for e in manifest['instances']]


@pytest.mark.parametrize('name, params, keys, instances', [
    ('sdpoint_resnet18', 11_689_512, 122, 19),
    ('sdpoint_resnet34', 21_797_672, 218, 35),
    ('sdpoint_resnet101', 44_549_160, 626, 69),
    ('sdpoint_resnet152', 60_192_808, 932, 103),
    ('sdpoint_resnext50_32x4d', 25_028_904, 320, 35),
    ('sdpoint_resnext101_32x4d', 44_177_704, 626, 69),  # spec B1: 44.18 M, 626 keys, 104 BN layers
    ('sdpoint_preresnet18', 11_689_640, 127, 19),
    ('sdpoint_preresnet34', 21_797_800, 223, 35),
    ('sdpoint_preresnet50', 25_557_160, 325, 35),
    ('sdpoint_preresnet101', 44_549_288, 631, 69),  # spec B1: 44.55 M
    ('sdpoint_preresnet152', 60_192_936, 937, 103),
    ('sdpoint_preresnet200', 64_673_960, 1225, 135),
    ('sdpoint_preresnet_cifar', 272_506, 133, 21),
])
def test_param_counts(name, params, keys, instances):
    with torch.device('meta'):
        model = dynzoo.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys
    assert len(model.instances()) == instances == 2 * model.num_blocks + 3
    if name == 'sdpoint_resnext101_32x4d':
        assert len(model.bn_layers()) == 104 and model.instance_bn_stats.num_channels == 68_928


def test_macs_per_instance_resnet50(manifest):
    model = dynzoo.create_model('sdpoint_resnet50')
    entries = {e['name']: e for e in manifest['instances']}
    names = ['nil', 'p16_r075', 'p0_r050', 'p6_r075', 'p7_r075', 'p15_r075']
    chosen = [_instance(entries[n]) for n in names]
    default = instance_macs(model, instances=chosen, ops=None)
    macs = instance_macs(model, instances=chosen[:2])
    assert [i.name for i in default] == names
    for name, instance in zip(names, chosen):
        assert default[instance] == entries[name]['fvcore_default'], name
    for name, instance in zip(names, chosen[:2]):
        assert macs[instance] == entries[name]['fvcore_macs'], name
    # Cost is not monotone in the point: 14 * 0.75 rounds down to 10, 28 * 0.75 = 21.
    assert default[(7, 0.75)] < default[(6, 0.75)]


@pytest.mark.parametrize('name, expected', [
    # spec B8, fvcore default GMACs at 224x224: nil, stem 0.5, block 7 0.75
    ('sdpoint_resnext101_32x4d', {NIL: 8.013, (33, 0.5): 2.145, (7, 0.75): 5.209}),
    ('sdpoint_preresnet101', {NIL: 7.834, (33, 0.5): 2.104, (7, 0.75): 5.078}),
])
def test_macs_spec_b8(name, expected):
    model = dynzoo.create_model(name)
    macs = instance_macs(model, instances=list(expected), ops=None)
    assert {k: round(v / 1e9, 3) for k, v in macs.items()} == expected


def test_sampling_distribution():
    model = _cifar()
    n_points = model.stem_point + 2  # nil, blocks 0..N-1, stem
    for sampling in ('uniform', 'authors'):
        model.sampling = sampling
        generator = torch.Generator().manual_seed(0)
        draws = [model.sample_instance(generator) for _ in range(20000)]
        freq = lambda cond: sum(map(cond, draws)) / len(draws)  # noqa: E731
        block0 = 0.0 if sampling == 'authors' else 1 / n_points
        nil = (2 if sampling == 'authors' else 1) / n_points
        assert freq(lambda i: i == NIL) == pytest.approx(nil, abs=0.01)
        assert freq(lambda i: i.point == 0) == pytest.approx(block0, abs=0.01)
        assert freq(lambda i: i.point == model.stem_point) == pytest.approx(1 / n_points, abs=0.01)
        assert freq(lambda i: i.ratio == 0.5) == pytest.approx(freq(lambda i: i.ratio == 0.75), abs=0.02)
        assert all(i in model.instances() for i in draws)
    with pytest.raises(ValueError, match='sampling'):
        _cifar(sampling='paper')


def test_train_samples_eval_runs_full_network():
    model = _cifar()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    instance = model.sample_instance()
    torch.manual_seed(3)
    sampled = model(x)
    assert torch.allclose(sampled, model(x, instance=instance), atol=1e-6)
    model.eval()
    assert torch.equal(model(x), model(x, instance=NIL))


def test_pooled_sizes_follow_the_input():
    model = _cifar().eval()
    sizes = []
    model.layer1.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-2:])))
    model.layer3.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    model(torch.randn(1, 3, 32, 32), instance=(9, 0.75))
    model(torch.randn(1, 3, 40, 40), instance=(9, 0.75))
    model(torch.randn(1, 3, 32, 48), instance=(6, 0.75))  # each side on its own; 8 * 0.75 = 6, 12 * 0.75 = 9
    assert sizes == [(24, 24), (6, 6), (30, 30), (8, 8), (32, 48), (6, 9)]
    with pytest.raises(ValueError, match='too small'):
        model(torch.randn(1, 3, 4, 4), instance=(8, 0.5))


def test_bad_instance_names_the_valid_ones():
    model = _cifar()
    x = torch.randn(1, 3, 32, 32)
    for bad in [(10, 0.5), (3, 0.6), (None, 0.5), (-1, 0.5), (True, 0.5), 'nil', 3]:
        with pytest.raises(ValueError, match=r'\(None, None\).*0\.\.8.*p=9.*\(0\.5, 0\.75\).*model\.instances\(\)'):
            model(x, instance=bad)
    assert model.check_instance((9, 0.5)) == Instance(9, 0.5)
    with pytest.raises(ValueError, match='3-channel'):
        model(torch.randn(1, 1, 32, 32))


def _loader(batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.zeros(4)) for _ in range(batches)]


def test_bn_statistics_stored_and_used_per_instance(tmp_path):
    model = _cifar()
    shared = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _loader()
    recalibrate_bn(model, loader, instances=[NIL, (4, 0.5)], num_batches=2)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in shared.items())  # shared statistics restored
    nil_stats, p4_stats = model.bn_stats(NIL), model.bn_stats((4, 0.5))
    assert model.bn_stats((5, 0.5)) is None and p4_stats.shape == (2, model.instance_bn_stats.num_channels)

    # Cumulative average over the 2 batches (not an EMA): the stem BN sees the same input under every instance.
    with torch.no_grad():
        stem = [model.conv1(x) for x, _ in loader[:2]]
    expected_mean = torch.stack([s.mean((0, 2, 3)) for s in stem]).mean(0)
    expected_var = torch.stack([s.var((0, 2, 3), unbiased=True) for s in stem]).mean(0)
    width = model.bn1.num_features
    assert torch.allclose(p4_stats[0, :width], expected_mean, atol=1e-5)
    assert torch.allclose(p4_stats[1, :width], expected_var, atol=1e-5)
    assert torch.allclose(nil_stats[:, :width], p4_stats[:, :width])
    assert not torch.allclose(nil_stats[:, -64:], p4_stats[:, -64:])  # the final BN sees different maps

    # Changing the instance changes the statistics the final BN uses; unstored instances use the shared ones.
    model.eval()
    used = []
    model.bn2.register_forward_pre_hook(lambda m, i: used.append(m.running_mean.clone()))
    x = torch.randn(1, 3, 32, 32)
    for instance in [NIL, (4, 0.5), (5, 0.5), None]:
        model(x, instance=instance)
    assert torch.equal(used[0], nil_stats[0, -64:]) and torch.equal(used[1], p4_stats[0, -64:])
    assert torch.equal(used[2], shared['bn2.running_mean']) and torch.equal(used[3], nil_stats[0, -64:])
    assert torch.equal(model.bn2.running_mean, shared['bn2.running_mean'])

    # Saved and loaded with the state: a plain state_dict and a checkpoint file through create_model.
    outputs = {i: model(x, instance=i) for i in [NIL, (4, 0.5), (5, 0.5)]}
    state = model.state_dict()
    assert {'instance_bn_stats.nil', 'instance_bn_stats.p4_r050'} <= state.keys()
    clone = _cifar()
    clone.load_state_dict(state)
    path = tmp_path / 'sdpoint_cifar.pth'
    torch.save({'state_dict': state}, path)
    from_file = dynzoo.create_model('sdpoint_preresnet_cifar', pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(path)))
    for loaded in (clone.eval(), from_file.eval()):
        assert torch.equal(loaded.bn_stats((4, 0.5)), p4_stats)
        for instance, logits in outputs.items():
            assert torch.equal(loaded(x, instance=instance), logits)
    assert model.double().bn_stats((4, 0.5)).dtype == torch.float64
    model.clear_bn_stats()
    assert model.bn_stats(NIL) is None

    bad = dict(state, **{'instance_bn_stats.p99_r050': p4_stats})
    with pytest.raises(RuntimeError, match='p99_r050'):
        _cifar().load_state_dict(bad)
    with pytest.raises(ValueError, match='empty loader'):
        recalibrate_bn(model, [], instances=[NIL])


def test_authors_checkpoint_loads(tmp_path, manifest):
    state = deterministic_state_dict(load_keys('sdpoint', FIXTURE))
    weights = {f'module.{k}': v.float() for k, v in state.items() if not k.endswith('num_batches_tracked')}
    path = tmp_path / 'checkpoint.pth.tar'  # PyTorch 0.4.0: no num_batches_tracked
    torch.save({'epoch': 115, 'arch': 'resnet50', 'state_dict': weights,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4, 'momentum': 0.9, 'params': [0, 1]}]}}, path)
    model = dynzoo.create_model(FIXTURE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(model.fc.weight, weights['module.fc.weight'])
    outputs = load_outputs('sdpoint', FIXTURE)
    with torch.no_grad():
        logits = model(torch.from_numpy(outputs['x']).float(), instance=(7, 0.75)).double().numpy()
    assert np.abs(logits - outputs['out_p7_r075']).max() <= 1e-5 * np.abs(outputs['out_p7_r075']).max()

    del weights['module.layer2.0.downsample.0.weight']
    torch.save({'state_dict': weights}, path)
    with pytest.raises(CheckpointMismatchError, match='layer2.0.downsample.0.weight'):
        dynzoo.create_model(FIXTURE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_select_instance(manifest):
    flops = {_instance(e): e['fvcore_default'] for e in manifest['instances']}
    assert select_instance(flops, 3.0e9) == (8, 0.5)  # 2.901 GMAC; (9, 0.5) and (3, 0.75) cost just over 3
    # fvcore's default count includes the SDPoint pooling, so (15, 0.75) counts 51k more than nil ...
    assert select_instance(flops, 10e9) == (15, 0.75)
    # ... and conv + linear MACs tie them, the earlier instance (nil) wins.
    assert select_instance({_instance(e): e['fvcore_macs'] for e in manifest['instances']}, 10e9) == NIL
    accuracy = {NIL: 0.76, (16, 0.5): 0.60, (0, 0.75): 0.70, (7, 0.75): 0.74}
    assert select_instance(flops, 4.0e9, accuracy) == (7, 0.75)
    assert select_instance(flops, 2.0e9, accuracy) == (16, 0.5)
    by_name = {Instance(*k).name: v for k, v in accuracy.items()}  # as evaluate_instances and the model card key them
    assert list(by_name) == ['nil', 'p16_r050', 'p0_r075', 'p7_r075']
    assert select_instance(flops, 4.0e9, by_name) == (7, 0.75) and select_instance(flops, 2.0e9, by_name) == (16, 0.5)
    with pytest.raises(ValueError, match="'p7_75' is not an SDPoint instance name"):
        select_instance(flops, 4.0e9, {'p7_75': 0.74})
    with pytest.raises(ValueError, match=r'cheapest is \(16, 0\.5\)'):
        select_instance(flops, 1e9)


def test_instance_macs_count_what_per_exit_macs_counts():
    model = dynzoo.create_model('sdpoint_preresnet_cifar', num_classes=10)
    full = instance_macs(model, instances=[NIL])[NIL]
    assert full == dynzoo.per_exit_macs(model)[0]  # conv + linear by default, both
    everything = instance_macs(model, instances=[NIL], ops=None)[NIL]
    assert everything > full  # fvcore's full count adds batch norm and pooling
    with pytest.warns(DeprecationWarning, match='pass ops=None for the count instance_flops gave'):
        assert dynzoo.instance_flops(model, instances=[NIL]) == {NIL: everything}
