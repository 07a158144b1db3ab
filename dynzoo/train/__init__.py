"""Train dynzoo models: the authors' recipes per family, a fast CIFAR recipe, one process or many (``torchrun``).

    python -m dynzoo.train --model msdnet_cifar_b7 --dataset cifar10 --data-path cifar10_jpeg.npz --output runs/b7
    torchrun --nproc_per_node 2 -m dynzoo.train ...   # DistributedDataParallel: gloo on CPU, nccl on GPU

* Presets (``--preset``, default the model family's authors' recipe, ``dynzoo.families``) set the optimizer,
  learning-rate schedule, epochs, global batch, weight decay, augmentation and loss; every preset value can be
  overridden on the command line. ``fast_cifar`` is dynzoo's short recipe for CPU training (cosine with warm-up,
  label smoothing, bf16). ``recipe``: the configuration and the loss.
* The loss follows the family: summed multi-exit cross-entropy for networks with several exits (MSDNet, the
  multi-classifier baselines), ``dynzoo.losses.SCANLoss`` / ``BYOTLoss`` for SCAN / Self-Distillation, plain
  cross-entropy for single-exit networks (DenseNet-BC; SDPoint samples its instance per batch itself in train mode).
* ``--batch-size`` is the *global* batch: each of N processes takes one contiguous N-th of every global batch, so a
  run gives the same batches, and without batch-dependent layers the same updates, on any number of processes
  (``datasets.GlobalBatchSampler``; the process group: ``distributed``, through timm).
* Every epoch, rank 0 writes the full resume state ``last.pth`` atomically (model, EMA, loss, optimizer, scheduler,
  every rank's RNG states, epoch; ``dynzoo.train_state``) and, with ``--compact-dir``, a compact copy small enough to
  commit between sessions. ``--resume`` continues from the full state (exactly) or else the compact one (same
  schedule, same epoch); a killed run loses at most the epoch in progress. ``--stop-after-epochs N`` ends this
  invocation after N epochs, resumable, for runs that span several sittings.
* ``--model-ema`` keeps an exponential moving average of the weights (``timm.utils.ModelEmaV3``), validated beside
  the model every epoch; the export takes whichever has the higher mean top-1 over the exits.
* ``log.json`` records the run; at the end the model is exported Hub-ready (``dynzoo.hub.save_pretrained``) with its
  per-exit validation accuracy; SDPoint networks first get batch-norm statistics re-estimated per instance and every
  instance evaluated (``dynzoo.sdpoint``), as their authors do. ``trainer``: setup, resume, epoch, validation, export.
* The command line (``dynzoo.cli.train``) adds ``--retain-freed-memory``: the process keeps freed memory for reuse
  instead of page-faulting every step's activations anew on CPU.
"""
from .._moved import moved_attribute
from ..train_state import save_checkpoint
from .datasets import GlobalBatchSampler, build_datasets
from .recipe import DEFAULTS, PRESETS, TrainStep, auto_preset, build_loss, resolve_config
from .trainer import Trainer, evaluate, run_train

__all__ = ['PRESETS', 'DEFAULTS', 'GlobalBatchSampler', 'resolve_config', 'auto_preset', 'build_loss', 'TrainStep',
           'build_datasets', 'evaluate', 'Trainer', 'run_train', 'save_checkpoint']

# The command-line parts moved to dynzoo.cli.train.
_MOVED = {'add_train_args': 'dynzoo.cli.train', 'main': 'dynzoo.cli.train'}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)
