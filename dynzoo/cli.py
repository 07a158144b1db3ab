"""The ``dynzoo`` command: ``dynzoo bench | eval | train | convert``. Its process keeps freed memory for reuse
(``dynzoo.inference.retain_freed_memory``): no page faults on every batch's feature maps."""
import argparse
import ast
import importlib
import json
from typing import Any, Dict, List, Optional, Sequence

from .inference import retain_freed_memory

# subcommand -> (module, function adding its arguments, function running it, help)
COMMANDS = {
    'bench': ('dynzoo.evaluate', 'add_bench_args', 'run_bench', 'per-exit table: FLOPs, parameters, accuracy'),
    'eval': ('dynzoo.evaluate', 'add_eval_args', 'run_eval', 'anytime / budgeted-batch / early-exit evaluation'),
    'train': ('dynzoo.train', 'add_train_args', 'run_train', "train a model with the authors' or a fast recipe"),
    'convert': ('dynzoo.hub', 'add_convert_args', 'run_convert',
                "turn an authors' checkpoint into a Hub-ready folder (safetensors)"),
    'export': ('dynzoo.export', 'add_export_args', 'run_export',
               'write each stage of a multi-exit model as its own ONNX or torch.export graph, for early exit'),
}


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
    subparsers = parser.add_subparsers(dest='command', required=True)
    for command, (module_name, add_args, run, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(command, help=help_text, description=help_text)
        getattr(module, add_args)(sub)
        sub.set_defaults(run=getattr(module, run))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()
    args.run(args)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
