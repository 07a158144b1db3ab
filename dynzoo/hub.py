"""Weights on the Hugging Face Hub: Hub-ready folders, model cards, offline mirrors, safe loading, conversion.

* ``save_pretrained(model, dir)`` writes ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``, plus a
  ``dynzoo`` entry with per-exit MACs, parameters and accuracy) + a ``README.md`` model card (huggingface_hub's
  ``ModelCard``); ``push_to_hub(model, repo_id)`` uploads that folder with ``huggingface_hub``.
* ``mirror_folder(name)``: the local Hub-layout folder of a name's weights, in the directory named by the
  environment variable ``DYNZOO_HUB_MIRROR`` (``<mirror>/<org>/<repo>/model.safetensors`` and ``config.json``) or
  among the weights shipped in this package (``dynzoo/weights/<architecture>.<tag>/``, the ``dynzoo`` organisation
  only). ``dynzoo.pretrained`` looks there before the Hub and URLs, for ``timm.create_model`` (after ``import
  dynzoo``) too, through the families' builder; only ``dynzoo.create_model`` does for ``hf-hub:`` names, whose
  config timm reads from the Hub before the builder runs.
* ``load_checkpoint_file(path)`` reads safetensors or PyTorch pickles, the latter with ``weights_only=True`` only:
  code-carrying pickles are refused, truncated, corrupt or garbage files raise :class:`CheckpointFileError`.
* ``convert_checkpoint(family, src, dst)`` turns an authors' checkpoint as released into a Hub-ready folder, through
  the family's ``checkpoint_filter_fn``; every key must map.
"""
import copy
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError
from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
from torch import nn

from ._moved import moved_attribute
from .families import FAMILIES as _ALL_FAMILIES, Family
from .flops import per_exit_macs, per_exit_params
from .models import CheckpointMismatchError, FoldedBatchNorm, PointwiseConv
from .models._helpers import HUB_ORG, PACKAGE_MIRROR, unwrap_state_dict
from .sdpoint import instance_rows

__all__ = [
    'MIRROR_ENV', 'PACKAGE_MIRROR', 'FAMILIES', 'CheckpointFileError', 'load_checkpoint_file', 'save_pretrained',
    'push_to_hub', 'mirror_folder', 'convert_checkpoint',
]

MIRROR_ENV = 'DYNZOO_HUB_MIRROR'
WEIGHTS_NAME = 'model.safetensors'

# The families whose authors released checkpoints that ``convert_checkpoint`` reads (``dynzoo.families``).
FAMILIES: Dict[str, Family] = {name: family for name, family in _ALL_FAMILIES.items() if family.checkpoint_filter}
# The command-line handlers moved to dynzoo.cli.
_MOVED = {'add_convert_args': 'dynzoo.cli.convert', 'run_convert': 'dynzoo.cli.convert'}


def __getattr__(name: str):
    return moved_attribute(__name__, name, _MOVED)


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read safely: truncated, corrupt, or a pickle carrying code."""


def load_checkpoint_file(path) -> Any:
    """The content of a ``.safetensors`` file or a PyTorch checkpoint, on CPU, without ever running pickled code.

    PyTorch files are read with ``torch.load(weights_only=True)``, which accepts tensors, dicts, lists and numbers
    (what the authors' ``torch.save(model.state_dict())`` / ``{'state_dict': ...}`` files hold) and refuses objects
    that would execute code on unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint file at {path}')
    with path.open('rb') as f:
        head = f.read(9)
    is_zip_or_pickle = head[:2] == b'PK' or head[:1] == b'\x80'
    if path.suffix == '.safetensors' or (len(head) >= 9 and head[8:9] == b'{' and not is_zip_or_pickle):
        try:
            return safetensors.torch.load_file(os.fspath(path), device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFileError(
                f'{path} is not a readable safetensors file ({e}); it is probably truncated or corrupt: '
                'download or export it again.') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'global' in str(e).lower():  # a GLOBAL opcode: the pickle references code
            raise CheckpointFileError(
                f'{path} is a pickle that carries Python objects other than tensors, dicts and numbers (it would run '
                'code when loaded), so dynzoo refuses it. Load it yourself only if you trust its origin, and save '
                'the plain state dict, e.g. torch.save(model.state_dict(), ...).') from e
        detail = next((line for line in str(e).splitlines() if 'Unsupported' in line), 'not a weights-only pickle')
        raise CheckpointFileError(f'{path} is not a readable PyTorch checkpoint (unpickling failed: {detail.strip()}); '
                                  'it is probably truncated or corrupt: download or save it again.') from e
    # What garbage makes the unpickler raise besides UnpicklingError (a memo key it never stored, an empty stack...).
    except (EOFError, RuntimeError, zipfile.BadZipFile, KeyError, IndexError, ValueError, TypeError, AttributeError,
            struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointFileError(
            f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); it is probably truncated or '
            'corrupt: download or save it again.') from e


def _per_exit_stats(model: nn.Module) -> Dict[str, Any]:
    """Exits, MACs and parameters per exit, counted on the model's device and dtype (one exit if it has no exits)."""
    return dict(num_exits=getattr(model, 'num_exits', 1), per_exit_macs=per_exit_macs(model),
                per_exit_params=per_exit_params(model))


def _fmt_m(value: float) -> str:
    return f'{value / 1e6:.2f}'


def _paper_link(cfg: Dict[str, Any]) -> Optional[str]:
    """The paper's page from its first id (``arXiv:<id>`` or ``doi:<id>``), a URL that exists for a real id."""
    ids = cfg.get('paper_ids') or ''
    first = (ids if isinstance(ids, str) else ids[0]) if ids else ''
    scheme, _, value = first.partition(':')
    return {'arxiv': f'https://arxiv.org/abs/{value}', 'doi': f'https://doi.org/{value}'}.get(scheme.lower())


def _model_card(name: str, config: Dict[str, Any]) -> str:
    """The model card: huggingface_hub's ``ModelCard`` with ``ModelCardData`` metadata. It links only the paper's
    page and the pretrained config's ``origin_url`` (the authors' code or the weights' page)."""
    info = config['dynzoo']
    architecture = config['architecture']
    cfg = config['pretrained_cfg']
    accuracy = info.get('per_exit_accuracy')
    kind = (f'a {info["num_exits"]}-exit dynamic image classifier: every exit returns logits, so a sample can leave '
            'the network as soon as an exit is confident' if info['num_exits'] > 1 else 'an image classifier')
    paper, link = cfg.get('paper_name'), _paper_link(cfg)
    card_license = cfg.get('license') or 'other'
    data = ModelCardData(library_name='timm', license=card_license, pipeline_tag='image-classification',
                         tags=['image-classification', 'timm', 'dynzoo', 'early-exit'])
    lines = [
        f'# {name}', '',
        f'`{architecture}`, {kind}. Built with dynzoo (the `dynzoo` Python package), which registers it in timm.', '',
    ]
    if paper:
        lines += ['Paper: ' + (f'[{paper}]({link})' if link else f'"{paper}" ({cfg.get("paper_ids", "")})') + '.', '']
    if cfg.get('origin_url'):
        lines += [f'Origin (the authors\' code or release): <{cfg["origin_url"]}>.', '']
    if cfg.get('description'):  # weights released by others: their reported accuracy, labelled as such
        lines += [f'{cfg["description"]}.', '']
    lines += [
        f'Classes: {config["num_classes"]}. Input: {"x".join(map(str, cfg["input_size"]))}, '
        f'mean {tuple(cfg["mean"])}, std {tuple(cfg["std"])}.', '',
    ]
    training = info.get('training')
    if training:
        lines += ['## Training', '']
        lines += [f'- {key}: {value}' for key, value in training.items()]
        lines.append('')
    header = '| exit | cumulative params (M) | cumulative MACs (M, fvcore conv+linear) |'
    rule = '|---:|---:|---:|'
    if accuracy:
        header += f' top-1 (%), {info.get("accuracy_dataset", "test set")} |'
        rule += '---:|'
    lines += ['## Per-exit cost' + (' and accuracy' if accuracy else ''), '', header, rule]
    for k in range(info['num_exits']):
        row = f'| {k + 1} | {_fmt_m(info["per_exit_params"][k])} | {_fmt_m(info["per_exit_macs"][k])} |'
        if accuracy:
            row += f' {accuracy[k]:.2f} |'
        lines.append(row)
    if info.get('instances'):
        lines += ['', '## Per-instance cost and accuracy', '',
                  'The instance (downsampling point, ratio) chooses the cost: `model(images, instance=(point, ratio))`'
                  '; `nil` is the full network. Batch-norm statistics are stored per instance.', '',
                  f'| instance | MACs (M, fvcore conv+linear) | top-1 (%), {info.get("accuracy_dataset", "test set")} |',
                  '|---|---:|---:|']
        lines += [f'| {row["instance"]} | {_fmt_m(row["macs"])} | {row["top1"]:.2f} |' for row in info['instances']]
    lines += [
        '', '## Usage', '', '```python', 'import dynzoo, timm', '',
        f"model = dynzoo.create_model('{name}', pretrained=True).eval()",
        "# or, after `import dynzoo` (which registers the architectures):",
        f"model = timm.create_model('hf-hub:{HUB_ORG}/{name}', pretrained=True).eval()",
        'logits_per_exit = model(images)  # a list, shallow exit first' if info['num_exits'] > 1 else
        'logits = model(images)',
        '```', '',
        f'Offline: set `{MIRROR_ENV}` to a folder holding `{HUB_ORG}/{name}/` (this repository\'s files).', '',
    ]
    return str(ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines)))


def save_pretrained(
        model: nn.Module,
        save_directory,
        model_name: Optional[str] = None,
        per_exit_accuracy: Optional[Sequence[float]] = None,
        accuracy_dataset: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
        dtype: Optional[torch.dtype] = None,
        data_config: Optional[Dict[str, Any]] = None,
        model_card: bool = True,
        per_instance_accuracy: Optional[Dict[str, float]] = None,
) -> Path:
    """Write a Hub-ready folder: ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

    ``model_name``: the published name (``architecture.tag``, default the model's own); ``per_exit_accuracy``
    (percent, shallow exit first) and ``accuracy_dataset`` go to the config and card; ``training``: a flat dict
    describing the recipe (shown in the card); ``dtype=torch.float16`` stores floating tensors in half precision
    (``create_model`` converts them back on load); ``data_config``: the preprocessing used, as timm's
    ``save_for_hf`` takes it. The config's ``dynzoo`` entry holds per-exit fvcore MACs and parameters.
    ``per_instance_accuracy`` (SDPoint networks: ``{instance name: top-1 %}``) adds every instance's MACs and
    accuracy to the config and card.

    The files are written in a temporary folder beside ``save_directory`` and then moved into it, so that a process
    killed while writing leaves no temporary file in the folder (which would be uploaded with it). A model optimized
    for inference (``optimize_for_inference`` / ``fuse_conv_bn``) is refused: its weights no longer fit the
    architecture the config names.
    """
    if any(isinstance(m, (FoldedBatchNorm, PointwiseConv)) for m in model.modules()):
        raise ValueError(
            'this model was optimized for inference (dynzoo.optimize_for_inference or fuse_conv_bn folded its batch '
            'norms into the convolutions), so its weights no longer fit its architecture and the folder could not be '
            'loaded: save the model before optimizing it, and optimize it again after loading')
    save_directory = Path(save_directory)
    architecture = model.pretrained_cfg['architecture']
    model_name = model_name or architecture
    arch_of_name, tag = split_model_name_tag(model_name)
    if arch_of_name != architecture:
        raise ValueError(f'model_name {model_name!r} does not name the architecture {architecture!r}')
    if per_exit_accuracy is not None:
        per_exit_accuracy = [float(a) for a in per_exit_accuracy]
    if not isinstance(getattr(model, 'num_features', None), int):
        raise ValueError(f'{type(model).__name__} has no num_features, which the saved config records: set it in '
                         "__init__ to the channels of the feature map its (final exit's) head reads, as timm does")
    info = _per_exit_stats(model)
    if per_exit_accuracy is not None and len(per_exit_accuracy) != info['num_exits']:
        raise ValueError(f'{len(per_exit_accuracy)} accuracies given for {info["num_exits"]} exits')
    info.update(per_exit_accuracy=per_exit_accuracy, accuracy_dataset=accuracy_dataset, training=training,
                storage_dtype=str(dtype or torch.float32).replace('torch.', ''),
                instances=instance_rows(model, per_instance_accuracy) if per_instance_accuracy else None)
    info = {k: v for k, v in info.items() if v is not None}
    channels_last = any(not t.is_contiguous() for t in model.state_dict().values())
    if dtype in (None, torch.float32) and not channels_last:
        export = model
    else:  # safetensors stores contiguous tensors
        export = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.contiguous_format)
    pretrained_cfg = {'hf_hub_id': f'{HUB_ORG}/{model_name}'}
    if tag:
        pretrained_cfg['tag'] = tag
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{save_directory.name}.', suffix='.tmp', dir=save_directory.parent))
    try:
        timm.models.save_for_hf(
            export, staging, safe_serialization=True, data_config=data_config,
            model_config={'pretrained_cfg': pretrained_cfg, 'dynzoo': info})
        config = json.loads((staging / 'config.json').read_text())
        if model.pretrained_cfg.get('tag') not in (None, '', tag):  # e.g. trained from scratch on a bare name whose
            # default cfg is another's released weights: that tag and its reported accuracy do not describe these
            config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items()
                                        if k != 'description' and (k != 'tag' or tag)}
            (staging / 'config.json').write_text(json.dumps(config, indent=2))
        if model_card:
            (staging / 'README.md').write_text(_model_card(model_name, config), encoding='utf-8')
        save_directory.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir()):
            os.replace(file, save_directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_directory


def push_to_hub(model: nn.Module, repo_id: str, commit_message: str = 'Add model', token: Optional[str] = None,
                private: bool = False, revision: Optional[str] = None, **save_kwargs):
    """Upload ``save_pretrained(model, ...)`` to ``repo_id`` (created if needed) with ``huggingface_hub``.

    ``save_kwargs`` go to :func:`save_pretrained`; ``model_name`` defaults to the repository name.
    """
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    save_kwargs.setdefault('model_name', repo_id.split('/')[-1])
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message)


def _has_weights(folder: Path) -> bool:
    return (folder / WEIGHTS_NAME).is_file()


def mirror_folder(model_name: str) -> Optional[Path]:
    """The local folder holding ``model_name``'s weights (``hf-hub:org/repo`` or ``architecture[.tag]``), if any.

    Looks in ``$DYNZOO_HUB_MIRROR`` first, then in the weights shipped with dynzoo (``dynzoo/weights/<repo>/``, for
    the ``dynzoo`` organisation), for the repositories ``<org>/<repo>`` of the name's ``hf_hub_id``, then
    ``dynzoo/<name as given>`` and ``dynzoo/<architecture>.<tag it resolves to>`` (where ``dynzoo convert`` tells
    you to put a converted folder).
    """
    if model_name.startswith('local-dir:'):
        return None
    if model_name.startswith('hf-hub:'):
        repo_ids = [model_name[len('hf-hub:'):].split('@')[0]]
    else:
        cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
        arch = split_model_name_tag(model_name)[0]
        resolved = f'{arch}.{cfg.tag}' if cfg is not None and cfg.tag else arch
        repo_ids = [cfg.hf_hub_id if cfg is not None else None, f'{HUB_ORG}/{model_name}', f'{HUB_ORG}/{resolved}']
    repo_ids = list(dict.fromkeys(r for r in repo_ids if r and r.count('/') == 1))
    mirror = os.environ.get(MIRROR_ENV)
    roots = [(Path(mirror).expanduser(), None)] if mirror else []
    roots.append((PACKAGE_MIRROR, HUB_ORG))
    for root, only_org in roots:
        for repo_id in repo_ids:
            org, repo = repo_id.split('/')
            folder = root / repo if only_org else root / repo_id
            if (only_org is None or org == only_org) and _has_weights(folder):
                return folder
    return None


def _convertible(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f'unknown family {family!r}; choose one of {", ".join(FAMILIES)}')
    return FAMILIES[family]


def _classifier_classes(state_dict: Dict[str, torch.Tensor], architecture: str) -> Optional[int]:
    classifier = get_pretrained_cfg(architecture).classifier
    first = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    weight = state_dict.get(f'{first}.weight') if first else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _fits(filter_fn, state_dict, architecture: str, kwargs: Dict[str, Any]) -> Tuple[Optional[str], int]:
    """(None, 0) if ``state_dict`` fits ``architecture`` (built on the meta device, no memory); else (error, distance)."""
    with torch.device('meta'):
        model = timm.create_model(architecture, **kwargs)
    try:
        filter_fn(dict(state_dict), model)
        return None, 0
    except (CheckpointMismatchError, KeyError, RuntimeError) as e:
        return str(e), len(model.state_dict().keys() ^ state_dict.keys())


def convert_checkpoint(family: str, src, dst, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                       dtype: Optional[torch.dtype] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                       overwrite: bool = False) -> Tuple[Path, str]:
    """Turn an authors' checkpoint ``src`` (as released) into a Hub-ready folder ``dst``; returns (dst, model name).

    ``model_name``: the dynzoo architecture (tag optional) the file holds; without it, every architecture of the
    family is tried and the one whose keys and shapes all fit is taken. ``num_classes`` defaults to the
    checkpoint's classifier size; ``model_kwargs`` describe a configuration the authors trained but dynzoo does not
    register (e.g. ``dict(n_blocks=10)``). A ``dst`` that exists and is not empty is refused unless ``overwrite``.
    """
    if Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())) and not overwrite:
        raise FileExistsError(f'{dst} exists and is not empty: choose another destination, or overwrite its files '
                              'with --force (overwrite=True)')
    filter_fn, names = _convertible(family).checkpoint_filter, _convertible(family).model_names()
    state_dict = unwrap_state_dict(load_checkpoint_file(src))
    if model_name is not None:
        architecture = split_model_name_tag(model_name)[0]
        if not is_model(architecture) or architecture not in names:
            raise ValueError(f'{architecture!r} is not a {family} model; {family} models: {", ".join(names)}')
        candidates = [architecture]
    else:
        candidates = names
    problems = []
    for architecture in candidates:
        kwargs = dict(model_kwargs or {})
        classes = num_classes or _classifier_classes(state_dict, architecture)
        if classes:
            kwargs['num_classes'] = classes
        error, distance = _fits(filter_fn, state_dict, architecture, kwargs)
        if error is None:
            model = timm.create_model(model_name or architecture, **kwargs)  # the tag's cfg: its paper, licence
            model.load_state_dict(filter_fn(state_dict, model), strict=True)
            name = model_name or architecture
            save_pretrained(model.eval(), dst, model_name=name, dtype=dtype,
                            training={'source': f'converted from the authors\' checkpoint {Path(src).name}'})
            return Path(dst), name
        problems.append((distance, architecture, error))
    distance, architecture, error = min(problems)
    raise CheckpointMismatchError(
        f'{src} does not fit any {family} model (closest: {architecture}): {error} '
        f'Is it a {family} checkpoint? Pass --family for the network it was trained with'
        + ('' if model_name else ', or --model to name the configuration') + '.')
