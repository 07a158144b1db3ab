"""Batch-1 latency of multi-exit networks on CPU: full forward, each exit, and early exit as the README calls it.

For each model, with one image at a time, ``--repeats`` rounds each time (interleaved, so that load on the machine
touches every variant alike):

* ``model(x)``, the full forward (every exit);
* ``iter_exits(x)`` run to exit k: the time until exit k's logits are in hand, for every k (one pass, the clock read
  at each exit);
* ``dynzoo.early_exit(model, x, thresholds=...)``, the call as the README writes it, with thresholds that send the
  image to exit k (``NEVER`` before k, ``ALWAYS`` from k on), for every k;
* the same call at several confidence thresholds (``[t] * (K - 1) + [0.0]``), one image per round from the embedded
  CIFAR-10 sample (CIFAR models) or random images, next to the MACs it spent.

Tables give the median and 95th-percentile latency, each exit's share of the full forward's MACs (fvcore cascade:
stages and heads 1..k) and its share of the full forward's time; at a threshold, where images leave at different
exits, the mean time over the mean time of the full forward, next to the mean MACs share. Time shares and the
early-exit overhead are medians of each round's ratio (``paired_ratio``): a change in the machine's speed during the
run touches both sides alike. Weights: shipped
ones for the ``.c10`` models, random for the others (timings hold, exits at a threshold do not). ``--clock cpu``
times with the process's CPU time, which time slices lost to other processes do not inflate (one thread).

``onnx_timers`` exports the model's stages (``dynzoo.export``) and times ONNX Runtime's runner next to PyTorch, when
the export and onnxruntime are there (``pip install dynzoo[export]``); otherwise a note says why it was skipped
(``--onnx off`` skips it always).

    python benchmarks/latency.py --clock cpu
"""
import argparse
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import dynzoo
from dynzoo.data import cifar_dataset
from dynzoo.evaluate import eval_transform
from dynzoo.inference import ALWAYS, NEVER

MODELS = ('msdnet_cifar_b7.c10', 'scan_resnet18.c10', 'msdnet_step4@224')
CLOCKS = dict(wall=time.perf_counter, cpu=time.process_time)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        help='NAME or NAME@SIZE (square input); a tagged name loads its shipped weights')
    parser.add_argument('--repeats', type=int, default=200, help='rounds per model')
    parser.add_argument('--thresholds', type=float, nargs='+', default=[0.5, 0.8, 0.9, 0.99])
    parser.add_argument('--images', type=int, default=50, help='images cycled through for the threshold rows')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall')
    parser.add_argument('--onnx', choices=('auto', 'off'), default='auto',
                        help='auto: also time the ONNX Runtime runner when dynzoo.export is importable')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


def load(spec: str):
    """The model (eval mode) and a stack of single images for ``NAME`` or ``NAME@SIZE``."""
    name, _, size = spec.partition('@')
    model = dynzoo.create_model(name, pretrained='.' in name).eval()
    input_size = (model.in_chans, int(size), int(size)) if size else tuple(model.pretrained_cfg['input_size'])
    return model, input_size


def sample_images(model, input_size, count: int, seed: int) -> torch.Tensor:
    """``count`` images of ``input_size``, normalised: the embedded CIFAR-10 sample where it fits, else noise."""
    if input_size[1:] == (32, 32):
        data = cifar_dataset('test', source='sample', transform=eval_transform(model))
        return torch.stack([data[i][0] for i in range(min(count, len(data)))])
    return torch.randn(count, *input_size, generator=torch.Generator().manual_seed(seed))


def onnx_timers(model, input_size, note: List[str]) -> Optional[Dict[str, Callable]]:
    """Callables that time ONNX Runtime on the exported stages of ``model``, or None (with the reason in ``note``).

    ``to_exits(x)`` returns the clock at each exit of one pass over the stages; ``early_exit(x, thresholds)`` runs
    ``dynzoo.export.OnnxEarlyExit``'s batch early exit.
    """
    try:
        from dynzoo import export
    except ImportError as error:
        note.append(f'ONNX Runtime not timed: dynzoo.export is not importable ({error})')
        return None
    folder = tempfile.mkdtemp(prefix='dynzoo_latency_')
    try:
        export.export_stages(model, folder, input_size=input_size, force=True)
        runner = export.OnnxEarlyExit(folder, threads=1)
    except Exception as error:  # an export branch in flux must not stop the PyTorch timings
        note.append(f'ONNX Runtime not timed: export failed ({type(error).__name__}: {error})')
        return None

    def to_exits(x):
        state, stamps = [x], []
        for k in range(runner.num_exits):
            state, _ = runner.run_stage(k, state)
            stamps.append(clock())
        return stamps

    return dict(to_exits=to_exits, early_exit=lambda x, thresholds: runner(x, thresholds))


def forced(num_exits: int, k: int) -> List[float]:
    """Thresholds that send every sample to exit k."""
    return [NEVER] * k + [ALWAYS] * (num_exits - k)


def measure(model, images: torch.Tensor, thresholds: List[float], repeats: int, ort: Optional[Dict]):
    """Seconds per round of every timed variant: {name: list}; plus the exits taken at each threshold."""
    num_exits = model.num_exits
    x = images[:1]
    x_np = x.numpy()
    times: Dict = {}
    exits: Dict = {t: [] for t in thresholds}

    def record(key, seconds):
        times.setdefault(key, []).append(seconds)

    def exit_stamps():
        with torch.no_grad():
            start, stamps = clock(), []
            for _ in model.iter_exits(x):
                stamps.append(clock())
        return start, stamps

    def round_(i):
        start = clock()
        with torch.no_grad():
            model(x)
        record('full', clock() - start)
        start, stamps = exit_stamps()
        for k, stamp in enumerate(stamps):
            record(('iter', k), stamp - start)
        for k in range(num_exits):
            start = clock()
            dynzoo.early_exit(model, x, thresholds=forced(num_exits, k))
            record(('early', k), clock() - start)
        image = images[i % len(images)][None]
        for t in thresholds:
            start = clock()
            result = dynzoo.early_exit(model, image, thresholds=[t] * (num_exits - 1) + [0.0])
            record(('threshold', t), clock() - start)
            exits[t].append(result.exits.item())
        if ort is not None:
            start = clock()
            stamps = ort['to_exits'](x_np)
            for k, stamp in enumerate(stamps):
                record(('ort iter', k), stamp - start)
            for k in range(num_exits):
                start = clock()
                ort['early_exit'](x_np, forced(num_exits, k))
                record(('ort early', k), clock() - start)

    round_(0)  # warm-up
    times.clear()
    for t in exits:
        exits[t].clear()
    for i in range(repeats):
        round_(i)
    return times, exits


def ms(seconds) -> str:
    return f'{np.median(seconds) * 1e3:.2f} / {np.percentile(seconds, 95) * 1e3:.2f}'


def paired_ratio(numerator, denominator) -> float:
    """Median over rounds of one round's ratio: a change in the machine's speed during the run touches both."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def report(spec, model, input_size, macs, times, exits, ort: bool):
    print(f'\n### {spec} ({"x".join(map(str, input_size))}, {macs[-1] / 1e6:.1f} MMACs)\n')
    print(f'full forward `model(x)`: {ms(times["full"])} ms (median / p95)\n')
    header = ('| exit | MACs share | `iter_exits` to exit (ms) | time share | time / MACs share | `early_exit` (ms) | '
              'early_exit / iter_exits |')
    rule = '|---|---|---|---|---|---|---|'
    if ort:
        header += ' ORT to exit (ms) | ORT early exit (ms) |'
        rule += '---|---|'
    print(header)
    print(rule)
    for k in range(model.num_exits):
        share = macs[k] / macs[-1]
        time_share = paired_ratio(times[('iter', k)], times['full'])
        row = (f'| {k + 1} | {share:.3f} | {ms(times[("iter", k)])} | {time_share:.3f} | '
               f'{time_share / share:.2f} | {ms(times[("early", k)])} | '
               f'{paired_ratio(times[("early", k)], times[("iter", k)]):.3f} |')
        if ort:
            row += f' {ms(times[("ort iter", k)])} | {ms(times[("ort early", k)])} |'
        print(row)
    print('\n| threshold | mean MACs share | mean time share | `early_exit` (ms) | exit fractions |')
    print('|---|---|---|---|---|')
    for t, taken in exits.items():
        taken = np.asarray(taken)
        mean_macs = float(np.mean(np.asarray(macs)[taken])) / macs[-1]
        fractions = np.bincount(taken, minlength=model.num_exits) / len(taken)
        print(f'| {t:g} | {mean_macs:.3f} | {np.mean(times[("threshold", t)]) / np.mean(times["full"]):.3f} | '
              f'{ms(times[("threshold", t)])} | {" ".join(f"{f:.2f}" for f in fractions)} |')


clock = CLOCKS['wall']


def main():
    global clock
    args = parse_args()
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    print(f'batch 1, 1 thread, {args.clock} clock, {args.repeats} interleaved rounds per model; times are median / '
          f'95th percentile; torch {torch.__version__}')
    for spec in args.models:
        torch.manual_seed(args.seed)
        model, input_size = load(spec)
        macs = dynzoo.per_exit_macs(model, input_size=input_size, scope='cascade')
        images = sample_images(model, input_size, args.images, args.seed)
        notes: List[str] = []
        ort = onnx_timers(model, input_size, notes) if args.onnx == 'auto' else None
        times, exits = measure(model, images, args.thresholds, args.repeats, ort)
        report(spec, model, input_size, macs, times, exits, ort is not None)
        for note in notes:
            print(f'\n{note}')


if __name__ == '__main__':
    main()
