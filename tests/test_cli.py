"""The ``dynzoo`` command dispatches to every subcommand."""
import importlib
from pathlib import Path

import pytest

import dynzoo
from dynzoo.cli import USER_ERRORS, build_parser, main, parse_key_values


def test_bench_prints_per_exit_table(capsys):
    assert main(['bench', 'msdnet_cifar_lin5']) == 0
    out = capsys.readouterr().out
    assert 'bench: msdnet_cifar_lin5 (100 classes, input 3x32x32, 5 exits)' in out
    assert '2,078,924' in out  # total parameters at the last exit (spec section 10)


@pytest.mark.parametrize('command', ['bench', 'eval', 'train', 'convert', 'weights', 'export'])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, '--help'])
    assert exit_info.value.code == 0
    assert 'usage: dynzoo ' + command in capsys.readouterr().out


def test_key_values_are_read_as_literals():
    parsed = parse_key_values(['memory_efficient=False', 'drop=0.5', 'flag=true', 'sizes=(1, 2)', 'name=b7'], '--x')
    assert parsed == dict(memory_efficient=False, drop=0.5, flag=True, sizes=(1, 2), name='b7')
    with pytest.raises(ValueError, match='--model-kwargs expects KEY=VALUE'):
        parse_key_values(['depth'], '--model-kwargs')


def test_dynzoo_error_classes_are_user_errors():
    """Every exception class dynzoo defines is reported as one error line by the command line."""
    modules = [importlib.import_module(f'dynzoo.{path.stem}') for path in Path(dynzoo.__file__).parent.glob('*.py')]
    modules += [importlib.import_module(f'dynzoo.models.{path.stem}')
                for path in (Path(dynzoo.__file__).parent / 'models').glob('*.py')]
    errors = {obj for module in modules for obj in vars(module).values()
              if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__.startswith('dynzoo')}
    assert {'UnknownModelError', 'CheckpointMismatchError', 'PackedCifarError'} <= {e.__name__ for e in errors}
    assert all(issubclass(error, USER_ERRORS) for error in errors), errors


def test_user_error_is_one_line_and_status_2_bug_keeps_its_traceback(monkeypatch, capsys):
    assert main(['eval', 'msdnet_cifar_b77']) == 2
    assert capsys.readouterr().err.startswith("dynzoo: error: Unknown dynzoo model 'msdnet_cifar_b77'")
    with pytest.raises(ValueError, match='Unknown dynzoo model'):
        main(['--debug', 'eval', 'msdnet_cifar_b77'])  # --debug before the command works too

    def bug(args):
        raise RuntimeError('a bug')

    monkeypatch.setattr('dynzoo.cli.evaluate.run_bench', bug)
    with pytest.raises(RuntimeError, match='a bug'):
        main(['bench', 'msdnet_cifar_b7'])
    assert capsys.readouterr().err == ''
