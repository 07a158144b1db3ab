"""Deprecated aliases of names that moved to another module (PEP 562 module ``__getattr__``)."""
import importlib
import warnings
from typing import Any, Mapping


def moved_attribute(module: str, name: str, moved: Mapping[str, str]) -> Any:
    """``name`` of ``moved[name]``, with a ``DeprecationWarning``; an ``AttributeError`` for names that never were
    in ``module``. The new module is imported on first use only."""
    if name not in moved:
        raise AttributeError(f'module {module!r} has no attribute {name!r}')
    warnings.warn(f'{module}.{name} is deprecated: use {moved[name]}.{name}', DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(moved[name]), name)
