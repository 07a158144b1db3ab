"""``dynzoo convert``: an authors' checkpoint as released -> a Hub-ready folder (``dynzoo.hub.convert_checkpoint``)."""
import os

import torch

from . import key_value
from ..hub import FAMILIES, MIRROR_ENV, convert_checkpoint
from ..models._helpers import HUB_ORG

__all__ = ['add_convert_args', 'run_convert']


def add_convert_args(parser) -> None:
    """``dynzoo convert --family F SRC DST [--model NAME] [--num-classes N] [--dtype float16]``."""
    parser.add_argument('--family', required=True, choices=sorted(FAMILIES),
                        help='model family of the checkpoint')
    parser.add_argument('src', help="the authors' checkpoint file (.pth, .pth.tar, .safetensors)")
    parser.add_argument('dst', help='output folder (model.safetensors, config.json, README.md)')
    parser.add_argument('--model', default=None, help='dynzoo architecture it holds (default: found from the keys)')
    parser.add_argument('--num-classes', type=int, default=None, help="default: the checkpoint's classifier size")
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float16'), help='storage precision')
    parser.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', type=key_value, default=[],
                        help='constructor arguments of a configuration dynzoo does not register, e.g. n_blocks=10')
    parser.add_argument('--force', action='store_true', help='write into a destination that is not empty')


def run_convert(args) -> int:
    """Handler of ``dynzoo convert``: prints what was written."""
    model_kwargs = dict(args.model_kwargs)
    dst, name = convert_checkpoint(args.family, args.src, args.dst, model_name=args.model,
                                   num_classes=args.num_classes, dtype=getattr(torch, args.dtype),
                                   model_kwargs=model_kwargs, overwrite=args.force)
    mirror = os.environ.get(MIRROR_ENV) or f'${MIRROR_ENV}'
    kwargs = ''.join(f', {k}={v!r}' for k, v in model_kwargs.items())
    print(f"converted {args.src} -> {dst} ({name}); load it with dynzoo.create_model('local-dir:{dst}', "
          f"pretrained=True), or copy the folder to {mirror}/{HUB_ORG}/{name}/ and load it with "
          f"dynzoo.create_model('{name}', pretrained=True{kwargs})")
    return 0
