"""Inference-only speed-ups: fold eval-mode BatchNorm into the convolution that feeds it
(``fuse_conv_bn``), and on top of it apply the families' own inference rewrites and compute 1x1 convolutions as
matrix products (``optimize_for_inference``)."""
import copy
import inspect
from typing import Iterable, Iterator, Optional, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ['FoldedBatchNorm', 'FunctionalSequential', 'MatmulConv1x1', 'PointwiseConv', 'folded_batch_norms',
           'fuse_conv_bn', 'has_call_hooks', 'optimize_for_inference', 'pointwise_matmul']


class FoldedBatchNorm(nn.Identity):
    """Stands where a BatchNorm was folded into the preceding convolution (``folded`` of them, where convolutions
    were merged); refuses to run in training mode, where the fused model would silently train without batch
    statistics."""

    def __init__(self, num_features: int, folded: int = 1):
        super().__init__()
        self.num_features = num_features
        self.folded = folded

    def forward(self, x):
        if self.training:
            raise RuntimeError('this model had its BatchNorm folded into the convolutions by '
                               'dynzoo.models.fuse_conv_bn and is for inference only: call .eval(), or train the '
                               'unfused model')
        return x

    def extra_repr(self) -> str:
        return f'{self.num_features}, folded into the preceding conv' + (f' ({self.folded})' if self.folded > 1 else '')


def folded_batch_norms(model: nn.Module) -> int:
    """How many BatchNorms ``fuse_conv_bn`` (over every call, ``optimize_for_inference``'s included) folded into the
    convolutions of ``model``: the ``FoldedBatchNorm`` modules that stand in their place."""
    return sum(m.folded for m in model.modules() if isinstance(m, FoldedBatchNorm))


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (is_plain_conv(conv) and type(norm) is nn.BatchNorm2d and norm.track_running_stats
            and conv.out_channels == norm.num_features)


def _sequential_pairs(module: nn.Sequential) -> Iterator[Tuple[str, str]]:
    names = list(module._modules)
    yield from zip(names, names[1:])


def _traced_pairs(module: nn.Module) -> Iterator[Tuple[str, str]]:
    """(conv, norm) children of ``module`` whose traced ``forward`` computes ``norm(conv(x))`` with each called once
    and the conv output used by nothing else; none when ``forward`` takes more than the input or cannot be traced by
    ``torch.fx``."""
    children = dict(module.named_children())
    if not any(isinstance(c, nn.Conv2d) for c in children.values()):
        return
    if len(inspect.signature(module.forward).parameters) != 1:
        return  # a traced optional argument would take one branch of its ``is None`` tests for all calls
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow, generators...: leave this module's pairs alone
        return
    calls = [n.target for n in graph.nodes if n.op == 'call_module']
    for node in graph.nodes:
        source = node.args[0] if node.op == 'call_module' and node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == 'call_module' and len(source.users) == 1
                and source.target in children and node.target in children
                and calls.count(source.target) == 1 and calls.count(node.target) == 1):
            yield source.target, node.target


def _kept_norms(model: nn.Module) -> Set[int]:
    """Ids of the BatchNorms that a submodule's ``unfoldable_batch_norms()`` asks to keep."""
    return {id(norm) for module in model.modules() if callable(getattr(module, 'unfoldable_batch_norms', None))
            for norm in module.unfoldable_batch_norms()}


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that is applied straight to a ``Conv2d``'s output into that convolution
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``: the conv gains a bias, the BatchNorm becomes a ``FoldedBatchNorm``
    no-op). Outputs stay equal within float rounding; ``forward`` and ``iter_exits`` work as before, with one
    normalisation pass less per folded pair.

    A pair is folded when it is adjacent in an ``nn.Sequential`` (MSDNet's every conv, the stems, shortcuts and heads
    of the other families) or when ``torch.fx`` traces the parent's ``forward`` and shows ``norm(conv(x))`` with the
    conv output used nowhere else (the ``self.bn1(self.conv1(x))`` of residual blocks whose ``forward`` takes the
    input alone). Modules whose ``forward`` has more arguments (SDPoint's blocks) or cannot be traced (the networks'
    own ``forward_stage``), and pre-activation BN -> ReLU -> Conv (DenseNet) keep their BatchNorm. So do the
    BatchNorms a submodule lists in its ``unfoldable_batch_norms()``: an SDPoint network with stored per-instance
    statistics (``dynzoo.sdpoint.recalibrate_bn``) swaps them into its BatchNorms for each instance, so folding one
    set into the convs would be wrong for every other instance.

    The fused model is for inference only: its ``state_dict`` keys differ (no BatchNorm entries, conv biases), so
    save and load checkpoints with the unfused model, and it raises if run in training mode. ``model`` must be in
    eval mode; it is copied unless ``inplace``. ``folded_batch_norms(model)`` counts the folded pairs.
    """
    if any(m.training for m in model.modules()):
        raise ValueError('fuse_conv_bn folds the running statistics of eval-mode BatchNorm: call model.eval() first '
                         '(a fused model is for inference only)')
    if not inplace:
        model = copy.deepcopy(model)
    kept = _kept_norms(model)
    for module in list(model.modules()):
        pairs = _sequential_pairs(module) if isinstance(module, nn.Sequential) else _traced_pairs(module)
        for conv_name, norm_name in list(pairs):
            conv, norm = module._modules[conv_name], module._modules[norm_name]
            if _foldable(conv, norm) and id(norm) not in kept:
                module._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
                module._modules[norm_name] = FoldedBatchNorm(norm.num_features).eval()
    return model


def pointwise_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 stride-1 convolution of NCHW ``x`` with ``weight`` of shape ``(out_channels, in_channels)``, computed as
    one batched matrix product. bmm with the weight expanded over the batch reads a batch-strided view (MSDNet's
    feature maps grown in place) without copying it; torch.matmul, and oneDNN's convolution, would copy it first."""
    n, c, h, w = x.shape
    y = torch.bmm(weight.expand(n, -1, -1), x.reshape(n, c, h * w))  # not baddbmm, which fvcore does not count
    if bias is not None:
        y += bias[:, None]
    return y.view(n, weight.shape[0], h, w)


class MatmulConv1x1(nn.Conv2d):
    """An ``nn.Conv2d`` with a 1x1 kernel, stride 1 and no padding (same parameters and ``state_dict``) that, with
    autograd off and NCHW input, computes ``pointwise_matmul``: MSDNet's inference path, where its dense layers grow
    their feature maps in place (batch-strided views that a convolution would copy) and its 1x1 convolutions have
    few output channels, which oneDNN's NCHW convolution runs slowly on large maps. With autograd on (training),
    channels-last input or while ``torch.fx`` traces it is ``nn.Conv2d``. Outputs agree within float rounding."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pointwise_forward(x, self.weight, self.bias)

    def _pointwise_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if (torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy)
                or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())):
            return self._conv_forward(x, weight, bias)
        return pointwise_matmul(x, weight.flatten(1), bias)


def has_call_hooks(modules: Iterable[nn.Module], include_global: bool = True) -> bool:
    """Whether calling any of these modules does more than its ``forward`` (``Module._call_impl``): a forward or
    backward hook on it or (``include_global``) on every module, or a ``Module.compile()``."""
    if include_global and (_module._global_forward_pre_hooks or _module._global_forward_hooks
                           or _module._global_backward_pre_hooks or _module._global_backward_hooks):
        return True
    return any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
               or m._compiled_call_impl is not None for m in modules)


def _hooks_or_tracing(modules: nn.Sequential) -> bool:
    """Whether running these modules' ops directly would skip something their ``__call__`` does: a hook or
    ``Module.compile()`` (``has_call_hooks``), TorchScript tracing (which records module scopes) or torch.compile."""
    return torch._C._get_tracing_state() or torch.compiler.is_compiling() or has_call_hooks(modules)


class FunctionalSequential(nn.Sequential):
    """An ``nn.Sequential`` of conv / BatchNorm / ReLU layers (same ``state_dict`` as ``nn.Sequential``) that, with
    autograd off and no hooks or tracing, runs them as their functional ops instead of module calls.

    At batch 1 a small layer's module call costs about as much as its kernel, and MSDNet's first block runs dozens of
    conv - BN - ReLU triples on maps of a few channels. Here an ``nn.Conv2d`` runs as its ``_conv_forward``, an
    eval-mode ``nn.BatchNorm2d`` as ``torch.batch_norm`` with its running statistics, an ``nn.ReLU`` as
    ``torch.relu(_)``, dynzoo's own inference layers by their ``forward``, and any other layer (a subclass included)
    as a module call; the results are bit-identical to ``nn.Sequential``'s. Weights and statistics are read from the
    layers' ``_parameters`` and ``_buffers``, where ``nn.Module.__getattr__`` finds them (it costs 0.4 µs a lookup,
    several per layer); a subclass, such as a parametrized layer, is called as a module. With autograd on, with a hook on any layer (``msdnet_op_counter``, profilers), while
    TorchScript or ``torch.fx`` traces or torch.compile compiles, and for input that is not 4-D (which
    ``nn.BatchNorm2d`` refuses), it is ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a torch.fx Proxy: fx records module calls; not 4-D: nn.BatchNorm2d's check refuses it
        if torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy) or _hooks_or_tracing(self) or x.dim() != 4:
            return super().forward(x)
        for module in self:
            kind = type(module)
            if kind is nn.Conv2d:
                params = module._parameters
                x = module._conv_forward(x, params['weight'], params['bias'])
            elif kind is nn.BatchNorm2d and not module.training and module._buffers['running_mean'] is not None:
                params, buffers = module._parameters, module._buffers
                x = torch.batch_norm(x, params['weight'], params['bias'], buffers['running_mean'],
                                     buffers['running_var'], False, 0.0, module.eps, torch.backends.cudnn.enabled)
            elif kind is nn.ReLU:
                x = torch.relu_(x) if module.inplace else torch.relu(x)
            elif kind is MatmulConv1x1:
                params = module._parameters
                x = module._pointwise_forward(x, params['weight'], params['bias'])
            elif kind in (PointwiseConv, FoldedBatchNorm):
                x = module.forward(x)
            else:
                x = module(x)
        return x


def is_plain_conv(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` whose forward is the convolution (or ``MatmulConv1x1``'s same product),
    not a subclass that does something else."""
    return type(module) in (nn.Conv2d, MatmulConv1x1)


class PointwiseConv(nn.Module):
    """A 1x1, stride-1, ungrouped ``Conv2d`` computed as one batched matrix product on NCHW input.

    oneDNN's NCHW convolution reorders its whole input for every call, so 1x1 convolutions with few output channels
    on large maps (MSDNet's 6-channel bottlenecks on 32x32 maps) run at 1-2 GMAC/s on CPU, up to 6x slower than
    ``weight @ x`` per image. Channels-last input keeps the convolution, which is fast there. Same outputs within
    float rounding; the weight is stored as ``(out_channels, in_channels)``. While ``torch.fx`` traces it is the
    convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=conv.weight.requires_grad)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                requires_grad=conv.bias.requires_grad)

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
                and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1
                and module.padding_mode == 'zeros')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (isinstance(x, torch.fx.Proxy)
                or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())):
            return F.conv2d(x, self.weight[:, :, None, None], self.bias)
        return pointwise_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, bias={self.bias is not None}'


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``fuse_conv_bn``, then CPU speed-ups that keep every output within float rounding:

    - every submodule (not ``model`` itself) with an ``inference_form()`` method is replaced by what it returns, a
      family's own inference rewrite: MSDNet's dense layers become ``SharedBottleneckLayer`` (the 1x1 bottlenecks
      reading the same scale run as one conv);
    - every 1x1 stride-1 ``Conv2d`` becomes a ``PointwiseConv`` (a batched matrix product).

    ``benchmarks/early_exit.py`` measures what this gains over the model's own inference path. Like
    ``fuse_conv_bn``, the result is for inference only and has its own ``state_dict`` keys: keep checkpoints with
    the unfused model.
    """
    model = fuse_conv_bn(model, inplace=inplace)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if callable(getattr(child, 'inference_form', None)):
                setattr(module, name, child.inference_form())
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if PointwiseConv.applies_to(child):
                setattr(module, name, PointwiseConv(child))
    return model.eval()  # the new modules too
