"""Exit policies: the criteria on hand-computed cases, max probability as today's rule, temperature fitting, fitting
to a MACs budget, real early exit equal to simulation, and the policy in the CLI."""
import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dynzoo
from dynzoo.data import load_sample
from dynzoo.cli.evaluate import add_eval_args, run_eval
from dynzoo.evaluate import eval_transform
from dynzoo.inference import (ALWAYS, NEVER, early_exit, evaluate_budgeted, fit_thresholds, geometric_fractions,
                              run_exit_rule, simulate_early_exit, _precomputed_exits)
from dynzoo.policies import CRITERIA, ExitPolicy, expected_calibration_error, fit_temperatures, fit_to_budget

torch.set_num_threads(1)


def _from_probabilities(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


# Three samples at one exit. max prob: 0.7, 0.5, 0.6; margin: 0.5, 0.05, 0.4;
# entropy (nats): -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.80182, 0.85569, 0.95027.
PROBABILITIES = [[0.7, 0.2, 0.1], [0.45, 0.5, 0.05], [0.2, 0.2, 0.6]]
ENTROPY = [0.7 * math.log(1 / 0.7) + 0.2 * math.log(5) + 0.1 * math.log(10),
           0.45 * math.log(1 / 0.45) + 0.5 * math.log(2) + 0.05 * math.log(20),
           2 * 0.2 * math.log(5) + 0.6 * math.log(1 / 0.6)]


def test_scores_hand_computed():
    logits = _from_probabilities(PROBABILITIES)
    expected = dict(max_prob=[0.7, 0.5, 0.6], entropy=[-h for h in ENTROPY], margin=[0.5, 0.05, 0.4])
    for criterion, values in expected.items():
        score, prediction = ExitPolicy(criterion).score(0, logits)
        assert score.tolist() == pytest.approx(values, abs=1e-6)
        assert prediction.tolist() == [0, 1, 2]
    assert ENTROPY == pytest.approx([0.80182, 0.85569, 0.95027], abs=1e-5)


def test_criteria_disagree_on_who_leaves():
    # Sample 1 has the lowest max probability but a lower entropy than sample 2 (its mass sits on two classes).
    logits = [_from_probabilities(PROBABILITIES), _from_probabilities([[1 / 3] * 3] * 3)]
    leaving = {('max_prob', 0.55): [0, 2], ('margin', 0.45): [0], ('entropy', -0.83): [0], ('entropy', -0.9): [0, 1],
               ('entropy', -0.96): [0, 1, 2]}
    for (criterion, threshold), expected in leaving.items():
        result = simulate_early_exit(logits, ExitPolicy(criterion, [threshold]))
        assert torch.nonzero(result.exits == 0).squeeze(1).tolist() == expected, (criterion, threshold)


def _patience_logits():
    """Four exits, three samples predicting 0 0 0 0 / 1 2 2 2 / 0 1 0 1 (one-hot logits)."""
    classes = [[0, 1, 0], [0, 2, 1], [0, 2, 0], [0, 2, 1]]
    return [torch.nn.functional.one_hot(torch.tensor(c), 3).double() * 3 for c in classes]


def test_patience_hand_computed():
    logits = _patience_logits()
    counters = ExitPolicy('patience').exit_scores(logits)
    assert [c.tolist() for c in counters] == [[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 2, 0]]
    one = simulate_early_exit(logits, ExitPolicy('patience', [1, 1, 1]))
    assert one.exits.tolist() == [1, 2, 3] and one.predictions.tolist() == [0, 2, 1]
    two = simulate_early_exit(logits, ExitPolicy('patience', [2, 2, 2]))
    assert two.exits.tolist() == [2, 3, 3]
    # The first exit has nothing to agree with: a fitted patience is raised to 1, so nobody leaves there.
    fitted = ExitPolicy('patience').fit(logits, [0.5, 0.2, 0.2, 0.1])
    assert fitted.thresholds[0] == 1 and simulate_early_exit(logits, fitted).exit_fractions(4)[0] == 0
    with pytest.raises(ValueError, match='depends on the earlier exits'):
        ExitPolicy('patience').score(0, logits[0])


@pytest.mark.parametrize('criterion', CRITERIA)
def test_numpy_logits_get_the_same_decisions(criterion):
    generator = torch.Generator().manual_seed(0)
    logits = [2 * torch.randn(64, 5, generator=generator).float() for _ in range(3)]
    policy = ExitPolicy(criterion, temperatures=[0.5, 1.0, 2.0]).fit(logits, geometric_fractions(0.7, 3))
    torch_memory = numpy_memory = None
    for k, exit_logits in enumerate(logits):
        leave, prediction, torch_memory = policy.decide(k, exit_logits, torch_memory)
        leave_np, prediction_np, numpy_memory = policy.decide(k, exit_logits.numpy(), numpy_memory)
        assert isinstance(leave_np, np.ndarray) and np.array_equal(leave_np, leave.numpy())
        assert np.array_equal(prediction_np, prediction.numpy())
    assert len(set(simulate_early_exit(logits, policy).exits.tolist())) > 1


def _two_splits(num_samples=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (2, num_samples), generator=generator)
    logits = 2 * torch.randn(2, 5, num_samples, 10, generator=generator)
    for split in range(2):
        logits[split][:, torch.arange(num_samples), labels[split]] += 4  # informative, not perfect
    return list(logits[0]), labels[0], list(logits[1]), labels[1]


def test_max_probability_policy_is_todays_rule():
    val_logits, val_labels, test_logits, test_labels = _two_splits()
    macs = [10.0, 20.0, 35.0, 40.0, 60.0]
    for q in (0.3, 1.0, 2.5):
        target = geometric_fractions(q, 5)
        assert ExitPolicy().fit(val_logits, target).thresholds == fit_thresholds(val_logits, target)
    today = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs)
    with_policy = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs, policy=ExitPolicy())
    assert with_policy == today
    # Temperature 1 divides by one: still bit for bit.
    unit = evaluate_budgeted(val_logits, val_labels, test_logits, test_labels, macs,
                             policy=ExitPolicy(temperatures=[1.0] * 5))
    assert unit == today


@pytest.fixture(scope='module')
def small_msdnet():
    torch.manual_seed(0)
    return dynzoo.create_model('msdnet_cifar_b7', n_blocks=4, step=1, base=1, channels=4, growth_rate=2,
                               num_classes=10).eval()


def test_max_probability_policy_early_exit_is_todays(small_msdnet):
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    thresholds = [0.11, 0.12, 0.13]
    macs = [1, 2, 3, 4]
    today = early_exit(small_msdnet, x, thresholds, macs)
    policy = early_exit(small_msdnet, x, ExitPolicy('max_prob', thresholds), macs)
    assert torch.equal(today.predictions, policy.predictions) and torch.equal(today.exits, policy.exits)
    assert today.macs == policy.macs and len(set(today.exits.tolist())) > 1


@pytest.fixture(scope='module')
def trained_msdnet_and_images():
    """The shipped CIFAR-10 MSDNet and 20 embedded test images: its exits agree often enough for patience."""
    model = dynzoo.create_model('msdnet_cifar_b7.c10', pretrained=True).eval()
    transform = eval_transform(model)
    images = load_sample()[0][::50]
    return model, torch.stack([transform(Image.fromarray(image)) for image in images])


@pytest.mark.parametrize('criterion', CRITERIA)
def test_real_early_exit_equals_simulation(request, criterion):
    """Thresholds fitted on some images, applied to others: real early exit takes the simulated decisions. Patience
    needs exits that agree, so it runs on the trained model; the others on a small random MSDNet, with and without
    temperatures."""
    if criterion == 'patience':
        model, x = request.getfixturevalue('trained_msdnet_and_images')
        x_val, x_test = x[:10], x[10:]
        settings = [None]
    else:
        model = request.getfixturevalue('small_msdnet')
        x_val, x_test = torch.randn(2, 32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        settings = [None, [0.05, 0.1, 0.2, 1.0]]
    with torch.no_grad():
        val_logits, test_logits = model(x_val), model(x_test)
    for temperatures in settings:
        policy = ExitPolicy(criterion, temperatures=temperatures).fit(val_logits,
                                                                      geometric_fractions(1.0, model.num_exits))
        unit_macs = list(range(1, model.num_exits + 1))  # given, so that fvcore does not trace the model
        simulated, real = simulate_early_exit(test_logits, policy), early_exit(model, x_test, policy, unit_macs)
        assert torch.equal(real.predictions, simulated.predictions) and torch.equal(real.exits, simulated.exits)
        assert real.samples_per_stage == simulated.samples_per_stage
        assert real.exits.min() < model.num_exits - 1  # some samples left early


def test_temperature_fitting_recovers_known_temperatures():
    generator = torch.Generator().manual_seed(0)
    calibrated = 3 * torch.randn(20000, 10, generator=generator)
    labels = torch.multinomial(torch.softmax(calibrated, 1), 1, generator=generator).squeeze(1)
    true = [2.5, 0.5, 1.0]
    observed = [calibrated * t for t in true]  # over-confident, under-confident, calibrated
    fitted = fit_temperatures(observed, labels)
    assert fitted == pytest.approx(true, rel=0.04)
    before = expected_calibration_error(observed[0], labels)
    after = expected_calibration_error(observed[0] / fitted[0], labels)
    assert before > 0.1 and after < 0.02


def test_expected_calibration_error_hand_computed():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right) in 10 bins: (2/3)|0.5 - 0.9| + (1/3)|1 - 0.6|.
    logits = _from_probabilities([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert expected_calibration_error(logits, torch.tensor([0, 1, 1]), bins=10) == pytest.approx(0.4)


def test_fit_to_budget_meets_the_budget():
    val_logits, _, test_logits, _ = _two_splits()
    macs = [10.0, 20.0, 35.0, 40.0, 60.0]
    for criterion in CRITERIA:
        budgets = (40.0, 55.0) if criterion == 'patience' else (25.0, 40.0)  # patience: nobody leaves at exit 1
        spent = []
        for budget in budgets:
            policy = fit_to_budget(val_logits, macs, budget, ExitPolicy(criterion))
            assert policy.criterion == criterion
            spent.append(simulate_early_exit(val_logits, policy, macs).mean_macs)
            assert spent[-1] <= budget
        assert spent[1] > spent[0]
        if criterion != 'patience':  # continuous scores land close to the budget
            assert spent[0] > 24.5 and spent[1] > 39.5
    with pytest.raises(ValueError, match='below the cheapest patience operating point'):
        fit_to_budget(val_logits, macs, 15.0, ExitPolicy('patience'))  # nobody can leave at the first exit
    with pytest.raises(ValueError, match='budget 5 MACs is below the cheapest max_prob operating point'):
        fit_to_budget(val_logits, macs, 5.0)
    # Below the grid's cheapest point (q = 1e-3 keeps one sample from exit 1) lies everyone leaving at exit 1.
    cheapest_on_grid = simulate_early_exit(val_logits, ExitPolicy().fit(val_logits, geometric_fractions(1e-3, 5)),
                                           macs).mean_macs
    assert cheapest_on_grid > 10.0
    everyone_first = fit_to_budget(val_logits, macs, (10.0 + cheapest_on_grid) / 2)
    assert simulate_early_exit(val_logits, everyone_first, macs).exit_fractions(5) == [1, 0, 0, 0, 0]


def test_policy_round_trips_as_a_dict_and_runs_the_one_loop():
    policy = ExitPolicy('margin', [0.3, 0.2, ALWAYS], temperatures=[1.5, 1.0, 0.8], strict=True)
    again = ExitPolicy(**policy.to_dict())
    assert again.to_dict() == policy.to_dict()
    logits, _, _, _ = _two_splits(50)
    result = run_exit_rule(again, _precomputed_exits(logits[:3]), 3, 50)
    assert torch.equal(result.exits, simulate_early_exit(logits[:3], policy).exits)


def _parse(argv):
    return add_eval_args(argparse.ArgumentParser()).parse_args(argv)


def test_cli_policy_options():
    common = ['msdnet_cifar_lin5', '--num-classes', '10', '--data', 'sample', '--holdout', '24', '--limit', '24',
              '--batch-size', '24']
    table, = run_eval(_parse(common + ['--mode', 'budget', '--policy', 'entropy', '--calibrate']))
    assert table.meta['policy'] == 'entropy' and len(table.meta['temperatures']) == 5
    assert all(t <= 0 or t == NEVER for row in table.rows for t in row['thresholds'])  # minus the entropy
    table, = run_eval(_parse(common + ['--mode', 'early-exit', '--policy', 'patience', '--q', '1']))
    assert table.rows[0]['exit_fractions'][0] == 0  # patience never leaves at the first exit
    table, = run_eval(_parse(common + ['--mode', 'early-exit', '--policy', 'margin', '--temperature', '1.5',
                                       '--budget', '2e7', '4e7']))
    assert table.meta['temperatures'] == [1.5] * 5 and [row['q'] for row in table.rows] == ['budget 2e+07',
                                                                                            'budget 4e+07']
    assert table.rows[0]['mean_macs'] < table.rows[1]['mean_macs']
    with pytest.raises(ValueError, match='--calibrate fits temperatures on held-out images'):
        run_eval(_parse(common + ['--mode', 'early-exit', '--calibrate', '--thresholds', '0.5', '0.5', '0.5', '0.5']))
