"""Pretrained weights as researchers get them: `model.pretrained` resolved through timm's pretrained configs, fetched
into the ecosystem's own caches, read without unpickling code, and recorded by file and sha256.

`model.pretrained` is one of
- `false` — from scratch;
- `true` — the backbone's default pretrained tag, as timm's `pretrained=True` (the tag in `model.backbone`, e.g.
  `densenet121.tv_in1k`, when it names one);
- a timm tag, whole (`convnext_small.fb_in22k`) or its part after the dot (`fb_in22k`);
- `hf-hub:org/repo[:file]` — a Hugging Face hub repository (its `model.safetensors` unless a file is named);
- an `http(s)://` URL — downloaded as timm downloads its URL weights (torch.hub's cache, `check_hash` on a
  `name-<sha256 prefix>.pth` file name);
- a local path (`model.pretrained_path` is this, kept as an alias).

Where timm gives a tag both a hub repository and a URL, the hub is used, as timm does. Hub files land in the hub's
cache (`HF_HOME`, `HF_HUB_CACHE`; `HF_ENDPOINT` for a mirror; `HF_HUB_OFFLINE=1` reads only the cache), URL files in
torch.hub's (`TORCH_HOME/hub/checkpoints`). A search fetches every file it can draw on its driver before any trial
trains (`prefetch`, over `tune_xray.weights.study_files`); a trial on another node fetches a missing file itself
under a file lock, once per node.

Files are read by `read_checkpoint`: safetensors, or `torch.load(weights_only=True)` with the configuration classes of
known trainer files (VMamba's yacs `CfgNode`) read as plain mappings; any other global is refused, named. A trainer
file's network is its `state_dict` / `model` — the weights the authors evaluated — and its EMA copy only with
`model.pretrained_ema: true`.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

HF_PREFIX = "hf-hub:"
HF_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order for a hub repository's weights
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar", ".ckpt")
# pickled configuration classes of released trainer files, read as plain mappings (no code of theirs runs)
CONFIG_STAND_INS = ("yacs.config.CfgNode",)
NETWORK_KEYS = ("state_dict", "model", "module", "net")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
WHOLE_FILE = "the whole file"  # a file that is the network's state dict, not a trainer file holding it


class WeightsError(ValueError):
    """A pretrained file that is missing, unreadable, refused or does not fit the backbone; the message names it."""


class WeightsMissing(WeightsError):
    """Files not in the cache where nothing may be downloaded (HF_HUB_OFFLINE=1)."""


@dataclass(frozen=True)
class WeightFile:
    """One file a backbone starts from. `source`: hf-hub | url | file; `location`: the hub repository, the URL or
    the path; `filename`: the hub file; `tag`: the timm tag it was resolved from (None for a URL, path or repo)."""

    backbone: str
    source: str
    location: str
    filename: str | None = None
    tag: str | None = None

    @property
    def name(self) -> str:
        """What the record says: `hf-hub:org/repo:file`, the URL, or the path."""
        if self.source == "hf-hub" and self.filename:
            return f"{HF_PREFIX}{self.location}:{self.filename}"
        if self.source == "hf-hub":
            return f"{HF_PREFIX}{self.location}"
        return self.location

    def fetch_command(self) -> str:
        """The command that puts this file in the cache on a machine with network."""
        if self.source == "hf-hub":
            return f"hf download {self.location} {self.filename or HF_DEFAULT_FILES[0]}"
        return (f"python -c \"import torch.hub as h; h.download_url_to_file('{self.location}', "
                f"'{_url_cache(self.location)}')\"")


def _architecture(backbone: str) -> tuple[str, str | None]:
    name, _, tag = backbone.partition(".")
    return name, tag or None


def _is_path(spec: str) -> bool:
    return "/" in spec or spec.startswith((".", "~")) or spec.lower().endswith(WEIGHT_SUFFIXES)


def resolve(backbone: str, pretrained, key: str = "model.pretrained") -> WeightFile | None:
    """The file `backbone` starts from under `pretrained` (see the module's text), or None: from scratch — asked
    (`false`), or `true` for a backbone timm knows no weights for (timm's untagged test models, our test_*). An
    unknown tag is a ConfigError listing the backbone's tags."""
    import timm

    if pretrained is None or pretrained is False:
        return None
    arch, backbone_tag = _architecture(backbone)
    if pretrained is True:
        tag = f"{arch}.{backbone_tag}" if backbone_tag else arch
        return _from_tag(backbone, tag, key, default=True)
    spec = str(pretrained).strip()
    if spec.startswith(HF_PREFIX):
        repo, _, filename = spec[len(HF_PREFIX):].partition(":")
        return WeightFile(backbone, "hf-hub", repo, filename or None)
    if spec.startswith(("http://", "https://")):
        return WeightFile(backbone, "url", spec)
    if "." in spec and timm.is_model(spec.split(".")[0]) and not _is_path(spec):
        if spec.split(".")[0] != arch:
            raise ConfigError(f"{key}={spec!r}: a tag of {spec.split('.')[0]}, not of the backbone {arch}")
        return _from_tag(backbone, spec, key)
    if not _is_path(spec):
        return _from_tag(backbone, f"{arch}.{spec}", key)
    return WeightFile(backbone, "file", str(Path(spec).expanduser()))


def _from_tag(backbone: str, tag: str, key: str, default: bool = False) -> WeightFile | None:
    """A timm pretrained tag's file: its hub repository and file where it has one, else its URL (timm's order)."""
    import timm

    from . import mamba_vision, vmamba  # noqa: F401  (registered with the official releases as their configs)

    arch = tag.split(".")[0]
    try:
        cfg = timm.models.get_pretrained_cfg(tag)
    except RuntimeError:  # timm: 'Invalid pretrained tag (…) for …'
        cfg = None
    if cfg is None:
        tags = sorted(timm.models.get_arch_pretrained_cfgs(arch)) if timm.is_model(arch) else []
        tags = [t for t in tags if _has_weights(timm.models.get_pretrained_cfg(t))]
        raise ConfigError(f"{key}: '{tag}' is not a pretrained tag of {arch}; its tags: {tags or 'none'}")
    if not _has_weights(cfg):
        if default:
            return None  # `true` for a model without published weights: from scratch, and the record says so
        raise ConfigError(f"{key}: timm's '{tag}' has no weights to fetch (no hub repository, no URL)")
    full = tag if "." in tag else f"{tag}.{cfg.tag}" if cfg.tag else tag
    if cfg.hf_hub_id:
        return WeightFile(backbone, "hf-hub", cfg.hf_hub_id, cfg.hf_hub_filename, full)
    return WeightFile(backbone, "url", cfg.url, None, full)


def _has_weights(cfg) -> bool:
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _hub_kwargs() -> dict:
    """The hub's cache, endpoint and offline flag as the environment says now (huggingface_hub reads them once, at
    import)."""
    cache = os.environ.get("HF_HUB_CACHE")
    if cache is None and os.environ.get("HF_HOME"):
        cache = str(Path(os.environ["HF_HOME"]) / "hub")
    return {"cache_dir": cache, "endpoint": os.environ.get("HF_ENDPOINT") or None,
            "local_files_only": offline()}


def offline() -> bool:
    """HF_HUB_OFFLINE: read only what the caches hold (the hub's convention, applied to URL files too)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _url_cache(url: str) -> Path:
    """Where torch.hub (and so timm) keeps a URL's file: TORCH_HOME/hub/checkpoints/<its name>."""
    from urllib.parse import urlsplit

    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)


def cached(weight: WeightFile) -> Path | None:
    """Where `weight` is on this machine, or None (nothing downloaded)."""
    if weight.source == "file":
        path = Path(weight.location)
        return path if path.is_file() else None
    if weight.source == "url":
        path = _url_cache(weight.location)
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    kwargs = _hub_kwargs()
    for filename in (weight.filename,) if weight.filename else HF_DEFAULT_FILES:
        found = try_to_load_from_cache(weight.location, filename, cache_dir=kwargs["cache_dir"])
        if isinstance(found, str):
            return Path(found)
    return None


def fetch(weight: WeightFile) -> Path:
    """`weight` on this machine, downloaded into its cache when missing (one process at a time per file: a file
    lock beside it, so a node downloads a file once however many trials start there). Offline and not cached:
    WeightsMissing. A download whose checksum does not match: WeightsError, the file not kept."""
    found = cached(weight)
    if found is not None:
        return found
    if weight.source == "file":
        raise WeightsError(f"{weight.location}: pretrained weights file not found")
    if offline():
        raise WeightsMissing(f"{weight.name}: not in the cache and HF_HUB_OFFLINE is set (fetch it with "
                             f"`{weight.fetch_command()}` where there is network, then copy the cache)")
    if weight.source == "url":
        return _fetch_url(weight)
    return _fetch_hub(weight)


def _fetch_url(weight: WeightFile) -> Path:
    """torch.hub's download, as timm's `download_cached_file(check_hash=True)` does it: into a temporary file, moved
    into the cache only when its sha256 starts with the prefix in its name (`name-<prefix>.pth`)."""
    import torch.hub
    from filelock import FileLock

    target = _url_cache(weight.location)
    target.parent.mkdir(parents=True, exist_ok=True)
    named = torch.hub.HASH_REGEX.search(target.name)
    with FileLock(str(target) + ".lock"):
        if target.is_file():  # another process of this node fetched it while this one waited
            return target
        try:
            torch.hub.download_url_to_file(weight.location, str(target), named.group(1) if named else None,
                                           progress=False)
            return target
        except RuntimeError as err:  # torch.hub: 'invalid hash value (expected "…", got "…")'
            raise WeightsError(f"{weight.location}: refused, its checksum does not match its name ({err})") from None
        except OSError as err:  # URLError, HTTPError, a refused connection
            raise WeightsError(f"{weight.location}: cannot download ({err})") from None


def _fetch_hub(weight: WeightFile) -> Path:
    """The hub's download into its cache. A large (LFS) file's blob is named by the sha256 the hub gives for it (its
    ETag): a download whose content hashes otherwise is refused and removed from the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    kwargs = _hub_kwargs()
    names = (weight.filename,) if weight.filename else HF_DEFAULT_FILES
    for filename in names:
        try:
            path = Path(hf_hub_download(weight.location, filename, library_name="timm", **kwargs))
        except EntryNotFoundError:
            continue
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            raise WeightsError(f"{HF_PREFIX}{weight.location}:{filename}: cannot download ({err})") from None
        blob = path.resolve()
        if re.fullmatch(r"[0-9a-f]{64}", blob.name) and sha256(path) != blob.name:
            got = sha256(path)
            for stale in (path, blob, path.with_name(path.name + ".sha256")):
                stale.unlink(missing_ok=True)
            raise WeightsError(f"{HF_PREFIX}{weight.location}:{filename}: refused, its sha256 {got} is not the "
                               f"hub's {blob.name}")
        return path
    raise WeightsError(f"{HF_PREFIX}{weight.location}: holds none of {list(names)}")


def sha256(path: Path) -> str:
    """The file's sha256, kept beside it (`<file>.sha256`, with its size and mtime) so a large file is hashed
    once per machine."""
    path = Path(path)
    stat = path.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    side = path.with_name(path.name + ".sha256")
    try:
        kept = side.read_text().split()
        if len(kept) == 3 and " ".join(kept[1:]) == stamp:
            return kept[0]
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    try:
        side.write_text(f"{digest.hexdigest()} {stamp}\n")
    except OSError:  # a read-only cache: hashed again next time
        pass
    return digest.hexdigest()


def read_checkpoint(path: Path, ema: bool = False, mmap: bool = False) -> tuple[dict, str]:
    """(state dict, which part of the file it is) of a weights file: safetensors as they are; a torch file loaded
    with `weights_only=True`, the known trainer configuration classes (CONFIG_STAND_INS) read as plain mappings.
    A trainer file's network: `state_dict` / `model` (the official loaders' choice), or with `ema` its EMA copy.
    `mmap`: tensors mapped, not read (to learn the part cheaply; a pre-1.6 torch file is read whole)."""
    import torch
    from timm.models import clean_state_dict

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return clean_state_dict(load_file(str(path))), WHOLE_FILE
        except Exception as err:  # noqa: BLE001 — a truncated or foreign file
            raise WeightsError(f"{path}: cannot read weights ({err})") from None
    stand_ins = [(collections.OrderedDict, name) for name in CONFIG_STAND_INS]
    mmap = mmap and zipfile.is_zipfile(path)  # torch's mmap reads only its zip format
    try:
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 — the unpickler names the global it refused
        text = str(err)
        named = re.search(r"GLOBAL ([\w.]+)", text)  # 'Unsupported global: GLOBAL x.y', '… GLOBAL posix.system whose'
        if named:
            name = named.group(1)
            raise WeightsError(f"{path}: refused — it holds the pickled object {name}, which could run code when "
                               "read (only tensors, plain containers and the known trainer configuration classes "
                               f"{list(CONFIG_STAND_INS)} are read)") from None
        raise WeightsError(f"{path}: cannot read weights ({text.splitlines()[0] if text else type(err).__name__})") \
            from None
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    keys = EMA_KEYS if ema else NETWORK_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return clean_state_dict(checkpoint[key]), f"its '{key}'"
    if ema:
        raise WeightsError(f"{path}: model.pretrained_ema is set but the file holds no EMA copy "
                           f"(none of {list(EMA_KEYS)}; its keys: {sorted(checkpoint)[:8]})")
    if all(hasattr(v, "shape") for v in checkpoint.values()):
        return clean_state_dict(checkpoint), WHOLE_FILE
    raise WeightsError(f"{path}: no network in it (none of {list(NETWORK_KEYS)}; its keys: {sorted(checkpoint)[:8]})")


def started_from(backbone: str, pretrained, ema: bool = False) -> dict:
    """What the record says a backbone started from: the resolved file (its name, tag, sha256, the part of it
    loaded: a trainer file's `state_dict` or its EMA copy) or from scratch, and why."""
    weight = resolve(backbone, pretrained)
    if weight is None:
        why = "asked" if not pretrained else "timm knows no pretrained weights for it"
        return {"backbone": backbone, "file": None, "sha256": None, "scratch": why}
    path = fetch(weight)
    part = WHOLE_FILE if path.suffix == ".safetensors" else read_checkpoint(path, ema, mmap=True)[1]
    return {"backbone": backbone, "file": weight.name, "tag": weight.tag, "sha256": sha256(path), "part": part}


def started_text(started: dict | None) -> str:
    """What a trial's backbones started from, in words (model cards, the report)."""
    if not isinstance(started, dict) or not started:
        return "not recorded"
    parts = []
    for backbone, entry in started.items():
        if entry.get("file"):
            part = f", {entry['part']}" if entry.get("part", WHOLE_FILE) != WHOLE_FILE else ""
            parts.append(f"{backbone}: {entry['file']} (sha256 {entry['sha256'][:12]}…{part})")
        else:
            parts.append(f"{backbone}: from scratch ({entry.get('scratch')})")
    return "; ".join(parts)


def backbones_of(cfg) -> list[str]:
    """The backbones a trial config builds with weights: the model's, or both CASS arms."""
    if cfg.cass.enabled:
        return [cfg.cass.cnn, cfg.cass.transformer]
    return [cfg.model.backbone]


def prefetch(files: list[WeightFile], workers: int = 4) -> tuple[list[Path], list[WeightFile]]:
    """The driver's fetch before any trial: the missing files downloaded in parallel under one progress bar.
    Returns (their paths, the files that were downloaded now). Offline with files missing: one WeightsMissing
    naming each and the command that fetches it."""
    from tqdm.auto import tqdm

    missing = [w for w in files if cached(w) is None]
    if missing and offline():
        lines = "\n".join(f"  {w.name}  ({w.backbone}): {w.fetch_command()}" for w in missing)
        raise WeightsMissing(f"{len(missing)} pretrained file(s) not in the cache and HF_HUB_OFFLINE is set:\n{lines}"
                             "\nfetch them where there is network (python -m tune_xray.weights STUDY does), copy the "
                             "cache (HF_HOME / TORCH_HOME) here, and run again")
    if missing:
        with ThreadPoolExecutor(min(workers, len(missing))) as pool, \
                tqdm(total=len(missing), desc="fetching pretrained weights", unit="file") as bar:
            for _ in pool.map(fetch, missing):
                bar.update()
    return [fetch(w) for w in files], missing


def caches_text(paths: list[Path]) -> str:
    """The caches that hold `paths`, in words."""
    roots = sorted({str(_cache_root(p)) for p in paths})
    return ", ".join(roots)


def _cache_root(path: Path) -> Path:
    parts = Path(path).parts
    for marker in ("hub", "checkpoints"):
        if marker in parts:
            return Path(*parts[:len(parts) - parts[::-1].index(marker)])
    return Path(path).parent


def size_text(paths: list[Path]) -> str:
    """The files' total size, in words."""
    return bytes_text(sum(Path(p).stat().st_size for p in paths))


def bytes_text(total: int) -> str:
    return f"{total / 1e6:.1f} MB" if total < 1e9 else f"{total / 1e9:.2f} GB"


