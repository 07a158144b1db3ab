"""``python -m dynzoo.train ...``: as ``dynzoo train ...`` (``dynzoo.cli.train``)."""
from ..cli.train import main

raise SystemExit(main())
