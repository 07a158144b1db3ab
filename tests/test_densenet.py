"""DenseNet-BC and the multi-classifier baselines: parity with torchvision and the gpleiss fixtures, torchvision's
legacy checkpoint keys, the memory-efficient implementation (same gradients, BN statistics moved once, linear saved
memory), DenseNet^MC / ResNet^MC as multi-exit networks."""
import copy

import pytest
import torch
import torchvision

import dynzoo
from dynzoo.models import densenet_bc as densenet_module
from dynzoo.models.densenet_bc import DenseNet, DenseNetMC, checkpoint_filter_fn
from dynzoo.models.resnet_mc import ResNetMC

from parity import deterministic_state_dict, load_keys, load_manifest, load_outputs

torch.set_num_threads(1)

MANIFEST = load_manifest('densenet')


def _build(name, **kwargs):
    return getattr(densenet_module, name)(**kwargs)


def _saved_activation_mib(model, x) -> float:
    """MiB of distinct tensors that autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2 ** 20


@pytest.mark.parametrize('name,num_classes,params', [
    ('densenet_bc_121', 1000, 7_978_856),
    ('densenet_bc_161', 1000, 28_681_000),
    ('densenet_bc_169', 1000, 14_149_480),
    ('densenet_bc_201', 1000, 20_013_928),
    ('densenet_bc_100_k12', 10, 769_162),
    ('densenet_bc_100_k12', 100, 800_032),
    ('densenet_bc_250_k24', 10, 15_324_406),
    ('densenet_bc_250_k24', 100, 15_480_556),
    ('densenet_bc_190_k40', 10, 25_624_430),
    ('densenet_bc_190_k40', 100, 25_821_620),
])
def test_param_counts(name, num_classes, params):
    model = dynzoo.create_model(name, num_classes=num_classes)
    assert isinstance(model, DenseNet)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize('name', ['densenet_bc_121', 'densenet_bc_161'])
def test_torchvision_parity(name):
    reference = getattr(torchvision.models, name.replace('_bc_', ''))(weights=None).eval()
    model = dynzoo.create_model(name).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('fixture_id', ['densenet_bc_121', 'densenet_bc_100_k12_c10'])
def test_fixture_parity(fixture_id):
    entry = MANIFEST[fixture_id]
    keys = load_keys('densenet', fixture_id)
    model = dynzoo.create_model(entry['dynzoo_name'], **entry['create_kwargs']).double().eval()
    assert [k[0] for k in keys] == list(model.state_dict())
    model.load_state_dict(deterministic_state_dict(keys))
    ref = load_outputs('densenet', fixture_id)
    with torch.no_grad():
        out = model(torch.from_numpy(ref['x']))
    torch.testing.assert_close(out, torch.from_numpy(ref['out0']), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in model.parameters()) == entry['total_params']
    model = model.float()
    assert dynzoo.count_macs(model, torch.zeros(1, *entry['fvcore']['input_shape'][1:])) == \
        entry['fvcore']['conv_linear_macs']


def test_torchvision_release_keys_load_from_file(tmp_path):
    """torchvision's released files: legacy ``norm.1``-style keys and no ``num_batches_tracked``."""
    legacy = load_keys('densenet', 'densenet_bc_121', 'legacy_keys')
    assert any('.norm.1.' in k[0] for k in legacy)
    state = {k: v.float() for k, v in deterministic_state_dict(legacy).items() if not k.endswith('num_batches_tracked')}
    path = tmp_path / 'densenet121-release.pth'
    torch.save(state, path)
    model = dynzoo.create_model('densenet_bc_121', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ref = load_outputs('densenet', 'densenet_bc_121')
    with torch.no_grad():
        out = model.double().eval()(torch.from_numpy(ref['x']))
    torch.testing.assert_close(out, torch.from_numpy(ref['out0']), rtol=1e-5, atol=1e-6)


def test_checkpoint_mismatch_is_named():
    model = DenseNet(block_config=(2, 2), growth_rate=4, stem='cifar', num_classes=10)
    state = model.state_dict()
    del state['features.denseblock1.denselayer2.conv2.weight']
    with pytest.raises(dynzoo.CheckpointMismatchError, match='denselayer2.conv2.weight'):
        checkpoint_filter_fn(state, model)


def _train_step(model, x):
    model.train()
    out = model(x)
    loss = sum(o.square().mean() for o in out) if isinstance(out, list) else out.square().mean()
    loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()


@pytest.mark.parametrize('model_fn', [
    lambda: DenseNet(block_config=(3, 4, 3), growth_rate=8, stem='cifar', num_classes=10, drop_rate=0.0),
    lambda: DenseNet(block_config=(2, 3, 2, 2), growth_rate=8, num_init_features=16, num_classes=10),
    lambda: DenseNetMC(block_config=(3, 3, 3), growth_rate=8, num_classes=10),
])
def test_memory_efficient_matches_plain(model_fn):
    torch.manual_seed(0)
    plain = model_fn().double()
    plain.set_memory_efficient(False)
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out_p, grads_p, state_p = _train_step(plain, x)
    out_e, grads_e, state_e = _train_step(efficient, x.clone())
    torch.testing.assert_close(out_e, out_p, rtol=0, atol=0)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_e[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    # Running statistics moved exactly once per step, as in the plain network (the references move them twice).
    for name, value in state_p.items():
        torch.testing.assert_close(state_e[name], value, rtol=1e-12, atol=0, msg=name)
        if name.endswith('num_batches_tracked'):
            assert int(state_e[name]) == 1, name


def test_memory_efficient_gradients_in_eval_mode_and_float32():
    torch.manual_seed(0)
    plain = DenseNet(block_config=(3, 3, 3), growth_rate=8, stem='cifar', num_classes=10, memory_efficient=False)
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, efficient):
        model.eval()
        inp = x.clone().requires_grad_()
        model(inp).logsumexp(1).sum().backward()
        grads.append((inp.grad, model.features.denseblock2.denselayer3.norm1.weight.grad))
        assert int(model.features.denseblock1.denselayer2.norm1.num_batches_tracked) == 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_memory_efficient_saves_linear_memory():
    x = torch.randn(2, 3, 32, 32)
    saved = {}
    for layers in (8, 16):
        for efficient in (False, True):
            model = DenseNet(block_config=(layers,) * 3, growth_rate=12, stem='cifar', num_classes=10,
                             memory_efficient=efficient).train()
            saved[layers, efficient] = _saved_activation_mib(model, x)
    assert saved[16, True] < 0.4 * saved[16, False]
    assert saved[16, True] / saved[8, True] < 2.05  # linear in depth
    assert saved[16, False] / saved[8, False] > 2.5  # quadratic in depth
    with torch.no_grad():
        assert _saved_activation_mib(model, x) == 0


def test_densenet_mc_is_multi_exit():
    model = dynzoo.create_model('densenet_bc_100_k12_mc', num_classes=10).eval()
    assert isinstance(model, dynzoo.MultiExitNetwork) and isinstance(model, DenseNetMC)
    assert model.num_exits == 3
    assert dynzoo.create_model('densenet_bc_100_k12', exits='blocks').num_exits == 3
    # The last exit is DenseNet-BC-100 itself: the fixture weights (final norm and classifier renamed) reproduce it.
    state = deterministic_state_dict(load_keys('densenet', 'densenet_bc_100_k12_c10'))
    state = {k.replace('features.norm_final', 'heads.2.norm').replace('classifier', 'heads.2.fc'): v
             for k, v in state.items()}
    model = model.double()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(('heads.0.', 'heads.1.')) for k in missing)
    ref = load_outputs('densenet', 'densenet_bc_100_k12_c10')
    x = torch.from_numpy(ref['x'])
    with torch.no_grad():
        outs = model(x)
        assert [o.shape for o in outs] == [(2, 10)] * 3
        torch.testing.assert_close(outs[2], torch.from_numpy(ref['out0']), rtol=1e-10, atol=1e-10)
        gen = model.iter_exits(x)
        first = next(gen)
        second = gen.send(torch.tensor([1]))
        torch.testing.assert_close(first, outs[0])
        torch.testing.assert_close(second, outs[1][1:])
    model = model.float()
    total = MANIFEST['densenet_bc_100_k12_c10']['fvcore']['conv_linear_macs']
    assert dynzoo.per_exit_macs(model, scope='standalone')[-1] == total
    standalone = dynzoo.per_exit_macs(model, scope='standalone')
    cascade = dynzoo.per_exit_macs(model)
    stem = 3 * 24 * 9 * 32 * 32
    block1 = sum((24 + 12 * i) * 48 + 48 * 12 * 9 for i in range(16)) * 32 * 32
    assert standalone[0] == cascade[0] == stem + block1 + 216 * 10
    assert cascade[1] - standalone[1] == 216 * 10 and cascade[2] - standalone[2] == 216 * 10 + 300 * 10
    # BC-100 (C10) plus two BN + Linear heads on 216 and 300 channels.
    expected_params = MANIFEST['densenet_bc_100_k12_c10']['total_params'] + (216 * 12 + 10) + (300 * 12 + 10)
    assert dynzoo.per_exit_params(model)[-1] == sum(p.numel() for p in model.parameters()) == expected_params
    with pytest.raises(ValueError, match='cannot take 2x2 inputs'):
        model(torch.zeros(1, 3, 2, 2))
    model.reset_classifier(5)
    assert all(o.shape == (1, 5) for o in model(torch.zeros(1, 3, 32, 32)))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="exits must be 'blocks'"):
        dynzoo.create_model('densenet_bc_100_k12', exits='layers')
    with pytest.raises(ValueError, match='too small'):
        dynzoo.create_model('densenet_bc_121')(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match='3-channel'):
        dynzoo.create_model('densenet_bc_100_k12')(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match='6n \\+ 2'):
        ResNetMC(depth=51)
    with pytest.raises(ValueError, match='ending with 9'):
        ResNetMC(depth=20, exits=(3, 6))


def test_resnet_mc():
    model = dynzoo.create_model('resnet_mc_cifar', num_classes=10).eval()
    assert model.num_exits == 3
    # He et al.'s ResNet-110 (option A shortcuts) has 1,727,962 parameters at 10 classes; the two extra exits add
    # Linear(16, 10) and Linear(32, 10).
    assert sum(p.numel() for p in model.parameters()) == 1_727_962 + 170 + 330
    assert sum(p.numel() for p in ResNetMC(depth=20, num_classes=10).parameters()) == 269_722 + 500
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        outs = model.double()(x)
        assert [o.shape for o in outs] == [(2, 10)] * 3
        gen = model.iter_exits(x)
        next(gen)
        torch.testing.assert_close(gen.send(torch.tensor([0])), outs[1][:1])
    model.float()
    flops = dynzoo.per_exit_macs(model)
    assert flops == sorted(flops) and len(flops) == 3
    # Stage 1: 18 blocks of two 3x3 convs, 16 -> 16 channels at 32x32.
    stage = 18 * 2 * 9 * 16 * 16 * 32 * 32
    stem = 3 * 16 * 9 * 32 * 32
    assert flops[0] == stem + stage + 16 * 10
    inside = ResNetMC(depth=62, exits=(4, 8, 14, 18, 24, 28, 30), num_classes=10)
    assert inside.num_exits == 7 and len(inside(x.float())) == 7
