"""The weights shipped in dynzoo/weights load offline, strictly, and reach their model card's accuracy on the
CIFAR-10 test sample embedded in the package."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import dynzoo
from dynzoo.data import cifar_dataset
from dynzoo.evaluate import collect_logits, eval_transform
from dynzoo.hub import PACKAGE_MIRROR
from dynzoo.models._helpers import REPORTED_TOP1

SHIPPED = sorted(p.name for p in PACKAGE_MIRROR.iterdir() if (p / 'model.safetensors').is_file())
# The sample has 1,000 images: one standard error of an accuracy near 90% is about 1 point.
MARGIN = 4.0


def test_shipped_weights_are_the_registered_c10_tags():
    assert 'msdnet_cifar_b7.c10' in SHIPPED
    assert set(SHIPPED) == {name for name in dynzoo.list_models(pretrained=True) if name.endswith('.c10')}


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_weights_load_and_match_their_card(name):
    folder = PACKAGE_MIRROR / name
    card = json.loads((folder / 'config.json').read_text())['dynzoo']
    model = dynzoo.create_model(name, pretrained=True).eval()
    stored = load_file(folder / 'model.safetensors')
    state = model.state_dict()
    assert stored.keys() == state.keys()
    assert all((state[k].float() == v.float()).all() for k, v in stored.items())

    loader = DataLoader(cifar_dataset('test', source='sample', transform=eval_transform(model)), batch_size=250)
    logits, labels = collect_logits(model, loader)
    sample_top1 = [100.0 * (l.argmax(1) == labels).double().mean().item() for l in logits]
    assert len(sample_top1) == len(card['per_exit_accuracy'])
    for measured, reported in zip(sample_top1, card['per_exit_accuracy']):
        assert measured >= reported - MARGIN, (sample_top1, card['per_exit_accuracy'])
    assert min(sample_top1) > 50  # chance is 10%

    for row in card.get('instances', []):  # SDPoint: every instance, with its own stored batch-norm statistics
        with torch.no_grad():
            instance = next(i for i in model.instances() if i.name == row['instance'])
            correct = sum(int((model(x, instance=instance).argmax(1) == y).sum()) for x, y in loader)
        assert 100.0 * correct / len(loader.dataset) >= row['top1'] - MARGIN, row


def test_timm_create_model_loads_shipped_weights_offline(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    name = 'resnet_mc_cifar.c10'
    through_timm = timm.create_model(name, pretrained=True).state_dict()
    stored = load_file(PACKAGE_MIRROR / name / 'model.safetensors')
    assert through_timm.keys() == stored.keys()
    assert all(torch.equal(through_timm[k], v.float()) for k, v in stored.items())


def _readme_weights_table():
    """``{weights: (top-1 per exit, cascade MMACs per exit or None, source)}`` from the README's weights table."""
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    numbers = lambda cell: [float(v) for v in cell.split('/')]
    return {m.group(1): (numbers(m.group(2)), numbers(m.group(3)) if m.group(3)[0].isdigit() else None, m.group(4))
            for m in re.finditer(r'^\| `([\w.]+)` \| ([\d. /]+) \| ([^|]+) \| ([^|]+) \|$', readme, re.M)}


def test_readme_weights_table_matches_the_cards():
    """Every shipped checkpoint has a row in the README's weights table with its card's top-1 and MACs per exit."""
    rows = {name: row for name, row in _readme_weights_table().items() if row[2].startswith('trained here')}
    assert set(rows) == set(SHIPPED)
    for name, (top1, mmacs, _) in rows.items():
        card = json.loads((PACKAGE_MIRROR / name / 'config.json').read_text())['dynzoo']
        assert top1 == card['per_exit_accuracy'], name
        assert mmacs == [round(m / 1e6, 2) for m in card['per_exit_macs']], name


def test_readme_weights_table_gives_the_reported_accuracy_of_released_weights():
    rows = {name: row for name, row in _readme_weights_table().items() if row[2].startswith('reported')}
    assert {name: top1 for name, (top1, _, _) in rows.items()} == {
        name: list(top1) for name, (_, top1) in REPORTED_TOP1.items()}
    for name, (top1, mmacs, _) in rows.items():
        assert len(mmacs) == len(top1), name