"""The layers: ``import dynzoo`` loads the library only, no library module imports the command line, the command
line's handlers moved with deprecated aliases left behind, and the allocator is changed only on request."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dynzoo
from dynzoo import cli

PACKAGE = Path(dynzoo.__file__).parent
REPO = PACKAGE.parent
# Entry points that run the command line; every other module is library.
ENTRY_POINTS = {'dynzoo.train.__main__', 'dynzoo.cli.__main__'}


def _library_modules():
    names = []
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(REPO).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        if not name.startswith('dynzoo.cli') and name not in ENTRY_POINTS:
            names.append(name)
    return names


def _loaded_after(statement: str):
    """The ``dynzoo*`` modules a fresh interpreter has loaded after ``statement``."""
    code = f'import sys; {statement}; print(" ".join(sorted(m for m in sys.modules if m.startswith("dynzoo"))))'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def test_import_dynzoo_loads_the_library_only():
    loaded = _loaded_after('import dynzoo')
    assert not {m for m in loaded if m.startswith('dynzoo.cli')}, loaded
    assert not {'dynzoo.data', 'dynzoo.train', 'dynzoo.export'} & loaded, loaded
    assert {'dynzoo.families', 'dynzoo.models.msdnet', 'dynzoo.evaluate'} <= loaded


def test_no_library_module_imports_the_command_line():
    modules = _library_modules()
    assert {'dynzoo.train', 'dynzoo.train.trainer', 'dynzoo.hub', 'dynzoo.export', 'dynzoo.families'} <= set(modules)
    loaded = _loaded_after('; '.join(f'import {m}' for m in modules))
    assert not {m for m in loaded if m.startswith('dynzoo.cli')}, loaded


def test_only_the_command_line_uses_argparse():
    users = []
    for name in _library_modules():
        path = REPO / Path(*name.split('.'))
        path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
        imported = {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                    for alias in node.names}
        if 'argparse' in imported:
            users.append(name)
    assert users == []


@pytest.mark.parametrize('module, name, new', [
    ('dynzoo.hub', 'run_convert', 'dynzoo.cli.convert'),
    ('dynzoo.evaluate', 'add_eval_args', 'dynzoo.cli.evaluate'),
    ('dynzoo.export', 'run_export', 'dynzoo.cli.export'),
    ('dynzoo.pretrained', 'run_weights', 'dynzoo.cli.weights'),
    ('dynzoo.train', 'add_train_args', 'dynzoo.cli.train'),
    ('dynzoo.train', 'main', 'dynzoo.cli.train'),
])
def test_moved_handlers_keep_a_deprecated_alias(module, name, new):
    old_module, new_module = (__import__(m, fromlist=['_']) for m in (module, new))
    with pytest.warns(DeprecationWarning, match=f'use {new}.{name}'):
        assert getattr(old_module, name) is getattr(new_module, name)
    with pytest.raises(AttributeError):
        getattr(old_module, 'no_such_name')


def test_freed_memory_is_retained_only_on_request(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr('dynzoo.inference.retain_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.delenv(cli.RETAIN_ENV, raising=False)
    assert cli.main(['weights', 'no_such_model*']) == 0
    assert calls == []
    assert cli.main(['--retain-freed-memory', 'weights', 'no_such_model*']) == 0
    assert cli.main(['weights', 'no_such_model*', '--retain-freed-memory']) == 0
    assert len(calls) == 2
    monkeypatch.setenv(cli.RETAIN_ENV, '1')
    assert cli.main(['weights', 'no_such_model*']) == 0
    assert len(calls) == 3
    monkeypatch.setenv(cli.RETAIN_ENV, '0')
    assert cli.main(['weights', 'no_such_model*']) == 0
    assert len(calls) == 3


def test_python_m_dynzoo_train_is_the_train_command():
    result = subprocess.run([sys.executable, '-m', 'dynzoo.train', '--help'], capture_output=True, text=True,
                            cwd=REPO, timeout=300, env={'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1',
                                                        'PATH': '/usr/bin:/bin'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith('usage: python -m dynzoo.train')
    for option in ('--compact-dir', '--stop-after-epochs', '--model-ema', '--retain-freed-memory', '--debug'):
        assert option in result.stdout
