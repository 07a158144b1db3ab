"""Training throughput (images/s) of a dynzoo model: plain fp32 against bf16 autocast, channels-last and
torch.compile, one run.

    python benchmarks/train_throughput.py --model msdnet_cifar_b7 --batch-size 64 --steps 10 [--compile]

Each setting runs the trainer's own step (``dynzoo.train.TrainStep``: forward, the family's loss, backward, SGD) on
random CIFAR-sized batches, after ``--warmup`` untimed steps; the table gives the median over ``--repeats`` timings.
``--compile`` adds the bf16 settings with the step compiled as ``dynzoo.train --compile`` does (the compile time,
minutes on a CPU, is reported apart and not timed).
"""
import argparse
import statistics
import time
from typing import Tuple

import torch

import dynzoo
from dynzoo.train import DEFAULTS, TrainStep, build_loss

SETTINGS = [('fp32', 'none', False, False), ('fp32 + channels-last', 'none', True, False),
            ('bf16', 'bf16', False, False), ('bf16 + channels-last', 'bf16', True, False)]
COMPILED = [('bf16 + compile', 'bf16', False, True), ('bf16 + channels-last + compile', 'bf16', True, True)]


def measure(model_name: str, amp: str, channels_last: bool, compiled: bool, batch_size: int, steps: int,
            warmup: int, repeats: int) -> Tuple[float, float]:
    """(images/s, seconds spent in the warm-up steps, which include compiling)."""
    torch.manual_seed(0)
    model = dynzoo.create_model(model_name, num_classes=10)
    step = TrainStep(model, build_loss(model, model_name, dict(DEFAULTS, label_smoothing=0.1))).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    step.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(step) if compiled else step
    images = torch.randn(batch_size, *model.default_input_size).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (batch_size,))
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp == 'bf16')

    def run(n: int) -> None:
        for _ in range(n):
            with autocast:
                loss = forward(images, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    start = time.perf_counter()
    run(warmup)
    warmup_time = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        timings.append(time.perf_counter() - start)
    return batch_size * steps / statistics.median(timings), warmup_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='msdnet_cifar_b7')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--compile', action='store_true', help='also the bf16 settings under torch.compile')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'{args.model}, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}')
    baseline = None
    print('| setting | images/s | vs fp32 | warm-up s |\n|---|---:|---:|---:|')
    for label, amp, channels_last, compiled in SETTINGS + (COMPILED if args.compile else []):
        rate, warmup_time = measure(args.model, amp, channels_last, compiled, args.batch_size, args.steps,
                                    args.warmup, args.repeats)
        baseline = baseline or rate
        print(f'| {label} | {rate:.1f} | {rate / baseline:.2f}x | {warmup_time:.0f} |', flush=True)


if __name__ == '__main__':
    main()
