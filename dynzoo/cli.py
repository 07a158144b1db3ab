"""The ``dynzoo`` command: ``dynzoo bench | eval | train | convert | weights | export``. Its process keeps freed memory for reuse
(``dynzoo.inference.retain_freed_memory``): no page faults on every batch's feature maps. A user error (``USER_ERRORS``)
prints one ``dynzoo: error: ...`` line and exits with status 2, as argparse does for a bad option; ``--debug`` shows its
traceback."""
import argparse
import ast
import importlib
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from .inference import retain_freed_memory

# subcommand -> (module, function adding its arguments, function running it, help)
COMMANDS = {
    'bench': ('dynzoo.evaluate', 'add_bench_args', 'run_bench', 'per-exit table: MACs, parameters, accuracy'),
    'eval': ('dynzoo.evaluate', 'add_eval_args', 'run_eval', 'anytime / budgeted-batch / early-exit evaluation'),
    'train': ('dynzoo.train', 'add_train_args', 'run_train', "train a model with the authors' or a fast recipe"),
    'convert': ('dynzoo.hub', 'add_convert_args', 'run_convert',
                "turn an authors' checkpoint into a Hub-ready folder (safetensors)"),
    'weights': ('dynzoo.pretrained', 'add_weights_args', 'run_weights',
                'every pretrained tag: source, accuracy, size, whether it is cached here'),
    'export': ('dynzoo.export', 'add_export_args', 'run_export',
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='dynzoo', description='Dynamic image classifiers: benchmark, evaluate, '
                                                                 'train and convert dynzoo models.')
    add_debug_arg(parser)
    subparsers = parser.add_subparsers(dest='command', required=True)
    for command, (module_name, add_args, run, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(command, help=help_text, description=help_text)
        getattr(module, add_args)(sub)
        add_debug_arg(sub, default=argparse.SUPPRESS)  # after the command too, without resetting the one before it
        sub.set_defaults(run=getattr(module, run))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    retain_freed_memory()
    return run_reporting_user_errors(parser.prog, args.run, args)


if __name__ == '__main__':
    raise SystemExit(main())
