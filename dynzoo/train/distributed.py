"""Processes of a run: the process group and the random states a resume restores."""
import random
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

__all__ = ['Distributed', 'rng_state', 'set_rng_state']


class Distributed:
    """The process group, set up by timm's ``init_distributed_device_so`` from ``torchrun``'s environment (nccl on
    GPU, gloo on CPU); a single process when not started by ``torchrun``."""

    def __init__(self, device: str = 'auto'):
        use_cuda = torch.cuda.is_available() and device != 'cpu'
        info = init_distributed_device_so(device='cuda' if use_cuda else 'cpu')
        self.world_size, self.rank, self.enabled = info['world_size'], info['global_rank'], info['distributed']
        self.device = torch.device(info['device'])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> List[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def rng_state() -> Dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state['state']['key'] = torch.from_numpy(numpy_state['state']['key'].astype(np.int64))
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    numpy_state = dict(state['numpy'])
    numpy_state['state'] = dict(numpy_state['state'], key=state['numpy']['state']['key'].numpy().astype(np.uint32))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
