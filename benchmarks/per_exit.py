"""Per-exit cost table: ``python benchmarks/per_exit.py msdnet_step4 msdnet_cifar_b7 ...``.

For each model, one row per exit: cumulative parameters and multiply-adds (fvcore, conv + linear) for the cascade,
standalone and lazy scopes, and the authors' own count where one exists. Same as ``dynzoo bench``.
"""
import sys

from dynzoo.cli import main

if __name__ == '__main__':
    raise SystemExit(main(['bench', *sys.argv[1:]]))
