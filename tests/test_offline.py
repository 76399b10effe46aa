"""Offline, a real-data run names everything it lacks (dataset files, models, reward models) in one error within
seconds: the hub is asked once (data.hub_unreachable) and, when it does not answer, only local folders and the
hub cache are looked in. No network: every request huggingface_hub makes goes to a fake transport that counts it
and either refuses it (an unreachable hub) or answers it."""
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants

import data
import macpo
import stages
from tiny import make_model, make_tokenizer

try:                                    # huggingface_hub 2.x's HTTP client, or 1.x's
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
if not hasattr(huggingface_hub, "set_client_factory"):
    pytest.skip("huggingface_hub before 1.0 has no client factory to fake the network with",
                allow_module_level=True)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeNetwork:
    """Every request huggingface_hub sends, recorded as (method, url); answered with `status`, or refused as
    an unreachable host when status is None.

    huggingface_hub 2.x also fetches, at most once per process, a registry for its user-agent telemetry
    ({ENDPOINT}/api/agent-harnesses, 3-second timeout) when transformers first builds a user agent, even for
    local-only loads; that request is its own, kept apart in `telemetry`."""

    def __init__(self, status=None):
        self.status, self.requests, self.telemetry = status, [], []

    def __call__(self, request):
        url = str(request.url)
        (self.telemetry if url.endswith("/api/agent-harnesses") else self.requests).append((request.method, url))
        if self.status is None:
            raise httpx.ConnectError("[Errno -2] Name or service not known (test)", request=request)
        return httpx.Response(self.status, request=request)


@pytest.fixture
def network(monkeypatch, tmp_path):
    """A fake network (unreachable until the test sets .status), online mode, and an empty hub cache."""
    fake = FakeNetwork()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    data._hub_answer.cache_clear()
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(fake)))
    yield fake
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    data._hub_answer.cache_clear()


def tiny_model_folder(path):
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cache_model(repo_id, tokenizer_and_config_from):
    """Lay out `repo_id` in the hub cache as huggingface_hub does (a ref naming a commit, the files under that
    commit's snapshot): its config and tokenizer only, all check_models reads."""
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in Path(tokenizer_and_config_from).iterdir():
        if f.name != "model.safetensors":
            (snapshot / f.name).write_bytes(f.read_bytes())


def test_unreachable_hub_is_asked_once_and_said_once(network, capsys):
    reason = data.hub_unreachable()
    assert reason.startswith("https://huggingface.co is unreachable: ConnectError") and data.hub_unreachable() == reason
    assert network.requests == [("HEAD", "https://huggingface.co")]
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and "HF_HUB_OFFLINE=1" in err


def test_hub_offline_switch_asks_nothing(network, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert data.hub_unreachable() == "HF_HUB_OFFLINE is set"
    assert network.requests == []


@pytest.mark.parametrize("status, reachable", [(200, True), (404, True), (503, False)])
def test_the_endpoint_of_hf_endpoint_is_the_one_asked(network, monkeypatch, status, reachable):
    # HF_ENDPOINT (a mirror) is read into huggingface_hub.constants.ENDPOINT; any answer short of a server error
    # means the hub can be asked.
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://mirror.example")
    network.status = status
    reason = data.hub_unreachable()
    assert (reason is None) == reachable
    if not reachable:
        assert reason == "https://mirror.example answered HTTP 503"
    assert network.requests == [("HEAD", "https://mirror.example")]


def test_unreachable_hub_run_names_every_missing_file_and_model_at_once(network, tmp_path):
    """Two dataset files, a teacher, the student and a reward model missing, one teacher a local folder: one
    error names the five, each with where to put it, after a single request to the hub and before any stage."""
    local = tiny_model_folder(tmp_path / "local-teacher")
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as e:
        macpo.main(["--task", "hh-helpful", "--teachers", f"nobody/t0,{local}", "--student", "nobody/s",
                    "--reward_models", "nobody/rm", "--system", "", "--out", str(tmp_path / "run"),
                    "--data_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache")])
    msg = str(e.value)
    assert network.requests == [("HEAD", "https://huggingface.co")] and len(network.telemetry) <= 1
    assert "5 of the run's files or models are missing" in msg
    lines = msg.splitlines()[1:]
    assert len(lines) == 5
    for split in ("train", "test"):
        line = next(x for x in lines if f"helpful-base/{split}.jsonl.gz" in x)
        assert str(tmp_path / "data" / "hh-rlhf" / "helpful-base" / f"{split}.jsonl.gz") in line
        assert "https://huggingface.co is unreachable" in line
    for name, flag in (("nobody/t0", "--teachers"), ("nobody/s", "--student"), ("nobody/rm", "--reward_models")):
        line = next(x for x in lines if f"'{name}' ({flag})" in x)
        assert f"`hf download {name} --local-dir models/{name.split('/')[1]}`" in line and f"pass it to {flag}" in line
        assert f"if it is a folder of yours, {name} does not exist here" in line
        assert str(tmp_path / "hub-cache") in line
    assert str(local) not in msg
    assert not (tmp_path / "run" / "init").exists()


@pytest.mark.parametrize("switch", [False, True])
def test_hub_cache_counts_when_the_hub_is_unreachable(network, tmp_path, monkeypatch, switch):
    # A model in the hub cache passes without the hub, unreachable or HF_HUB_OFFLINE; one that is not is named.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", switch)
    cache_model("someone/tiny", tiny_model_folder(tmp_path / "tiny"))
    cfg = macpo.parse_config(["--task", "hh-helpful", "--teachers", "someone/tiny", "--student", "someone/tiny",
                              "--reward_models", "someone/tiny", "--system", ""])
    assert stages.check_models(cfg) == []
    asked = [] if switch else [("HEAD", "https://huggingface.co")]
    assert network.requests == asked
    cfg.student = "someone/absent"
    missing = stages.check_models(cfg)
    assert len(missing) == 1 and "'someone/absent' (--student)" in missing[0]
    assert ("HF_HUB_OFFLINE is set" if switch else "is unreachable") in missing[0]
    assert network.requests == asked                       # still the one request, or none


def test_dataset_in_the_hub_cache_is_used_when_the_hub_is_unreachable(network, tmp_path):
    repo = tmp_path / "cache" / "datasets--Anthropic--hh-rlhf"
    cached = repo / "snapshots" / COMMIT / "helpful-base" / "train.jsonl.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert data.dataset_file("hh", "helpful-base", "train", cache_dir=tmp_path / "cache") == cached
    assert data.missing_dataset_files([("hh", "helpful-base", "train")], cache_dir=tmp_path / "cache") == []
    assert network.requests == [("HEAD", "https://huggingface.co")]


def test_local_folders_never_ask_the_hub(network, tmp_path):
    local = str(tiny_model_folder(tmp_path / "m"))
    cfg = macpo.parse_config(["--task", "hh-helpful", "--teachers", f"{local},{local}", "--student", local,
                              "--reward_models", local, "--system", ""])
    assert stages.check_models(cfg) == []
    assert network.requests == []


def test_a_reachable_hub_is_asked_for_each_model(network, tmp_path, monkeypatch):
    # With the hub answering, models are checked online as before (check_model without local_files_only).
    network.status = 200
    asked = []

    def check_model(name, trust_remote_code=False, local_files_only=False):
        asked.append((name, local_files_only))
        raise data.ModelLoadError(f"cannot load model {name!r} (test)")
    monkeypatch.setattr(stages, "check_model", check_model)
    cfg = macpo.parse_config(["--task", "hh-helpful", "--teachers", "a/t0,a/t1", "--student", "a/s",
                              "--reward_models", "a/rm"])
    missing = stages.check_models(cfg)
    assert asked == [("a/t0", False), ("a/t1", False), ("a/s", False), ("a/rm", False)]
    assert missing == [f"cannot load model {n!r} (test)" for n in ("a/t0", "a/t1", "a/s", "a/rm")]
