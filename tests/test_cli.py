"""The ``dynzoo`` command dispatches to every subcommand."""
import pytest

from dynzoo.cli import build_parser, main


def test_bench_prints_per_exit_table(capsys):
    assert main(['bench', 'msdnet_cifar_lin5']) == 0
    out = capsys.readouterr().out
    assert 'bench: msdnet_cifar_lin5 (100 classes, input 3x32x32, 5 exits)' in out
    assert '2,078,924' in out  # total parameters at the last exit (spec section 10)


@pytest.mark.parametrize('command', ['bench', 'eval', 'train', 'convert'])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, '--help'])
    assert exit_info.value.code == 0
    assert 'usage: dynzoo ' + command in capsys.readouterr().out
