"""``dynzoo weights``: every pretrained tag, its source, accuracy and size, and whether it is cached here."""
import huggingface_hub

from ..pretrained import cache_dir, weights_table

__all__ = ['add_weights_args', 'run_weights']


def add_weights_args(parser) -> None:
    """``dynzoo weights [PATTERN]``."""
    parser.add_argument('pattern', nargs='?', default='*', help="wildcard on the names, e.g. 'msdnet_step*'")


def run_weights(args) -> int:
    """Handler of ``dynzoo weights``: prints the table of every pretrained tag."""
    rows = weights_table(args.pattern)
    if not rows:
        print(f'no pretrained tag matches {args.pattern!r}')
        return 0
    columns = ('name', 'top1', 'accuracy', 'size', 'cached', 'source')
    headers = dict(name='weights', top1='top-1 % per exit', accuracy='accuracy', size='size', cached='cached here',
                   source='source')
    widths = {c: max(len(headers[c]), *(len(r[c]) for r in rows)) for c in columns}
    print('  '.join(headers[c].ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print('  '.join(row[c].ljust(widths[c]) for c in columns).rstrip())
    print(f'cache: {cache_dir()} (URL and file-only weights); Hugging Face cache: '
          f'{huggingface_hub.constants.HF_HUB_CACHE}')
    return 0
