"""dynzoo.pretrained: every tag has weights that exist; downloads over a loopback HTTP server that serves synthetic
checkpoints in the released formats (strict loads, cache reuse, interrupted transfers, offline); the Hugging Face
cache as huggingface_hub lays it out; timm.create_model taking the same sources; configs and model cards that tell
the truth; ``dynzoo weights``."""
import hashlib
import http.server
import io
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from timm.models import PretrainedCfg, _registry, get_pretrained_cfg

import dynzoo
from dynzoo import hub, pretrained
from dynzoo.cli import main
from dynzoo.models import CheckpointMismatchError
from dynzoo.models._helpers import AS_REPORTED, FILE_ONLY, REPORTED_TOP1

# Hub repositories known to exist: timm's own, for the DenseNets (each is in timm's registry, checked below).
TIMM_REPOS = {f'timm/densenet{depth}.tv_in1k' for depth in (121, 161, 169, 201)}
TINY_MSDNET = dict(n_blocks=2, step=1, base=1, channels=4, growth_rate=2)  # ImageNet stem, sides 129..384
TINY_DENSENET = dict(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8)


class _Server(http.server.ThreadingHTTPServer):
    files: dict
    requests: list
    truncate: set


class _Handler(http.server.BaseHTTPRequestHandler):
    def _serve(self, body: bool):
        self.server.requests.append(self.path)
        path = urlparse(self.path).path
        data = self.server.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if body:  # a transfer cut mid-file: the full length announced, half of it sent, the connection closed
            self.wfile.write(data[:len(data) // 2] if path in self.server.truncate else data)

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _Server(('127.0.0.1', 0), _Handler)
    srv.files, srv.requests, srv.truncate = {}, [], set()
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches, online; the Hub's address is a closed loopback port's."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    for name in ('HF_HUB_OFFLINE', pretrained.OFFLINE_ENV, hub.MIRROR_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def _hub_at(server, monkeypatch):
    """huggingface_hub's requests go to the loopback server (which answers 404: no repository there)."""
    monkeypatch.setattr(huggingface_hub.constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                        f'http://127.0.0.1:{server.server_port}/{{repo_id}}/resolve/{{revision}}/{{filename}}')


def _serve_as(server, monkeypatch, name: str, checkpoint) -> str:
    """Serve ``checkpoint`` at the path of the tag's released URL and point the tag's URL at the server, replacing
    only the host. Returns the URL."""
    cfg = _registry._model_pretrained_cfgs[name]
    url, file_name = pretrained.url_and_file_name(cfg.url, name)
    parsed = urlparse(url)
    local = parsed._replace(scheme='http', netloc=f'127.0.0.1:{server.server_port}').geturl()
    monkeypatch.setattr(cfg, 'url', (local, file_name) if isinstance(cfg.url, tuple) else local)
    server.files[parsed.path] = _saved(checkpoint)
    return local


def _saved(checkpoint) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def _random_model(name: str, seed: int, **kwargs):
    torch.manual_seed(seed)
    model = dynzoo.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return model


def _assert_same_outputs(a, b, x):
    with torch.no_grad():
        out_a, out_b = a.eval()(x), b.eval()(x)
    for ya, yb in zip(out_a if isinstance(out_a, list) else [out_a], out_b if isinstance(out_b, list) else [out_b]):
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)


def _l2w_checkpoint(model):
    """L2W-DEN's ``torch.save`` dict: the DDP model's ``.module`` state dict (no prefix), its optimizer, and the
    weight prediction network with its own optimizer."""
    meta = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    return dict(epoch=300, arch='msdnet', state_dict=model.state_dict(), best_prec1=75.03, is_best=True,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
                meta_state_dict=meta.state_dict(), meta_optimizer=torch.optim.Adam(meta.parameters()).state_dict())


def test_l2w_url_loads_strictly_and_is_cached(server, caches, monkeypatch):
    name = 'msdnet_step4.l2w_e300_in1k'
    model = _random_model('msdnet_step4', seed=0, **TINY_MSDNET)
    _serve_as(server, monkeypatch, name, _l2w_checkpoint(model))
    loaded = dynzoo.create_model('msdnet_step4', pretrained=True, **TINY_MSDNET)  # the bare name's default
    _assert_same_outputs(model, loaded, torch.randn(2, 3, 160, 160))
    assert server.requests == ['/f/496543cfbbc741e380dd/?dl=1']
    assert sorted(p.name for p in caches.iterdir()) == [f'{name}.pth.tar']

    again = dynzoo.create_model(name, pretrained=True, **TINY_MSDNET)  # from the cache: no request
    assert len(server.requests) == 1
    _assert_same_outputs(model, again, torch.randn(1, 3, 129, 129))

    strict = _l2w_checkpoint(model)
    del strict['state_dict']['classifier.1.linear.bias']
    _serve_as(server, monkeypatch, 'msdnet_step4.l2w_e100_in1k', strict)
    with pytest.raises(CheckpointMismatchError, match=r'1 missing key\(s\): classifier\.1\.linear\.bias'):
        dynzoo.create_model('msdnet_step4.l2w_e100_in1k', pretrained=True, **TINY_MSDNET)

    # Weights of another base (as the step 6 ones would be if L2W-DEN trained them with base 4): the error says so.
    other_base = _random_model('msdnet_step6', seed=0, **dict(TINY_MSDNET, base=2))
    _serve_as(server, monkeypatch, 'msdnet_step6.l2w_e300_in1k', _l2w_checkpoint(other_base))
    with pytest.raises(CheckpointMismatchError, match=r'missing key.*blocks hold \[4, 2\] modules .* this model.s '
                       r'\[2, 2\]: the checkpoint was built with another base, step or n_blocks'):
        dynzoo.create_model('msdnet_step6', pretrained=True, **TINY_MSDNET)


def _assert_same_state_dict(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)


def test_timm_create_model_takes_dynzoos_sources(server, caches, monkeypatch):
    """After ``import dynzoo``, timm.create_model loads the URL without a file name (the bare name's default tag)
    as dynzoo.create_model does, from the one file it downloads, and keeps no copy of the weights in its cfg."""
    model = _random_model('msdnet_step4', seed=6, **TINY_MSDNET)
    _serve_as(server, monkeypatch, 'msdnet_step4.l2w_e300_in1k', _l2w_checkpoint(model))
    through_timm = timm.create_model('msdnet_step4', pretrained=True, **TINY_MSDNET)
    through_dynzoo = dynzoo.create_model('msdnet_step4.l2w_e300_in1k', pretrained=True, **TINY_MSDNET)
    _assert_same_state_dict(model, through_timm)
    _assert_same_state_dict(through_dynzoo, through_timm)
    assert server.requests == ['/f/496543cfbbc741e380dd/?dl=1']
    assert through_timm.pretrained_cfg == through_dynzoo.pretrained_cfg
    assert 'state_dict' not in through_timm.pretrained_cfg
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError, match=r"'msdnet_step7\.in1k'.*https://www\.dropbox"):
        timm.create_model('msdnet_step7.in1k', pretrained=True)  # the same clear error, not random weights


def test_timm_create_model_loads_the_shipped_weights_offline_and_the_mirror_first(caches, monkeypatch, tmp_path):
    name = 'msdnet_cifar_b7.c10'
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    shipped = safetensors.torch.load_file(hub.PACKAGE_MIRROR / name / 'model.safetensors')
    through_timm = timm.create_model(name, pretrained=True)
    assert through_timm.state_dict().keys() == shipped.keys()
    assert all(torch.equal(through_timm.state_dict()[k], v.float()) for k, v in shipped.items())
    _assert_same_state_dict(dynzoo.create_model(name, pretrained=True), through_timm)

    model = _random_model('msdnet_cifar_b7', seed=7, num_classes=10)
    hub.save_pretrained(model, tmp_path / 'mirror' / 'dynzoo' / name, model_name=name)
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / 'mirror'))  # the mirror comes before the shipped folder
    through_timm = timm.create_model(name, pretrained=True)
    _assert_same_state_dict(model, through_timm)
    _assert_same_state_dict(dynzoo.create_model(name, pretrained=True), through_timm)


def test_official_dataparallel_file_loads_from_a_url_and_from_the_cache(server, caches, monkeypatch):
    model = _random_model('msdnet_step4', seed=1, **TINY_MSDNET)
    official = dict(epoch=90, arch='msdnet', best_prec1=75.0,
                    state_dict={f'module.{k}': v for k, v in model.state_dict().items()},
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    server.files['/msdnet-step=4-block=5.pth.tar'] = _saved(official)
    url = f'http://127.0.0.1:{server.server_port}/msdnet-step=4-block=5.pth.tar'
    loaded = dynzoo.create_model('msdnet_step4.in1k', pretrained=True, pretrained_cfg_overlay=dict(url=url),
                                 **TINY_MSDNET)
    _assert_same_outputs(model, loaded, torch.randn(1, 3, 160, 160))
    # The file-only tag finds the released file under its own name in the cache, with no request.
    assert (caches / FILE_ONLY['msdnet_step4.in1k']).is_file()
    cached = dynzoo.create_model('msdnet_step4.in1k', pretrained=True, **TINY_MSDNET)
    _assert_same_outputs(model, cached, torch.randn(1, 3, 160, 160))
    assert len(server.requests) == 1


@pytest.mark.parametrize('create', [dynzoo.create_model, timm.create_model], ids=['dynzoo', 'timm'])
def test_torchvision_file_is_the_fallback_when_the_hub_fails(server, caches, monkeypatch, create):
    _hub_at(server, monkeypatch)
    model = _random_model('densenet_bc_121', seed=2, **TINY_DENSENET)
    legacy = {re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): v
              for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}  # pre-0.4 file
    assert any('.norm.1.' in k for k in legacy)
    _serve_as(server, monkeypatch, 'densenet_bc_121.tv_in1k', legacy)
    loaded = create('densenet_bc_121', pretrained=True, **TINY_DENSENET)
    _assert_same_outputs(model, loaded, torch.randn(2, 3, 64, 64))
    assert server.requests[-1] == '/models/densenet121-a639ec97.pth'
    assert any('/timm/densenet121.tv_in1k/resolve/' in p for p in server.requests[:-1])  # the Hub was tried first
    assert sorted(p.name for p in caches.iterdir()) == ['densenet121-a639ec97.pth']  # torch.hub's own name


def test_interrupted_transfer_leaves_no_file_and_says_what_to_do(server, caches, monkeypatch):
    name = 'msdnet_step7.l2w_e300_in1k'
    model = _random_model('msdnet_step7', seed=3, **TINY_MSDNET)
    url = _serve_as(server, monkeypatch, name, _l2w_checkpoint(model))
    server.truncate.add(urlparse(url).path)
    expected = caches / f'{name}.pth.tar'
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError) as error:
        dynzoo.create_model(name, pretrained=True, **TINY_MSDNET)
    message = str(error.value)
    for part in (url, 'transfer stopped', str(expected), 'pretrained_cfg_overlay=dict(file=PATH)', 'in the cache'):
        assert part in message
    assert not caches.exists() or list(caches.iterdir()) == []  # neither the file nor a partial one is left

    server.truncate.clear()
    _assert_same_outputs(model, dynzoo.create_model(name, pretrained=True, **TINY_MSDNET),
                         torch.randn(1, 3, 160, 160))

    expected.unlink()
    del server.files[urlparse(url).path]  # a source that cannot be reached
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError, match=r'HTTP Error 404') as error:
        dynzoo.create_model(name, pretrained=True, **TINY_MSDNET)
    assert url in str(error.value) and 'pretrained_cfg_overlay=dict(file=PATH)' in str(error.value)


@pytest.mark.parametrize('setting', ['HF_HUB_OFFLINE', pretrained.OFFLINE_ENV])
def test_offline_makes_no_request_and_names_the_ways_out(server, caches, monkeypatch, setting):
    name = 'msdnet_step6.l2w_e300_in1k'
    url = _serve_as(server, monkeypatch, name, {})
    _hub_at(server, monkeypatch)
    _serve_as(server, monkeypatch, 'densenet_bc_169.tv_in1k', {})
    monkeypatch.setenv(setting, '1')  # the variable only: huggingface_hub read its setting (off) at import
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError) as error:
        dynzoo.create_model(name, pretrained=True)
    for part in ('offline', url, str(caches / f'{name}.pth.tar'), 'pretrained_cfg_overlay=dict(file=PATH)'):
        assert part in str(error.value)
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError, match=r'timm/densenet169\.tv_in1k.*offline'):
        dynzoo.create_model('densenet_bc_169', pretrained=True)
    assert server.requests == []


def test_offline_densenet_names_the_hub_repository_and_the_url(caches, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError, match=r'timm/densenet121\.tv_in1k.*offline.*'
                       r'https://download\.pytorch\.org/models/densenet121-a639ec97\.pth.*'
                       r'pretrained_cfg_overlay=dict\(file=PATH\)'):
        dynzoo.create_model('densenet_bc_121.tv_in1k', pretrained=True)


def test_file_only_weights_name_their_folder_and_file(caches):
    with pytest.raises(dynzoo.PretrainedWeightsNotFoundError, match=r"'msdnet_step7\.in1k'.*https://www\.dropbox\.com"
                       r"/sh/.*msdnet-step=7-block=5\.pth\.tar.*pretrained_cfg_overlay=dict\(file=PATH\)"):
        dynzoo.create_model('msdnet_step7.in1k', pretrained=True)


def _hf_cache_repo(cache: Path, repo_id: str, files: dict) -> None:
    """``files`` (name -> bytes) as huggingface_hub stores a download: blobs named by their sha256, a snapshot of
    relative links to them, ``refs/main`` naming the snapshot."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / 'blobs' / blob).write_bytes(data)
        (repo / 'snapshots' / commit / name).symlink_to(Path('..') / '..' / 'blobs' / blob)


@pytest.mark.parametrize('create', [dynzoo.create_model, timm.create_model], ids=['dynzoo', 'timm'])
def test_densenet_from_timms_hub_repository_in_the_hf_cache(server, caches, monkeypatch, create):
    torch.manual_seed(4)
    reference = timm.create_model('densenet121').eval()
    _hf_cache_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), 'timm/densenet121.tv_in1k', {
        'model.safetensors': safetensors.torch.save(reference.state_dict()),
        'config.json': json.dumps(dict(architecture='densenet121', num_classes=1000)).encode()})
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = create('densenet_bc_121', pretrained=True)  # timm and huggingface_hub read the cache
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv(pretrained.OFFLINE_ENV, '1')  # dynzoo's setting, unknown to huggingface_hub
    _hub_at(server, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(create('densenet_bc_121', pretrained=True).eval()(x), expected, rtol=0, atol=0)
    assert server.requests == []
    [row] = pretrained.weights_table('densenet_bc_121*')
    assert row['cached'] == 'yes' and row['size'] == '30.8 MiB'  # timm's densenet121 in float32


@pytest.fixture
def unittest_tag(server, caches, monkeypatch, tmp_path):
    """The tag msdnet_cifar_b7.unittest: Hub id dynzoo/msdnet_cifar_b7.unittest, URL on the loopback server."""
    name = 'msdnet_cifar_b7.unittest'
    monkeypatch.setitem(_registry._model_pretrained_cfgs, name, PretrainedCfg(**dict(
        get_pretrained_cfg('msdnet_cifar_b7').to_dict(), tag='unittest', hf_hub_id=f'dynzoo/{name}', num_classes=10,
        url=f'http://127.0.0.1:{server.server_port}/unittest.pth')))
    monkeypatch.setitem(_registry._model_with_tags, 'msdnet_cifar_b7',
                        _registry._model_with_tags['msdnet_cifar_b7'] + [name])
    monkeypatch.setattr(_registry, '_model_has_pretrained', _registry._model_has_pretrained | {name})
    monkeypatch.setattr(hub, 'PACKAGE_MIRROR', tmp_path / 'shipped')
    return name


def test_one_checkpoint_gives_the_same_model_from_every_source(unittest_tag, server, caches, monkeypatch, tmp_path):
    tiny = dict(n_blocks=2, base=1, step=1, channels=4, growth_rate=2)
    model = _random_model('msdnet_cifar_b7', seed=5, num_classes=10, **tiny)
    authors = {'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}
    torch.save(authors, tmp_path / 'authors.pth')
    server.files['/unittest.pth'] = _saved(authors)
    x = torch.randn(2, 3, 32, 32)

    def check(**kwargs):
        _assert_same_outputs(model, dynzoo.create_model(unittest_tag, pretrained=True, **tiny, **kwargs), x)

    check(pretrained_cfg_overlay=dict(file=tmp_path / 'authors.pth'))
    check(pretrained_cfg_overlay=dict(state_dict=authors))
    check(pretrained_cfg_overlay=dict(hf_hub_id=None))  # the URL
    hub.save_pretrained(model, tmp_path / 'folder', model_name=unittest_tag)
    files = {p.name: p.read_bytes() for p in (tmp_path / 'folder').iterdir()}
    _hf_cache_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), f'dynzoo/{unittest_tag}', files)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    check()  # the Hub, from its cache
    (tmp_path / 'mirror' / 'dynzoo').mkdir(parents=True)
    (tmp_path / 'mirror' / 'dynzoo' / unittest_tag).symlink_to(tmp_path / 'folder')
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / 'mirror'))
    check()  # the mirror
    monkeypatch.delenv(hub.MIRROR_ENV)
    (tmp_path / 'shipped').mkdir()
    (tmp_path / 'shipped' / unittest_tag).symlink_to(tmp_path / 'folder')
    check()  # the shipped folder
    assert len(server.requests) == 1


@pytest.mark.parametrize('name', dynzoo.list_models(pretrained=True))
def test_every_pretrained_tag_has_a_source_that_exists(name):
    cfg = get_pretrained_cfg(name)
    org, _, repo = (cfg.hf_hub_id or '').partition('/')
    if org == 'dynzoo':  # dynzoo's own weights ship in the package
        assert (hub.PACKAGE_MIRROR / repo / 'model.safetensors').is_file()
        assert (hub.PACKAGE_MIRROR / repo / 'config.json').is_file()
        assert hub.mirror_folder(name) == hub.PACKAGE_MIRROR / repo
    elif cfg.hf_hub_id:
        assert cfg.hf_hub_id in TIMM_REPOS
        timm_name = cfg.hf_hub_id.split('/')[1]
        assert timm.models.get_pretrained_cfg(timm_name).hf_hub_id == cfg.hf_hub_id  # timm's own tag
    else:
        assert cfg.url, f'{name} has no source'
    if cfg.url:
        url, file_name = pretrained.url_and_file_name(cfg.url, name)
        parsed = urlparse(url)
        assert parsed.scheme == 'https' and '.' in file_name
        assert parsed.path.endswith(file_name) or parsed.query == 'dl=1', url  # a file, not a web page
    if name in REPORTED_TOP1:
        assert AS_REPORTED in cfg.description


def test_bare_names_default_to_the_best_released_weights():
    for arch in ('msdnet_step4', 'msdnet_step6', 'msdnet_step7'):
        tags = [n for n in dynzoo.list_models(f'{arch}.*', pretrained=True) if n in REPORTED_TOP1]
        best = max(tags, key=lambda n: REPORTED_TOP1[n][1][-1])
        assert f'{arch}.{get_pretrained_cfg(arch).tag}' == best == f'{arch}.l2w_e300_in1k'
    assert get_pretrained_cfg('densenet_bc_121').hf_hub_id == 'timm/densenet121.tv_in1k'


@pytest.mark.parametrize('name', sorted(p.name for p in hub.PACKAGE_MIRROR.iterdir()))
def test_shipped_configs_match_the_registered_ones(name):
    config = json.loads((hub.PACKAGE_MIRROR / name / 'config.json').read_text())
    registered = get_pretrained_cfg(name).to_dict()
    assert config['architecture'] == registered['architecture'] and config['num_classes'] == registered['num_classes']
    for key, value in config['pretrained_cfg'].items():
        expected = registered.get(key)
        assert value == (list(expected) if isinstance(expected, tuple) else expected), key


@pytest.mark.parametrize('name', sorted(p.name for p in hub.PACKAGE_MIRROR.iterdir()))
def test_shipped_model_cards_are_built_from_their_config_and_link_only_real_pages(name):
    folder = hub.PACKAGE_MIRROR / name
    config = json.loads((folder / 'config.json').read_text())
    card = (folder / 'README.md').read_text()
    assert card == hub._model_card(name, config)
    assert huggingface_hub.ModelCard(card).data.library_name == 'timm'
    cfg = get_pretrained_cfg(name)
    ids = cfg.paper_ids.split(':')[1]
    real = {cfg.origin_url, f'https://arxiv.org/abs/{ids}', f'https://doi.org/{ids}'}
    links = set(re.findall(r'https?://[^\s)>]+', card))
    assert links and links <= real, links - real


def test_weights_command_lists_every_tag_with_its_source(capsys):
    assert main(['weights']) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith('cache:')}
    assert set(rows) == set(dynzoo.list_models(pretrained=True)) | set(FILE_ONLY)
    assert 'shipped' in rows['msdnet_cifar_b7.c10'] and 'measured here' in rows['msdnet_cifar_b7.c10']
    assert '61.64 / 67.89 / 71.61 / 73.82 / 75.03' in rows['msdnet_step4.l2w_e300_in1k']
    assert AS_REPORTED in rows['msdnet_step4.l2w_e300_in1k'] and 'cloud.tsinghua.edu.cn' in rows[
        'msdnet_step4.l2w_e300_in1k']
    assert 'Hub timm/densenet121.tv_in1k' in rows['densenet_bc_121.tv_in1k']
    assert 'file only' in rows['msdnet_step4.in1k']
    assert main(['weights', 'scan*']) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]] == ['scan_resnet18.c10']
