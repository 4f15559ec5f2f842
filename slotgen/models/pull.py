"""``slotgen pull NAME``: a ready model folder from the Hugging Face Hub, verified, assembled atomically.

What each name is made of (repository ids and file names from each project's README and configs):

==============  ===========================================================================================
name            files
==============  ===========================================================================================
``wan-base``    ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: ``transformer/``, ``vae/``, ``text_encoder/``,
                ``tokenizer/`` (the bidirectional base; streaming it runs, the pictures are poor)
``self-forcing`` Wan's ``transformer/config.json``, ``vae/``, ``text_encoder/``, ``tokenizer/`` +
                ``gdhe17/Self-Forcing``: ``checkpoints/self_forcing_dmd.pt`` (preset ``self_forcing``)
``longlive``    the same Wan parts + ``Efficient-Large-Model/LongLive-1.3B``: ``models/longlive_base.pt``
                + ``models/lora.pt`` (rank 256, ``lora_alpha: 256`` in LongLive's configs; preset ``longlive``)
``memflow``     the same Wan parts + ``KlingTeam/MemFlow``: ``base.pt`` + ``lora.pt`` at the repository root
                (its ``configs/inference.yaml`` reads them from ``checkpoints/`` after ``--local-dir
                checkpoints``; preset ``memflow``)
==============  ===========================================================================================

A causal checkpoint replaces the transformer's weights, so its folder takes only Wan's
``transformer/config.json`` (the architecture), not the base transformer weights.

Downloads go through ``huggingface_hub`` (``snapshot_download`` with ``allow_patterns``, ``hf_hub_download``)
into its cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` are honoured by the
library); an interrupted download resumes from the cache's ``.incomplete`` file. The model folder holds
symbolic links into that cache, so every checkpoint shares one copy of Wan's sub-folders, plus its
``slotgen.json`` (the preset and the causal weights) and ``pull.json`` (what was fetched, at which commit).

The folder is assembled in a hidden temporary directory beside its final place and renamed into place
only after verification: every file present and non-empty, sizes equal to the hub's (when online), every
safetensors header readable and consistent with its file size, every shard of an index present, the
configs parse, and the transformer weights (the checkpoint with its LoRA merged, or Wan's own) match the
architecture of ``transformer/config.json`` key for key and shape for shape. A failed or interrupted
pull leaves no folder that ``render`` would accept.

Where pulled folders live: ``$SLOTGEN_HOME/models/NAME`` (``SLOTGEN_HOME`` defaults to
``~/.local/share/slotgen``). ``--model NAME`` resolves a built-in name first, then an existing path, then a
pulled folder of that name (:func:`resolve_model_path`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slotgen.errors import ModelError, one_line, write_cause

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_PARTS = ("transformer/config.json", "vae/*", "text_encoder/*", "tokenizer/*")  # what a checkpoint folder needs
WAN_BASE_PARTS = ("transformer/*", "vae/*", "text_encoder/*", "tokenizer/*")
MANIFEST = "pull.json"


class PullError(ModelError):
    """A pull that could not complete (network, missing file, wrong content, disk); nothing was installed."""


@dataclass(frozen=True)
class RepoFile:
    """One file of a checkpoint repository and where it goes in the model folder."""

    repo: str
    path: str  # inside the repository
    dest: str  # inside the model folder


@dataclass(frozen=True)
class Pullable:
    """A model folder ``slotgen pull`` can assemble."""

    name: str
    summary: str
    wan_patterns: tuple[str, ...]
    files: tuple[RepoFile, ...] = ()
    settings: dict = field(default_factory=dict)  # slotgen.json

    @property
    def repos(self) -> list[str]:
        return [WAN_REPO] + sorted({f.repo for f in self.files})


PULLABLE: dict[str, Pullable] = {p.name: p for p in (
    Pullable("wan-base", "Wan2.1-T2V-1.3B, diffusers format (bidirectional base)", WAN_BASE_PARTS,
             settings={"name": "wan2.1-t2v-1.3b"}),
    Pullable("self-forcing", "Self-Forcing DMD causal generator on Wan2.1-T2V-1.3B", WAN_PARTS,
             (RepoFile("gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", "checkpoints/self_forcing_dmd.pt"),),
             {"name": "wan2.1-1.3b-self-forcing", "preset": "self_forcing",
              "checkpoint": "checkpoints/self_forcing_dmd.pt"}),
    Pullable("longlive", "LongLive-1.3B: base + LoRA on Wan2.1-T2V-1.3B", WAN_PARTS,
             (RepoFile("Efficient-Large-Model/LongLive-1.3B", "models/longlive_base.pt", "checkpoints/longlive_base.pt"),
              RepoFile("Efficient-Large-Model/LongLive-1.3B", "models/lora.pt", "checkpoints/lora.pt")),
             {"name": "wan2.1-1.3b-longlive", "preset": "longlive", "checkpoint": "checkpoints/longlive_base.pt",
              "lora": "checkpoints/lora.pt", "lora_alpha": 256}),
    Pullable("memflow", "MemFlow: base + LoRA on Wan2.1-T2V-1.3B", WAN_PARTS,
             (RepoFile("KlingTeam/MemFlow", "base.pt", "checkpoints/base.pt"),
              RepoFile("KlingTeam/MemFlow", "lora.pt", "checkpoints/lora.pt")),
             {"name": "wan2.1-1.3b-memflow", "preset": "memflow", "checkpoint": "checkpoints/base.pt",
              "lora": "checkpoints/lora.pt", "lora_alpha": 256}),
)}


# --- where pulled folders live -----------------------------------------------------------------------------
def slotgen_home() -> Path:
    """``$SLOTGEN_HOME``, else ``~/.local/share/slotgen``."""
    return Path(os.environ.get("SLOTGEN_HOME") or "~/.local/share/slotgen").expanduser()


def models_dir() -> Path:
    """Where ``slotgen pull`` puts folders by default and where ``--model NAME`` finds them."""
    return slotgen_home() / "models"


def pulled_folder(name: str, directory: Path | None = None) -> Path | None:
    """The pulled folder ``name`` (a verified one: it has its ``pull.json``), or None."""
    folder = (directory or models_dir()) / name
    return folder if (folder / MANIFEST).is_file() else None


def resolve_model_path(spec: str) -> Path | None:
    """Where ``--model spec`` points when it is not a built-in: an existing path first, then a pulled folder.

    None when neither exists (the loader then says what is wrong)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if "/" not in spec and os.sep not in spec:
        return pulled_folder(spec)
    return None


def not_pulled_hint(spec: str) -> str:
    """The hint for a ``--model`` that names a pullable model not pulled yet ('' otherwise)."""
    if spec in PULLABLE and pulled_folder(spec) is None:
        return f"; it can be pulled: slotgen pull {spec} (pulled folders live in {models_dir()}, $SLOTGEN_HOME/models)"
    return ""


# --- the pull ----------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    name: str
    folder: Path
    files: list[dict]  # {dest, repo, path, commit, size}
    checks: list[str]  # what was verified, in words
    sizes_checked: bool


def _hub():
    import huggingface_hub

    return huggingface_hub


def _constants():
    from huggingface_hub import constants

    return constants


def _offline() -> bool:
    return bool(_constants().HF_HUB_OFFLINE)


def _hub_error(err: BaseException, what: str) -> PullError:
    """One line for a huggingface_hub / OS failure while fetching ``what``."""
    import httpx
    from huggingface_hub import errors as e

    if isinstance(err, e.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE=1 and it is not in the local cache " + str(_constants().HF_HUB_CACHE)
               if _offline() else "the hub cannot be reached (no network?) and it is not in the local cache")
        return PullError(f"{what}: {why}; nothing was installed (connect and run the same command)")
    if isinstance(err, httpx.TransportError):
        return PullError(f"{what}: cannot reach the hub {_constants().ENDPOINT} ({type(err).__name__}: "
                         f"{one_line(err, 80)}); no network? nothing was installed (run the same command when connected)")
    if isinstance(err, OSError) and not isinstance(err, e.HfHubHTTPError) and getattr(err, "errno", None):
        where = getattr(err, "filename", None) or _constants().HF_HUB_CACHE
        return PullError(f"{what}: cannot write {where}: {write_cause(err)}; nothing was installed (free space or set "
                         "HF_HOME to a larger disk, then run the same command: finished files are kept)")
    if isinstance(err, e.GatedRepoError):
        return PullError(f"{what}: the repository is gated; accept its terms on huggingface.co and set HF_TOKEN")
    if isinstance(err, e.RepositoryNotFoundError):
        return PullError(f"{what}: repository not found on the hub (or private: set HF_TOKEN); nothing was installed")
    if isinstance(err, e.RevisionNotFoundError):
        return PullError(f"{what}: revision not found on the hub; nothing was installed")
    if isinstance(err, e.EntryNotFoundError):
        return PullError(f"{what}: file not found in the repository; nothing was installed")
    return PullError(f"{what}: download failed ({type(err).__name__}: {one_line(err, 160)}); nothing was installed "
                     "(run the same command to resume)")


def _fetch_wan(patterns: tuple[str, ...], revision: str | None, force: bool = False) -> tuple[Path, list[str]]:
    """Wan's snapshot folder in the cache and the files of it matching ``patterns`` (relative paths)."""
    hub = _hub()
    what = f"{WAN_REPO} ({', '.join(patterns)})"
    try:
        snap = Path(hub.snapshot_download(WAN_REPO, revision=revision, allow_patterns=list(patterns),
                                               force_download=force))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types; each becomes one line
        raise _hub_error(err, what) from None
    rels = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file() or p.is_symlink())
    files = [r for r in rels if any(fnmatch.fnmatch(r, pat) for pat in patterns)]
    for pat in patterns:
        if not any(fnmatch.fnmatch(r, pat) for r in files):
            raise PullError(f"{WAN_REPO}: nothing matches {pat!r} in {snap}; expected the diffusers layout "
                            f"(transformer/, vae/, text_encoder/, tokenizer/) — wrong repository or an incomplete cache")
    return snap, files


def _fetch_file(f: RepoFile, revision: str | None, force: bool = False) -> Path:
    try:
        return Path(_hub().hf_hub_download(f.repo, f.path, revision=revision, force_download=force))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001
        raise _hub_error(err, f"{f.repo}/{f.path}") from None


def _commit_of(path: Path) -> str | None:
    """The commit of a file in huggingface_hub's cache (``.../snapshots/<commit>/...``)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _hub_sizes(repo: str, paths: list[str], revision: str | None) -> dict[str, int]:
    """The hub's sizes of ``paths`` (online only)."""
    try:
        infos = _hub().HfApi().get_paths_info(repo, paths, revision=revision)
    except Exception as err:  # noqa: BLE001
        raise _hub_error(err, f"{repo} (file sizes)") from None
    return {i.path: i.size for i in infos if getattr(i, "size", None) is not None}


def pull(name: str, directory: str | Path | None = None, *, revision: str | None = None, force: bool = False,
         log: Callable[[str], None] = lambda m: None) -> PullResult:
    """Download, verify and install the model folder ``name`` into ``directory`` (default :func:`models_dir`).

    ``force``: download every file again even when the cache has it (after a corrupt or truncated file).
    Re-pulling a complete folder re-verifies it and replaces it atomically. Raises :class:`PullError`
    (one line) and leaves the previous state (no folder, or the previous complete one)."""
    if name not in PULLABLE:
        raise PullError(f"unknown model {name!r}; expected one of {', '.join(PULLABLE)} (slotgen pull --list)")
    if force and _offline():
        raise PullError("--force downloads every file again, which HF_HUB_OFFLINE=1 forbids; unset it or drop --force")
    spec = PULLABLE[name]
    root = Path(directory).expanduser() if directory is not None else models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PullError(f"--dir {root}: cannot create it: {write_cause(err)}") from None
    final = root / name
    if final.exists() and not (final / MANIFEST).is_file():
        raise PullError(f"{final} exists and is not a pulled folder (no {MANIFEST}); move it away or pass another --dir")
    for stale in root.glob(f".{name}.partial-*"):  # a pull killed before it could clean up (not a running one)
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)

    log(f"fetching {WAN_REPO}: {', '.join(spec.wan_patterns)}")
    snap, wan_files = _fetch_wan(spec.wan_patterns, revision, force)
    sources: list[tuple[str, str, Path, str]] = [(WAN_REPO, r, snap / r, r) for r in wan_files]  # repo, path, cached, dest
    for f in spec.files:
        log(f"fetching {f.repo}: {f.path}")
        sources.append((f.repo, f.path, _fetch_file(f, revision, force), f.dest))

    tmp = root / f".{name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        records = []
        for repo, path, cached, dest in sources:
            target = tmp / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(cached.absolute(), target)
            size = cached.stat().st_size if cached.exists() else -1
            records.append({"dest": dest, "repo": repo, "path": path, "commit": _commit_of(cached), "size": size})
        (tmp / "slotgen.json").write_text(json.dumps(spec.settings, indent=2) + "\n")
        sizes_checked = not _offline()
        if sizes_checked:
            log("checking sizes against the hub")
            by_repo: dict[str, list[dict]] = {}
            for r in records:
                by_repo.setdefault(r["repo"], []).append(r)
            hubs = {}
            for repo, rs in by_repo.items():
                try:
                    hubs[repo] = _hub().HfApi().get_paths_info(repo, [r["path"] for r in rs],
                                                               revision=rs[0]["commit"] or revision)
                except Exception as err:  # noqa: BLE001 - the files came from the cache; the hub is unreachable now
                    log(f"sizes not compared with the hub ({type(err).__name__}: {one_line(err, 100)})")
                    sizes_checked = False
                    break
            for repo, rs in by_repo.items():
                hub = {i.path: i.size for i in hubs.get(repo, []) if getattr(i, "size", None) is not None}
                for r in rs:
                    if r["path"] in hub and hub[r["path"]] != r["size"]:
                        raise PullError(f"{repo}/{r['path']}: {r['size']} bytes in the cache, {hub[r['path']]} on the hub "
                                        "(truncated or corrupt download); pull again with --force")
        log("verifying")
        checks = verify_folder(tmp, spec)
        manifest = {"name": name, "files": records, "sizes_checked_against_hub": sizes_checked, "checks": checks}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PullError(f"cannot assemble {final}: {write_cause(err)}; nothing was installed") from None
    except ModelError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, PullError):
            raise
        # a loader's message about a file of the temporary folder: name it inside the model folder
        raise PullError(f"{name}: {str(err).replace(str(tmp) + os.sep, '')}; nothing was installed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PullResult(name, final, records, checks, sizes_checked)


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (text) runs on this machine; not a number counts as dead."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, final: Path) -> None:
    """Rename the verified ``tmp`` to ``final``; an older pulled ``final`` is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- verification ------------------------------------------------------------------------------------------
def _check_safetensors(path: Path, rel: str) -> int:
    """Tensors in a safetensors file; its header must parse and describe exactly the file's bytes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys()))
    except (SafetensorError, OSError, ValueError) as err:
        raise PullError(f"{rel}: not a valid safetensors file ({one_line(err, 120)}): truncated or corrupt; pull again "
                        "with --force") from None


def verify_folder(folder: Path, spec: Pullable) -> list[str]:
    """Check an assembled folder as ``load_wan`` will read it (module docstring); the checks done, in words."""
    import torch

    from slotgen.models.wan import _meta_transformer
    from slotgen.models.wan_checkpoint import checkpoint_state_dict
    from slotgen.models.wan_settings import read_folder_config
    from slotgen.engine.presets import get_preset

    checks = []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        rel = str(p.relative_to(folder))
        if p.stat().st_size == 0:
            raise PullError(f"{rel}: empty file (interrupted download?); pull again with --force")
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (folder / part).is_dir():
            raise PullError(f"{part}/ is missing from the download; expected Wan's diffusers layout")
    n = 0
    for p in files:
        rel = str(p.relative_to(folder))
        if p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except (ValueError, OSError) as err:
                raise PullError(f"{rel}: not valid JSON ({one_line(err, 80)}): corrupt download") from None
        if p.name.endswith(".safetensors.index.json"):
            shards = set(json.loads(p.read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (p.parent / s).is_file())
            if missing:
                raise PullError(f"{rel}: {len(missing)} shard(s) missing (first: {missing[0]}); pull again to resume")
        if p.suffix == ".safetensors":
            _check_safetensors(p, rel)
            n += 1
    checks.append(f"{len(files)} files present and non-empty; {n} safetensors headers consistent with their sizes")

    cfg = read_folder_config(folder)
    tconfig = json.loads((folder / "transformer" / "config.json").read_text())
    model = _meta_transformer(tconfig, torch.float32)
    text_dim = json.loads((folder / "text_encoder" / "config.json").read_text()).get("d_model")
    if text_dim != tconfig.get("text_dim"):
        raise PullError(f"text_encoder/config.json: width {text_dim} differs from the transformer's text_dim "
                        f"{tconfig.get('text_dim')}; wrong repository")
    if cfg.checkpoint is None:
        checkpoint_state_dict(model, folder / "transformer", label="transformer weights")
        checks.append(f"transformer weights: every key and shape of WanTransformer3DModel ({len(model.state_dict())} tensors)")
    else:
        entry = get_preset(cfg.settings.preset).weights
        checkpoint_state_dict(model, cfg.checkpoint, cfg.lora, cfg.lora_alpha, entry=entry)
        lora = f" with {cfg.lora.name} merged (alpha {cfg.lora_alpha:g})" if cfg.lora is not None else ""
        checks.append(f"{cfg.checkpoint.name} ('{entry}'){lora}: every key and shape of WanTransformer3DModel "
                      f"({len(model.state_dict())} tensors)")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - tokenizer loaders raise many types
        raise PullError(f"tokenizer/: cannot be loaded ({type(err).__name__}: {one_line(err, 100)})") from None
    checks.append("tokenizer loads")
    return checks


# --- listing -----------------------------------------------------------------------------------------------
def list_pullable(directory: str | Path | None = None) -> list[dict]:
    """One row per pullable name: summary, repositories, size (recorded when pulled, the hub's when online),
    and where it is when pulled."""
    root = Path(directory).expanduser() if directory is not None else models_dir()
    rows = []
    for spec in PULLABLE.values():
        folder = pulled_folder(spec.name, root)
        size, source = None, "unknown (offline)"
        if folder is not None:
            m = json.loads((folder / MANIFEST).read_text())
            size, source = sum(max(0, f["size"]) for f in m["files"]), "pulled"
        elif not _offline():
            try:
                size, source = _remote_size(spec), "hub"
            except PullError as err:
                source = f"unknown ({err})"
        rows.append({"name": spec.name, "summary": spec.summary, "repos": spec.repos, "bytes": size,
                     "size_from": source, "folder": str(folder) if folder is not None else None})
    return rows


def _remote_size(spec: Pullable) -> int:
    hub = _hub()
    try:
        info = hub.HfApi().model_info(WAN_REPO, files_metadata=True)
    except Exception as err:  # noqa: BLE001
        raise _hub_error(err, WAN_REPO) from None
    total = sum(s.size or 0 for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in spec.wan_patterns))
    for repo in {f.repo for f in spec.files}:
        sizes = _hub_sizes(repo, [f.path for f in spec.files if f.repo == repo], None)
        total += sum(sizes.values())
    return total


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def render_hint(result: PullResult) -> str:
    """The command to run next."""
    default = pulled_folder(result.name) == result.folder
    model = result.name if default else str(result.folder)
    return f"slotgen render STORYBOARD.yaml --model {model} --device cuda"
