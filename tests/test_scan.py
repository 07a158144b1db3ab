"""SCAN / Self-Distillation (BYOT) ResNets and losses against the authors' code (spec ../shared/specs/scan_sdpoint.md,
part A): keys, outputs, features, parameter counts, losses, checkpoints, FLOPs."""
import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn

import dynzoo
from dynzoo.flops import count_macs
from dynzoo.hub import CheckpointFileError
from dynzoo.losses import BYOTLoss, SCANLoss, soft_cross_entropy
from dynzoo.models import CheckpointMismatchError, ScanResNet
from dynzoo.models.scan import _DEPTHS
from parity import deterministic_state_dict, load_keys, load_manifest, load_outputs

MANIFEST = load_manifest('scan')
FIXTURES = sorted(MANIFEST)

# Spec A4/A8 and the manifest: total parameters at 100 classes.
PARAMS = {
    'scan_resnet18': 15_164_240, 'scan_resnet34': 25_272_400, 'scan_resnet50': 61_149_904,
    'scan_resnet101': 80_142_032, 'scan_resnet152': 95_785_680,
    'byot_resnet18': 12_283_344, 'byot_resnet34': 22_391_504, 'byot_resnet50': 38_426_576,
    'byot_resnet101': 57_418_704, 'byot_resnet152': 73_062_352,
}

# Spec A8: fvcore default counts (conv, linear, batch norm, upsample) in MMAC, standalone and cascade, per exit.
SPEC_A8_MMAC = {
    'scan_resnet18_c100': {'standalone': [206.35, 323.84, 452.88, 556.70], 'cascade': [206.35, 376.76, 541.68, 676.03]},
    'byot_resnet18_c100': {'standalone': [166.35, 297.03, 427.90, 556.70], 'cascade': [166.35, 309.96, 449.89, 584.25]},
}
# What fvcore's default count adds to conv + linear in these networks.
EXTRA_FVCORE_OPS = ('batch_norm', 'upsample_bilinear2d')


def _model(fixture_id, dtype=torch.float64):
    entry = MANIFEST[fixture_id]
    model = dynzoo.create_model(entry['dynzoo_name'], **entry['create_kwargs']).to(dtype).eval()
    model.load_state_dict(deterministic_state_dict(load_keys('scan', fixture_id)))
    return model


def _relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.detach().numpy() - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_state_dict_keys_and_shapes_match_authors(fixture_id):
    model = dynzoo.create_model(MANIFEST[fixture_id]['dynzoo_name'])
    expected = [(name, tuple(shape)) for name, shape, _ in load_keys('scan', fixture_id)]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert len(expected) == MANIFEST[fixture_id]['num_state_dict_keys']


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_logits_and_features_match_authors_code(fixture_id):
    model = _model(fixture_id)
    ref = load_outputs('scan', fixture_id)
    x = torch.from_numpy(ref['x'])
    logits, features = _fixture_outputs(fixture_id)
    with torch.no_grad():
        plain = model(x)
        iterated = list(model.iter_exits(x))
    assert len(logits) == len(features) == model.num_exits == 4
    for k in range(4):
        assert _relative_error(logits[k], ref[f'out{k}']) < 1e-12
        assert _relative_error(features[k], ref[f'feat{k}']) < 1e-12
        assert features[k].shape == (2, model.num_features)
        assert torch.equal(plain[k], logits[k]) and torch.equal(iterated[k], logits[k])
    if 'feature_loss' in ref:
        # SCAN's forward returned this scalar; dynzoo returns the features it is made of.
        feature_loss = sum(((features[3] - f) ** 2).sum() for f in features[:3])
        assert math.isclose(float(feature_loss), float(ref['feature_loss']), rel_tol=1e-12)


def test_iter_exits_send_keeps_selected_samples():
    model = _model('byot_resnet18_c100')
    ref = load_outputs('scan', 'byot_resnet18_c100')
    with torch.no_grad():
        gen = model.iter_exits(torch.from_numpy(ref['x']))
        assert _relative_error(next(gen), ref['out0']) < 1e-12
        second = gen.send(torch.tensor([1]))
    assert _relative_error(second, ref['out1'][1:]) < 1e-12


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts(name):
    block, layers = _DEPTHS[int(name.split('resnet')[1])]
    with torch.device('meta'):
        model = ScanResNet(block, layers, head_type=name.split('_')[0])
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_per_exit_params_match_manifest(fixture_id):
    model = dynzoo.create_model(MANIFEST[fixture_id]['dynzoo_name'])
    assert sum(p.numel() for p in model.parameters()) == MANIFEST[fixture_id]['total_params']
    assert dynzoo.per_exit_params(model) == [e['cumulative_params'] for e in MANIFEST[fixture_id]['per_exit']]


def test_registry_and_num_classes():
    names = dynzoo.list_models('*_resnet*')
    assert set(PARAMS) <= set(names)
    model = dynzoo.create_model('scan_resnet18', num_classes=10)
    assert [head.out_features for head in model.get_classifier()] == [10] * 4
    model.reset_classifier(7)
    assert [o.shape for o in model(torch.zeros(1, 3, 32, 32))] == [(1, 7)] * 4
    assert model.pretrained_cfg['classifier'] == ('fc1', 'fc2', 'fc3', 'fc4')


@pytest.mark.parametrize('bad_shape', [(1, 3, 64, 64), (1, 3, 224, 224), (1, 1, 32, 32), (3, 32, 32)])
@pytest.mark.parametrize('name', ['scan_resnet18', 'byot_resnet18'])
def test_bad_inputs_raise_value_error(name, bad_shape):
    model = dynzoo.create_model(name).eval()
    with pytest.raises(ValueError, match=r'32'):
        model(torch.zeros(bad_shape))
    with pytest.raises(ValueError):
        model(torch.zeros(bad_shape), return_features=True)


def _authors_checkpoint(fixture_id, path):
    """The file the authors' training script saves: a plain float32 state dict (BYOT: plus adaptation_layers.*)."""
    suffix = 'ckpt_keys' if fixture_id.startswith('byot') else 'keys'
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in deterministic_state_dict(load_keys('scan', fixture_id, suffix)).items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_authors_checkpoint_loads(fixture_id, tmp_path):
    path = tmp_path / 'bestmodel.pth'
    saved = _authors_checkpoint(fixture_id, path)
    assert any(k.startswith('adaptation_layers.') for k in saved) == fixture_id.startswith('byot')
    model = dynzoo.create_model(MANIFEST[fixture_id]['dynzoo_name'], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)))
    assert not any(k.startswith('adaptation_layers.') for k in model.state_dict())
    ref = load_outputs('scan', fixture_id)
    with torch.no_grad():
        outputs = model.double().eval()(torch.from_numpy(ref['x']))
    for k in range(4):
        assert _relative_error(outputs[k], ref[f'out{k}']) < 1e-6
    if fixture_id.startswith('byot'):
        loss = BYOTLoss().load_adaptation_layers(path)
        assert torch.equal(loss.adaptation_layers[2].weight, saved['adaptation_layers.2.weight'])
        with pytest.raises(CheckpointMismatchError, match=r'adaptation_layers.0.bias: checkpoint \(512,\), loss '
                                                          r'\(2048,\).*feature_dim=model.num_features'):
            BYOTLoss(feature_dim=2048).load_adaptation_layers(path)
        truncated = tmp_path / 'truncated.pth'
        truncated.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(CheckpointFileError, match='truncated'):
            BYOTLoss().load_adaptation_layers(truncated)


def test_checkpoint_for_other_family_fails_clearly(tmp_path):
    path = tmp_path / 'scan.pth'
    _authors_checkpoint('scan_resnet18_c100', path)
    with pytest.raises(CheckpointMismatchError, match='missing key'):
        dynzoo.create_model('byot_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match='adaptation_layers'):
        BYOTLoss().load_adaptation_layers(path)


@lru_cache(maxsize=None)
def _fixture_outputs(fixture_id):
    """``(logits, features)`` of the fixture model on the fixture input, computed once per test session."""
    with torch.no_grad():
        return _model(fixture_id)(torch.from_numpy(load_outputs('scan', fixture_id)['x']), return_features=True)


def _outputs_and_labels(fixture_id):
    ref = load_outputs('scan', fixture_id)
    return _fixture_outputs(fixture_id), torch.from_numpy(ref['labels']), ref


def test_scan_loss_matches_authors_training_script():
    outputs, labels, ref = _outputs_and_labels('scan_resnet18_c100')
    loss = SCANLoss()(outputs, labels)
    assert math.isclose(loss.item(), float(ref['loss_total']), rel_tol=1e-12)
    assert math.isclose(float(np.dot(ref['loss_weights'], ref['loss_terms'])), loss.item(), rel_tol=1e-12)
    # Term 1 of the fixture: softCE_T3(exit 3, exit 4); without distillation the feature term goes too.
    logits = outputs[0]
    assert math.isclose(soft_cross_entropy(logits[2], logits[3], 3.0).item(), ref['loss_terms'][1], rel_tol=1e-12)
    plain_ce = ref['loss_terms'][[0, 2, 4, 6]].sum()
    assert math.isclose(SCANLoss(lambda_kd=0.0)(outputs, labels).item(), plain_ce, rel_tol=1e-12)


def test_byot_loss_matches_authors_training_script():
    outputs, labels, ref = _outputs_and_labels('byot_resnet18_c100')
    ckpt = deterministic_state_dict(load_keys('scan', 'byot_resnet18_c100', 'ckpt_keys'))
    criterion = BYOTLoss().double().load_adaptation_layers(ckpt)
    loss = criterion(outputs, labels)
    assert math.isclose(loss.item(), float(ref['loss_total']), rel_tol=1e-12)
    loss.backward()
    # The authors' hint skips the 3/4 exit, so adaptation layer 0 gets no gradient.
    assert criterion.adaptation_layers[0].weight.grad is None
    assert criterion.adaptation_layers[2].weight.grad is not None


def test_byot_paper_variant():
    outputs, labels, ref = _outputs_and_labels('byot_resnet18_c100')
    ckpt = deterministic_state_dict(load_keys('scan', 'byot_resnet18_c100', 'ckpt_keys'))
    criterion = BYOTLoss(variant='paper').double().load_adaptation_layers(ckpt)
    logits, features = [[t.detach().numpy() for t in ts] for ts in outputs]
    y = ref['labels']

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def ce(z):
        return -log_softmax(z)[np.arange(len(y)), y].mean()

    teacher = np.exp(log_softmax(logits[3] / 3.0))
    expected = 0.7 * sum(ce(z) for z in logits)
    for k in range(3):
        kl = (teacher * (np.log(teacher) - log_softmax(logits[k] / 3.0))).sum(axis=1).mean()
        w, b = ckpt[f'adaptation_layers.{2 - k}.weight'].numpy(), ckpt[f'adaptation_layers.{2 - k}.bias'].numpy()
        hint = (((features[k] @ w.T + b) - features[3]) ** 2).sum(axis=1).mean()
        expected += 0.3 * kl + 0.03 * hint
    assert math.isclose(criterion(outputs, labels).item(), expected, rel_tol=1e-10)
    with pytest.raises(ValueError, match='variant'):
        BYOTLoss(variant='iccv')
    with pytest.raises(ValueError, match='return_features'):
        criterion(outputs[0], labels)


class _ExitsUpTo(nn.Module):
    """Stages 0..k and the listed heads, with the stage output kept alive (the fvcore standalone/cascade graphs)."""

    def __init__(self, model, k, heads):
        super().__init__()
        self.model, self.k, self.heads = model, k, heads

    def forward(self, x):
        state, outputs = x, []
        for i in range(self.k + 1):
            state = self.model.forward_stage(i, state)
            if i in self.heads:
                outputs.append(self.model.forward_exit(i, state))
        return (*outputs, state)


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_per_exit_macs_match_manifest_and_spec_a8(fixture_id):
    model = dynzoo.create_model(MANIFEST[fixture_id]['dynzoo_name']).eval()
    per_exit = MANIFEST[fixture_id]['per_exit']
    flops = {scope: dynzoo.per_exit_macs(model, scope=scope) for scope in ('cascade', 'standalone', 'lazy')}
    assert flops['cascade'] == [e['fvcore_convlinear_cascade'] for e in per_exit]
    assert flops['standalone'] == [e['fvcore_convlinear_standalone'] for e in per_exit]
    # Every head reads the full stage output, so lazy evaluation saves nothing here.
    assert flops['lazy'] == flops['cascade']
    # Spec A8 counts as fvcore does by default: conv + linear plus the batch-norm (and upsample) term.
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        for scope in ('standalone', 'cascade'):
            for k in range(4):
                graph = _ExitsUpTo(model, k, [k] if scope == 'standalone' else range(k + 1))
                extra = count_macs(graph, x, ops=EXTRA_FVCORE_OPS)
                assert flops[scope][k] + extra == per_exit[k][f'fvcore_default_{scope}']
                assert round((flops[scope][k] + extra) / 1e6, 2) == SPEC_A8_MMAC[fixture_id][scope][k]


@pytest.mark.parametrize('fixture_id', FIXTURES)
def test_fvcore_default_minus_conv_linear_is_batch_norm_term(fixture_id):
    model = dynzoo.create_model(MANIFEST[fixture_id]['dynzoo_name']).eval()
    entry = MANIFEST[fixture_id]
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        default, conv_linear = count_macs(model, x, ops=None), count_macs(model, x)
        batch_norm = count_macs(model, x, ops=('batch_norm',))
    assert default == entry['fvcore_default_total'] and conv_linear == entry['fvcore_convlinear_total']
    assert batch_norm == entry['fvcore_default_by_operator']['batch_norm']
    upsample = entry['fvcore_default_by_operator'].get('upsample_bilinear2d', 0)  # BYOT's bilinear attention masks
    assert default - conv_linear == batch_norm + upsample
