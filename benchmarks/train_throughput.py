"""Training throughput (images/s) of a dynzoo model: plain fp32 against bf16 autocast and channels-last, one run.

    python benchmarks/train_throughput.py --model msdnet_cifar_b7 --batch-size 64 --steps 10

Each setting runs the trainer's own step (``dynzoo.train.TrainStep``: forward, the family's loss, backward, SGD) on
random CIFAR-sized batches, after ``--warmup`` untimed steps; the table gives the median over ``--repeats`` timings.
"""
import argparse
import statistics
import time

import torch

import dynzoo
from dynzoo.train import DEFAULTS, TrainStep, build_loss

SETTINGS = [('fp32', 'none', False), ('fp32 + channels-last', 'none', True), ('bf16', 'bf16', False),
            ('bf16 + channels-last', 'bf16', True)]


def measure(model_name: str, amp: str, channels_last: bool, batch_size: int, steps: int, warmup: int,
            repeats: int) -> float:
    torch.manual_seed(0)
    model = dynzoo.create_model(model_name, num_classes=10)
    step = TrainStep(model, build_loss(model, model_name, dict(DEFAULTS, label_smoothing=0.1))).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    step.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, *model.default_input_size).contiguous(memory_format=memory_format)
    target = torch.randint(0, 10, (batch_size,))
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp == 'bf16')

    def run(n: int) -> None:
        for _ in range(n):
            with autocast:
                loss = step(images, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(warmup)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        timings.append(time.perf_counter() - start)
    return batch_size * steps / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='msdnet_cifar_b7')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f'{args.model}, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}')
    baseline = None
    print('| setting | images/s | vs fp32 |\n|---|---:|---:|')
    for label, amp, channels_last in SETTINGS:
        rate = measure(args.model, amp, channels_last, args.batch_size, args.steps, args.warmup, args.repeats)
        baseline = baseline or rate
        print(f'| {label} | {rate:.1f} | {rate / baseline:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
