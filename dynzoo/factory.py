"""``create_model`` / ``list_models``: timm's registry, restricted to dynzoo's models, with clear errors."""
import difflib
from typing import Any, Dict, List, Optional

import timm
from timm.models import is_model, model_entrypoint, split_model_name_tag

from .pretrained import HUB_ERRORS, resolve_pretrained_source, url_source


class UnknownModelError(ValueError, RuntimeError):
    """A model name (or pretrained tag) that dynzoo does not register."""


def is_dynzoo_model(name: str) -> bool:
    """True for ``architecture`` or ``architecture.tag`` names registered by dynzoo (not by timm itself)."""
    arch = split_model_name_tag(name)[0]
    return is_model(arch) and model_entrypoint(arch).__module__.startswith('dynzoo.')


def list_models(filter: str = '', pretrained: bool = False, exclude_filters: str = '') -> List[str]:
    """dynzoo's registered models matching the wildcard ``filter``; with ``pretrained=True``, the tagged weights."""
    names = timm.list_models(filter or '', pretrained=pretrained, exclude_filters=exclude_filters)
    return [n for n in names if is_dynzoo_model(n)]


def _check_name(model_name: str) -> None:
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a string such as 'msdnet_step4' or 'msdnet_cifar_b7.c10', got "
                        f'{type(model_name).__name__} {model_name!r}; dynzoo.list_models() lists the names')
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
    tags = timm.list_models(f'{arch}.*', include_tags=True)
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

    ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` (or ``state_dict=...``) loads a checkpoint of yours,
    including the authors' own files and dynzoo's trainer's ``last.pth`` (without ``pretrained=True`` a warning says
    it is not loaded, where timm is silent). Otherwise ``pretrained=True`` looks in the offline
    mirror (``$DYNZOO_HUB_MIRROR``, then the weights shipped in ``dynzoo/weights/``), then the Hugging Face Hub
    (through timm and huggingface_hub's cache), then the weights' URL (downloaded to torch.hub's cache); see
    ``dynzoo.pretrained``. A bare architecture name loads its default tag's weights (``msdnet_step4``: the best
    released); a CIFAR architecture's bare name is the untrained default, so its weights take the tag
    (``msdnet_cifar_b7.c10``), as the error for a bare name says.
    """
    _check_name(model_name)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if pretrained and model_name.startswith(('hf-hub:', 'local-dir:')):
        # timm reads such a name's config before the family's builder (which resolves the registered names' weights
        # for dynzoo and timm alike): a mirror must replace the Hub here
        model_name, pretrained_cfg_overlay = resolve_pretrained_source(model_name, pretrained_cfg_overlay)
    try:
        return timm.create_model(model_name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                 **kwargs)
    except HUB_ERRORS as e:  # an hf-hub: repository could not be read: the URL, if any, is the fallback
        pretrained_cfg_overlay = url_source(model_name, pretrained_cfg_overlay, hub_error=e)
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=pretrained_cfg_overlay,
                                 **kwargs)
