"""SSL once, fine-tuned many times: a finished SSL phase's backbone kept in the experiment, keyed by everything that
shapes it, so a later trial with the same key fine-tunes from it instead of pre-training again — and a new search
can start from an earlier one's (`model.init_from`), S0's workflow (choose a BYOL recipe, then fine-tune) as one
declarative step.

The store is `<experiment>/ssl/<key>/`: `backbone.pt` (the state dicts of the backbones the fine-tune trains, in
its order) and `meta.json` (the key's inputs, the trial that pre-trained it, its SSL summary with the probe curve).
The key is the SHA-256 of: the SSL phase's section, the model section (less what only the fine-tune or the
machine reads: drop_rate, compile, grad_checkpointing, scan_backend, init_from), the augmentations (less the
evaluation-only tta and eval_view), the data section (less loader and cache-placement settings), the seed, amp,
deterministic, and the ranks the phase ran on (each rank draws its own batch).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import ConfigError, TrialConfig

STORE_DIR = "ssl"
WEIGHTS, META = "backbone.pt", "meta.json"
NOT_SHAPING = {
    "model": ("drop_rate", "compile", "grad_checkpointing", "scan_backend", "init_from"),
    "augment": ("tta", "eval_view"),
    "data": ("num_workers", "device_cache", "device_share", "cache_dir"),
}


def ssl_phase(cfg: TrialConfig) -> str | None:
    if cfg.byol.enabled:
        return "byol"
    return "cass" if cfg.cass.enabled else None


def ssl_inputs(cfg: TrialConfig, world_size: int) -> dict:
    """What shapes a trial's SSL phase (see the module's text); None-free JSON."""
    dumped = cfg.model_dump(mode="json")
    phase = ssl_phase(cfg)
    return {"phase": phase, phase: dumped[phase],
            **{section: {k: v for k, v in dumped[section].items() if k not in NOT_SHAPING[section]}
               for section in NOT_SHAPING},
            "seed": cfg.seed, "amp": cfg.amp, "deterministic": cfg.deterministic, "world_size": world_size}


def ssl_key(cfg: TrialConfig, world_size: int) -> str:
    return hashlib.sha256(json.dumps(ssl_inputs(cfg, world_size), sort_keys=True).encode()).hexdigest()[:20]


def save(directory: Path, backbones: list[torch.nn.Module], meta: dict) -> Path:
    """The backbones' weights and `meta` into `directory` (a local one; the trial uploads it to the store)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save([b.state_dict() for b in backbones], directory / WEIGHTS)
    (directory / META).write_text(json.dumps(meta, indent=1, default=float))
    return directory


def read(directory: Path) -> tuple[list[dict], dict]:
    """(the backbones' state dicts, meta) of one stored SSL phase."""
    return (torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True),
            json.loads((directory / META).read_text()))


def probe_curve(history: list[dict]) -> dict[str, float]:
    """An SSL history's probe of the study's metric (`probe_val_<metric>`, else its mean AUROC) by epoch."""
    from .probe import study_probe

    return {str(m["epoch"]): float(study_probe(m)) for m in history if study_probe(m) is not None}


def final_probe(meta: dict) -> float | None:
    """The probe's value at the stored phase's last probed epoch (None: it was never probed)."""
    curve = meta.get("probe") or {}
    return curve[max(curve, key=int)] if curve else None


def stored(experiment: Path) -> list[dict]:
    """Every SSL phase an experiment (a local directory) keeps: its meta, with `dir`, best probe first (unprobed
    ones last)."""
    metas = []
    for meta_file in sorted((Path(experiment) / STORE_DIR).glob(f"*/{META}")):
        meta = json.loads(meta_file.read_text())
        metas.append({**meta, "dir": str(meta_file.parent)})
    return sorted(metas, key=lambda m: (final_probe(m) is None, -(final_probe(m) or 0.0)))


def resolve_init(spec: str) -> dict:
    """`model.init_from`: `EXPERIMENT` (its SSL phase with the best final probe) or `EXPERIMENT:tNNN` (that trial's)
    → the stored phase's meta (with `dir`); anything else is one ConfigError naming what there is."""
    named = re.fullmatch(r"(.+):(t\d+)", spec)
    path, trial = (named.group(1), named.group(2)) if named else (spec, "")
    experiment = Path(path).expanduser()
    if not experiment.is_dir():
        raise ConfigError(f"model.init_from={spec}: no experiment directory {experiment}")
    metas = stored(experiment)
    if not metas:
        raise ConfigError(f"model.init_from={spec}: {experiment} keeps no SSL phase ({experiment / STORE_DIR} is "
                          "empty: its trials had none, or none finished one)")
    if not trial:
        return metas[0]
    chosen = [m for m in metas if m.get("trial") == trial]
    if not chosen:
        raise ConfigError(f"model.init_from={spec}: {experiment} keeps no SSL phase of {trial}; it keeps "
                          f"{', '.join(sorted(str(m.get('trial')) for m in metas))}")
    return chosen[0]


def check_fits(meta: dict, names: list[str], spec: str) -> None:
    """The stored backbones must be the ones the fine-tune trains, in its order."""
    if meta.get("backbones") != names:
        raise ConfigError(f"model.init_from={spec}: its SSL phase trained {meta.get('backbones')}; this trial "
                          f"fine-tunes {names}")


def fetch(store: str, key: str) -> Path | None:
    """The stored phase of `key` in a local scratch copy (None when the store has none). `store` is the
    experiment's `ssl/` folder, a path or a URI (cluster.download)."""
    from ..cluster import download

    local = Path(tempfile.mkdtemp(prefix="tune_xray-ssl-"))
    if download(f"{store}/{key}", local) and (local / WEIGHTS).is_file() and (local / META).is_file():
        return local
    shutil.rmtree(local, ignore_errors=True)
    return None


def keep(store: str, key: str, directory: Path) -> bool:
    """Upload a finished phase to the store unless one with its key is there already (the first to finish
    stands: a second trial that pre-trained the same key concurrently keeps its own run and uploads nothing)."""
    from ..cluster import download, upload

    probe = Path(tempfile.mkdtemp(prefix="tune_xray-ssl-"))
    try:
        if download(f"{store}/{key}/{META}", probe / META):
            return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    upload(directory, f"{store}/{key}")
    return True


def main(argv=None) -> int:
    """`python -m tune_xray.phases.ssl_store EXPERIMENT [--top K]`: the SSL phases an experiment keeps, best final
    probe first, and the `model.init_from` axis over the top K to paste into a study's params."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tune_xray.phases.ssl_store", description=main.__doc__)
    parser.add_argument("experiment")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args(argv)
    metas = stored(Path(args.experiment))
    if not metas:
        print(f"{args.experiment}: no SSL phase kept (under {STORE_DIR}/)")
        return 1
    for meta in metas:
        probe = final_probe(meta)
        epochs = len((meta.get("summary") or {}).get("history") or [])
        print(f"{meta.get('trial')}: {meta.get('phase')} of {', '.join(meta.get('backbones') or [])}, {epochs} epochs, "
              f"final probe {'none' if probe is None else f'{probe:.4f}'} (key {meta['key']})")
    top = [f"{Path(args.experiment).resolve()}:{m['trial']}" for m in metas[:args.top] if m.get("trial")]
    print(f"model.init_from: {{choice: [{', '.join(top)}]}}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
