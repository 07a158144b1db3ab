"""Registry, factory and torch.hub entry points."""
import importlib
from pathlib import Path

import pytest
import timm
import torch

import dynzoo

REPO = Path(__file__).resolve().parents[1]
MSDNET_NAMES = ['msdnet_cifar_b7', 'msdnet_cifar_b10', 'msdnet_cifar_lin5', 'msdnet_cifar_lin7',
                'msdnet_step4', 'msdnet_step6', 'msdnet_step7']


def test_list_models_only_dynzoo():
    assert dynzoo.list_models('msdnet*') == MSDNET_NAMES
    names = dynzoo.list_models()
    assert 'resnet50' not in names and 'densenet121' not in names
    assert all(dynzoo.is_dynzoo_model(n) for n in names)


def test_pretrained_tags():
    tags = dynzoo.list_models('msdnet*', pretrained=True)
    assert {'msdnet_step4.l2w_e300_in1k', 'msdnet_step7.l2w_e100_in1k', 'msdnet_cifar_b7.c10'} <= set(tags)
    assert 'msdnet_step4.in1k' not in tags  # the authors' file has no direct link: a tag without a source
    for tag in dynzoo.list_models('*.c10', pretrained=True):  # dynzoo's own weights keep their Hub id
        assert timm.models.get_pretrained_cfg(tag).hf_hub_id == f'dynzoo/{tag}', tag


def test_create_model_dynzoo_and_timm_agree():
    a = dynzoo.create_model('msdnet_cifar_b7', num_classes=10)
    b = timm.create_model('msdnet_cifar_b7', num_classes=10)
    assert type(a) is type(b) is dynzoo.models.MSDNet
    assert a.num_classes == b.num_classes == 10
    assert a.pretrained_cfg['input_size'] == (3, 32, 32)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"msdnet_stp4.*Did you mean: msdnet_step4"):
        dynzoo.create_model('msdnet_stp4')
    with pytest.raises(RuntimeError):  # also a RuntimeError, like timm's own unknown-model error
        dynzoo.create_model('msdnet_stp4')
    with pytest.raises(ValueError, match='timm model, not a dynzoo'):
        dynzoo.create_model('resnet18')


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match=r"no pretrained tag 'c100'.*msdnet_step4\.in1k"):
        dynzoo.create_model('msdnet_step4.c100')


def test_torch_hub_local():
    model = torch.hub.load(str(REPO), 'msdnet_cifar_lin5', source='local', pretrained=False, num_classes=10)
    assert isinstance(model, dynzoo.models.MSDNet) and model.num_exits == 5
    hubconf = importlib.import_module('hubconf')
    assert set(MSDNET_NAMES) <= {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')}


def test_bare_name_keeps_architecture_config_tag_selects_weights():
    assert dynzoo.create_model('msdnet_cifar_b7').num_classes == 100
    assert dynzoo.create_model('msdnet_cifar_b7.c10').num_classes == 10
    assert 'msdnet_cifar_b7' not in dynzoo.list_models(pretrained=True)
