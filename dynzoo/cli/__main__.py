"""``python -m dynzoo.cli``: the ``dynzoo`` command."""
from . import main

raise SystemExit(main())
