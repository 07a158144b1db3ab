"""``dynzoo export``: every stage of a multi-exit model as its own graph (``dynzoo.export.export_stages``)."""
import argparse

from . import key_value
from ..export import FORMATS, MANIFEST, export_stages
from ..factory import create_model

__all__ = ['add_export_args', 'run_export']


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """``dynzoo export NAME --format onnx|pt2 --out DIR [--pretrained] [--thresholds T ...] [--force]``."""
    parser.add_argument('model', help='dynzoo model name (multi-exit), e.g. msdnet_cifar_b7.c10')
    parser.add_argument('--format', default='onnx', choices=FORMATS, help='ONNX (for OnnxEarlyExit) or torch.export')
    parser.add_argument('--out', required=True, help='output folder (must be empty unless --force)')
    parser.add_argument('--pretrained', action='store_true', help='load the trained weights')
    parser.add_argument('--thresholds', type=float, nargs='+', default=None,
                        help='exit thresholds stored in the manifest (one per exit, or one fewer)')
    parser.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help="image size the graphs take (default: the model's)")
    parser.add_argument('--force', action='store_true', help='replace the stage files and manifest in --out')
    parser.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', type=key_value, default=[],
                        help='constructor arguments, e.g. n_blocks=3')


def run_export(args) -> int:
    """Handler of ``dynzoo export``: prints what was written."""
    model = create_model(args.model, pretrained=args.pretrained,
                         **dict(args.model_kwargs)).eval()
    manifest = export_stages(model, args.out, format=args.format, input_size=args.input_size,
                             thresholds=args.thresholds, force=args.force)
    files = ', '.join(stage['file'] for stage in manifest['stages'])
    print(f'exported {args.model} ({manifest["num_exits"]} exits, input {"x".join(map(str, manifest["input_size"]))}) '
          f'to {args.out}: {files}, {MANIFEST}')
    return 0
