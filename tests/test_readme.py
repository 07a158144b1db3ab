"""The README is the user's path: its code blocks run as written, in order, as a reader runs them.

Every ``python`` block runs in one namespace (a block may use what an earlier one defined), and every ``dynzoo ...``
command of a ``bash`` block runs through the CLI in the same folder; ``pip install`` lines are what CI itself runs,
and ``python -m dynzoo.train`` (hours of training) is only checked to parse its arguments.
"""
import argparse
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r'```(python|bash)\n(.*?)```', README.read_text(), re.S)]


def _commands(script: str):
    """Each command of a shell block (chained with ``&&`` or on its own line), as an argument list."""
    for line in script.replace('\\\n', ' ').splitlines():
        for part in line.split('&&'):
            argv = shlex.split(part.split('#')[0])
            if argv:
                yield argv


def _run_command(argv):
    if argv[0] == 'dynzoo':
        from dynzoo.cli import main
        assert main(argv[1:]) == 0, argv
    elif argv[:3] == ['python', '-m', 'dynzoo.train']:
        from dynzoo.cli.train import add_train_args
        parser = argparse.ArgumentParser()
        add_train_args(parser)
        parser.parse_args(argv[3:])
    else:
        assert argv[:2] == ['pip', 'install'] or argv[0].startswith('HF_HUB_OFFLINE'), f'unexpected command {argv}'


def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip('onnxruntime', reason='the README exports to ONNX: pip install "dynzoo[export]"')
    namespace = {'__name__': '__readme__'}
    assert sum(language == 'python' for language, _ in BLOCKS) >= 3
    for index, (language, source) in enumerate(BLOCKS, 1):
        if language == 'python':
            exec(compile(source, f'README.md block {index}', 'exec'), namespace)
        else:
            for argv in _commands(source):
                _run_command(argv)


def test_readme_is_a_short_page():
    """The README is a user's page of at most 10 KB; measurements and history belong in docs/."""
    assert len(README.read_bytes()) <= 10_000
