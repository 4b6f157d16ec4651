"""The pretrained files a study can draw, and `python -m tune_xray.weights`: list them, fetch them into the caches
(for a cluster without network: fetch where there is network, copy the caches, run with HF_HUB_OFFLINE=1), or check
a cache offline. Resolving, fetching and reading one file: `tune_xray.models.pretrained`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .config import ConfigError, parse_overrides
from .models.pretrained import (
    WeightFile,
    WeightsError,
    backbones_of,
    bytes_text,
    cached,
    caches_text,
    prefetch,
    resolve,
    sha256,
    size_text,
)

WEIGHT_KEYS = ("model.backbone", "cass.cnn", "cass.transformer", "model.pretrained", "model.pretrained_ema")


def _weight_points(study) -> list[dict]:
    """Every combination of the values the study's params can give the keys that choose a file (backbones,
    `model.pretrained`, `model.pretrained_ema`): a `by:` parameter takes its case's values under its parent's
    value, its every case's when the parent is not one of these keys; `when` conditions are not narrowed (a
    superset: a file listed is one a trial may draw)."""
    from .space import case_key

    points: list[dict] = [{}]
    for key, spec in study.ordered_params():
        if key not in WEIGHT_KEYS:
            continue
        grown = []
        for point in points:
            if spec.cases is None:
                branches = [spec]
            elif spec.by in point:
                branches = [spec.cases[c] for c in (case_key(point[spec.by]),) if c in spec.cases]
            else:
                branches = list(spec.cases.values())
            values = [v for branch in branches for v in branch.candidate_values()]
            grown += [{**point, key: value} for value in values] or [point]
        points = grown
    return points


def study_files(resolved) -> tuple[list[WeightFile], list[str]]:
    """Every file a resolved study can draw — its params and `by:` cases (warm starts are among them), its smoke
    mapping, both CASS arms — once each, and the backbones asked for `true` that have no weights (from scratch)."""
    files: dict[str, WeightFile] = {}
    scratch: set[str] = set()
    for point in _weight_points(resolved.study):
        cfg = resolved.trial_config(point)
        for backbone in backbones_of(cfg):
            weight = resolve(backbone, cfg.model.pretrained)
            if weight is None and cfg.model.pretrained:
                scratch.add(backbone)
            elif weight is not None:
                files.setdefault(weight.name, weight)
    return list(files.values()), sorted(scratch)


def expected_bytes(backbone: str) -> int:
    """About how large a backbone's weights file is before it is fetched: its parameters in float32 (counted on
    the meta device: nothing allocated). A trainer file holding an EMA copy or optimizer state is larger."""
    import timm
    import torch

    from . import models  # noqa: F401  (MambaVision and VMamba registered)

    with torch.device("meta"):
        model = timm.create_model(backbone.split(".")[0], pretrained=False)
    return sum(p.numel() for p in model.parameters()) * 4


# ---- python -m tune_xray.weights ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """List (and fetch) every pretrained file a study can draw: `python -m tune_xray.weights STUDY [--set k=v]
    [--smoke] [--list] [--check]`. For a cluster without network: run it where there is network, copy the caches
    (HF_HOME, TORCH_HOME), run the search with HF_HUB_OFFLINE=1."""
    from .space import load_study

    parser = argparse.ArgumentParser(prog="python -m tune_xray.weights", description=main.__doc__)
    parser.add_argument("study", help="a study name (byol) or a search-space file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true", help="the study's smoke mapping")
    parser.add_argument("--list", action="store_true", help="list only; fetch nothing")
    parser.add_argument("--check", action="store_true", help="verify the caches without network; exit 1 naming "
                        "what is missing")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study)
        overrides = parse_overrides(args.overrides)
        study.check_overrides(overrides)
        resolved = study.resolve(overrides, args.smoke)
        files, scratch = study_files(resolved)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not (args.list or args.check):
        try:
            prefetch(files)
        except WeightsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    missing, held, expected = [], [], 0
    for weight in files:
        path = cached(weight)
        row = {**asdict(weight), "file": weight.name, "cache": str(path) if path else None,
               "bytes": path.stat().st_size if path else None, "sha256": sha256(path) if path else None}
        if path is not None:
            held.append(path)
        if path is None:
            missing.append(weight)
            row["expected_bytes"] = expected_bytes(weight.backbone)
            expected += row["expected_bytes"]
        if args.json:
            print(json.dumps(row))
            continue
        if path is None:
            print(f"{weight.backbone}: {weight.name} — not cached (≈ {row['expected_bytes'] / 1e6:.0f} MB of "
                  "float32 weights)")
        else:
            print(f"{weight.backbone}: {weight.name} — {row['bytes'] / 1e6:.1f} MB, sha256 {row['sha256']}, {path}")
    for backbone in scratch:
        print(f"{backbone}: no pretrained weights in timm — trained from scratch")
    line = f"{len(files)} file(s); {len(held)} cached"
    if held:
        line += f" ({size_text(held)} in {caches_text(held)})"
    if missing:
        line += f"; {len(missing)} to fetch, ≈ {bytes_text(expected)}"
    print(line)
    if args.check and missing:
        for weight in missing:
            print(f"missing: {weight.name} — {weight.fetch_command()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
