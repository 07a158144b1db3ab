"""Per-exit cost table: ``python benchmarks/per_exit.py msdnet_step4 msdnet_cifar_b7 ...``.

For each model, one row per exit: cumulative parameters and multiply-adds (fvcore, conv + linear) for the cascade,
standalone and lazy scopes, and the authors' own FLOPs count where one exists.
"""
import argparse

import dynzoo
from dynzoo.flops import format_per_exit_table, per_exit_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='+', help='dynzoo model names')
    parser.add_argument('--num-classes', type=int, default=None)
    args = parser.parse_args()
    for name in args.models:
        model = dynzoo.create_model(name, num_classes=args.num_classes)
        size = 'x'.join(map(str, model.pretrained_cfg['input_size']))
        print(f'\n{name} ({model.num_classes} classes, input {size}, {model.num_exits} exits)')
        print(format_per_exit_table(per_exit_table(model)))


if __name__ == '__main__':
    main()
