"""dynzoo.hub: Hub folders, offline mirror and Hub cache, safe loading of bad files, authors' checkpoint conversion."""
import argparse
import json
import os
import re
import shutil

import huggingface_hub.constants
import pytest
import timm
import torch
from timm.models import PretrainedCfg

import dynzoo
from dynzoo import hub
from dynzoo.cli.convert import add_convert_args, run_convert
from dynzoo.models import CheckpointMismatchError

TINY = dict(n_blocks=2, base=1, step=1, channels=4, growth_rate=2)
TAG = 'msdnet_cifar_b7.unittest'


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10, **TINY).eval()
    with torch.no_grad():  # non-trivial BN buffers, so that a load that skips them shows
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model


def _assert_same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key].dtype == sa[key].dtype, key
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=atol)


@pytest.fixture
def unittest_tag(monkeypatch):
    """Register the pretrained tag msdnet_cifar_b7.unittest (hf_hub_id dynzoo/msdnet_cifar_b7.unittest)."""
    from timm.models import _registry
    monkeypatch.setitem(_registry._model_pretrained_cfgs, TAG, PretrainedCfg(
        **dict(timm.models.get_pretrained_cfg('msdnet_cifar_b7').to_dict(), tag='unittest',
               hf_hub_id=f'dynzoo/{TAG}', num_classes=10)))
    monkeypatch.setitem(_registry._model_with_tags, 'msdnet_cifar_b7',
                        _registry._model_with_tags['msdnet_cifar_b7'] + [TAG])
    monkeypatch.setattr(_registry, '_model_has_pretrained', _registry._model_has_pretrained | {TAG})
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    return TAG


def test_save_pretrained_writes_hub_folder(tmp_path):
    model = _tiny()
    folder = hub.save_pretrained(model, tmp_path / TAG, model_name=TAG, per_exit_accuracy=[61.5, 70.25],
                                 accuracy_dataset='CIFAR-10 test', training={'epochs': 3})
    assert sorted(os.listdir(folder)) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'msdnet_cifar_b7' and config['num_classes'] == 10
    assert config['model_args'] == dict(TINY, num_classes=10, in_chans=3)
    assert config['pretrained_cfg']['hf_hub_id'] == f'dynzoo/{TAG}' and config['pretrained_cfg']['tag'] == 'unittest'
    info = config['dynzoo']
    assert info['num_exits'] == 2 and info['per_exit_accuracy'] == [61.5, 70.25]
    assert info['per_exit_macs'] == dynzoo.per_exit_macs(model) and info['per_exit_params'][-1] == sum(
        p.numel() for p in model.parameters())
    card = (folder / 'README.md').read_text()
    assert '| 2 |' in card and '70.25' in card and f"create_model('{TAG}', pretrained=True)" in card
    with pytest.raises(ValueError, match='2 exits'):
        hub.save_pretrained(model, tmp_path / 'bad', per_exit_accuracy=[1.0])


def test_save_pretrained_counts_a_single_exit_model_in_its_own_dtype_and_channels(tmp_path):
    model = dynzoo.create_model('densenet_bc_100_k12', num_classes=10, in_chans=1).to(torch.bfloat16)
    folder = hub.save_pretrained(model, tmp_path / 'gray', per_exit_accuracy=[50.0])
    info = json.loads((folder / 'config.json').read_text())['dynzoo']
    assert info['num_exits'] == 1 and info['per_exit_macs'] == dynzoo.per_exit_macs(model.float())
    assert 280e6 < info['per_exit_macs'][0] < 300e6  # DenseNet-BC-100 k=12: 0.29 GMACs (1-channel stem)
    assert info['per_exit_params'] == [sum(p.numel() for p in model.parameters())]


def test_mirror_env_and_shipped_weights_load_offline(tmp_path, monkeypatch, unittest_tag):
    model = _tiny()
    hub.save_pretrained(model, tmp_path / 'mirror' / 'dynzoo' / TAG, model_name=TAG)
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / 'mirror'))
    _assert_same_weights(model, dynzoo.create_model(TAG, pretrained=True, **TINY))
    loaded = dynzoo.create_model(f'hf-hub:dynzoo/{TAG}', pretrained=True)  # architecture and args from config.json
    _assert_same_weights(model, loaded)
    assert 'state_dict' not in loaded.pretrained_cfg

    monkeypatch.delenv(hub.MIRROR_ENV)
    monkeypatch.setattr(hub, 'PACKAGE_MIRROR', tmp_path / 'shipped')
    half = _tiny(seed=1)
    hub.save_pretrained(half, tmp_path / 'shipped' / TAG, model_name=TAG, dtype=torch.float16)
    safetensors_dtypes = {v.dtype for v in hub.load_checkpoint_file(tmp_path / 'shipped' / TAG /
                                                                     'model.safetensors').values()}
    assert safetensors_dtypes == {torch.float16, torch.int64}
    from_shipped = dynzoo.create_model(TAG, pretrained=True, **TINY)
    _assert_same_weights(half, from_shipped, atol=2e-3)  # float16 storage, float32 model
    assert hub.mirror_folder('msdnet_cifar_b7.unittest') == tmp_path / 'shipped' / TAG
    assert hub.mirror_folder('hf-hub:someone/else') is None


def test_hf_hub_names_resolve_through_the_hub_cache_offline(tmp_path, monkeypatch, unittest_tag):
    model = _tiny(seed=2)
    commit = 'a' * 40
    repo = tmp_path / 'cache' / f'models--dynzoo--{TAG}'
    hub.save_pretrained(model, repo / 'snapshots' / commit, model_name=TAG)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    _assert_same_weights(model, dynzoo.create_model(f'hf-hub:dynzoo/{TAG}', pretrained=True))
    _assert_same_weights(model, timm.create_model(f'hf-hub:dynzoo/{TAG}', pretrained=True))
    _assert_same_weights(model, dynzoo.create_model(TAG, pretrained=True, **TINY))  # tag -> hf_hub_id -> cache


def test_bad_files_raise_clear_errors(tmp_path, monkeypatch, unittest_tag):
    model = _tiny()
    folder = hub.save_pretrained(model, tmp_path / 'dynzoo' / TAG, model_name=TAG, model_card=False)
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(hub.CheckpointFileError, match='truncated or corrupt'):
        hub.load_checkpoint_file(weights)
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path))
    with pytest.raises(hub.CheckpointFileError, match='truncated or corrupt'):
        dynzoo.create_model(TAG, pretrained=True, **TINY)

    marker = tmp_path / 'code_ran'

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({'state_dict': model.state_dict(), 'extra': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(hub.CheckpointFileError, match='carries Python objects'):
        hub.load_checkpoint_file(tmp_path / 'evil.pth')
    assert not marker.exists()

    torch.save(model.state_dict(), tmp_path / 'plain.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'plain.pth').read_bytes()[:1000])
    with pytest.raises(hub.CheckpointFileError, match='truncated or corrupt'):
        hub.load_checkpoint_file(tmp_path / 'cut.pth')
    with pytest.raises(FileNotFoundError):
        hub.load_checkpoint_file(tmp_path / 'missing.pth')


def _convert(*argv):
    parser = argparse.ArgumentParser()
    add_convert_args(parser)
    return run_convert(parser.parse_args([str(a) for a in argv]))


def test_convert_authors_checkpoint(tmp_path, capsys):
    model = _tiny(seed=3)
    # MSDNet's main.py: nn.DataParallel (module. prefix), save_checkpoint's dict with the optimizer state.
    authors = {'epoch': 300, 'arch': 'msdnet', 'best_prec1': 93.1,
               'state_dict': {f'module.{k}': v for k, v in model.state_dict().items() if 'num_batches' not in k},
               'optimizer': torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()}
    torch.save(authors, tmp_path / 'msdnet_authors.pth.tar')
    assert _convert('--family', 'msdnet', '--model', 'msdnet_cifar_b7', tmp_path / 'msdnet_authors.pth.tar',
                    tmp_path / 'out', '--model-kwargs', *[f'{k}={v}' for k, v in TINY.items()]) == 0
    assert 'msdnet_cifar_b7' in capsys.readouterr().out
    converted = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert converted['num_classes'] == 10
    _assert_same_weights(model, dynzoo.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True))

    # The released full-size files need no --model: the configuration is found from the keys (meta device).
    full = dynzoo.create_model('msdnet_cifar_lin5', num_classes=100)
    torch.save({'state_dict': full.state_dict()}, tmp_path / 'lin5.pth')
    path, name = hub.convert_checkpoint('msdnet', tmp_path / 'lin5.pth', tmp_path / 'lin5')
    assert name == 'msdnet_cifar_lin5' and json.loads((path / 'config.json').read_text())['num_classes'] == 100

    with pytest.raises(CheckpointMismatchError, match='does not fit any densenet model'):
        hub.convert_checkpoint('densenet', tmp_path / 'lin5.pth', tmp_path / 'wrong')
    with pytest.raises(ValueError, match='not a msdnet model'):
        hub.convert_checkpoint('msdnet', tmp_path / 'lin5.pth', tmp_path / 'wrong', model_name='scan_resnet18')
    broken = {k: v for k, v in full.state_dict().items() if k != 'classifier.4.linear.bias'}
    torch.save(broken, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointMismatchError, match=r'missing key\(s\): classifier.4.linear.bias'):
        hub.convert_checkpoint('msdnet', tmp_path / 'broken.pth', tmp_path / 'wrong', model_name='msdnet_cifar_lin5')
    assert not (tmp_path / 'wrong').exists()


def test_convert_advice_works_and_a_non_empty_destination_needs_force(tmp_path, capsys, monkeypatch):
    model = _tiny(seed=4)
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, tmp_path / 'authors.pth')
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / 'mirror'))
    argv = ['--family', 'msdnet', '--model', 'msdnet_cifar_b7', tmp_path / 'authors.pth', tmp_path / 'out',
            '--model-kwargs', *[f'{k}={v}' for k, v in TINY.items()]]
    assert _convert(*argv) == 0
    advice = re.search(r'copy the folder to (\S+)/ and load it with dynzoo\.create_model\((.*)\)$',
                       capsys.readouterr().out.strip())
    shutil.copytree(tmp_path / 'out', advice.group(1))
    _assert_same_weights(model, eval(f'dynzoo.create_model({advice.group(2)})'))  # the printed call, as printed

    with pytest.raises(FileExistsError, match='--force'):
        _convert(*argv)
    assert _convert(*argv, '--force') == 0


def test_export_under_another_tag_drops_the_source_tags_claims(tmp_path):
    model = dynzoo.create_model('msdnet_step4', n_blocks=2, step=1, base=1, channels=4, growth_rate=2)
    assert model.pretrained_cfg['tag'] == 'l2w_e300_in1k'  # the bare name's default: weights released by others
    for name, kept in (('msdnet_step4', False), ('msdnet_step4.l2w_e300_in1k', True)):
        hub.save_pretrained(model, tmp_path / name, model_name=name)
        cfg = json.loads((tmp_path / name / 'config.json').read_text())['pretrained_cfg']
        assert ('description' in cfg) == kept and cfg.get('tag') == (name.partition('.')[2] or None)
        assert ('as reported by the authors' in (tmp_path / name / 'README.md').read_text()) == kept
