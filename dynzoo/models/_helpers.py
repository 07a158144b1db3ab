"""Helpers shared by the model families: the model builder (dynzoo's pretrained sources, for timm.create_model too),
checkpoint checking and filtering, default configs (untagged default, weights released by others), init."""
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import timm
import torch
from timm.models import build_model_with_cfg, clean_state_dict, generate_default_cfgs
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet
from torch import nn


HUB_ORG = 'dynzoo'
# Hub folders of the weights shipped inside the package, found with no network.
PACKAGE_MIRROR = Path(__file__).resolve().parents[1] / 'weights'
AS_REPORTED = 'as reported by the authors, not re-measured here'
# Weights released by others: per-exit top-1 (%) as their authors report it, tag -> (dataset, accuracies).
REPORTED_TOP1: Dict[str, Tuple[str, Tuple[float, ...]]] = {}
# Weights released only as a file inside a web page or shared folder (no direct download): tag -> the file's name.
FILE_ONLY: Dict[str, str] = {}
# The entries of a training checkpoint that hold the weights, in timm's ``load_state_dict`` order of preference.
STATE_DICT_ENTRIES = ('state_dict_ema', 'model_ema', 'state_dict', 'model')


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model it is loaded into."""


def unwrap_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a plain state dict, or the entry of a training checkpoint that holds one, taken
    as timm's ``load_state_dict`` takes it (``state_dict_ema``, ``model_ema``, ``state_dict``, then ``model``: the
    authors' ``{'state_dict': ...}``, dynzoo's trainer's ``last.pth``), with the ``module.`` / ``_orig_mod.``
    prefixes of DataParallel, DDP and ``torch.compile`` removed by timm's ``clean_state_dict``."""
    if isinstance(checkpoint, dict):
        entry = next((k for k in STATE_DICT_ENTRIES if isinstance(checkpoint.get(k), dict)), None)
        checkpoint = checkpoint[entry] if entry else checkpoint
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f'expected a state dict (a dict of tensors, or a checkpoint dict with a "state_dict" or "model" entry '
            f'holding one), got a {type(checkpoint).__name__}: save model.state_dict()')
    not_tensors = [str(k) for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointMismatchError(
            f'expected a state dict (a dict of tensors), got a dict with {len(not_tensors)} entries that are not '
            f'tensors ({_short_list(not_tensors)}) and none of the entries {", ".join(STATE_DICT_ENTRIES)}: '
            'save model.state_dict()')
    return clean_state_dict(checkpoint)


def _kind(tensor: torch.Tensor) -> str:
    return ('bool' if tensor.dtype == torch.bool else 'complex' if tensor.is_complex()
            else 'floating-point' if tensor.is_floating_point() else 'integer')


def _short_list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def replaced_classifier_keys(model: nn.Module) -> Set[str]:
    """Classifier keys that timm drops on load because the model is built for another ``num_classes`` than its
    pretrained config (fine-tuning, or ``num_classes=0`` for features); empty when the class counts agree."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if cfg.get('num_classes') is None or getattr(model, 'num_classes', None) == cfg['num_classes']:
        return set()
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    return {f'{name}.{p}' for name in classifiers for p in ('weight', 'bias')}


def check_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Return ``state_dict`` if it fits ``model`` key for key and shape for shape; raise a clear error if not.

    BatchNorm ``num_batches_tracked`` counters that old (PyTorch < 0.4) checkpoints lack are filled from the model.
    Classifier weights of another class count are left out when the model is built for a different ``num_classes``
    than its pretrained config (timm then loads the rest and keeps the new heads freshly initialised, or none for
    ``num_classes=0``). A first convolution (the config's ``first_conv``) built for another ``in_chans`` may differ
    in its input channels: timm's loader adapts the pretrained filters to them. Integer or bool tensors where the
    model has floating-point ones (and the reverse) are refused: ``load_state_dict`` would cast them.
    """
    expected = model.state_dict()
    skip = {k for k in replaced_classifier_keys(model)
            if k in state_dict and (k not in expected or state_dict[k].shape != expected[k].shape)}
    expected = {k: v for k, v in expected.items() if k not in skip}
    state_dict = {k: v for k, v in state_dict.items() if k not in skip}
    adapted = {k for k in _first_conv_keys(model) if k in state_dict and k in expected
               and _other_in_chans(state_dict[k], expected[k])}
    for key, value in expected.items():
        if key.endswith('num_batches_tracked') and key not in state_dict:
            state_dict[key] = value.clone()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
        for k in expected.keys() & state_dict.keys() - adapted
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    wrong_kind = [f'{k}: checkpoint {state_dict[k].dtype} vs model {expected[k].dtype}'
                  for k in expected.keys() & state_dict.keys() if _kind(state_dict[k]) != _kind(expected[k])]
    if missing or unexpected or wrong_shape or wrong_kind:
        name = type(model).__name__
        problems = []
        if missing:
            problems.append(f'{len(missing)} missing key(s): {_short_list(missing)}')
        if unexpected:
            problems.append(f'{len(unexpected)} unexpected key(s): {_short_list(unexpected)}')
        if wrong_shape:
            problems.append(f'{len(wrong_shape)} shape mismatch(es): {"; ".join(sorted(wrong_shape)[:6])}')
        if wrong_kind:
            problems.append(f'{len(wrong_kind)} tensor(s) of another kind (integer, bool or floating point; loading '
                            f'would cast them silently): {"; ".join(sorted(wrong_kind)[:6])}')
        hint = ('Check that the checkpoint was trained for this architecture/configuration'
                + (' and pass the num_classes it was trained with' if any('linear' in s or 'fc' in s or 'classifier' in s
                                                                          for s in wrong_shape) else '')
                + '; if you only want the backbone, load it with strict=False yourself.')
        raise CheckpointMismatchError(f'checkpoint does not fit {name}: ' + '; '.join(problems) + '. ' + hint)
    return state_dict


def _first_conv_keys(model: nn.Module) -> Set[str]:
    first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') or ()
    return {f'{name}.weight' for name in ((first,) if isinstance(first, str) else first)}


def _other_in_chans(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether two conv weights differ in their input channels only (timm's ``adapt_input_conv`` case)."""
    return theirs.dim() == ours.dim() == 4 and theirs.shape[1] != ours.shape[1] and \
        theirs.shape[:1] + theirs.shape[2:] == ours.shape[:1] + ours.shape[2:]


def make_checkpoint_filter(convert: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict]] = None):
    """A timm ``pretrained_filter_fn``: unwrap, strip ``module.``, apply ``convert`` (family-specific renames), check."""

    def checkpoint_filter_fn(state_dict, model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict = unwrap_state_dict(state_dict)
        if convert is not None:
            state_dict = convert(state_dict, model)
        return check_state_dict(state_dict, model)

    return checkpoint_filter_fn


checkpoint_filter = make_checkpoint_filter()


def dynzoo_default_cfgs(cfgs: Dict[str, Dict[str, Any]],
                        reported_top1: Optional[Dict[str, Tuple[str, Sequence[float]]]] = None,
                        file_only: Optional[Dict[str, str]] = None) -> Dict:
    """timm's ``generate_default_cfgs`` for a family's ``{'arch.tag': cfg}``, the dynzoo way.

    * The untagged config is the default of each architecture that has one: timm makes the first tag with weights
      the default, so ``msdnet_cifar_b7`` would become its CIFAR-10 weights' 10-class config; in dynzoo the bare name
      keeps the architecture's own config (100 classes for the CIFAR models) and trained weights are asked for by
      tag (``msdnet_cifar_b7.c10``). The untagged configs go to timm last, as ``'arch.*'``, its mark for the default.
    * ``reported_top1`` (tag -> (dataset, per-exit top-1 %)) of weights released by others goes to
      ``REPORTED_TOP1`` and to the tag's ``description``, labelled as the authors' numbers; ``file_only`` (tag -> file
      name) records weights released only inside a web page or shared folder (``FILE_ONLY``; the cfg's
      ``origin_url`` is that page).
    """
    cfgs = dict(cfgs)
    for name, (dataset, top1) in (reported_top1 or {}).items():
        REPORTED_TOP1[name] = (dataset, tuple(top1))
        cfgs[name] = {**cfgs[name], 'description': (
            f'{dataset} top-1{" per exit" if len(top1) > 1 else ""} {" / ".join(f"{a:.2f}" for a in top1)} (%), '
            f'{AS_REPORTED}')}
    FILE_ONLY.update(file_only or {})
    tagged = {name: cfg for name, cfg in cfgs.items() if '.' in name}
    untagged = {f'{name}.*': cfg for name, cfg in cfgs.items() if '.' not in name}
    return generate_default_cfgs({**tagged, **untagged})


def _outside_libraries() -> int:
    """The ``stacklevel`` of the innermost caller outside dynzoo and timm, for a warning to point at the user's
    line, however many library frames lie between (``dynzoo.create_model`` or ``timm.create_model``)."""
    libraries = tuple(str(Path(module.__file__).parent) for module in (sys.modules['dynzoo'], timm))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(libraries):
        frame, level = frame.f_back, level + 1
    return level


def build_model(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, pretrained_cfg=None,
                pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg``, taking the weights from dynzoo's sources (``dynzoo.pretrained``).

    Every family builds through this, so ``timm.create_model(name, pretrained=True)`` (which calls the entry
    function with the name's tag as ``pretrained_cfg``) and ``dynzoo.create_model`` load the same weights the same
    way. A registered name is resolved with ``resolve_pretrained_source``, its URL being the fallback when its Hub
    repository cannot be read; a cfg dict (``hf-hub:`` and ``local-dir:`` names, whose config timm has read) is
    left to timm. Weights passed in memory are not kept in ``model.pretrained_cfg``.
    """

    if kwargs.get('features_only') and kwargs.get('feature_cls', 'getter') == 'getter':
        return _feature_getter(model_cls, variant, pretrained, pretrained_cfg, pretrained_cfg_overlay, **kwargs)

    if not pretrained and pretrained_cfg_overlay and any(
            pretrained_cfg_overlay.get(key) is not None for key in ('file', 'state_dict')):
        warnings.warn(f'{variant}: pretrained_cfg_overlay names weights, but pretrained=False, so they are not loaded '
                      '(timm loads an overlay\'s weights only with pretrained=True): pass pretrained=True',
                      UserWarning, stacklevel=_outside_libraries())

    def build(overlay):
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg,
                                    pretrained_cfg_overlay=overlay, **kwargs)

    if pretrained and (pretrained_cfg is None or isinstance(pretrained_cfg, str)):
        from ..pretrained import HUB_ERRORS, resolve_pretrained_source, url_source  # it imports this module
        name = f'{variant}.{pretrained_cfg}' if pretrained_cfg else variant
        _, overlay = resolve_pretrained_source(name, pretrained_cfg_overlay)
        try:
            model = build(overlay)
        except HUB_ERRORS as e:  # the Hub repository could not be read: the URL, if any, is the fallback
            model = build(url_source(name, overlay, hub_error=e))
    else:
        model = build(pretrained_cfg_overlay)
    model.pretrained_cfg.pop('state_dict', None)
    return model


def classifier_layer(in_features: int, num_classes: int) -> nn.Module:
    """A Linear classifier, or ``nn.Identity`` for ``num_classes=0`` (timm's convention: the model then returns the
    classifier's input)."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def _feature_getter(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, pretrained_cfg,
                    pretrained_cfg_overlay: Optional[Dict[str, Any]], features_only: bool, out_indices=None,
                    feature_cls: str = 'getter', **kwargs) -> FeatureGetterNet:
    """``features_only=True``: the model in timm's ``FeatureGetterNet``, which returns its ``forward_intermediates``
    maps (every ``feature_info`` entry unless ``out_indices`` says which)."""
    model = build_model(model_cls, variant, pretrained, pretrained_cfg, pretrained_cfg_overlay, **kwargs)
    features = FeatureGetterNet(model, out_indices=len(model.feature_info) if out_indices is None else out_indices)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return features


def init_he_fan_out(model: nn.Module, zero_linear_bias: bool = True) -> None:
    """He-normal convs with fan-out (``N(0, sqrt(2 / (k * k * out_channels)))``), BN weight 1 / bias 0 and, with
    ``zero_linear_bias``, zero Linear bias; Linear weights and transposed convs keep PyTorch's init. MSDNet's and
    SDPoint's authors zero the Linear bias, SCAN's/BYOT's and torchvision's CIFAR-style ResNets do not."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
