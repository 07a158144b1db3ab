"""SDPoint instances: per-instance batch-norm recalibration, evaluation, MACs, and the choice of one under a budget.

The networks live in ``dynzoo.models.sdpoint`` (``sdpoint_resnet50``, ``sdpoint_preresnet101``, ...); the trainer,
``dynzoo.hub``'s model cards and the command line take every per-instance step from here.
"""
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .evaluate import topk_correct
from .flops import CONV_LINEAR_OPS, _deprecated, _eval_mode, _example_input, count_macs
from .models.sdpoint import Instance, SDPointResNet

__all__ = ['recalibrate_bn', 'evaluate_instances', 'instance_macs', 'instance_flops', 'instance_rows',
           'select_instance']


def _require_sdpoint(model) -> None:
    if not isinstance(model, SDPointResNet):
        raise TypeError(f'{type(model).__name__} is not an SDPoint network (build one with '
                        f'dynzoo.create_model("sdpoint_resnet50") or another sdpoint_* name)')


@torch.no_grad()
def recalibrate_bn(model: SDPointResNet, loader: Iterable, instances: Optional[Sequence] = None,
                   num_batches: Optional[int] = 100) -> SDPointResNet:
    """Estimate batch-norm statistics for each instance and store them in ``model``.

    For every instance (default: all of ``model.instances()``), every BN layer's running statistics are reset and
    re-estimated as a cumulative average (BN ``momentum=None``) over the first ``num_batches`` batches of ``loader``
    (``None``: all of it) run in train mode with that instance, then stored with ``model.store_bn_stats``. From then on
    ``model(x, instance=...)`` in eval mode uses them, and they are saved and loaded with the ``state_dict``. The
    model's shared running statistics, BN momenta and train/eval mode are restored afterwards.

    ``loader`` yields image batches or ``(images, ...)`` tuples (labels are ignored); use training images with the
    training transforms as the authors do, or held-out images with the eval transforms.

    The authors instead re-run the whole training set before evaluating each instance, updating the shared statistics
    as an EMA (momentum 0.1) that starts from the previous instance's statistics, and store nothing.
    """
    _require_sdpoint(model)
    instances = model.instances() if instances is None else [model.check_instance(i) for i in instances]
    layers = model.bn_layers()
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(), bn.momentum)
             for bn in layers]
    param = next(model.parameters())
    was_training = model.training
    model.train()
    try:
        for instance in instances:
            for bn in layers:
                bn.reset_running_stats()
                bn.momentum = None
            seen = 0
            for batch in loader:
                if num_batches is not None and seen >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device=param.device, dtype=param.dtype), instance=instance)
                seen += 1
            if seen == 0:
                raise ValueError('recalibrate_bn got an empty loader: pass a loader that yields image batches')
            model.store_bn_stats(instance)
    finally:
        for bn, (mean, var, count, momentum) in zip(layers, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
            bn.momentum = momentum
        model.train(was_training)
    return model


@torch.no_grad()
def evaluate_instances(model: SDPointResNet, loader: Iterable, instances: Optional[Sequence] = None
                       ) -> Dict[str, float]:
    """Top-1 (%) of every instance (default: all of ``model.instances()``), ``{instance name: accuracy}``, in one
    pass over ``loader``'s ``(images, labels)`` batches, in eval mode."""
    _require_sdpoint(model)
    instances = model.instances() if instances is None else [model.check_instance(i) for i in instances]
    model.eval()
    device = next(model.parameters()).device
    correct, total = [0] * len(instances), 0
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        for i, instance in enumerate(instances):
            correct[i] += topk_correct(model(images, instance=instance), target)[0]
        total += len(target)
    if total == 0:
        raise ValueError('evaluate_instances got an empty loader')
    return {instance.name: 100.0 * c / total for instance, c in zip(instances, correct)}


class _InstanceGraph(nn.Module):
    """``forward(x)`` runs one instance, so that fvcore can trace it."""

    def __init__(self, model: SDPointResNet, instance: Instance):
        super().__init__()
        self.model, self.instance = model, instance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, instance=self.instance)


def instance_macs(model: SDPointResNet, input_size: Optional[Sequence[int]] = None,
                  instances: Optional[Sequence] = None,
                  ops: Optional[Sequence[str]] = CONV_LINEAR_OPS) -> Dict[Instance, int]:
    """fvcore multiply-adds (MACs) of one image per instance, as ``{instance: count}`` in ``model.instances()`` order.

    ``input_size`` defaults to the model's ``pretrained_cfg['input_size']``; ``instances`` to all of them. By
    default convolutions and linear layers only, as ``dynzoo.per_exit_macs``; ``ops=None`` keeps fvcore's default
    count (also batch norm and adaptive average pooling), which is what the SDPoint spec tabulates. The authors'
    ``utils/flops.py`` counts about twice these numbers (2 FLOPs per multiply-add, plus ReLU, pooling and residual
    adds).
    """
    _require_sdpoint(model)
    x = _example_input(model, input_size)
    instances = model.instances() if instances is None else [model.check_instance(i) for i in instances]
    with _eval_mode(model):
        return {instance: count_macs(_InstanceGraph(model, instance), x, ops=ops) for instance in instances}


def instance_flops(model: SDPointResNet, input_size: Optional[Sequence[int]] = None,
                   instances: Optional[Sequence] = None, ops: Optional[Sequence[str]] = None) -> Dict[Instance, int]:
    """Deprecated: ``instance_macs``. Keeps its old default, fvcore's full count (``ops=None``), where
    ``instance_macs`` counts convolutions and linear layers only, as ``per_exit_macs``."""
    _deprecated('instance_flops', 'instance_macs', note='; instance_macs counts conv + linear only by default, as '
                'per_exit_macs: pass ops=None for the count instance_flops gave')
    return instance_macs(model, input_size, instances, ops)


def instance_rows(model: SDPointResNet, per_instance_accuracy: Mapping[str, float]) -> List[Dict[str, Any]]:
    """``[{instance, macs, top1}]`` for the instances named in ``per_instance_accuracy``, in ``model.instances()``
    order, with their ``instance_macs`` (what a model card tabulates)."""
    macs = instance_macs(model)
    unknown = set(per_instance_accuracy) - {instance.name for instance in macs}
    if unknown:
        raise ValueError(f'per_instance_accuracy names instances the model does not have: {sorted(unknown)}')
    return [dict(instance=instance.name, macs=count, top1=float(per_instance_accuracy[instance.name]))
            for instance, count in macs.items() if instance.name in per_instance_accuracy]


def _as_instance(key) -> Instance:
    return Instance.from_name(key) if isinstance(key, str) else Instance(*key)


def select_instance(macs: Union[Mapping, SDPointResNet], budget: float,
                    accuracy: Optional[Mapping] = None) -> Instance:
    """The instance to run under a cost ``budget`` (same unit as ``macs``).

    ``macs`` is ``instance_macs(model)`` (or the model itself, which computes it). Without ``accuracy``, the most
    expensive instance that fits (cost is the only accuracy proxy, and it is not monotone in the point); with
    ``accuracy`` (``{instance: accuracy}`` from an evaluation, instances absent from it are skipped; keys may be
    ``Instance``/``(point, ratio)`` or names such as ``'p8_r050'``, as in a model card), the most accurate
    instance that fits, the cheaper one on ties. Raises a ``ValueError`` naming the cheapest instance if none fits.
    """
    if isinstance(macs, nn.Module):
        macs = instance_macs(macs)
    macs = {_as_instance(k): v for k, v in macs.items()}
    if accuracy is not None:
        accuracy = {_as_instance(k): v for k, v in accuracy.items()}
        unknown = accuracy.keys() - macs.keys()
        if unknown:
            raise ValueError(f'accuracy lists instances without a MACs count: {sorted(unknown, key=str)[:5]}')
    candidates = [i for i in macs if macs[i] <= budget and (accuracy is None or i in accuracy)]
    if not candidates:
        cheapest = min(macs, key=macs.get)
        raise ValueError(f'no instance fits a budget of {budget:,}: the cheapest is {tuple(cheapest)} at '
                         f'{macs[cheapest]:,}')
    if accuracy is None:
        return max(candidates, key=lambda i: macs[i])
    return max(candidates, key=lambda i: (accuracy[i], -macs[i]))
