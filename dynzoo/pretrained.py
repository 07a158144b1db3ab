"""Where pretrained weights come from: the weights shipped in the package and the offline mirror, the Hugging Face
Hub (read by timm), direct URLs (downloaded here), and files released only inside a web page; ``dynzoo weights``.

``resolve_pretrained_source`` turns a name and its ``pretrained_cfg_overlay`` into a source timm's
``load_pretrained`` loads. Every family builds through ``dynzoo.models._helpers.build_model``, which calls it, so
``dynzoo.create_model`` and ``timm.create_model`` (after ``import dynzoo``) load the same weights the same way:

* a ``file=`` or ``state_dict=`` overlay, the mirror (``$DYNZOO_HUB_MIRROR``) and the shipped folders are read
  here, safely (``dynzoo.hub.load_checkpoint_file``), and handed to timm as the overlay's ``state_dict``; the entry
  holding the weights is picked and prefixes removed as timm's ``load_state_dict`` / ``clean_state_dict`` do;
* a Hub repository (``hf_hub_id``) is left to timm and huggingface_hub (their cache, ``HF_HUB_OFFLINE``); if it
  cannot be read, the cfg's ``url`` is the fallback;
* a URL is downloaded here, because torch.hub and timm name the cached file after the URL's path and the released
  MSDNet URLs (``.../f/<id>/?dl=1``) have none: a cfg ``url`` may be timm's ``(url, file name)`` pair. Files go to
  torch.hub's cache (``<torch hub dir>/checkpoints/<file name>``, where torch.hub and timm put theirs), written to
  a temporary name and renamed once complete and readable;
* offline (``HF_HUB_OFFLINE=1`` or ``DYNZOO_OFFLINE=1``) no request is made: only cached files are used.

Every source then goes through timm's ``load_pretrained`` and the family's checkpoint filter (strict, clear
errors), so one checkpoint gives the same model from any of them.
"""
import fnmatch
import http.client
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from timm.models import get_pretrained_cfg, split_model_name_tag
from tqdm import tqdm

from . import hub
from ._moved import moved_attribute
from .models._helpers import AS_REPORTED, FILE_ONLY, HUB_ORG, REPORTED_TOP1, unwrap_state_dict

__all__ = ['OFFLINE_ENV', 'HUB_ERRORS', 'PretrainedWeightsNotFoundError', 'is_offline', 'cache_dir',
           'url_and_file_name', 'download_url', 'resolve_pretrained_source', 'url_source', 'weights_table']

# The command-line handlers moved to dynzoo.cli.
_MOVED = {'add_weights_args': 'dynzoo.cli.weights', 'run_weights': 'dynzoo.cli.weights'}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)


OFFLINE_ENV = 'DYNZOO_OFFLINE'
# What huggingface_hub raises when a repository cannot be read: not published, offline and not cached, unreachable.
HUB_ERRORS = (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled)
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError)


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """``pretrained=True`` found the weights in no local source and could not download them."""


def _is_true(value: Optional[str]) -> bool:
    return (value or '').strip().lower() in ('1', 'true', 'yes', 'on')


def is_offline() -> bool:
    """True under ``HF_HUB_OFFLINE`` (huggingface_hub's setting, or the variable as set now) or ``DYNZOO_OFFLINE``."""
    return (huggingface_hub.constants.is_offline_mode() or _is_true(os.environ.get('HF_HUB_OFFLINE'))
            or _is_true(os.environ.get(OFFLINE_ENV)))


def cache_dir() -> Path:
    """torch.hub's checkpoint folder, where torch.hub and timm cache downloaded weights too."""
    return Path(torch.hub.get_dir()) / 'checkpoints'


def url_and_file_name(url, model_name: str) -> Tuple[str, str]:
    """``(url, cache file name)`` of a cfg ``url``: timm's ``(url, file name)`` pair, or the URL and the last part
    of its path (``<model_name>.pth`` when the path has none)."""
    if isinstance(url, (tuple, list)):
        return url[0], url[1]
    return url, os.path.basename(urlparse(url).path) or f'{model_name}.pth'


def _ways_out(path: Path) -> str:
    return (f'Pass the file with pretrained_cfg_overlay=dict(file=PATH), or put it in the cache as {path} '
            '(create_model then finds it offline).')


def download_url(url: str, path: Path, progress: bool = True) -> Any:
    """Download ``url`` to ``path`` and return its content (``hub.load_checkpoint_file``).

    The bytes go to a temporary file beside ``path`` (``.<name>.<random>.part``), which becomes ``path`` only once
    the announced length has arrived and it reads as a checkpoint: an interrupted or corrupt transfer leaves nothing
    under ``path``'s name. Raises :class:`PretrainedWeightsNotFoundError` when offline (no request is made) or when
    the transfer fails.
    """
    if is_offline():
        raise PretrainedWeightsNotFoundError(
            f'{path.name} is not in the cache and dynzoo is offline (HF_HUB_OFFLINE or {OFFLINE_ENV}), so it was not '
            f'downloaded from {url}. {_ways_out(path)}')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.part', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            request = urllib.request.Request(url, headers={'User-Agent': f'dynzoo (torch {torch.__version__})'})
            with urllib.request.urlopen(request, timeout=60) as response:
                length = response.headers.get('Content-Length')
                total = int(length) if length else None
                received = 0
                with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=path.name,
                          disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if total is not None and received != total:
                raise http.client.IncompleteRead(b'', total - received)
        content = hub.load_checkpoint_file(tmp)
        os.replace(tmp, path)
        return content
    except (*_NETWORK_ERRORS, hub.CheckpointFileError) as e:
        reason = f'{type(e).__name__}: {e}'
        if isinstance(e, http.client.IncompleteRead):
            reason = f'the transfer stopped before the end ({e})'
        raise PretrainedWeightsNotFoundError(
            f'could not download {url} to {path} ({reason}). {_ways_out(path)}') from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _with_state_dict(overlay: Dict[str, Any], model_name: str, checkpoint) -> Dict[str, Any]:
    """The overlay with the checkpoint's weights as ``state_dict`` and, unless the caller set it, ``num_classes``
    set to the checkpoint's own class count: timm then keeps the classifiers when the model has as many classes and
    drops them (fine-tuning) only when it has another number, instead of comparing with the registered config's
    count, which says nothing about a user's checkpoint."""
    state_dict = unwrap_state_dict(checkpoint)
    overlay = dict(overlay, state_dict=state_dict)
    if 'num_classes' not in overlay and not model_name.startswith(('hf-hub:', 'local-dir:')):
        classes = hub._classifier_classes(state_dict, model_name)
        if classes is not None:
            overlay['num_classes'] = classes
    return overlay


def _cfg(model_name: str, overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    cfg = get_pretrained_cfg(model_name)
    return dict(cfg.to_dict() if cfg is not None else {}, **(overlay or {}))


def _tags_with_weights(model_name: str) -> List[str]:
    """The tags with weights of ``model_name``'s architecture, else of its family (``scan_resnet34`` ->
    ``scan_resnet18.c10``)."""
    arch = split_model_name_tag(model_name)[0]
    from .factory import list_models
    return list_models(f'{arch}.*', pretrained=True) or list_models(f'{arch.split("_")[0]}_*', pretrained=True)


def _no_weights(model_name: str, cfg: Dict[str, Any]) -> PretrainedWeightsNotFoundError:
    name = f'{cfg["architecture"]}.{cfg["tag"]}' if cfg.get('tag') else cfg.get('architecture', model_name)
    if name in FILE_ONLY:
        path = cache_dir() / FILE_ONLY[name]
        return PretrainedWeightsNotFoundError(
            f'{name!r}: the authors released these weights only inside {cfg.get("origin_url")}, with no direct '
            f'download link, and {path} does not exist. Download {FILE_ONLY[name]} from there. {_ways_out(path)}')
    tags = _tags_with_weights(model_name)
    hint = (f'the tags with weights: {", ".join(tags)} (e.g. dynzoo.create_model({tags[0]!r}, pretrained=True))'
            if tags else 'dynzoo.list_models(pretrained=True) lists the weights that exist')
    return PretrainedWeightsNotFoundError(
        f'{model_name!r} has no pretrained weights; {hint}. A checkpoint of your own loads with '
        'pretrained_cfg_overlay=dict(file=PATH).')


def url_source(model_name: str, overlay: Optional[Dict[str, Any]], hub_error: Optional[Exception] = None
               ) -> Dict[str, Any]:
    """The overlay that loads ``model_name`` from its cfg's ``url``: the cached file, else a download (none when
    offline). ``hub_error``: why the Hub repository, tried first, could not be read (named in the error)."""
    cfg = _cfg(model_name, overlay)
    repo_id = cfg.get('hf_hub_id') or model_name.partition('hf-hub:')[2]
    hub_part = (f'the Hugging Face Hub repository {repo_id} could not be read ({type(hub_error).__name__}: offline '
                'and not in the Hub cache, unreachable, or not published)' if hub_error is not None else '')
    if not cfg.get('url'):
        raise PretrainedWeightsNotFoundError(
            f'no weights for {model_name!r}: {hub_part or "no source"}, and no mirror holds them '
            f'(${hub.MIRROR_ENV}/{repo_id or HUB_ORG + "/" + model_name}/). Pass a local file with '
            'pretrained_cfg_overlay=dict(file=PATH).') from hub_error
    url, file_name = url_and_file_name(cfg['url'], model_name)
    path = cache_dir() / file_name
    try:
        checkpoint = hub.load_checkpoint_file(path) if path.is_file() else download_url(url, path)
    except PretrainedWeightsNotFoundError as e:
        raise PretrainedWeightsNotFoundError(
            f'no weights for {model_name!r}: {hub_part + "; and " if hub_part else ""}{e}') from (hub_error or e)
    return _with_state_dict(dict(overlay or {}, hf_hub_id=None, file=os.fspath(path)), model_name, checkpoint)


def resolve_pretrained_source(model_name: str, pretrained_cfg_overlay: Optional[Dict[str, Any]] = None
                              ) -> Tuple[str, Optional[Dict[str, Any]]]:
    """The ``(model_name, pretrained_cfg_overlay)`` for ``timm.create_model(..., pretrained=True)``.

    In order: the caller's ``state_dict`` or ``file``; the mirror and shipped folders (``hub.mirror_folder``); a
    Hub repository (left to timm, the builder calling :func:`url_source` if it cannot be read; read from the
    Hub cache here when only ``DYNZOO_OFFLINE`` is set, which huggingface_hub does not know); a URL; a file
    released only inside a web page, if it is in the cache. Raises :class:`PretrainedWeightsNotFoundError` naming
    what exists when the name has no weights.
    """
    overlay = dict(pretrained_cfg_overlay or {})
    if overlay.get('state_dict') is not None:
        return model_name, _with_state_dict(overlay, model_name, overlay['state_dict'])
    if overlay.get('file'):
        return model_name, _with_state_dict(overlay, model_name, hub.load_checkpoint_file(overlay['file']))
    folder = hub.mirror_folder(model_name)
    if folder is not None:
        weights = folder / hub.WEIGHTS_NAME
        overlay = dict(overlay, file=os.fspath(weights), source='mirror')
        overlay = _with_state_dict(overlay, model_name, hub.load_checkpoint_file(weights))
        if model_name.startswith('hf-hub:'):
            if not (folder / 'config.json').is_file():
                raise FileNotFoundError(
                    f'{folder} has {hub.WEIGHTS_NAME} but no config.json; copy the whole Hub folder')
            model_name = f'local-dir:{folder}'
        return model_name, overlay
    if model_name.startswith(('hf-hub:', 'local-dir:')):
        return model_name, pretrained_cfg_overlay
    cfg = _cfg(model_name, overlay)
    if cfg.get('hf_hub_id'):
        if is_offline() and not huggingface_hub.constants.is_offline_mode():  # dynzoo's setting: read the cache here
            cached = _hub_cached(cfg['hf_hub_id'])
            if cached is None:
                return model_name, url_source(model_name, overlay, hub_error=OfflineModeIsEnabled(
                    f'{cfg["hf_hub_id"]} is not in the Hub cache'))
            return model_name, _with_state_dict(dict(overlay, file=os.fspath(cached)), model_name,
                                                hub.load_checkpoint_file(cached))
        return model_name, pretrained_cfg_overlay
    if cfg.get('url'):
        return model_name, url_source(model_name, overlay)
    name = f'{cfg["architecture"]}.{cfg["tag"]}' if cfg.get('tag') else model_name
    cached = cache_dir() / FILE_ONLY[name] if name in FILE_ONLY else None
    if cached is not None and cached.is_file():
        return model_name, _with_state_dict(dict(overlay, file=os.fspath(cached)), model_name,
                                            hub.load_checkpoint_file(cached))
    raise _no_weights(model_name, cfg)


# ---------------------------------------------------------------- dynzoo weights


def _size(path: Optional[Path]) -> str:
    return f'{path.stat().st_size / 2 ** 20:.1f} MiB' if path is not None and path.is_file() else '?'


def _hub_cached(repo_id: str) -> Optional[Path]:
    found = huggingface_hub.try_to_load_from_cache(repo_id, hub.WEIGHTS_NAME)
    return Path(found) if isinstance(found, str) else None


def weights_table(pattern: str = '*') -> List[Dict[str, str]]:
    """One row per tag with weights (and per file-only tag) whose name matches the wildcard ``pattern``: name,
    source, top-1 per exit and where it comes from (measured here, or reported by the authors), size where known,
    whether it is cached here."""
    from .factory import list_models
    names = sorted(set(list_models(pretrained=True)) | set(FILE_ONLY))
    rows = []
    for name in (n for n in names if fnmatch.fnmatch(n, pattern)):
        cfg = get_pretrained_cfg(name)
        local, shipped = None, None
        if cfg.hf_hub_id and cfg.hf_hub_id.split('/')[0] == HUB_ORG:
            shipped = hub.PACKAGE_MIRROR / cfg.hf_hub_id.split('/')[1]
        if shipped is not None and (shipped / hub.WEIGHTS_NAME).is_file():
            source, local = 'shipped', shipped / hub.WEIGHTS_NAME
            card = json.loads((shipped / 'config.json').read_text()).get('dynzoo', {})
            accuracy = (card.get('per_exit_accuracy'), f'measured here ({card.get("accuracy_dataset", "test set")})')
        else:
            file_name = FILE_ONLY.get(name) or (url_and_file_name(cfg.url, name)[1] if cfg.url else None)
            local = cache_dir() / file_name if file_name and (cache_dir() / file_name).is_file() else None
            if cfg.hf_hub_id:
                source = f'Hub {cfg.hf_hub_id}' + (' (URL fallback)' if cfg.url else '')
                local = _hub_cached(cfg.hf_hub_id) or local
            elif cfg.url:
                source = f'URL {url_and_file_name(cfg.url, name)[0]}'
            else:
                source = f'file only: {FILE_ONLY[name]} from {cfg.origin_url}'
            dataset, top1 = REPORTED_TOP1.get(name, (None, None))
            accuracy = (top1, f'{AS_REPORTED} ({dataset})' if top1 else '')
        top1, label = accuracy
        rows.append(dict(name=name, source=source, top1=' / '.join(f'{a:.2f}' for a in top1) if top1 else '-',
                         accuracy=label, size=_size(local),
                         cached='shipped' if source == 'shipped' else 'yes' if local else 'no'))
    return rows
