"""Each stage of a multi-exit model as its own graph (ONNX, torch.export), and early exit over them in ONNX Runtime."""
import json

import numpy as np
import pytest
import torch

import dynzoo
from dynzoo.cli import build_parser, main
from dynzoo.data import load_sample
from dynzoo.export import MANIFEST, OnnxEarlyExit, export_stages

torch.set_num_threads(1)

# A three-exit MSDNet small enough to export quickly (as tests/test_train.py's TINY_MSDNET).
TINY_MSDNET = dict(n_blocks=3, base=1, step=1, channels=4, growth_rate=2, num_classes=10)


def _onnx():
    for module in ('onnx', 'onnxscript', 'onnxruntime'):
        pytest.importorskip(module, reason=f'{module} is missing: the ONNX tests need pip install "dynzoo[export]"')


def _random_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _cifar_sample(model, n: int) -> torch.Tensor:
    images = torch.from_numpy(load_sample()[0][:n]).permute(0, 3, 1, 2).float() / 255
    cfg = model.pretrained_cfg
    return (images - torch.tensor(cfg['mean']).view(3, 1, 1)) / torch.tensor(cfg['std']).view(3, 1, 1)


def _thresholds_between_confidences(logits, quantile: float):
    """Per exit but the last, a threshold halfway across the widest gap between the sorted confidences near
    ``quantile``: every confidence is far (in float rounding terms) from it, so ONNX Runtime and PyTorch decide
    alike."""
    thresholds = []
    for exit_logits in logits[:-1]:
        confidence = torch.softmax(exit_logits, 1).max(1).values.sort().values
        i = int(quantile * len(confidence))
        gaps = confidence[i - 3:i + 4] - confidence[i - 4:i + 3]
        j = i - 3 + int(gaps.argmax())
        assert confidence[j] - confidence[j - 1] > 1e-4, 'test data: pick another quantile'
        thresholds.append(float(confidence[j - 1] + confidence[j]) / 2)
    return thresholds


@pytest.fixture(scope='module')
def msdnet_onnx(tmp_path_factory):
    _onnx()
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_b7', **TINY_MSDNET).eval()
    folder = tmp_path_factory.mktemp('msdnet_onnx')
    with torch.no_grad():
        thresholds = _thresholds_between_confidences(model(_random_batch(64)), 0.5)
    return model, folder, export_stages(model, folder, thresholds=thresholds)


@pytest.fixture(scope='module')
def scan_onnx(tmp_path_factory):
    _onnx()
    model, folder = dynzoo.create_model('scan_resnet18.c10', pretrained=True).eval(), tmp_path_factory.mktemp('scan')
    return model, folder, export_stages(model, folder)


def test_manifest_chains_the_stages(msdnet_onnx):
    model, folder, manifest = msdnet_onnx
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    stages = manifest['stages']
    assert [s['file'] for s in stages] == ['stage_0.onnx', 'stage_1.onnx', 'stage_2.onnx']
    assert all((folder / s['file']).is_file() for s in stages)
    assert stages[0]['inputs'] == ['x']
    for previous, stage in zip(stages, stages[1:]):  # stage k takes stage k-1's state, without its logits
        assert stage['inputs'] == previous['outputs'][:-1]
    # MSDNet's state holds a map per scale that the block's deferred work reads (LazyBlock.frontier). The tiny
    # model's three layers keep three, two and one scales; the second drops the finest, which its deferred finer
    # output still reads, so three maps pass from stage 1 to stage 2.
    assert [len(s['outputs']) - 1 for s in stages] == [3, 3, 1]
    assert [s['outputs'][-1] for s in stages] == ['logits_0', 'logits_1', 'logits_2']
    per_exit_macs = dynzoo.per_exit_macs
    assert manifest['macs'] == [s['macs'] for s in stages] == per_exit_macs(model)
    assert manifest['input_size'] == [3, 32, 32] and manifest['num_exits'] == 3 and manifest['num_classes'] == 10
    assert manifest['mean'] == list(model.pretrained_cfg['mean']) and len(manifest['thresholds']) == 2


@pytest.mark.parametrize('batch', [1, 5])
def test_onnx_stages_reproduce_every_exit(msdnet_onnx, batch):
    model, folder, _ = msdnet_onnx
    x = _random_batch(batch, seed=batch)  # traced at batch 2
    with torch.no_grad():
        expected = model(x)
    outputs = OnnxEarlyExit(folder, threads=1).all_exits(x.numpy())
    assert len(outputs) == 3
    for output, reference in zip(outputs, expected):
        assert output.shape == (batch, 10)
        np.testing.assert_allclose(output, reference.numpy(), rtol=0, atol=2e-6)


def _assert_same_early_exit(exported, x, thresholds=None):
    """The runner's early exit (with the manifest's thresholds unless given) against ``dynzoo.early_exit``."""
    model, folder, manifest = exported
    result = OnnxEarlyExit(folder, threads=1)(x.numpy(), thresholds)
    thresholds = manifest['thresholds'] if thresholds is None else thresholds
    reference = dynzoo.early_exit(model, x, thresholds, macs=manifest['macs'])
    assert result.exits.tolist() == reference.exits.tolist()
    assert result.predictions.tolist() == reference.predictions.tolist()
    assert result.samples_per_stage == reference.samples_per_stage
    assert result.macs == reference.macs
    return result


def test_onnx_early_exit_equals_pytorch_msdnet(msdnet_onnx):
    result = _assert_same_early_exit(msdnet_onnx, _random_batch(64))  # the batch the thresholds were set on
    assert result.samples_per_stage[0] == 64 > result.samples_per_stage[1] > result.samples_per_stage[2] > 0


def test_later_stages_run_on_the_samples_still_inside_only(msdnet_onnx):
    _, folder, _ = msdnet_onnx
    runner, batches = OnnxEarlyExit(folder, threads=1), []
    for session in runner.sessions:
        def run(outputs, feeds, run=session.run):
            batches.append({name: len(t) for name, t in feeds.items()})
            return run(outputs, feeds)
        session.run = run
    result = runner(_random_batch(64).numpy())
    assert [set(sizes.values()) for sizes in batches] == [{n} for n in result.samples_per_stage]
    assert len(batches) == 3 and batches[0] == {'x': 64} and len(batches[1]) == 3 and 0 < batches[1]['state_0.0'] < 64


def test_onnx_early_exit_equals_pytorch_scan(scan_onnx):
    model, _, manifest = scan_onnx
    assert [len(s['inputs']) for s in manifest['stages']] == [1] * 4  # a ResNet's state is one tensor
    x = _cifar_sample(model, 48)
    with torch.no_grad():
        thresholds = _thresholds_between_confidences(model(x), 0.4)
    result = _assert_same_early_exit(scan_onnx, x, thresholds)
    assert set(result.exits.tolist()) == {0, 1, 2, 3}
    assert (result.predictions == load_sample()[1][:48]).mean() > 0.7  # trained weights on real images


def test_last_exit_takes_every_remaining_sample(msdnet_onnx):
    x = _random_batch(6, seed=1)
    nobody = _assert_same_early_exit(msdnet_onnx, x, [1e8, 1e8, 1e8])  # the last exit's threshold is ignored
    assert nobody.exits.tolist() == [2] * 6 and nobody.samples_per_stage == [6, 6, 6]
    everybody = _assert_same_early_exit(msdnet_onnx, x, [0.0, 0.0])
    assert everybody.exits.tolist() == [0] * 6 and everybody.samples_per_stage == [6]


def test_runner_applies_every_exit_policy_as_early_exit_does(scan_onnx):
    """The runner decides with dynzoo's own exit loop: any ExitPolicy gives dynzoo.early_exit's exits."""
    model, _, _ = scan_onnx
    images = _cifar_sample(model, 96)
    x = images[:48]
    with torch.no_grad():  # fitted on other images: no confidence sits exactly on a threshold
        logits = model(images[48:])
    for criterion in dynzoo.policies.CRITERIA:
        policy = dynzoo.ExitPolicy(criterion).fit(logits, [0.4, 0.3, 0.2, 0.1])
        result = _assert_same_early_exit(scan_onnx, x, policy)
        assert len(set(result.exits.tolist())) > 1, criterion


def test_runner_refuses_wrong_input_and_thresholds(msdnet_onnx):
    _, folder, _ = msdnet_onnx
    runner = OnnxEarlyExit(folder, threads=1)
    with pytest.raises(ValueError, match=r'take batches of shape \(N, 3, 32, 32\), got \(2, 3, 28, 28\)'):
        runner(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match='expected 3 thresholds'):
        runner(np.zeros((2, 3, 32, 32), np.float32), [0.5])


def test_cli_writes_pt2_stages_that_chain_to_the_models_outputs(tmp_path, capsys):
    (tmp_path / 'stage_5.onnx').write_text('an earlier, deeper export')
    (tmp_path / 'notes.txt').write_text('not an export')
    kwargs = [f'{k}={v}' for k, v in dict(TINY_MSDNET, n_blocks=2).items()]
    torch.manual_seed(0)
    assert main(['export', 'msdnet_cifar_b7', '--format', 'pt2', '--out', str(tmp_path), '--thresholds', 'inf',
                 '--force', '--model-kwargs', *kwargs]) == 0
    assert 'stage_0.pt2, stage_1.pt2, manifest.json' in capsys.readouterr().out
    # --force replaced the earlier export's files and left the others alone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['manifest.json', 'notes.txt', 'stage_0.pt2', 'stage_1.pt2']
    def refuse(constant):
        raise ValueError(f'not JSON: {constant}')

    manifest = json.loads((tmp_path / MANIFEST).read_text(), parse_constant=refuse)
    assert manifest['format'] == 'pt2' and manifest['thresholds'] == [1e8]  # an infinity stored as 1e8
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_b7', **dict(TINY_MSDNET, n_blocks=2)).eval()  # the same weights
    x = _random_batch(3)
    with torch.no_grad():
        expected = model(x)
    state = [x]
    for k, stage in enumerate(manifest['stages']):
        outputs = torch.export.load(str(tmp_path / stage['file'])).module()(*state)
        state, logits = outputs[:-1], outputs[-1]
        torch.testing.assert_close(logits, expected[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='holds pt2 stages; OnnxEarlyExit runs ONNX ones'):
        OnnxEarlyExit(tmp_path)


def test_cli_help_names_the_formats(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(['export', '--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert 'usage: dynzoo export' in out and '{onnx,pt2}' in out and '--force' in out


def test_optimized_msdnet_exports_stage_by_stage_where_the_cascade_cannot_be_cut(tmp_path):
    # optimize_for_inference's 1x1 convs read the batch size off the image's shape, which stage 1 does not receive:
    # that stage is traced alone.
    _onnx()
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_b7', **dict(TINY_MSDNET, n_blocks=2)).eval()
    export_stages(dynzoo.optimize_for_inference(model), tmp_path)
    x = _random_batch(4)
    with torch.no_grad():
        expected = model(x)
    for output, reference in zip(OnnxEarlyExit(tmp_path, threads=1).all_exits(x.numpy()), expected):
        np.testing.assert_allclose(output, reference.numpy(), rtol=0, atol=2e-6)
