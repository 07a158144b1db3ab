"""The ``dynzoo`` command dispatches to every subcommand."""
import pytest

from dynzoo.cli import build_parser, main, parse_key_values


def test_bench_prints_per_exit_table(capsys):
    assert main(['bench', 'msdnet_cifar_lin5']) == 0
    out = capsys.readouterr().out
    assert 'bench: msdnet_cifar_lin5 (100 classes, input 3x32x32, 5 exits)' in out
    assert '2,078,924' in out  # total parameters at the last exit (spec section 10)


@pytest.mark.parametrize('command', ['bench', 'eval', 'train', 'convert', 'weights'])
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
