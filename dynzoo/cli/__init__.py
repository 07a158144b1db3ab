"""The ``dynzoo`` command: ``dynzoo bench | eval | train | convert | weights | export``, and ``python -m dynzoo.train``.

The command line is the only layer that knows argparse: each subcommand's module here adds its arguments
(``add_*_args``) and runs them (``run_*``) with the library's functions; no library module imports this package.
A user error (``USER_ERRORS``) prints one ``dynzoo: error: ...`` line and exits with status 2, as argparse does for a
bad option; ``--debug`` shows its traceback. ``--retain-freed-memory`` (or ``DYNZOO_RETAIN_FREED_MEMORY=1``) makes
the process keep freed memory for reuse (``dynzoo.inference.retain_freed_memory``): no page faults on every batch's
feature maps, at the price of a process that keeps its peak memory.
"""
import argparse
import ast
import importlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import inference

RETAIN_ENV = 'DYNZOO_RETAIN_FREED_MEMORY'

# subcommand -> (module, function adding its arguments, function running it, help)
COMMANDS = {
    'bench': ('dynzoo.cli.evaluate', 'add_bench_args', 'run_bench', 'per-exit table: MACs, parameters, accuracy'),
    'eval': ('dynzoo.cli.evaluate', 'add_eval_args', 'run_eval', 'anytime / budgeted-batch / early-exit evaluation'),
    'train': ('dynzoo.cli.train', 'add_train_args', 'run_train', "train a model with the authors' or a fast recipe"),
    'convert': ('dynzoo.cli.convert', 'add_convert_args', 'run_convert',
                "turn an authors' checkpoint into a Hub-ready folder (safetensors)"),
    'weights': ('dynzoo.cli.weights', 'add_weights_args', 'run_weights',
                'every pretrained tag: source, accuracy, size, whether it is cached here'),
    'export': ('dynzoo.cli.export', 'add_export_args', 'run_export',
               'write each stage of a multi-exit model as its own ONNX or torch.export graph, for early exit'),
}


# The exceptions that report a user error rather than a bug in dynzoo:
# * ValueError: a bad argument value, checkpoint or data file; dynzoo's own errors derive from it (UnknownModelError,
#   CheckpointMismatchError, CheckpointFileError, PackedCifarError);
# * OSError: a missing, unreadable or unwritable file or folder, or no network (PretrainedWeightsNotFoundError is a
#   FileNotFoundError);
# * TypeError: a keyword that --model-kwargs or --loss-kwargs passes to a constructor that does not take it, or a value
#   of the wrong type there.
# Anything else (RuntimeError, KeyError, ...) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, TypeError)


def add_debug_arg(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument('--debug', action='store_true', default=default,
                        help='show the Python traceback of a user error instead of one error line')


def add_process_args(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """The options of the whole process: ``--debug`` and ``--retain-freed-memory`` (default: off, or
    ``$DYNZOO_RETAIN_FREED_MEMORY``). ``default=argparse.SUPPRESS`` adds them after a subcommand too, without
    resetting what was given before it."""
    add_debug_arg(parser, default=False if default is None else default)
    parser.add_argument('--retain-freed-memory', action='store_true',
                        default=_env_flag(RETAIN_ENV) if default is None else default,
                        help='keep freed memory for reuse instead of returning it to the system (glibc): faster CPU '
                             f'forwards, a process that keeps its peak memory (also: {RETAIN_ENV}=1)')


def _env_flag(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def apply_process_args(args: argparse.Namespace) -> None:
    """What the process options change for the whole process (``--retain-freed-memory``)."""
    if getattr(args, 'retain_freed_memory', False):
        if not inference.retain_freed_memory():
            print('--retain-freed-memory: the C library is not glibc, nothing changed', file=sys.stderr)


def run_reporting_user_errors(prog: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``run(args)``, then 0; a ``USER_ERRORS`` exception becomes one ``PROG: error: MESSAGE`` line on stderr and
    status 2, unless ``args.debug``."""
    try:
        run(args)
    except USER_ERRORS as error:
        if getattr(args, 'debug', False):
            raise
        message = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f'{prog}: error: {message or type(error).__name__}', file=sys.stderr)
        return 2
    return 0


def positive_int(text: str) -> int:
    """argparse ``type`` of counts that must be at least 1 (batch sizes, threads, limits)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def parse_key_values(items: Optional[Sequence[str]], option: str) -> Dict[str, Any]:
    """``['depth=3', 'memory_efficient=False', 'name=x']`` -> ``{'depth': 3, 'memory_efficient': False, 'name': 'x'}``:
    values are read as Python literals (``False``, ``0.5``, ``(1, 2)``) or JSON (``false``, ``[1, 2]``), anything
    else stays a string."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'{option} expects KEY=VALUE, got {item!r}')
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            try:
                parsed[key] = json.loads(value)
            except json.JSONDecodeError:
                parsed[key] = value
    return parsed


def key_value(text: str) -> Tuple[str, Any]:
    """argparse ``type`` of ``KEY=VALUE`` items (``--model-kwargs``, ``--loss-kwargs``): ``(key, value)``, the value
    read as ``parse_key_values`` reads it; ``dict(args.model_kwargs)`` then gives the keyword arguments."""
    try:
        return next(iter(parse_key_values([text], 'KEY=VALUE option').items()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f'expects KEY=VALUE, got {text!r}') from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='dynzoo', description='Dynamic image classifiers: benchmark, evaluate, '
                                                                 'train and convert dynzoo models.')
    add_process_args(parser)
    subparsers = parser.add_subparsers(dest='command', required=True)
    for command, (module_name, add_args, run, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(command, help=help_text, description=help_text)
        getattr(module, add_args)(sub)
        add_process_args(sub, default=argparse.SUPPRESS)  # after the command too, not resetting the one before it
        sub.set_defaults(run=getattr(module, run))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_process_args(args)
    return run_reporting_user_errors(parser.prog, args.run, args)
