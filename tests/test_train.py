"""dynzoo.train: presets, losses per family, exact resume after a kill, DDP on 2 gloo processes = 1 process.

Run as a script (``torchrun ... tests/test_train.py ARGS``), this file registers the BN-free toy model and runs
``dynzoo.cli.train.main(ARGS)`` (``python -m dynzoo.train``): the DDP test uses it as the worker.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

import dynzoo
from dynzoo import losses
from dynzoo import train as dtrain
from dynzoo.cli.train import add_train_args, main as train_main
from dynzoo.models import MultiExitNetwork

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name('torchrun')
TINY_MSDNET = ['--model', 'msdnet_cifar_b7', '--model-kwargs', 'n_blocks=2', 'base=1', 'step=1', 'channels=4',
               'growth_rate=2']
FAST = ['--dataset', 'synthetic', '--synthetic-size', '64', '--batch-size', '16', '--workers', '0', '--no-progress']


class _Head(nn.Module):
    def __init__(self, chs: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(chs, num_classes)

    def forward(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.linear(x)


class ToyExits(MultiExitNetwork):
    """Two conv stages, two exits, no batch-dependent layer: DDP must reproduce one process exactly."""
    num_exits = 2
    default_input_size = (3, 32, 32)

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())])
        self.heads = nn.ModuleList([_Head(4, num_classes), _Head(8, num_classes)])
        self.num_features = self.head_hidden_size = 8
        self.feature_info = [dict(num_chs=4, reduction=2, module='stages.0'),
                             dict(num_chs=8, reduction=4, module='stages.1')]

    def forward_stage(self, k, state):
        return self.stages[k](state)

    def forward_exit_head(self, k, x, pre_logits=False):
        return self.heads[k](x, pre_logits)

    def exit_classifiers(self):
        return [head.linear for head in self.heads]

    def set_exit_classifier(self, k, num_classes):
        self.heads[k].linear = nn.Linear(self.heads[k].linear.in_features, num_classes)


default_cfgs = generate_default_cfgs({'toy_exits_test': dict(
    num_classes=10, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), first_conv='stages.0.0',
    classifier=('heads.0.linear', 'heads.1.linear'))})


@register_model
def toy_exits_test(pretrained: bool = False, **kwargs) -> ToyExits:
    return build_model_with_cfg(ToyExits, 'toy_exits_test', pretrained, **kwargs)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    return parser.parse_args([str(a) for a in argv])


def _final_state(output: Path):
    return torch.load(output / 'last.pth', weights_only=True)


def test_presets_follow_the_authors_and_yield_to_the_command_line():
    cfg = dtrain.resolve_config(_args('--model', 'msdnet_cifar_b7', '--output', 'x'))
    assert cfg['preset'] == 'msdnet_cifar' and cfg['augment'] == 'msdnet_cifar'
    assert (cfg['opt'], cfg['lr'], cfg['momentum'], cfg['weight_decay'], cfg['batch_size'], cfg['epochs']) == (
        'momentum', 0.1, 0.9, 1e-4, 64, 300)
    assert cfg['sched'] == 'multistep' and cfg['milestones'] == [150, 225] and cfg['decay_rate'] == 0.1
    cfg = dtrain.resolve_config(_args('--model', 'msdnet_cifar_b7', '--output', 'x', '--epochs', '40', '--lr',
                                      '0.05', '--no-wd-bn-bias', '--amp', 'bf16'))
    assert cfg['milestones'] == [20, 30] and cfg['lr'] == 0.05 and not cfg['wd_bn_bias'] and cfg['amp'] == 'bf16'
    assert dtrain.resolve_config(_args('--model', 'byot_resnet18', '--output', 'x'))['milestones'] == [83, 166, 240]
    assert dtrain.resolve_config(_args('--model', 'scan_resnet18', '--output', 'x'))['weight_decay'] == 5e-4
    fast = dtrain.resolve_config(_args('--model', 'msdnet_cifar_b7', '--output', 'x', '--preset', 'fast_cifar'))
    assert (fast['sched'], fast['label_smoothing'], fast['amp']) == ('cosine', 0.1, 'bf16')
    with pytest.raises(ValueError, match='unknown preset'):
        dtrain.resolve_config(_args('--model', 'msdnet_cifar_b7', '--output', 'x', '--preset', 'nope'))


def test_loss_follows_the_family():
    config = dict(dtrain.DEFAULTS, label_smoothing=0.1)
    msdnet = dynzoo.create_model('msdnet_cifar_b7', num_classes=10, n_blocks=2, base=1, step=1, channels=4,
                                 growth_rate=2)
    loss = dtrain.build_loss(msdnet, 'msdnet_cifar_b7', config)
    assert isinstance(loss, losses.MultiExitCrossEntropy) and loss.label_smoothing == 0.1
    assert type(dtrain.build_loss(nn.Conv2d(1, 1, 1), 'densenet_bc_100_k12', config)) is nn.CrossEntropyLoss
    scan = dynzoo.create_model('scan_resnet18', num_classes=10)
    scan_loss = dtrain.build_loss(scan, 'scan_resnet18', dict(config))
    assert isinstance(scan_loss, losses.SCANLoss) and scan_loss.forward_kwargs == {'return_features': True}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    assert torch.isfinite(dtrain.TrainStep(scan, scan_loss)(x, y))
    byot_loss = dtrain.build_loss(scan, 'byot_resnet18', dict(config))
    assert isinstance(byot_loss, losses.BYOTLoss) and byot_loss.adaptation_layers[0].in_features == 512
    with pytest.raises(ValueError, match='dynzoo.losses has no loss'):
        dtrain.build_loss(msdnet, 'msdnet_cifar_b7', dict(config, loss='NoSuchLoss'))


def test_global_batch_sampler_splits_each_global_batch():
    one = list(dtrain.GlobalBatchSampler(20, 8, seed=3))
    ranks = [list(dtrain.GlobalBatchSampler(20, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 2 and all(len(b) == 8 for b in one)
    assert [a + b for a, b in zip(*ranks)] == one
    with pytest.raises(ValueError, match='multiple of the number of processes'):
        dtrain.GlobalBatchSampler(20, 7, world_size=2)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, monkeypatch):
    common = TINY_MSDNET + FAST + ['--preset', 'fast_cifar', '--epochs', '3', '--warmup-epochs', '1']
    dtrain.run_train(_args(*common, '--output', tmp_path / 'straight'))

    calls = {'n': 0}
    forward = dtrain.TrainStep.forward

    def killed_mid_epoch_2(self, *a):
        calls['n'] += 1
        if calls['n'] == 6:  # 4 steps per epoch: step 2 of epoch 2
            raise KeyboardInterrupt('simulated kill')
        return forward(self, *a)

    monkeypatch.setattr(dtrain.TrainStep, 'forward', killed_mid_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        dtrain.run_train(_args(*common, '--output', tmp_path / 'killed'))
    assert _final_state(tmp_path / 'killed')['epoch'] == 1
    monkeypatch.setattr(dtrain.TrainStep, 'forward', forward)
    with pytest.raises(FileExistsError, match='--resume'):
        dtrain.run_train(_args(*common, '--output', tmp_path / 'killed'))
    dtrain.run_train(_args(*common, '--output', tmp_path / 'killed', '--resume'))

    straight, resumed = _final_state(tmp_path / 'straight'), _final_state(tmp_path / 'killed')
    assert resumed['epoch'] == straight['epoch'] == 3 and resumed['global_step'] == 12
    for key, value in straight['model'].items():
        assert torch.equal(value, resumed['model'][key]), key
    strip = lambda h: [{k: v for k, v in e.items() if k not in ('epoch_time_s', 'images_per_s')} for e in h]
    assert strip(straight['history']) == strip(resumed['history'])
    log = json.loads((tmp_path / 'killed' / 'log.json').read_text())
    assert [e['epoch'] for e in log['epochs']] == [1, 2, 3] and len(log['epochs'][-1]['val_top1']) == 2
    config = json.loads((tmp_path / 'killed' / 'pretrained' / 'config.json').read_text())
    assert config['dynzoo']['per_exit_accuracy'] == log['epochs'][-1]['val_top1']

    # Resuming with more epochs continues on the new schedule (the 3-epoch cosine had already reached zero).
    longer = TINY_MSDNET + FAST + ['--preset', 'fast_cifar', '--epochs', '5', '--warmup-epochs', '1']
    dtrain.run_train(_args(*longer, '--output', tmp_path / 'straight', '--resume'))
    extended = _final_state(tmp_path / 'straight')
    assert extended['epoch'] == 5 and straight['history'][-1]['lr'] == 0 < extended['history'][3]['lr']


def test_resume_from_compact_state_continues_the_schedule_with_ema(tmp_path):
    """The machine lost the full state (last.pth): the committed compact copy resumes the same schedule at the same
    epoch, step and learning rate, EMA included."""
    common = TINY_MSDNET + FAST + ['--preset', 'fast_cifar', '--epochs', '4', '--warmup-epochs', '1', '--model-ema']
    dtrain.run_train(_args(*common, '--output', tmp_path / 'straight'))
    straight = _final_state(tmp_path / 'straight')

    run, compact = tmp_path / 'run', tmp_path / 'training' / 'run'
    dtrain.run_train(_args(*common, '--output', run, '--compact-dir', compact, '--stop-after-epochs', '2'))
    assert _final_state(run)['epoch'] == 2 and not (run / 'pretrained').exists()
    stored = safetensors.torch.load_file(compact / 'state.safetensors')
    assert stored['model.blocks.0.0.layers.0.net.0.weight'].dtype == torch.float16
    assert stored['model_ema.blocks.0.0.layers.0.net.0.weight'].dtype == torch.float16
    assert {v.dtype for k, v in stored.items() if k.startswith('optimizer.')} == {torch.bfloat16}
    assert (compact / 'state.safetensors').stat().st_size < (run / 'last.pth').stat().st_size / 1.5
    (run / 'last.pth').unlink()
    with pytest.raises(FileExistsError, match='--resume'):  # a fresh start would overwrite the compact state
        dtrain.run_train(_args(*common, '--output', run, '--compact-dir', compact))

    dtrain.run_train(_args(*common, '--output', run, '--compact-dir', compact, '--resume'))
    resumed = _final_state(run)
    assert resumed['epoch'] == 4 and resumed['global_step'] == straight['global_step'] == 16
    assert [e['epoch'] for e in resumed['history']] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed['history'], straight['history']):
        assert ours['lr'] == pytest.approx(theirs['lr'], rel=1e-9, abs=1e-12)
    assert straight['history'][1]['lr'] > straight['history'][2]['lr'] > 0  # epochs 3-4 ran the cosine's tail
    assert len(resumed['history'][-1]['val_top1_ema']) == 2
    ema, model = resumed['model_ema'], resumed['model']
    assert any(not torch.equal(ema[k], model[k]) for k in model if model[k].is_floating_point())
    assert (run / 'pretrained' / 'model.safetensors').is_file()


def test_compiled_training_equals_eager_and_saves_plain_keys(tmp_path):
    common = TINY_MSDNET + FAST + ['--preset', 'fast_cifar', '--amp', 'none', '--no-channels-last', '--epochs', '1',
                                   '--warmup-epochs', '0', '--lr', '0.01']
    dtrain.run_train(_args(*common, '--output', tmp_path / 'eager'))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dtrain.run_train(_args(*common, '--compile', '--output', tmp_path / 'compiled'))
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] >= 1
    eager, compiled = _final_state(tmp_path / 'eager'), _final_state(tmp_path / 'compiled')
    assert list(compiled['model']) == list(eager['model'])  # no '_orig_mod.' prefixes
    torch.manual_seed(0)  # the trainer seeds the initial weights with --seed (0)
    initial = dynzoo.create_model('msdnet_cifar_b7', num_classes=10, n_blocks=2, base=1, step=1, channels=4,
                                  growth_rate=2).state_dict()
    assert max((eager['model'][k].float() - v.float()).abs().max() for k, v in initial.items()) > 1e-3
    for key, value in eager['model'].items():  # float reassociation differs; SGD amplifies it a little
        torch.testing.assert_close(compiled['model'][key], value, rtol=1e-3, atol=2e-5)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth'
    dtrain.save_checkpoint(path, {'epoch': 1})

    def crash(obj, f):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        dtrain.save_checkpoint(path, {'epoch': 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'epoch': 1}


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    common = ['--model', 'toy_exits_test'] + FAST + ['--preset', 'fast_cifar', '--amp', 'none', '--augment', 'none',
                                                      '--epochs', '2', '--warmup-epochs', '0']
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    result = subprocess.run(
        [str(TORCHRUN), '--standalone', '--nproc_per_node', '2', __file__, *common,
         '--output', str(tmp_path / 'ddp')], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('epoch 2/2') == 1  # one log line per epoch, from rank 0 only
    dtrain.run_train(_args(*common, '--output', tmp_path / 'single'))

    ddp, single = _final_state(tmp_path / 'ddp'), _final_state(tmp_path / 'single')
    assert json.loads((tmp_path / 'ddp' / 'log.json').read_text())['world_size'] == 2
    assert len(ddp['rng']) == 2 and not torch.equal(ddp['rng'][0]['torch'], ddp['rng'][1]['torch'])
    for key, value in single['model'].items():
        torch.testing.assert_close(ddp['model'][key], value, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)  # the trainer seeds the initial weights with --seed (0)
    initial = toy_exits_test(num_classes=10).state_dict()
    assert (single['model']['heads.1.linear.weight'] - initial['heads.1.linear.weight']).abs().max() > 1e-3
    for a, b in zip(ddp['history'], single['history']):
        assert a['val_top1'] == b['val_top1']
        assert abs(a['train_loss'] - b['train_loss']) < 1e-5


if __name__ == '__main__':
    raise SystemExit(train_main(sys.argv[1:]))


def test_sdpoint_run_ends_with_per_instance_batch_norm_and_accuracy(tmp_path):
    output = tmp_path / 'sdpoint'
    dtrain.run_train(_args('--model', 'sdpoint_preresnet_cifar', *FAST, '--preset', 'fast_cifar', '--epochs', '1',
                           '--warmup-epochs', '0', '--recalibrate-batches', '2', '--no-channels-last',
                           '--export-note', 'a test run', '--output', output))
    # Validation during training re-estimated the full instance's statistics; no other instance has any yet.
    saved = torch.load(output / 'last.pth', weights_only=False)['model']
    assert [k for k in saved if k.startswith('instance_bn_stats.')] == ['instance_bn_stats.nil']
    config = json.loads((output / 'pretrained' / 'config.json').read_text())
    model = dynzoo.create_model('sdpoint_preresnet_cifar')
    rows = config['dynzoo']['instances']
    assert [r['instance'] for r in rows] == [i.name for i in model.instances()] and len(rows) == 21
    assert rows[0]['instance'] == 'nil' and config['dynzoo']['per_exit_accuracy'] == [rows[0]['top1']]
    assert rows[0]['macs'] == config['dynzoo']['per_exit_macs'][0] >= max(r['macs'] for r in rows[1:])
    assert min(r['macs'] for r in rows) < 0.5 * rows[0]['macs']  # the stem point at ratio 0.5
    assert all(0 <= r['top1'] <= 100 for r in rows)
    card = (output / 'pretrained' / 'README.md').read_text()
    assert '## Per-instance cost and accuracy' in card and '| p9_r050 |' in card and '- note: a test run' in card
    trained = dynzoo.create_model('sdpoint_preresnet_cifar', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(output / 'pretrained' / 'model.safetensors'))).eval()
    stats = [trained.bn_stats(i) for i in trained.instances()]
    assert all(s is not None for s in stats) and not torch.equal(stats[0], stats[-1])


def test_holdout_leaves_out_the_images_budgeted_evaluation_fits_on(monkeypatch):
    from dynzoo import data
    from dynzoo.cli import evaluate
    images = np.zeros((100, 32, 32, 3), dtype=np.uint8)
    def fake_cifar(split, transform=None, **kwargs):  # labels are the image indices
        return data.ArrayDataset(images, np.arange(100) if split == 'train' else np.zeros(100, dtype=np.int64),
                                 transform=transform)

    monkeypatch.setattr(data, 'cifar_dataset', fake_cifar)
    monkeypatch.setattr(evaluate, 'cifar_dataset', fake_cifar)
    args = _args('--model', 'msdnet_cifar_b7', '--dataset', 'cifar10', '--data-path', 'unused.npz', '--holdout', '20',
                 '--output', 'unused')
    train_set, _ = dtrain.build_datasets(args, dtrain.resolve_config(args))
    eval_args = argparse.Namespace(data='npz', data_root=None, data_path='unused.npz', dataset='cifar10',
                                   download=False, limit=None, heldout_from='train')
    heldout, _ = evaluate._split_heldout_test(eval_args, None, 20)
    trained_on = {int(train_set[i][1]) for i in range(len(train_set))}
    fitted_on = {int(heldout[i][1]) for i in range(len(heldout))}
    assert len(trained_on) == 80 and len(fitted_on) == 20 and trained_on.isdisjoint(fitted_on)
