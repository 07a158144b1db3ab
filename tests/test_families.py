"""dynzoo.families: one descriptor per family, which names, presets, losses, augmentation, counters and checkpoint
conversion all read."""
import argparse

import pytest
import torch

import dynzoo
from dynzoo import hub, losses
from dynzoo.cli.train import add_train_args
from dynzoo.families import FAMILIES, family_of
from dynzoo.models.msdnet import msdnet_op_counter
from dynzoo.train import PRESETS, auto_preset, build_loss, resolve_config
from dynzoo.train.recipe import DEFAULTS


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    return parser.parse_args([*argv, '--output', 'unused'])


def test_every_model_belongs_to_exactly_one_family():
    names = dynzoo.list_models()
    owners = {name: [f.name for f in FAMILIES.values() if f.owns(name)] for name in names}
    assert all(len(found) == 1 for found in owners.values()), {n: f for n, f in owners.items() if len(f) != 1}
    listed = sorted(name for family in FAMILIES.values() for name in family.model_names())
    assert listed == sorted(names)
    assert family_of('msdnet_cifar_b7.c10').name == 'msdnet' and family_of('byot_resnet18').name == 'byot'
    assert family_of('resnet50') is None  # timm's own


def test_family_of_a_model_by_name_or_class():
    scan = dynzoo.create_model('scan_resnet18', num_classes=10)
    assert family_of(scan).name == 'scan'
    assert family_of(dynzoo.create_model('byot_resnet18', num_classes=10)).name == 'byot'
    assert family_of(dynzoo.models.MSDNet(n_blocks=2, base=1, step=1, channels=4, growth_rate=2)).name == 'msdnet'
    assert family_of(torch.nn.Linear(2, 2)) is None


def test_presets_and_augmentation_come_from_the_family():
    for family in FAMILIES.values():
        for recipe in family.recipes:
            assert PRESETS[recipe.name] == dict(recipe.values)
    assert auto_preset('msdnet_cifar_b7', 'cifar10') == FAMILIES['msdnet'].recipe('cifar').name
    assert auto_preset('densenet_bc_121', 'imagefolder') == FAMILIES['densenet'].recipe('imagenet').name
    assert auto_preset('resnet_mc_cifar', 'cifar10') == 'fast_cifar'  # no authors' recipe
    with pytest.raises(ValueError, match='no ImageNet preset'):
        auto_preset('scan_resnet18', 'imagefolder')
    assert resolve_config(_args('--model', 'byot_resnet18'))['augment'] == FAMILIES['byot'].augment
    assert resolve_config(_args('--model', 'resnet_mc_cifar'))['augment'] == 'cifar'
    assert resolve_config(_args('--model', 'sdpoint_resnet50', '--dataset', 'imagefolder'))['augment'] == 'imagenet'


def test_loss_and_the_model_outputs_it_needs_come_from_the_family():
    scan = dynzoo.create_model('scan_resnet18', num_classes=10)
    for name in ('scan', 'byot'):
        loss = build_loss(scan, f'{name}_resnet18', dict(DEFAULTS))
        assert type(loss) is FAMILIES[name].loss and loss.forward_kwargs == {'return_features': True}
    assert FAMILIES['msdnet'].loss is None and FAMILIES['densenet'].loss is None
    assert not hasattr(build_loss(scan, 'scan_resnet18', dict(DEFAULTS, loss='multi_ce')), 'forward_kwargs')
    assert losses.SCANLoss.forward_kwargs == {'return_features': True}


def test_authors_counter_is_the_families():
    assert FAMILIES['msdnet'].authors_macs is msdnet_op_counter
    model = dynzoo.create_model('msdnet_cifar_b7', num_classes=10, n_blocks=2, base=1, step=1, channels=4,
                                growth_rate=2)
    with torch.no_grad():
        direct = msdnet_op_counter(model.eval(), torch.zeros(1, 3, 32, 32))
    assert dynzoo.per_exit_macs(model, convention='authors') == direct and len(direct) == 2
    with pytest.raises(ValueError, match="no authors' counting convention"):
        dynzoo.per_exit_macs(dynzoo.create_model('scan_resnet18', num_classes=10), convention='authors')


def test_convert_takes_the_families_that_released_checkpoints():
    assert set(hub.FAMILIES) == {name for name, family in FAMILIES.items() if family.checkpoint_filter}
    assert 'resnet_mc' not in hub.FAMILIES and {'msdnet', 'scan', 'byot', 'sdpoint', 'densenet'} <= set(hub.FAMILIES)
    with pytest.raises(ValueError, match='unknown family'):
        hub.convert_checkpoint('resnet_mc', 'src.pth', '/nonexistent/out')
