"""Threshold fitting (MSDNet protocol), the genetic search, the SCAN rule, real early exit, evaluation CLI."""
import argparse
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import dynzoo
from dynzoo.cli.evaluate import add_bench_args, add_eval_args, run_bench, run_eval
from dynzoo.evaluate import collect_logits, measure_early_exit, model_name
from dynzoo.models._exits import feature_map, flatten_tensors
from dynzoo.inference import (ALWAYS, NEVER, ExitRule, early_exit, evaluate_budgeted, fit_thresholds,
                              genetic_threshold_search, geometric_fractions, scan_predict, simulate_early_exit)

torch.set_num_threads(1)

# fvcore conv + linear multiply-adds of msdnet_cifar_b7 with 10 classes, cascade scope (stages and heads 1..k, the
# stages run lazily: the spec's lazy scope; the authors' whole blocks: 14955776, 25235968, ...).
MSDNET_CIFAR_B7_CASCADE = [13244672, 23229952, 35726080, 44759040, 55561472, 66460160, 75407104]


def _two_class_logits(confidences):
    """Logits whose softmax is (c, 1 - c): the max probability is exactly c for c > 0.5, the class is 0."""
    c = torch.tensor(confidences, dtype=torch.float64)
    return torch.log(torch.stack([c, 1 - c], dim=1))


def test_fit_thresholds_hand_computed():
    # Exit 1: floor(10 * 0.5) = 5 samples leave; the 5th most confident is 0.75 (samples 0..4).
    # Exit 2: of samples 5..9 (confidences 0.55 0.95 0.65 0.85 0.75) the 3rd most confident is 0.75 (6, 8, 9).
    exit1 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.52]
    exit2 = [0.99, 0.6, 0.7, 0.8, 0.9, 0.55, 0.95, 0.65, 0.85, 0.75]
    logits = [_two_class_logits(exit1), _two_class_logits(exit2), _two_class_logits([0.6] * 10)]
    thresholds = fit_thresholds(logits, [0.5, 0.3, 0.2])
    assert thresholds[0] == pytest.approx(0.75, abs=1e-6)
    assert thresholds[1] == pytest.approx(0.75, abs=1e-6)
    assert thresholds[2] == ALWAYS
    result = simulate_early_exit(logits, thresholds, macs=[1, 2, 3])
    assert result.exits.tolist() == [0, 0, 0, 0, 0, 2, 1, 2, 1, 1]
    assert result.exit_fractions(3) == pytest.approx([0.5, 0.3, 0.2])
    assert result.macs == 5 * 1 + 3 * 2 + 2 * 3
    # floor(10 * 0.05) = 0: nobody exits at exit 1 and its threshold stays at the authors' 1e8.
    assert fit_thresholds(logits, [0.05, 0.5, 0.45])[0] == NEVER


def test_geometric_fractions_and_realised_fractions():
    target = geometric_fractions(0.5, 5)
    assert target == pytest.approx([16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31])
    generator = torch.Generator().manual_seed(0)
    logits = [3 * torch.randn(1000, 10, generator=generator) for _ in range(5)]
    result = simulate_early_exit(logits, fit_thresholds(logits, target))
    realised = result.exit_fractions(5)
    for k in range(4):  # the spec's check: realised = floor(N * p_k) / N on continuous confidences
        assert realised[k] == math.floor(1000 * target[k]) / 1000
    assert sum(realised) == pytest.approx(1.0)


def test_evaluate_budgeted_curve():
    generator = torch.Generator().manual_seed(1)
    logits = [2 * torch.randn(400, 10, generator=generator) for _ in range(3)]
    labels = torch.randint(0, 10, (400,), generator=generator)
    macs = [10.0, 25.0, 40.0]
    rows = evaluate_budgeted(logits, labels, logits, labels, macs)
    assert [r['q'] for r in rows] == pytest.approx([p / 20 for p in range(1, 40)])
    for row in rows:  # same split for fitting and testing: realised fractions are the fitted ones
        assert row['exit_fractions'] == pytest.approx(row['val_exit_fractions'])
        assert row['expected_macs'] == pytest.approx(sum(f * c for f, c in zip(row['exit_fractions'], macs)))
    assert rows[0]['expected_macs'] < rows[-1]['expected_macs']


def _synthetic_exits(num_samples=600, seed=0):
    """Three exits with informative confidences: a later exit is right more often, and a confident exit is right."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    difficulty = torch.rand(num_samples, generator=generator)
    logits = []
    for skill in (0.35, 0.6, 0.85):
        margin = 4 * (skill - difficulty) + 0.5 * torch.randn(num_samples, generator=generator)
        wrong = (labels + 1 + torch.randint(0, 9, (num_samples,), generator=generator)) % 10
        predicted = torch.where(margin > 0, labels, wrong)
        out = 0.3 * torch.randn(num_samples, 10, generator=generator)
        out[torch.arange(num_samples), predicted] += 1 + 3 * margin.abs()
        logits.append(out)
    return logits, labels


def test_genetic_search_reproducible_and_beats_single_exits():
    logits, labels = _synthetic_exits()
    macs = [1.0, 2.0, 3.0]
    single_exit_accuracy = [(l.argmax(1) == labels).double().mean().item() for l in logits]
    first = genetic_threshold_search(logits, labels, macs, budget=2.0, seed=3, generations=30)
    again = genetic_threshold_search(logits, labels, macs, budget=2.0, seed=3, generations=30)
    assert first.thresholds == again.thresholds and first.history == again.history
    assert first.history == sorted(first.history)  # elitism: the best fitness never drops
    for budget in (1.0, 1.5, 2.0, 2.5, 3.0):
        result = genetic_threshold_search(logits, labels, macs, budget=budget, seed=0, generations=30)
        affordable = [a for a, f in zip(single_exit_accuracy, macs) if f <= budget]
        assert result.expected_macs <= budget + 1e-9
        assert result.accuracy >= max(affordable)
        replay = simulate_early_exit(logits, result.thresholds, macs)
        assert replay.accuracy(labels) == pytest.approx(result.accuracy)
        assert replay.mean_macs == pytest.approx(result.expected_macs)
    # With informative confidences, mixing exits beats exit 2 alone at exit 2's cost.
    at_exit2_cost = genetic_threshold_search(logits, labels, macs, budget=2.0, seed=0, generations=30)
    assert at_exit2_cost.accuracy > single_exit_accuracy[1] + 0.02


def test_scan_rule_hand_case():
    # Sample 0 passes exit 1 (0.99 > 0.98); sample 1 equals exit 1's threshold (strict: no) and passes exit 2;
    # sample 2 never passes and takes the mean of the logits (class 1 wins the ensemble).
    exit1 = torch.log(torch.tensor([[0.99, 0.01], [0.98, 0.02], [0.9, 0.1]], dtype=torch.float64))
    exit2 = torch.log(torch.tensor([[0.5, 0.5], [0.01, 0.99], [0.4, 0.6]], dtype=torch.float64))
    exit3 = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.3, 0.7]], dtype=torch.float64))
    exit4 = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64))
    result = scan_predict([exit1, exit2, exit3, exit4])
    assert result.exits.tolist() == [0, 1, 4]
    assert result.predictions.tolist() == [0, 1, 1]
    assert result.mean_macs == pytest.approx((0.32 + 0.53 + 1.07) / 3)



def test_ensemble_fallback_when_some_samples_pass_the_last_exit():
    # Sample 0 passes the last exit's threshold; sample 1 does not and takes the mean of both exits (class 1).
    exit1 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    exit2 = torch.tensor([[10.0, 0.0], [0.5, 0.0]])
    result = simulate_early_exit([exit1, exit2], [0.9, 0.9], fallback='ensemble', strict=True)
    assert result.exits.tolist() == [1, 2] and result.predictions.tolist() == [0, 1]
    assert result.samples_per_stage == [2, 2]

@pytest.fixture(scope='module')
def msdnet():
    torch.manual_seed(0)
    return dynzoo.create_model('msdnet_cifar_b7', num_classes=10).eval()


def _batch_sizes_per_stage(model):
    sizes = []
    def record(module, args):
        state = args[0]
        sizes.append(feature_map(state if isinstance(state, torch.Tensor) else state[0]).shape[0])
    handles = [block.register_forward_pre_hook(record) for block in model.blocks]
    return sizes, handles


def test_early_exit_matches_simulation(msdnet):
    generator = torch.Generator().manual_seed(0)
    x_val, x_test = torch.randn(2, 16, 3, 32, 32, generator=generator)
    with torch.no_grad():
        val_logits, test_logits = msdnet(x_val), msdnet(x_test)
    thresholds = fit_thresholds(val_logits, geometric_fractions(0.5, msdnet.num_exits))
    for logits, threshold in zip(test_logits[:-1], thresholds):  # no sample sits on a threshold
        assert (torch.softmax(logits, 1).max(1).values - threshold).abs().min() > 1e-6
    simulated = simulate_early_exit(test_logits, thresholds, MSDNET_CIFAR_B7_CASCADE)
    sizes, handles = _batch_sizes_per_stage(msdnet)
    try:
        real = early_exit(msdnet, x_test, thresholds, macs=MSDNET_CIFAR_B7_CASCADE)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(real.predictions, simulated.predictions)
    assert torch.equal(real.exits, simulated.exits)
    assert real.macs == simulated.macs
    assert sizes == real.samples_per_stage  # each stage ran on the samples still inside, nothing more
    assert len(set(real.exits.tolist())) > 2 and sizes[0] == 16 and sizes[-1] < 16
    assert real.mean_macs < MSDNET_CIFAR_B7_CASCADE[-1]


def test_early_exit_counts_cascade_macs(msdnet):
    x = torch.randn(2, 3, 32, 32)
    everyone_at_exit1 = early_exit(msdnet, x, [0.0] + [NEVER] * 6)  # counts the cascade MACs itself
    assert everyone_at_exit1.macs == 2 * MSDNET_CIFAR_B7_CASCADE[0] and everyone_at_exit1.samples_per_stage == [2]


def test_scan_predict_real_equals_simulated(msdnet, monkeypatch):
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = msdnet(x)
    thresholds = [0.3, 0.8, 0.9, 0.9999, 0.99999, 0.999999, 0.9999999]
    simulated, real = scan_predict(logits, thresholds=thresholds, relative_costs=[1] * 8), \
        scan_predict(msdnet, x, thresholds=thresholds, relative_costs=[1] * 8)
    assert torch.equal(real.predictions, simulated.predictions) and torch.equal(real.exits, simulated.exits)
    with pytest.raises(ValueError, match='thresholds'):
        scan_predict(logits)  # the authors' four thresholds do not fit a seven-exit model
    # one threshold fewer than exits would let the last exit take everyone (no ensemble): refused, before any work
    monkeypatch.setattr(msdnet, 'iter_exits', lambda x: pytest.fail('scan_predict ran the model before its checks'))
    with pytest.raises(ValueError, match=r'thresholds for all 7 exits.*got 6'):
        scan_predict(msdnet, x, thresholds=thresholds[:-1], relative_costs=[1] * 7)
    with pytest.raises(ValueError, match=r'relative_costs needs one value per exit plus one for the ensemble \(8\)'):
        scan_predict(msdnet, torch.zeros(2, 3, 32, 32), thresholds=thresholds, relative_costs=[1] * 7)


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the counting passes while the test runs: fvcore traces (``count_macs``) and the one-forward count of
    every stage and head (``_stage_and_head_macs``)."""
    calls = []
    for name in ('count_macs', '_stage_and_head_macs'):
        count = getattr(dynzoo.flops, name)
        monkeypatch.setattr(dynzoo.flops, name, lambda *args, _count=count, **kwargs: calls.append(1) or _count(
            *args, **kwargs))
    return calls


def test_default_call_counts_once_per_model_size_and_change(count_calls):
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    everyone_at_the_end = [NEVER] * 4
    first = early_exit(model, x, everyone_at_the_end)
    assert len(count_calls) == 1  # one forward counts every exit's cascade cost
    again = early_exit(model, x, everyone_at_the_end)
    scan_predict(model, x, thresholds=[0.5] * 5, relative_costs=[1] * 6)
    assert len(count_calls) == 1 and again.macs == first.macs  # taken from the cache
    fresh = dynzoo.per_exit_macs(dynzoo.create_model('msdnet_cifar_lin5', num_classes=10))
    assert first.macs == 4 * fresh[-1]

    # Another input size, another classifier, an optimized copy: each counted anew, each right.
    bigger = early_exit(model, torch.randn(4, 3, 40, 40), everyone_at_the_end)
    assert bigger.macs == 4 * dynzoo.per_exit_macs(dynzoo.create_model('msdnet_cifar_lin5', num_classes=10),
                                                   input_size=(3, 40, 40))[-1] > first.macs
    model.reset_classifier(1000)
    calls_before = len(count_calls)
    wider = early_exit(model, x, everyone_at_the_end)
    assert len(count_calls) > calls_before
    assert wider.macs == 4 * dynzoo.per_exit_macs(dynzoo.create_model('msdnet_cifar_lin5', num_classes=1000))[-1]
    assert wider.macs > first.macs
    calls_before = len(count_calls)
    fast = dynzoo.optimize_for_inference(model)
    assert early_exit(fast, x, everyone_at_the_end).macs == wider.macs and len(count_calls) > calls_before
    calls_before = len(count_calls)
    early_exit(model, x, everyone_at_the_end)  # building the copy left the original's counts alone
    assert len(count_calls) == calls_before


def _two_exit_logits(first, second):
    return [torch.log(torch.tensor(first, dtype=torch.float64)), torch.log(torch.tensor(second, dtype=torch.float64))]


class _Margin(ExitRule):
    """Top-1 minus top-2 probability: a criterion that changes only ``score``."""

    def score(self, k, logits):
        top = torch.softmax(logits.float(), 1).topk(2, dim=1)
        return top.values[:, 0] - top.values[:, 1], top.indices[:, 0]


class _Agree(ExitRule):
    """Leave once two consecutive exits predict the same class: a rule that carries memory between exits."""

    def __init__(self):
        super().__init__([])

    def check(self, num_exits):
        pass

    def decide(self, k, logits, memory=None):
        prediction = logits.argmax(1)
        leave = torch.zeros_like(prediction, dtype=torch.bool) if memory is None else prediction == memory
        return leave, prediction, prediction


def test_exit_rules_plug_into_simulated_and_real_early_exit(msdnet):
    # Margin 0.9 - 0.05 = 0.85 >= 0.8 leaves at exit 1; max probability 0.6 passes 0.55 but its margin 0.2 does not.
    logits = _two_exit_logits([[0.9, 0.05, 0.05], [0.6, 0.4, 0.0]], [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    assert simulate_early_exit(logits, _Margin([0.8])).exits.tolist() == [0, 1]
    assert simulate_early_exit(logits, [0.55]).exits.tolist() == [0, 0]
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        all_logits = msdnet(x)
    predicted = torch.stack([l.argmax(1) for l in all_logits])
    agree = (predicted[1:] == predicted[:-1]).int()
    expected = [int(a.argmax()) + 1 if a.any() else msdnet.num_exits - 1 for a in agree.T]
    for rule in (_Margin([0.3, 0.5, 0.6, 0.6, 0.7, 0.8]), _Agree()):
        simulated, real = simulate_early_exit(all_logits, rule), early_exit(msdnet, x, rule)
        assert torch.equal(real.predictions, simulated.predictions) and torch.equal(real.exits, simulated.exits)
        assert real.samples_per_stage == simulated.samples_per_stage
    assert simulated.exits.tolist() == expected and len(set(expected)) > 1
    with pytest.raises(ValueError, match='fallback and strict to the ExitRule'):
        early_exit(msdnet, x, _Agree(), strict=True)


def test_deprecated_flops_names_still_work(msdnet):
    logits = _two_exit_logits([[0.9, 0.1], [0.6, 0.4]], [[0.1, 0.9], [0.2, 0.8]])
    with pytest.warns(DeprecationWarning, match='macs='):
        result = simulate_early_exit(logits, [0.8], flops=[1, 3])
    with pytest.warns(DeprecationWarning, match='EarlyExitResult.macs'):
        assert result.flops == result.macs == 1 * 2 + 2 * 1
    with pytest.warns(DeprecationWarning, match='per_exit_macs'):
        assert dynzoo.per_exit_flops(msdnet) == MSDNET_CIFAR_B7_CASCADE
    rows = evaluate_budgeted(logits, torch.tensor([0, 1]), logits, torch.tensor([0, 1]), [1, 3], qs=[1.0])
    with pytest.warns(DeprecationWarning, match="'expected_macs'"):
        assert rows[0]['expected_flops'] == rows[0]['expected_macs']
    with pytest.raises(KeyError):
        rows[0]['flops']
    with pytest.raises(ValueError, match='both macs= and its deprecated alias'):
        simulate_early_exit(logits, [0.8], macs=[1, 3], flops=[1, 3])


def _parse(add_args, argv):
    return add_args(argparse.ArgumentParser()).parse_args(argv)


def test_cli_eval_and_bench_smoke(tmp_path, capsys):
    table, = run_eval(_parse(add_eval_args, ['msdnet_cifar_b7', '--limit', '4', '--batch-size', '4',
                                             '--out', str(tmp_path)]))
    saved = json.loads((tmp_path / 'anytime.json').read_text())
    assert [row['macs_cascade'] for row in saved['rows']] == MSDNET_CIFAR_B7_CASCADE
    assert saved['meta']['num_samples'] == 4 and len(table) == 7
    assert (tmp_path / 'anytime.png').read_bytes()[:4] == b'\x89PNG'
    table, = run_eval(_parse(add_eval_args, ['msdnet_cifar_b7', '--mode', 'early-exit', '--q', '0.5', '2',
                                             '--holdout', '8', '--limit', '8', '--batch-size', '8']))
    assert [row['q'] for row in table.rows] == [0.5, 2.0]
    assert table.rows[0]['mean_macs'] < table.rows[1]['mean_macs'] <= MSDNET_CIFAR_B7_CASCADE[-1]
    budget = tmp_path / 'budget'
    tables = run_eval(_parse(add_eval_args, ['msdnet_cifar_lin5', 'resnet_mc_cifar', '--mode', 'budget', '--data',
                                             'sample', '--holdout', '20', '--limit', '20', '--batch-size', '20',
                                             '--out', str(budget)]))
    assert [t.meta['model'] for t in tables] == ['msdnet_cifar_lin5', 'resnet_mc_cifar']
    assert len(tables[0].rows) == len(tables[1].rows) == 39  # q = p/20, p = 1..39
    assert sorted(p.name for p in budget.iterdir()) == [
        'budget.png', 'budget_msdnet_cifar_lin5.json', 'budget_msdnet_cifar_lin5.png', 'budget_resnet_mc_cifar.json',
        'budget_resnet_mc_cifar.png']
    tables = run_bench(_parse(add_bench_args, ['scan_resnet18', '--no-accuracy', '--out', str(tmp_path)]))
    cascade, lazy = tables[0].column('macs_cascade'), tables[0].column('macs_lazy')
    assert len(cascade) == 4 and cascade == sorted(cascade) and all(l <= c for l, c in zip(lazy, cascade))
    assert json.loads((tmp_path / 'bench_scan_resnet18.json').read_text())['rows'][-1]['macs_cascade'] == cascade[-1]
    assert 'bench: scan_resnet18' in capsys.readouterr().out


def test_tables_name_models_with_their_tag():
    assert model_name(dynzoo.create_model('resnet_mc_cifar.c10')) == 'resnet_mc_cifar.c10'
    assert model_name(dynzoo.create_model('resnet_mc_cifar')) == 'resnet_mc_cifar'


def test_early_exit_refuses_training_mode_and_single_exit_models():
    model = dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).train()
    with pytest.raises(ValueError, match='eval mode'):
        early_exit(model, torch.zeros(2, 3, 32, 32), [0.5] * 5)
    densenet = dynzoo.create_model('densenet_bc_100_k12', num_classes=10).eval()
    with pytest.raises(ValueError, match='needs a multi-exit model.*DenseNet has one exit'):
        early_exit(densenet, torch.zeros(2, 3, 32, 32), [0.0])


def test_cli_eval_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match='--mode budget needs a multi-exit model.*--mode anytime'):
        run_eval(_parse(add_eval_args, ['densenet_bc_100_k12', '--mode', 'budget', '--limit', '4']))
    with pytest.raises(ValueError, match='has 100 classes but the embedded CIFAR-10 sample has 10'):
        run_eval(_parse(add_eval_args, ['msdnet_cifar_lin5', '--num-classes', '100']))
    with pytest.raises(ValueError, match='has 10 classes but --dataset cifar100 has 100'):
        run_bench(_parse(add_bench_args, ['msdnet_cifar_b7.c10', '--pretrained', '--data', 'npz', '--data-path',
                                          'unused.npz', '--dataset', 'cifar100']))

    # Given thresholds need no held-out images: the whole test split is evaluated (fitting would hold out half).
    table, = run_eval(_parse(add_eval_args, ['msdnet_cifar_lin5', '--num-classes', '10', '--mode', 'early-exit',
                                             '--thresholds', '0.5', '0.5', '0.5', '0.5', '0', '--batch-size', '250']))
    assert table.title.endswith('on 1000 images') and table.rows[0]['q'] == 'given'


def test_retain_freed_memory_stops_page_faults_of_reused_blocks():
    """A block allocated where a freed, touched one was comes without new pages once retain_freed_memory() is on;
    glibc's default maps fresh memory for it (32 MiB: ~8k page faults). Each case runs in its own process: the
    setting is global."""
    script = textwrap.dedent('''
        import resource, sys, torch
        from dynzoo.inference import retain_freed_memory
        if sys.argv[1] == 'retain':
            assert retain_freed_memory()
        torch.empty(2 ** 24).fill_(1.0)  # 64 MiB, touched and freed at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2 ** 23).fill_(1.0)  # 32 MiB: fits in the freed block
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    ''')
    faults = {mode: int(subprocess.run([sys.executable, '-c', script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ('default', 'retain')}
    assert faults['default'] > 5000
    assert faults['retain'] < 500


def test_measure_early_exit_counts_where_images_leave_and_what_they_cost():
    torch.manual_seed(0)
    model = dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    macs = dynzoo.per_exit_macs(model)
    everyone_at_the_end = measure_early_exit(model, loader, ExitRule([NEVER] * 4))
    assert everyone_at_the_end['exit_fractions'] == [0, 0, 0, 0, 1] and everyone_at_the_end['macs_ratio'] == 1
    predictions = model(images)[-1].argmax(1)
    assert everyone_at_the_end['accuracy'] == (predictions == labels).double().mean().item()
    everyone_first = measure_early_exit(model, loader, ExitRule([ALWAYS] * 4))
    assert everyone_first['exit_fractions'] == [1, 0, 0, 0, 0] and everyone_first['mean_macs'] == macs[0]

    # At another input size the ratio is to the full network's MACs at that size.
    big = [(torch.randn(3, 3, 40, 40), torch.tensor([0, 1, 2]))]
    assert measure_early_exit(model, big, ExitRule([NEVER] * 4))['macs_ratio'] == 1
    assert measure_early_exit(model, big, ExitRule([NEVER] * 4))['mean_macs'] > macs[-1]

    # SCAN's rule: no exit fires at NEVER, so the ensemble of all exits answers (outcome num_exits)
    ensemble = measure_early_exit(model, loader, ExitRule([NEVER] * 5, fallback='ensemble'))
    assert ensemble['exit_fractions'] == [0, 0, 0, 0, 0, 1] and ensemble['macs_ratio'] == 1
    mean_logits = torch.stack(model(images)).mean(0)
    assert ensemble['accuracy'] == (mean_logits.argmax(1) == labels).double().mean().item()


@pytest.mark.parametrize('name, hooked', [('scan_resnet18', 'layer1'), ('msdnet_cifar_b7', 'blocks.0')])
def test_early_exit_leaves_what_forward_hooks_kept_intact(name, hooked):
    """Samples that leave are dropped from the stage state in place, unless a hook may hold its tensors."""
    torch.manual_seed(0)
    model = dynzoo.create_model(name, num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    kept = []
    model.get_submodule(hooked).register_forward_hook(lambda module, args, output: kept.append(output))
    with torch.no_grad():
        logits = model(x)
    expected = [t.clone() for t in flatten_tensors(kept[0])]
    confidence = torch.softmax(logits[0], 1).amax(1)
    threshold = confidence.median().item()  # about half the batch leaves at exit 1
    early_exit(model, x, [threshold] + [NEVER] * (model.num_exits - 2))  # counts the MACs: the hook runs too
    kept.clear()
    result = early_exit(model, x, [threshold] + [NEVER] * (model.num_exits - 2))
    assert 0 < (result.exits == 0).sum() < len(x)
    seen = flatten_tensors(kept[0])
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want)


def test_collect_logits_restores_the_models_mode():
    model = dynzoo.create_model('msdnet_cifar_lin5', num_classes=10).train()
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    logits, labels = collect_logits(model, loader)
    assert model.training and len(logits) == 5
    with torch.no_grad():
        torch.testing.assert_close(logits[-1], model.eval()(loader[0][0])[-1])


def test_cli_checks_counts_before_running_images(monkeypatch):
    def no_images(*args, **kwargs):
        raise AssertionError('images ran before the arguments were checked')
    monkeypatch.setattr('dynzoo.cli.evaluate.collect_logits', no_images)
    monkeypatch.setattr('dynzoo.cli.evaluate.measure_early_exit', no_images)
    for mode in ('early-exit', 'budget'):
        with pytest.raises(ValueError, match=r'--temperature takes one value for every exit or one per exit \(5\)'):
            run_eval(_parse(add_eval_args, ['msdnet_cifar_lin5', '--num-classes', '10', '--mode', mode,
                                            '--temperature', '1', '2']))
    with pytest.raises(ValueError, match=r'needs 5 thresholds \(or 4'):
        run_eval(_parse(add_eval_args, ['msdnet_cifar_lin5', '--num-classes', '10', '--mode', 'early-exit',
                                        '--thresholds', '0.5', '0.5']))
