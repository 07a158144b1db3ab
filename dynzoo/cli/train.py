"""``dynzoo train`` and ``python -m dynzoo.train``: the trainer's options (``dynzoo.train``)."""
import argparse
from typing import Optional, Sequence

from . import add_process_args, apply_process_args, key_value, run_reporting_user_errors
from ..data import PRESETS as DATA_PRESETS
from ..train import PRESETS, run_train
from ..train import __doc__ as TRAIN_DOC

__all__ = ['add_train_args', 'run_train', 'main']


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dynzoo train`` / ``python -m dynzoo.train``."""
    _add_model_and_data_args(parser)
    _add_run_args(parser)
    _add_recipe_args(parser)
    _add_device_args(parser)
    _add_export_args(parser)


def _add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True, help='model name, e.g. msdnet_cifar_b7')
    parser.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', type=key_value,
                        help='extra constructor arguments')
    parser.add_argument('--pretrained', action='store_true', help='start from pretrained weights')
    parser.add_argument('--num-classes', type=int, default=None, help='default: from the dataset')
    parser.add_argument('--dataset', default='cifar10', choices=('cifar10', 'cifar100', 'imagefolder', 'synthetic'))
    parser.add_argument('--data-source', default=None, choices=('npz', 'torchvision'),
                        help='CIFAR source (default: npz when --data-path is given, else torchvision)')
    parser.add_argument('--data-path', default=None, help='packed-JPEG CIFAR npz (e.g. cifar10_jpeg.npz)')
    parser.add_argument('--data-root', default=None, help='torchvision CIFAR root, or the ImageNet-style folder')
    parser.add_argument('--download', action='store_true', help='let torchvision download CIFAR into --data-root')
    parser.add_argument('--input-size', type=int, default=224, help='image size for --dataset imagefolder')
    parser.add_argument('--synthetic-size', type=int, default=256, help='training images of --dataset synthetic')


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """Where the run writes, and how it resumes and stops."""
    parser.add_argument('--output', required=True, help='run folder: last.pth, log.json, pretrained/')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='continue from OUTPUT/last.pth, else from the compact state in --compact-dir (or from '
                             'the given checkpoint); starts fresh if there is none')
    parser.add_argument('--compact-dir', default=None,
                        help='also keep a compact resume state (float16 weights and EMA, bfloat16 momentum) in '
                             'this folder every epoch, e.g. training/<run> to commit between sessions')
    parser.add_argument('--stop-after-epochs', type=int, default=None,
                        help='end this invocation after N epochs (resume later with --resume; no export)')
    parser.add_argument('--model-ema', action='store_true',
                        help='keep an EMA of the weights (timm ModelEmaV3), validate it, export it when better')
    parser.add_argument('--model-ema-decay', type=float, default=0.9998,
                        help='the EMA decay it warms up to (timm\'s warm-up, power 3/4)')


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--preset', default='auto', help=f'auto (the family\'s authors\' recipe) or one of: '
                                                         f'{", ".join(PRESETS)}')
    group = parser.add_argument_group('recipe (overrides the preset)')
    group.add_argument('--epochs', type=int)
    group.add_argument('--batch-size', type=int, help='global batch (split across processes)')
    group.add_argument('--opt', help="timm optimizer: 'momentum' (SGD), 'nesterov', 'adamw', ...")
    group.add_argument('--lr', type=float)
    group.add_argument('--momentum', type=float)
    group.add_argument('--weight-decay', type=float)
    group.add_argument('--wd-bn-bias', action=argparse.BooleanOptionalAction, default=None,
                       help='also decay BatchNorm and bias parameters (the authors did)')
    group.add_argument('--sched', help="timm scheduler: 'multistep', 'cosine', 'step', ...")
    group.add_argument('--milestones', type=float, nargs='+', help='multistep epochs (values < 1: fractions)')
    group.add_argument('--decay-rate', type=float)
    group.add_argument('--warmup-epochs', type=int)
    group.add_argument('--warmup-lr', type=float)
    group.add_argument('--min-lr', type=float)
    group.add_argument('--label-smoothing', type=float)
    group.add_argument('--augment', help=f'dynzoo.data transform preset ({", ".join(DATA_PRESETS)}), auto or none')
    group.add_argument('--amp', choices=('bf16', 'none'), help='bf16 autocast (CPU with bf16 support, or GPU)')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None)
    group.add_argument('--loss', help="'auto', 'ce', 'multi_ce' or a class of dynzoo.losses")
    parser.add_argument('--loss-kwargs', nargs='*', metavar='KEY=VALUE', type=key_value, help='extra loss arguments')


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    """Seeds, devices, data loading, compilation, validation."""
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=2, help='data-loading processes per training process')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--eval-interval', type=int, default=1, help='validate every N epochs (and at the end)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the training step (1 CPU thread, bf16: msdnet_cifar_b7 1.3x the images/s '
                             'after about 5 minutes of compiling; scan_resnet18 no gain; SDPoint recompiles per '
                             'instance)')
    parser.add_argument('--find-unused-parameters', action='store_true',
                        help='DDP: allow parameters without gradient (automatic for losses with parameters)')


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    """The Hub-ready export at the end, and SDPoint's per-instance statistics before it."""
    parser.add_argument('--export', default=None, help='Hub-ready folder written at the end (OUTPUT/pretrained)')
    parser.add_argument('--export-name', default=None, help='published name, e.g. msdnet_cifar_b7.c10')
    parser.add_argument('--holdout', type=int, default=0,
                        help='CIFAR: leave out the N training images that `dynzoo eval --mode budget --holdout N` '
                             'fits its early-exit thresholds on (MSDNet: 5000)')
    parser.add_argument('--recalibrate-batches', type=int, default=100,
                        help='SDPoint: training batches per instance for the final batch-norm recalibration')
    parser.add_argument('--val-recalibrate-batches', type=int, default=20,
                        help='SDPoint: training batches for the full instance\'s batch-norm statistics before each '
                             'validation during training (0: validate with the shared running statistics)')
    parser.add_argument('--export-note', default=None,
                        help='a line about the run for the model card (e.g. what it was fine-tuned from)')
    parser.add_argument('--export-dtype', default='float32', choices=('float32', 'float16'))
    parser.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dynzoo.train``: as ``dynzoo train``, a user error is one error line and status 2 (``--debug``:
    its traceback)."""
    parser = argparse.ArgumentParser(prog='python -m dynzoo.train', description=TRAIN_DOC.split('\n')[0])
    add_train_args(parser)
    add_process_args(parser)
    args = parser.parse_args(argv)
    apply_process_args(args)
    return run_reporting_user_errors(parser.prog, run_train, args)
