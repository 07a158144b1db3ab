"""The input check every family runs first: a tensor in the model's dtype, or an error that says how to get one."""
import numpy as np
import torch
import torch.fx
from torch import nn

PREPROCESS_HINT = ('dynzoo.evaluate.eval_transform(model) turns PIL images into normalised float tensors; stack them '
                   'into an N x C x H x W batch')


_fx = torch.fx._symbolic_trace
_fx_tracing = getattr(_fx, 'is_fx_symbolic_tracing', _fx.is_fx_tracing)  # older torch has only the latter


def is_fx_tracing() -> bool:
    """Whether ``torch.fx`` symbolic tracing is recording the forward."""
    return _fx_tracing()


def is_recording() -> bool:
    """Whether ``torch.fx`` symbolic tracing, ``torch.jit.trace``, ``torch.compile`` or ``torch.export`` is recording
    the forward: the input is then a proxy or the example, and a check would only fail on proxies or add work to the
    graph."""
    return is_fx_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def checks_input(x) -> bool:
    """Whether a model should check ``x``: a real call, not a recording (``is_recording``) or an ``fx`` proxy.
    Call it behind ``if not torch.jit.is_scripting()``: TorchScript then compiles neither the check nor its
    messages."""
    return not isinstance(x, torch.fx.Proxy) and not is_recording()


def _autocast_casts(x: torch.Tensor) -> bool:
    device = x.device.type
    return (x.is_floating_point() and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device))


def _first_parameter(module: nn.Module):
    """``next(module.parameters(), None)`` without building ``named_modules``' generator (several microseconds on a
    deep network, paid on every forward)."""
    for param in module._parameters.values():
        if param is not None:
            return param
    for child in module._modules.values():
        param = None if child is None else _first_parameter(child)
        if param is not None:
            return param
    return None


def check_input_tensor(model: nn.Module, x) -> None:
    """Raise a ``TypeError`` that names the fix unless ``x`` is a tensor in the dtype of ``model``'s parameters:
    numpy arrays (``torch.from_numpy``), other non-tensors, and other dtypes (fp16, bf16 or fp64 into an fp32 model,
    uint8 images) fail inside torch's convolution code otherwise. Under ``torch.autocast`` any floating-point input
    passes: autocast casts it.

    Call it behind ``if not torch.jit.is_scripting()`` (TorchScript compiles neither branch then); it does nothing
    when ``checks_input(x)`` is false.
    """
    if not checks_input(x):
        return
    name = type(model).__name__
    if isinstance(x, np.ndarray):
        raise TypeError(f'{name} takes a torch.Tensor, got a numpy array: convert it with torch.from_numpy(x) (an '
                        f'N x C x H x W float batch, normalised as the model was trained; {PREPROCESS_HINT})')
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{name} takes a batch of images as a torch.Tensor (N x C x H x W), got '
                        f'{type(x).__name__}: {PREPROCESS_HINT}')
    param = _first_parameter(model)
    if param is None or x.dtype == param.dtype or _autocast_casts(x):
        return
    if x.is_floating_point():
        raise TypeError(f'{name} has {param.dtype} weights but the input is {x.dtype}: convert the input with '
                        f'x.to({param.dtype}) or the model with model.to({x.dtype}) (or run it under torch.autocast)')
    raise TypeError(f'{name} has {param.dtype} weights but the input is {x.dtype}: images must be float tensors, '
                    f'scaled and normalised as the model was trained (x.to({param.dtype}) / 255, then the '
                    f'normalisation; {PREPROCESS_HINT})')
