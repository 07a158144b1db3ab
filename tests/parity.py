"""The deterministic weights of the parity fixtures (``../shared/parity/README.md``), generated from a key list."""
import json
import math
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / 'fixtures'


def deterministic_state_dict(keys):
    """Weights for ``keys`` (a list of ``[name, shape, dtype]``): index i uses ``manual_seed(1000 + i)``, float64."""
    state = {}
    for i, (name, shape, dtype) in enumerate(keys):
        g = torch.Generator().manual_seed(1000 + i)
        if 'int' in dtype:
            state[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith('running_var'):
            state[name] = 0.75 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
        elif name.endswith('running_mean'):
            state[name] = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif len(shape) >= 2:
            state[name] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
        elif name.endswith('bias'):
            state[name] = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return state


def load_keys(family: str, fixture_id: str, suffix: str = 'keys'):
    return json.loads((FIXTURES / family / f'{fixture_id}.{suffix}.json').read_text())


def load_outputs(family: str, fixture_id: str):
    return dict(np.load(FIXTURES / family / f'{fixture_id}.npz'))


def load_manifest(family: str):
    return {entry['id']: entry for entry in json.loads((FIXTURES / family / 'manifest.json').read_text())}
