"""Peak training memory and step time of DenseNet-BC, memory-efficient vs plain.

Run ``python benchmarks/densenet_memory.py``.

Rows: the CIFAR DenseNet-BC models (depth 100 k12, 190 k40, 250 k24; dynzoo plain and memory-efficient) and
``densenet_bc_121`` against torchvision's ``densenet121`` (plain and its own ``memory_efficient=True``). Every
measurement runs in a fresh Python process (this script with ``--worker``), so allocator caches and earlier peaks do
not leak between rows. One training step is forward, cross-entropy, backward (model in train mode, no optimizer).

Memory is the peak of the bytes allocated during the step that are live at once (activations, weight gradients,
temporaries; not the weights and input allocated before it): on CUDA from ``torch.cuda.max_memory_allocated``, on CPU
from ``torch.profiler`` with ``profile_memory=True``, summing each op's own (self) allocations in start order. The
CPU table also lists the growth of the process's peak resident set (``ru_maxrss``), which adds allocator slack and
fragmentation. Time is the median of ``--steps`` unprofiled steps after the measured one.
Prints a table and saves a PNG of memory vs depth (``--plot``).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CIFAR_MODELS = (('densenet_bc_100_k12', 100, 12), ('densenet_bc_190_k40', 190, 40), ('densenet_bc_250_k24', 250, 24))
IMPLS = ('plain', 'efficient')


def _current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _build(source: str, name: str, efficient: bool):
    if source == 'torchvision':
        import torchvision
        return torchvision.models.densenet121(weights=None, memory_efficient=efficient)
    import dynzoo
    return dynzoo.create_model(name, memory_efficient=efficient)


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(args.source, args.model, args.impl == 'efficient').to(device).train()
    num_classes = model.classifier.out_features
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, num_classes, (args.batch,), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
        rss = float('nan')
    else:
        from torch.profiler import ProfilerActivity, profile
        before = _current_rss_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        live = peak = 0
        for event in sorted(prof.profiler.function_events, key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {'peak_mib': peak / 2 ** 20, 'rss_mib': rss / 2 ** 20, 'step_s': statistics.median(times)}


def measure(source: str, model: str, impl: str, batch: int, size: int, cfg) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--source', source, '--model', model,
           '--impl', impl, '--batch', str(batch), '--size', str(size), '--steps', str(cfg.steps),
           '--threads', str(cfg.threads), '--device', cfg.device]
    env = {**os.environ, 'OMP_NUM_THREADS': str(cfg.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f'measurement {source} {model} {impl} failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for impl, marker in zip(IMPLS, 'os'):
        points = sorted((r['depth'], r['peak_mib'], r['k']) for r in rows if r['cifar'] and r['impl'] == impl)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=f'dynzoo {impl}')
        for depth, mib, k in points:
            ax.annotate(f'k={k}', (depth, mib), textcoords='offset points', xytext=(4, 4), fontsize=8)
    batch = next(r['batch'] for r in rows if r['cifar'])
    ax.set(xlabel='depth', ylabel='peak training memory (MiB)', title=f'CIFAR DenseNet-BC, batch {batch}, 32x32')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=16, help='CIFAR batch size (32x32)')
    parser.add_argument('--imagenet-batch', type=int, default=8, help='densenet_bc_121 batch size')
    parser.add_argument('--imagenet-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per measurement (after the measured one)')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--plot', default='densenet_memory.png')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--source', default='dynzoo', help=argparse.SUPPRESS)
    parser.add_argument('--model', help=argparse.SUPPRESS)
    parser.add_argument('--impl', choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument('--size', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    jobs = [('dynzoo', name, impl, args.batch, 32, depth, k) for name, depth, k in CIFAR_MODELS for impl in IMPLS]
    jobs += [(source, 'densenet_bc_121', impl, args.imagenet_batch, args.imagenet_size, 121, 32)
             for source in ('dynzoo', 'torchvision') for impl in IMPLS]
    for source, name, impl, batch, size, depth, k in jobs:
        result = measure(source, name, impl, batch, size, args)
        rows.append(dict(source=source, model=name, impl=impl, batch=batch, size=size, depth=depth, k=k,
                         cifar=size == 32, **result))
        print(f'  measured {source} {name} {impl}: {result["peak_mib"]:.0f} MiB, {result["step_s"]:.2f} s', flush=True)

    plain = {(r['source'], r['model']): r for r in rows if r['impl'] == 'plain'}
    print(f'\nDenseNet-BC training step on {args.device} ({args.threads} thread(s)), peak memory above weights + input')
    print('| model | implementation | batch | peak MiB | vs plain | peak RSS growth MiB | step s | time vs plain |')
    print('|---|---|---|---:|---:|---:|---:|---:|')
    for r in rows:
        base = plain[r['source'], r['model']]
        print(f'| {r["model"]} {r["size"]}x{r["size"]} | {r["source"]} {r["impl"]} | {r["batch"]} | '
              f'{r["peak_mib"]:.0f} | {r["peak_mib"] / base["peak_mib"]:.2f} | {r["rss_mib"]:.0f} | '
              f'{r["step_s"]:.2f} | {r["step_s"] / base["step_s"]:.2f} |')
    plot(rows, args.plot)
    print(f'\nsaved {args.plot}')


if __name__ == '__main__':
    main()
