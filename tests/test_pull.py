"""``slotgen pull`` offline, against a local Hugging Face cache in huggingface_hub's own layout
(tests/hub_cache.py): tiny random weights under the real repository ids, file names and key names."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from slotgen.errors import ModelError
from slotgen.models import load_model
from slotgen.models.pull import PULLABLE, PullError, list_pullable, pull
from tests.hub_cache import COMMIT, blob_of, build_hub_cache
from tests.test_wan_loading import assert_same_weights, assert_state, expected_merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    models = build_hub_cache(base / "cache", base / "work")
    return base / "cache", models


@pytest.fixture
def hub(built_cache, tmp_path, monkeypatch):
    """A private copy of the cache, made huggingface_hub's cache for this test, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    shutil.copytree(built_cache[0], cache, symlinks=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SLOTGEN_HOME", str(tmp_path / "home"))
    return cache


def only_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg, msg
    return msg


def no_folder(root: Path, name: str) -> None:
    """Nothing render would accept: neither the folder nor a leftover temporary one."""
    assert not (root / name).exists()
    assert not [p for p in root.glob(f".{name}*")] if root.exists() else True
    with pytest.raises(ModelError):
        load_model(name) if root == Path(os.environ["SLOTGEN_HOME"]) / "models" else load_model(str(root / name))


@pytest.mark.slow
def test_pull_assembles_working_folders_for_every_checkpoint(hub, built_cache, tmp_path):
    models = built_cache[1]
    root = tmp_path / "home" / "models"
    for name in ("self-forcing", "longlive", "memflow", "wan-base"):
        result = pull(name)
        assert result.folder == root / name and (root / name / "pull.json").is_file()
        assert json.loads((root / name / "slotgen.json").read_text()) == PULLABLE[name].settings
        assert all(r["commit"] == COMMIT for r in result.files)
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
    # a checkpoint folder takes Wan's architecture, not its base transformer weights
    assert [p.name for p in (root / "longlive" / "transformer").iterdir()] == ["config.json"]
    assert len(list((root / "wan-base" / "transformer").glob("*.safetensors"))) >= 1
    # one shared copy of Wan's sub-folders: every folder's VAE is the same cached blob
    vae = "vae/diffusion_pytorch_model.safetensors"
    blobs = {(root / n / vae).resolve() for n in ("self-forcing", "longlive", "memflow", "wan-base")}
    assert blobs == {blob_of(hub, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", vae)}

    # render's loader finds each by name, with the right weights and preset
    sf = load_model("self-forcing")
    assert sf.settings.preset == "self_forcing" and sf.name == "wan2.1-1.3b-self-forcing"
    assert_same_weights(sf.transformer, models["self-forcing"])  # generator_ema, the preset's entry
    for name in ("longlive", "memflow"):
        bundle = load_model(name)
        generator, lora = models[name]
        assert bundle.settings.preset == name
        assert_state(bundle.transformer, expected_merge(generator, lora, 256 / 4))  # lora_alpha 256, rank 4
    assert_same_weights(load_model("wan-base").transformer, models["wan-base"])
    rows = {r["name"]: r for r in list_pullable()}
    assert rows["longlive"]["folder"] == str(root / "longlive") and rows["longlive"]["bytes"] > 0


@pytest.mark.slow
def test_render_finds_the_pulled_folder_by_name(hub, tmp_path):
    """The CLI end to end: pull, then render --model longlive (environment variables, not patches)."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "SLOTGEN_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "slotgen", *a], capture_output=True, text=True, env=env,
                                    cwd=tmp_path, timeout=300)
    out = run("pull", "longlive")
    assert out.returncode == 0, out.stderr
    assert "next: slotgen render STORYBOARD.yaml --model longlive" in out.stdout
    assert "verified: longlive_base.pt ('generator') with lora.pt merged (alpha 256)" in out.stderr
    story = tmp_path / "s.yaml"
    story.write_text("duration: 1.5625\nfps: 16\nresolution: 48x32\nseed: 1\nprompts:\n  - prompt: a red circle\n")
    out = run("render", str(story), "--model", "longlive", "-o", str(tmp_path / "s.mp4"), "-q")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s.mp4").stat().st_size > 0
    assert "accelerate" not in out.stderr  # no advice to install what slotgen does not need
    listing = run("pull", "--list")
    assert listing.returncode == 0 and "not pulled" in listing.stdout and "(pulled)" in listing.stdout


def test_interrupted_pull_leaves_nothing_and_resumes(hub, tmp_path, monkeypatch):
    import huggingface_hub

    real = huggingface_hub.hf_hub_download
    calls = []

    def interrupted(repo, filename, **kw):
        calls.append(filename)
        if filename == "models/lora.pt":
            raise KeyboardInterrupt
        return real(repo, filename, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull("longlive")
    root = tmp_path / "home" / "models"
    no_folder(root, "longlive")
    # a pull killed with -9 leaves its temporary folder: render never takes it, the next pull removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / f".longlive.partial-{dead.stdout.strip()}" / "vae").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", real)
    with pytest.raises(ModelError, match="slotgen pull longlive"):
        load_model("longlive")
    running = root / f".longlive.partial-{os.getppid()}"  # another pull, still running: left alone
    running.mkdir()
    assert pull("longlive").folder == root / "longlive"
    assert sorted(p.name for p in root.iterdir()) == [running.name, "longlive"]
    load_model("longlive")


@pytest.mark.parametrize("target,damage,match", [
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers:vae/diffusion_pytorch_model.safetensors", "truncate",
     r"vae/diffusion_pytorch_model.safetensors: not a valid safetensors file .*pull again with --force"),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers:text_encoder/model.safetensors", "corrupt",
     r"text_encoder/model.safetensors: not a valid safetensors file"),
    ("Efficient-Large-Model/LongLive-1.3B:models/longlive_base.pt", "truncate", r"longlive_base.pt: not a readable"),
    ("Efficient-Large-Model/LongLive-1.3B:models/lora.pt", "empty", r"checkpoints/lora.pt: empty file"),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers:transformer/config.json", "corrupt", r"transformer/config.json: not valid JSON"),
])
def test_corrupt_or_truncated_file_is_one_line_and_installs_nothing(hub, tmp_path, target, damage, match):
    repo, path = target.split(":")
    blob = blob_of(hub, repo, path)
    data = blob.read_bytes()
    blob.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "corrupt": b"\x07" * 16 + data[16:]}[damage])
    with pytest.raises(PullError) as err:
        pull("longlive")
    assert __import__("re").search(match, only_line(err)), only_line(err)
    no_folder(tmp_path / "home" / "models", "longlive")


def test_wrong_repository_content_is_one_line(hub, tmp_path):
    """A repository holding another architecture (3 layers instead of the config's 2) is refused by key."""
    from tests.hub_cache import add_file, original_state, torch_bytes
    from tests.test_wan_loading import tiny_transformer

    add_file(hub, "gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt",
             torch_bytes({"generator_ema": original_state(tiny_transformer(5, num_layers=3))}, tmp_path))
    with pytest.raises(PullError) as err:
        pull("self-forcing")
    assert "unexpected (first: blocks.2." in only_line(err)
    no_folder(tmp_path / "home" / "models", "self-forcing")


def test_repository_not_found_on_the_hub_is_one_line(hub, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo, filename, **kw):
        url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
        raise RepositoryNotFoundError("404 Client Error\nRepository Not Found",
                                      response=httpx.Response(404, request=httpx.Request("GET", url)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(PullError) as err:
        pull("memflow")
    assert only_line(err).startswith("KlingTeam/MemFlow/base.pt: repository not found on the hub")
    no_folder(tmp_path / "home" / "models", "memflow")


def test_file_not_in_the_offline_cache_is_one_line(hub, tmp_path):
    shutil.rmtree(hub / "models--KlingTeam--MemFlow")
    with pytest.raises(PullError) as err:
        pull("memflow")
    assert "KlingTeam/MemFlow/base.pt: HF_HUB_OFFLINE=1 and it is not in the local cache" in only_line(err)
    no_folder(tmp_path / "home" / "models", "memflow")


@pytest.mark.slow
def test_no_network_is_one_line(tmp_path):
    """Online mode with the hub unreachable (a closed local port) and nothing cached: exit 2, one line."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9", "SLOTGEN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "slotgen", "pull", "self-forcing"], capture_output=True, text=True,
                         env=env, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), out.stderr
    assert "cannot be reached" in lines[-1] or "cannot reach" in lines[-1], lines[-1]
    assert not (tmp_path / "home" / "models" / "self-forcing").exists()


@pytest.mark.parametrize("where", ["cache", "folder"])
def test_full_disk_is_one_line_and_installs_nothing(hub, tmp_path, monkeypatch, where):
    """ENOSPC while the hub library writes its cache, or while the folder is assembled."""
    import huggingface_hub

    import slotgen.models.pull as pull_module

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(hub / "blobs.incomplete"))

    if where == "cache":
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    else:
        monkeypatch.setattr(pull_module.os, "symlink", full)
    with pytest.raises(PullError) as err:
        pull("self-forcing")
    assert "no space left on the device" in only_line(err) and "nothing was installed" in only_line(err)
    no_folder(tmp_path / "home" / "models", "self-forcing")


def test_existing_folder_that_is_not_pulled_is_never_replaced(hub, tmp_path):
    mine = tmp_path / "home" / "models" / "longlive"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(PullError, match="is not a pulled folder"):
        pull("longlive")
    assert (mine / "notes.txt").read_text() == "mine"


def test_force_offline_is_one_line(hub):
    with pytest.raises(PullError, match="--force downloads every file again, which HF_HUB_OFFLINE=1 forbids"):
        pull("longlive", force=True)


def test_unknown_name_is_one_line(hub):
    with pytest.raises(PullError, match="unknown model 'longlife'; expected one of wan-base, self-forcing"):
        pull("longlife")


def test_size_differing_from_the_hub_is_refused(hub, tmp_path, monkeypatch):
    """Online: the files resolve from the cache (the endpoint is a closed port, so the library falls back to
    it) and their sizes are compared with the hub's listing; a short file is refused by name."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    cached = {"checkpoints/self_forcing_dmd.pt": blob_of(hub, "gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt")}

    class Info:
        def __init__(self, path, size):
            self.path, self.size = path, size

    def paths_info(self, repo, paths, revision=None):
        assert revision == COMMIT  # the commit the cache resolved, not a moving branch
        return [Info(p, cached[p].stat().st_size + 1) for p in paths if p in cached]

    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", paths_info)
    with pytest.raises(PullError) as err:
        pull("self-forcing")
    line = only_line(err)
    assert line.startswith("gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt: ") and "on the hub (truncated" in line
    no_folder(tmp_path / "home" / "models", "self-forcing")
