"""Conventions every family shares: timm's model API, cost counting, evaluation, constructor overrides, classifier reset."""
import json
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset, DataLoader

import dynzoo
from dynzoo.evaluate import collect_logits
from dynzoo.models._inputs import check_input_tensor

MULTI_EXIT_CIFAR = ['msdnet_cifar_lin5', 'scan_resnet18', 'byot_resnet18', 'densenet_bc_100_k12_mc', 'resnet_mc_cifar']


def test_single_exit_models_have_one_exit_costed():
    model = dynzoo.create_model('densenet_bc_100_k12')
    assert dynzoo.per_exit_macs(model) == [287_960_472]  # spec: BC-100 k12, 100 classes, conv + linear MACs
    assert dynzoo.per_exit_params(model) == [800_032]


def test_collect_logits_on_single_and_multi_exit_models():
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6)), batch_size=4)
    single, labels = collect_logits(dynzoo.create_model('sdpoint_preresnet_cifar'), loader)
    multi, _ = collect_logits(dynzoo.create_model('msdnet_cifar_lin5', num_classes=10), loader)
    assert [t.shape for t in single] == [(6, 10)] and labels.tolist() == list(range(6))
    assert [t.shape for t in multi] == [(6, 10)] * 5


def test_macs_follow_the_models_input_channels():
    rgb = dynzoo.per_exit_macs(dynzoo.create_model('msdnet_cifar_lin5'))
    gray = dynzoo.per_exit_macs(dynzoo.create_model('msdnet_cifar_lin5', in_chans=1))
    stem_rgb_minus_gray = 16 * 2 * 3 * 3 * 32 * 32  # only the first conv sees the input channels
    assert [r - g for r, g in zip(rgb, gray)] == [stem_rgb_minus_gray] * 5
    with pytest.raises(ValueError, match='in_chans=3'):
        dynzoo.create_model('msdnet_cifar_lin5', in_chans=1)(torch.zeros(1, 3, 32, 32))


def test_constructor_arguments_override_the_registered_preset():
    assert dynzoo.create_model('msdnet_step4', step=2, n_blocks=2).num_exits == 2
    small = dynzoo.create_model('densenet_bc_121', growth_rate=16)
    assert sum(p.numel() for p in small.parameters()) < 7_978_856


def _pre_logits(model, x):
    """Every exit's pre-logits vector, through the per-exit API."""
    state, vectors = x, []
    for k in range(model.num_exits):
        state = model.forward_stage(k, state)
        vectors.append(model.forward_exit_head(k, model.exit_input(k, state), pre_logits=True))
    return vectors


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR)
def test_reset_classifier_to_features_gives_the_pre_logits_and_back(name):
    model = dynzoo.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pre_logits = _pre_logits(model, x)
        model.reset_classifier(0)
        assert model.num_classes == 0 and all(isinstance(c, nn.Identity) for c in model.get_classifier())
        for got, expected in zip(model(x), pre_logits, strict=True):
            assert torch.equal(got, expected)
        assert pre_logits[-1].shape == (2, model.head_hidden_size)
        model.reset_classifier(7, global_pool='avg')
        assert [o.shape for o in model(x)] == [(2, 7)] * model.num_exits
    with pytest.raises(ValueError, match="global_pool must be None or 'avg'"):
        model.reset_classifier(7, global_pool='max')


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR + ['densenet_bc_100_k12', 'sdpoint_preresnet_cifar'])
def test_timm_single_model_api(name):
    """forward_features is the map the final exit reads (pool_size x num_features), forward_head its head."""
    model = dynzoo.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        final = out[-1] if isinstance(out, list) else out
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, *model.pretrained_cfg['pool_size'])
        assert torch.equal(model.forward_head(features), final)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        no_head = dynzoo.create_model(name, num_classes=0).eval()
        no_head.load_state_dict({k: v for k, v in model.state_dict().items() if k in no_head.state_dict()})
        out = no_head(x)
        assert torch.equal(out[-1] if isinstance(out, list) else out, model.forward_head(features, pre_logits=True))


@pytest.mark.parametrize('name', ['densenet_bc_100_k12', 'sdpoint_preresnet_cifar'])
def test_single_exit_models_drop_pooling_like_timm(name):
    model = dynzoo.create_model(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features, 8, 8)
        model.reset_classifier(5, global_pool='avg')
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_get_classifier_is_one_module_list_that_follows_resets():
    model = dynzoo.create_model('scan_resnet18', num_classes=10)
    classifiers = model.get_classifier()
    assert classifiers is model.get_classifier() and list(classifiers) == [model.fc1, model.fc2, model.fc3, model.fc4]
    model.reset_classifier(3)
    assert model.get_classifier() is classifiers and list(classifiers) == [model.fc1, model.fc2, model.fc3, model.fc4]
    assert [c.out_features for c in classifiers] == [3] * 4
    assert not any(k.startswith('_classifiers') for k in model.state_dict())


def test_forward_head_with_an_exit_index_is_the_deprecated_forward_exit():
    model = dynzoo.create_model('resnet_mc_cifar', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        state = model.forward_stage(0, x)
        with pytest.warns(DeprecationWarning, match=r'forward_exit\(k, state\)'):
            old = model.forward_head(0, state)
        assert torch.equal(old, model.forward_exit(0, state)) and torch.equal(old, model(x)[0])


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR + ['densenet_bc_100_k12', 'sdpoint_preresnet_cifar'])
def test_features_only_returns_the_feature_info_maps(name):
    model = timm.create_model(name, features_only=True).eval()
    info = model.feature_info
    assert len(info.channels()) >= 3
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 32, 32))
    assert [m.shape[1] for m in maps] == info.channels()
    assert [32 // m.shape[-1] for m in maps] == info.reduction()
    last = timm.create_model(name, features_only=True, out_indices=(-1,)).eval()
    last.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(last(torch.ones(1, 3, 32, 32))[0], last.model.forward_features(torch.ones(1, 3, 32, 32)))


@pytest.mark.parametrize('autograd', [True, False], ids=['grad', 'no_grad'])
@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR + ['densenet_bc_100_k12', 'sdpoint_preresnet_cifar'])
def test_fx_traces_the_models(name, autograd):
    """With autograd off too (timm's fx tests and feature extractors trace under ``inference_mode``): the inference
    fast paths must not branch on a traced value."""
    model = dynzoo.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(autograd):
        graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected, got = model(x), graph(x)
    for e, g in zip(*[[t] if isinstance(t, torch.Tensor) else t for t in (expected, got)], strict=True):
        assert torch.equal(e, g)
    assert not any(n.op == 'call_function' and 'check' in str(n.target) for n in graph.graph.nodes)


@pytest.mark.parametrize('name', ['resnet_mc_cifar', 'sdpoint_preresnet_cifar'])
def test_torch_export_and_jit_trace_run_through_the_input_checks(name):
    model = dynzoo.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings
        expected = model(x)
        graphs = [torch.export.export(model, (x,)).module(), torch.jit.trace(model, x, strict=False)]
        for graph in graphs:
            got = graph(x)
            for e, g in zip(*[[t] if isinstance(t, torch.Tensor) else t for t in (expected, got)], strict=True):
                torch.testing.assert_close(g, e)


def test_sdpoint_scripts_with_its_instances():
    model = dynzoo.create_model('sdpoint_preresnet_cifar').eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for instance in [None, (3, 0.5), (model.stem_point, 0.75)]:
            torch.testing.assert_close(scripted(x, instance), model(x, instance=instance))


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR)
def test_scripting_a_multi_exit_model_names_what_works_instead(name):
    model = dynzoo.create_model(name).eval()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match='multi-exit network.*torch.jit.trace'):
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        torch.jit.script(model)


def test_densenet_bc_scripts_with_the_plain_bottleneck():
    """TorchScript compiles the concatenating bottleneck; the memory-efficient one (an autograd function) stays
    eager-only. Same outputs."""
    model = dynzoo.create_model('densenet_bc_100_k12', num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', ['msdnet_cifar_b7.c10', 'sdpoint_preresnet_cifar.c10'])
def test_shipped_weights_load_for_other_input_channels_and_no_classifier(name):
    """timm adapts the first conv to in_chans after the checkpoint filter, and drops the classifier at 0 classes."""
    gray = timm.create_model(name, pretrained=True, in_chans=1, num_classes=0)
    rgb = timm.create_model(name, pretrained=True)
    first_conv = rgb.pretrained_cfg['first_conv']
    rgb_weight, gray_weight = (m.get_submodule(first_conv).weight for m in (rgb, gray))
    # timm sums the RGB filters in float32 and rounds them back to the file's dtype (the shipped weights are 16-bit)
    torch.testing.assert_close(gray_weight, rgb_weight.sum(1, keepdim=True), rtol=1e-2, atol=4e-3)
    assert all(isinstance(c, nn.Identity) for c in (gray.get_classifier() if name.startswith('msdnet') else [gray.fc]))


def test_module_names_do_not_mix_with_timms():
    assert timm.list_models(module='densenet_bc') == [n for n in dynzoo.list_models() if n.startswith('densenet_bc')]
    assert not set(timm.list_models(module='densenet')) & set(dynzoo.list_models())


def test_untagged_config_stays_the_default():
    from timm.models._registry import get_arch_pretrained_cfgs
    model = timm.create_model('msdnet_cifar_b7')
    assert model.num_classes == 100 and model.pretrained_cfg['num_classes'] == 100
    assert list(get_arch_pretrained_cfgs('msdnet_cifar_b7')) == ['msdnet_cifar_b7', 'msdnet_cifar_b7.c10']


class _CheckedConv(nn.Module):
    """A conv behind the families' input check, called as they call it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_input_tensor(self, x)
        return self.conv(x)


def test_input_check_leaves_no_trace_in_fx_torchscript_export_and_compiled_graphs():
    model = _CheckedConv().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match='float32 weights'):
        model(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        graphs = [torch.fx.symbolic_trace(model), torch.jit.script(model), torch.jit.trace(model, x),
                  torch.export.export(model, (x,)).module(), torch.compile(model, backend='eager', fullgraph=True)]
    for graph in graphs:
        assert torch.equal(graph(x), model(x))
    assert [node.op for node in graphs[0].graph.nodes] == ['placeholder', 'call_module', 'output']


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR + ['densenet_bc_100_k12', 'sdpoint_preresnet_cifar'])
def test_input_of_another_dtype_is_refused_but_autocast_casts_float32(name):
    model = dynzoo.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match='float32 weights but the input is torch.uint8'):
        model(x.to(torch.uint8))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = model(x)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
    assert all(o.dtype == torch.bfloat16 for o in outputs)


def test_collect_logits_refuses_labels_outside_the_models_classes():
    model = dynzoo.create_model('resnet_mc_cifar', num_classes=10)
    for labels, message in (([0, 10], 'label 10 is not a class of this 10-class model'),
                            ([0.0, 1.0], 'integer class indices')):
        loader = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32), torch.tensor(labels)), batch_size=2)
        with pytest.raises(ValueError, match=message):
            collect_logits(model, loader)


@pytest.mark.parametrize('folder', sorted(p for p in dynzoo.models._helpers.PACKAGE_MIRROR.iterdir() if p.is_dir()))
def test_shipped_configs_state_the_models_num_features(folder):
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_features'] == dynzoo.create_model(config['architecture']).num_features
