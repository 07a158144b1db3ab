"""Conventions every family shares: cost counting, evaluation, constructor overrides, classifier reset."""
import warnings

import pytest
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


@pytest.mark.parametrize('name', MULTI_EXIT_CIFAR)
def test_reset_classifier_to_features(name):
    model = dynzoo.create_model(name).eval()
    model.reset_classifier(0)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32))
    assert len(outputs) == model.num_exits and all(o.shape[1] != 0 and o.shape[1] != 100 for o in outputs)


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
