"""``create_model`` / ``list_models``: timm's registry, restricted to dynzoo's models, with clear errors."""
import difflib
from typing import Any, Dict, List, Optional

import timm
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from timm.models import is_model, model_entrypoint, split_model_name_tag


class UnknownModelError(ValueError, RuntimeError):
    """A model name (or pretrained tag) that dynzoo does not register."""


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """``pretrained=True`` found the weights in no local source and could not get them from the Hugging Face Hub."""


def is_dynzoo_model(name: str) -> bool:
    """True for ``architecture`` or ``architecture.tag`` names registered by dynzoo (not by timm itself)."""
    arch = split_model_name_tag(name)[0]
    return is_model(arch) and model_entrypoint(arch).__module__.startswith('dynzoo.')


def list_models(filter: str = '', pretrained: bool = False, exclude_filters: str = '') -> List[str]:
    """dynzoo's registered models matching the wildcard ``filter``; with ``pretrained=True``, the tagged weights."""
    names = timm.list_models(filter or '', pretrained=pretrained, exclude_filters=exclude_filters)
    return [n for n in names if is_dynzoo_model(n)]


def _check_name(model_name: str) -> None:
    if model_name.startswith(('hf-hub:', 'local-dir:')):
        return
    arch, tag = split_model_name_tag(model_name)
    if is_model(arch) and not is_dynzoo_model(arch):
        raise UnknownModelError(f'{arch!r} is a timm model, not a dynzoo one: build it with timm.create_model.')
    if not is_dynzoo_model(arch):
        known = list_models()
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f' Did you mean: {", ".join(close)}?' if close else ''
        raise UnknownModelError(
            f'Unknown dynzoo model {arch!r}.{hint} dynzoo.list_models() lists all {len(known)} models.')
    tags = timm.list_pretrained(f'{arch}.*')
    if tag and model_name not in tags:
        raise UnknownModelError(
            f'{arch!r} has no pretrained tag {tag!r}. Known tags: {", ".join(tags) or "none"}.')


def create_model(
        model_name: str,
        pretrained: bool = False,
        num_classes: Optional[int] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        **kwargs,
):
    """Build a dynzoo model by name, as ``timm.create_model`` does (``arch`` or ``arch.tag`` or ``hf-hub:org/repo``).

    ``pretrained_cfg_overlay=dict(file=PATH)`` loads a local checkpoint, including the authors' own files.
    Otherwise ``pretrained=True`` looks in the offline mirror (``$DYNZOO_HUB_MIRROR``, then the weights shipped in
    ``dynzoo/weights/``) before huggingface_hub's download and cache (see ``dynzoo.hub``).
    """
    _check_name(model_name)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if pretrained:
        from .hub import resolve_pretrained_source
        model_name, pretrained_cfg_overlay = resolve_pretrained_source(model_name, pretrained_cfg_overlay)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                  **kwargs)
    except (HfHubHTTPError, EntryNotFoundError) as e:  # EntryNotFoundError covers offline cache misses
        raise _weights_not_found(model_name, pretrained_cfg_overlay, e) from e
    if isinstance(getattr(model, 'pretrained_cfg', None), dict):
        model.pretrained_cfg.pop('state_dict', None)  # mirrored weights were passed in memory: do not keep a copy
    return model


def _weights_not_found(model_name: str, overlay: Optional[Dict[str, Any]], error: Exception):
    cfg = timm.models.get_pretrained_cfg(model_name)
    cfg = dict(cfg.to_dict() if cfg is not None else {}, **(overlay or {}))
    source = f'the Hugging Face Hub repository {cfg["hf_hub_id"]}' if cfg.get('hf_hub_id') else 'the Hub'
    url = (f', or pretrained_cfg_overlay=dict(hf_hub_id=None) to download the original file ({cfg["url"]})'
           if cfg.get('url') and cfg.get('hf_hub_id') else '')
    mirror = f'$DYNZOO_HUB_MIRROR/{cfg["hf_hub_id"]}/' if cfg.get('hf_hub_id') else '$DYNZOO_HUB_MIRROR/<org>/<repo>/'
    return PretrainedWeightsNotFoundError(
        f'no weights for {model_name!r}: no offline mirror holds them and {source} could not be read '
        f'({type(error).__name__}: offline, or not published yet). Pass a local file with '
        f'pretrained_cfg_overlay=dict(file=PATH) (the authors\' own checkpoints load){url}, or put the Hub folder '
        f'in {mirror}.')
