"""Time of real early exit against the full forward, next to the MACs ratio (CPU).

Thresholds are fitted on held-out images for MSDNet's geometric exit distributions (and for the q whose held-out
expected MACs come closest to ``--target-ratio`` of the full model), then one test batch runs through the call as the
README writes it, ``dynzoo.early_exit(model, x, thresholds=...)`` (no cost argument: the per-exit MACs come from
dynzoo's cache, counted on the variant's first call, which is timed apart), and through ``model(x)`` (every exit),
alternately, ``--repeats`` times; the fastest run of each is kept (robust to other load on the machine), and the
median over the rounds of each round's early-exit time over its full-forward time ("paired", robust to drifts of
the machine's speed during the run). The
"stage-time model" column predicts the time ratio from the measured time of each stage in the full forward (samples
that ran stage k x its per-sample time): the gap between MACs and time that comes from stages differing in time per
MAC, not from early exit itself.

Each ``--variants`` entry times its own copy of the model, the same one for early exit and full forward: ``plain``;
``fused`` (``dynzoo.models.fuse_conv_bn``: BatchNorm folded into the convs, inference only);
``fused_channels_last`` (fused, model and batch in channels-last memory format, which ``compact_batch`` keeps);
``optimized`` (``dynzoo.optimize_for_inference``: fused, 1x1 convolutions as batched matrix products, the bottlenecks
reading the same scale merged into one). With autograd off, the plain MSDNet already grows its feature maps in place
and runs its 1x1 convolutions as matrix products (its inference path). Thresholds come from the plain model for
every variant.
``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared with other jobs,
time slices lost to them then do not count (with one thread; memory-bandwidth and cache contention still do).
``--allocator retain`` first calls ``dynzoo.inference.retain_freed_memory()``
(see its docstring: without it every forward page-faults its large feature maps anew, which costs MSDNet's 32x32
stages far more time than their multiply-adds).

    python benchmarks/early_exit.py --data npz --data-path ../shared/data/cifar10_jpeg.npz --batch-size 256

Weights are random unless ``--checkpoint``/``--pretrained`` is given: the timings hold, the accuracy does not.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import dynzoo
from dynzoo.data import cifar_dataset, holdout_indices
from dynzoo.evaluate import collect_logits, eval_transform
from dynzoo.flops import clear_macs_cache
from dynzoo.inference import (NEVER, fit_thresholds, geometric_fractions, retain_freed_memory,
                              simulate_early_exit)
from dynzoo.models import fuse_conv_bn, optimize_for_inference

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10_jpeg.npz'
VARIANTS = ('plain', 'fused', 'fused_channels_last', 'optimized')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='msdnet_cifar_b7')
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--pretrained', action='store_true')
    parser.add_argument('--data', choices=('npz', 'torchvision', 'sample'), default=None,
                        help='default: npz when --data-path (or ../shared/data/cifar10_jpeg.npz) exists, else sample')
    parser.add_argument('--data-path', default=None)
    parser.add_argument('--data-root', default=None)
    parser.add_argument('--holdout', type=int, default=1000, help='held-out images for threshold fitting')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--q', type=float, nargs='+', default=[0.25, 0.5, 1.0, 1.5])
    parser.add_argument('--target-ratio', type=float, default=0.5,
                        help='also time the q whose held-out MACs are closest to this share of the full model')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--variants', nargs='+', choices=VARIANTS, default=['plain', 'fused', 'optimized'],
                        help='model variants to time (each against its own full forward)')
    parser.add_argument('--allocator', choices=('default', 'retain'), default='default',
                        help="retain: dynzoo.inference.retain_freed_memory() (glibc keeps freed memory, no page "
                             "faults on reused feature maps); default: the C library's own behaviour")
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                        help="cpu: the process's CPU time (time.process_time), which time slices lost to other "
                             "processes on a shared machine do not inflate; meant for --threads 1")
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def load_splits(args, transform):
    source = args.data
    path = args.data_path or (DEFAULT_NPZ if DEFAULT_NPZ.is_file() else None)
    if source is None:
        source = 'npz' if path is not None else 'sample'
    if source == 'sample':
        test = cifar_dataset('test', source='sample', transform=transform)
        test_index, heldout_index = holdout_indices(len(test), len(test) - args.batch_size, args.seed)
        return source, Subset(test, heldout_index.tolist()), Subset(test, test_index.tolist())
    train = cifar_dataset('train', source=source, root=args.data_root, path=path, transform=transform)
    test = cifar_dataset('test', source=source, root=args.data_root, path=path, transform=transform)
    heldout_index = holdout_indices(len(train), args.holdout, args.seed)[1]
    test_index = np.random.default_rng(args.seed).permutation(len(test))[:args.batch_size]
    return source, Subset(train, heldout_index.tolist()), Subset(test, np.sort(test_index).tolist())


CLOCKS = dict(wall=time.perf_counter, cpu=time.process_time)
clock = CLOCKS['wall']


def timed(fn) -> float:
    start = clock()
    fn()
    return clock() - start


def stage_seconds(model, x):
    """Seconds of stage k plus head k on the whole batch, for every k (one full pass)."""
    seconds, state = [], x
    for k in range(model.num_exits):
        start = clock()
        state = model.forward_stage(k, state)
        model.forward_exit(k, state)
        seconds.append(clock() - start)
    return seconds


def main():
    global clock
    args = parse_args()
    clock = CLOCKS[args.clock]
    if args.allocator == 'retain' and not retain_freed_memory():
        raise SystemExit('--allocator retain needs glibc (Linux)')
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = dict(pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else dict(num_classes=10)
    model = dynzoo.create_model(args.model, pretrained=bool(args.pretrained or args.checkpoint), **kwargs).eval()
    source, heldout, test = load_splits(args, eval_transform(model))
    val_logits, _ = collect_logits(model, DataLoader(heldout, batch_size=args.batch_size))
    x, labels = next(iter(DataLoader(test, batch_size=args.batch_size)))
    macs = dynzoo.per_exit_macs(model, scope='cascade')
    full_macs = macs[-1]

    def heldout_ratio(q):
        thresholds = fit_thresholds(val_logits, geometric_fractions(q, model.num_exits))
        return simulate_early_exit(val_logits, thresholds, macs).mean_macs / full_macs

    grid = np.round(np.arange(0.05, 3.0, 0.05), 2)
    target_q = float(grid[np.argmin([abs(heldout_ratio(q) - args.target_ratio) for q in grid])])
    points = sorted(set(args.q) | {target_q})

    print(f'{args.model}, {source} CIFAR-10, batch {len(labels)}, {args.threads} CPU thread(s), '
          f'best of {args.repeats}, {args.clock} clock, {args.allocator} allocator; thresholds fitted on {len(heldout)} held-out images; '
          f'full model {full_macs / 1e6:.2f} MMACs (fvcore cascade, all exits)')
    rows = []
    for variant in args.variants:
        variant_model, variant_x = prepare_variant(model, x, variant)
        first_call, per_stage, variant_rows = time_variant(variant_model, variant_x, labels, val_logits, points,
                                                           args.repeats)
        share = ' '.join(f'{t / per_stage.sum():.2f}' for t in per_stage)
        print(f'{variant}: first early_exit call {first_call:.3f} s (counts the MACs); time share of stage+head k in '
              f'the full forward: {share}')
        rows += [(variant, *row) for row in variant_rows]
    macs_share = ' '.join(f'{m / full_macs:.2f}' for m in np.diff(macs, prepend=0))
    print(f'MACs share of stage+head k: {macs_share}')
    print('| variant | q | MACs ratio | time ratio | time / MACs | paired / MACs | stage-time model | time / model | '
          'early exit (s) | full (s) | top-1 | exit fractions |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for (variant, q, macs_ratio, time_ratio, overhead, paired, model_ratio, residual, early_s, full_s, accuracy,
         fractions) in rows:
        marker = ' (target)' if q == target_q else ''
        print(f'| {variant} | {q:.2f}{marker} | {macs_ratio:.3f} | {time_ratio:.3f} | {overhead:.3f} | '
              f'{paired / macs_ratio:.3f} | {model_ratio:.3f} | {residual:.3f} | {early_s:.3f} | {full_s:.3f} | '
              f'{accuracy:.3f} | {" ".join(f"{f:.2f}" for f in fractions)} |')


def prepare_variant(model, x, variant):
    """The model copy and input batch that ``variant`` times."""
    if variant == 'plain':
        return model, x
    if variant == 'optimized':
        return optimize_for_inference(model), x
    fused = fuse_conv_bn(model)
    if variant == 'fused':
        return fused, x
    return fused.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def time_variant(model, x, labels, val_logits, points, repeats):
    """Seconds of the first ``early_exit`` call (which counts the MACs), per-stage seconds of the full forward, and
    one row per operating point q: MACs ratio, time ratio, their quotient, the paired time ratio, the stage-time
    model's ratio, time over model, best early-exit and full seconds, top-1, fractions."""
    with torch.no_grad():
        model(x)  # warm-up
        clear_macs_cache(model)  # the first call counts, as in a fresh process
        first_call = timed(lambda: dynzoo.early_exit(model, x, thresholds=[NEVER] * model.num_exits))
        full_macs = dynzoo.per_exit_macs(model)[-1]
        per_stage = np.min([stage_seconds(model, x) for _ in range(repeats)], axis=0)
        rows = []
        for q in points:
            thresholds = fit_thresholds(val_logits, geometric_fractions(q, model.num_exits))
            result = dynzoo.early_exit(model, x, thresholds=thresholds)
            early_time, full_time = [], []
            for _ in range(repeats):
                early_time.append(timed(lambda: dynzoo.early_exit(model, x, thresholds=thresholds)))
                full_time.append(timed(lambda: model(x)))
            macs_ratio = result.mean_macs / full_macs
            time_ratio = min(early_time) / min(full_time)
            model_ratio = float(np.dot(result.samples_per_stage, per_stage[:len(result.samples_per_stage)])
                                / (len(labels) * per_stage.sum()))
            paired = float(np.median(np.array(early_time) / np.array(full_time)))
            rows.append((q, macs_ratio, time_ratio, time_ratio / macs_ratio, paired, model_ratio,
                         time_ratio / model_ratio, min(early_time), min(full_time), result.accuracy(labels),
                         result.exit_fractions(model.num_exits)))
    return first_call, per_stage, rows


if __name__ == '__main__':
    main()
