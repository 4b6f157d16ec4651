"""Ensemble selection over a search's own completed trials, on validation predictions only.

Caruana et al. 2004 ("Ensemble selection from libraries of models"): greedy forward selection **with
replacement** from a sorted initialisation (the best few), bagged over random halves of the pool — the
paper's guards against over-fitting the selection set; a member's weight is how often it was chosen. The
objective is the study's selection metric on validation. Averaging is over probabilities; thresholds (binary
and F1 rules) are chosen on validation for the ensemble itself. The test split is read once, after the
selection, for the record (S0 picked its ensemble exhaustively on test: SEEDS.md flaw 1).

    python -m tune_xray.ensemble tune_xray_runs/byol-smoke [--size 5] [--method caruana|topk|best] [--bags 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from .metrics import classification_metrics, interval, patient_bootstrap, weighted_mean_auroc

ENSEMBLE_DIR = "ensemble"


class EnsembleError(ValueError):
    """A pool that cannot be ensembled (no completed trial, trials that predicted different images)."""


@dataclass
class Split:
    """One split's stored predictions of every pool member: probabilities (M, n, C), targets, patients."""

    paths: list[str]
    y: np.ndarray  # (n, C) 0/1 (one-hot for single-label tasks)
    groups: np.ndarray
    probs: np.ndarray

    @property
    def ids_hash(self) -> str:
        return hashlib.sha256("\n".join(self.paths).encode()).hexdigest()[:16]


@dataclass
class Pool:
    experiment_dir: Path
    trials: list[dict]  # summary rows of the completed trials, each with its `dir`
    classes: list[str]
    task: str
    metric: str  # the study's selection metric, e.g. val_mean_auroc
    rule: str  # threshold rule of the trials (youden | f1)
    val: Split

    @cached_property
    def single(self) -> np.ndarray:
        """Each member's own validation score (the study's metric, higher is better)."""
        score = scorer(self)
        return np.array([float(score(p)[0]) for p in self.val.probs])


def read_predictions(directory: Path, split: str, classes: list[str]) -> tuple:
    """A trial's stored predictions of a split: (paths, 0/1 targets, patient groups, probabilities)."""
    frame = pd.read_csv(directory / f"predictions_{split}.csv")
    groups = frame["patient_id"].fillna(frame["path"]).astype(str).to_numpy()
    return (frame["path"].astype(str).tolist(), frame[[f"y_{c}" for c in classes]].to_numpy(),
            groups, frame[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64))


def _stack(pool_dirs: list[Path], names: list[str], split: str, classes: list[str]) -> Split:
    """Every member's predictions of one split; members that predicted other images are refused."""
    first, probs = None, []
    for directory, name in zip(pool_dirs, names):
        paths, y, groups, prob = read_predictions(directory, split, classes)
        if first is None:
            first = (paths, y, groups, name)
        elif paths != first[0]:
            raise EnsembleError(f"{name} predicted other {split} images than {first[3]} (image-id hash "
                                f"{Split(paths, y, groups, prob).ids_hash} vs {Split(*first[:3], prob).ids_hash}): "
                                "trials of different data or splits cannot be ensembled")
        probs.append(prob)
    return Split(first[0], first[1], first[2], np.stack(probs))


def load_pool(experiment_dir: str | Path) -> Pool:
    """The completed trials of a search (its summary.json) and their stored validation predictions."""
    experiment_dir = Path(experiment_dir)
    summary_file = experiment_dir / "summary.json"
    if not summary_file.is_file():
        raise EnsembleError(f"{experiment_dir}: no summary.json (not a tune_xray search directory)")
    summary = json.loads(summary_file.read_text())
    trials = []
    # the search's trials, then its repeats (tune_xray.repeat: the best configurations with new seeds)
    for row in summary["rows"] + (summary.get("repeats") or {}).get("trials", []):
        directory = Path(row.get("dir") or experiment_dir / f"{row['trial']}-{row['trial_id']}")
        if row["status"] == "complete" and (directory / "predictions_val.csv").is_file():
            trials.append({**row, "dir": str(directory)})
    if not trials:
        raise EnsembleError(f"{experiment_dir}: no completed trial with stored predictions to ensemble")
    first = json.loads((Path(trials[0]["dir"]) / "summary.json").read_text())
    cfg = yaml.safe_load((Path(trials[0]["dir"]) / "config.yaml").read_text())
    classes = list(first["classes"])
    val = _stack([Path(t["dir"]) for t in trials], [t["trial"] for t in trials], "val", classes)
    return Pool(experiment_dir, trials, classes, first["task"], cfg["supervised"]["selection_metric"],
                cfg["supervised"]["threshold"], val)


def scorer(pool: Pool) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """`score(prob, weights)` → the study's metric (higher is better) of `prob` on validation targets, under
    each row of `weights` (bootstrap resamples; None: the split as it is)."""
    return split_scorer(pool.val.y, pool.task, pool.metric, pool.classes, pool.rule)


def split_scorer(y: np.ndarray, task: str, metric: str, classes, rule: str):
    name = metric[len("val_"):]

    def score(prob: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        weights = np.ones((1, len(y))) if weights is None else weights
        if name == "mean_auroc":
            return weighted_mean_auroc(y, prob, weights)
        out = []
        for w in weights:  # other metrics: one resample at a time
            rows = np.repeat(np.arange(len(y)), w.astype(int))
            if name == "loss":
                p = np.clip(prob[rows], 1e-7, 1 - 1e-7)
                value = -(np.mean(y[rows] * np.log(p) + (1 - y[rows]) * np.log(1 - p)) if task == "multilabel"
                          else np.mean(np.log((p * y[rows]).sum(1))))
                out.append(-value)  # higher is better
            else:
                targets = y[rows] if task == "multilabel" else y[rows].argmax(1)
                out.append(classification_metrics(task, targets, prob[rows], classes, rule=rule)["metrics"][name])
        return np.asarray(out, dtype=np.float64)

    return score


def forward_selection(probs: np.ndarray, score, size: int, init: int, candidates,
                      single: np.ndarray | None = None) -> tuple[np.ndarray, list[float]]:
    """Caruana's greedy forward selection with replacement from a sorted initialisation of the `init` best
    (`single`: the members' own scores, computed here when not given); returns the selection counts (M,) and
    the score after each addition (the selection curve)."""
    candidates = list(candidates)
    single = single if single is not None else np.array([float(score(p)[0]) for p in probs])
    counts, total = np.zeros(len(probs)), np.zeros(probs.shape[1:])
    for j in sorted(candidates, key=lambda j: -single[j])[:max(1, min(init, size))]:
        counts[j] += 1
        total += probs[j]
    curve = [float(score(total / counts.sum())[0])]
    while counts.sum() < size:
        gains = {j: float(score((total + probs[j]) / (counts.sum() + 1))[0]) for j in candidates}
        best = max(candidates, key=lambda j: (gains[j], single[j]))  # ties: the better single model
        counts[best] += 1
        total += probs[best]
        curve.append(gains[best])
    return counts, curve


def select(pool: Pool, method: str = "caruana", size: int = 5, bags: int = 20, bag_fraction: float = 0.5,
           init: int = 2, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Member weights (summing to 1) over the pool, from validation predictions only, and the selection curve
    (validation metric vs ensemble size, forward selection over the whole pool)."""
    probs, score = pool.val.probs, scorer(pool)
    m = len(probs)
    ranked = np.argsort(-pool.single, kind="stable")
    if method in ("best", "topk"):
        k = 1 if method == "best" else min(size, m)
        weights = np.zeros(m)
        weights[ranked[:k]] = 1.0 / k
        return weights, [float(score(probs[ranked[:i]].mean(0))[0]) for i in range(1, k + 1)]
    counts, curve = forward_selection(probs, score, size, init, range(m), pool.single)
    if bags <= 1 or m == 1:
        return counts / counts.sum(), curve
    rng, weights = np.random.default_rng(seed), np.zeros(m)
    for _ in range(bags):
        subset = rng.choice(m, size=max(1, math.ceil(bag_fraction * m)), replace=False)
        bag_counts, _ = forward_selection(probs, score, size, init, sorted(subset), pool.single)
        weights += bag_counts / bag_counts.sum()
    return weights / weights.sum(), curve


def _with_ci(values: np.ndarray, point: float) -> dict:
    lo, hi = interval(values)
    return {"value": point, "ci_low": lo, "ci_high": hi}


def record(pool: Pool, weights: np.ndarray, topk: int, resamples: int = 1000, seed: int = 0) -> dict:
    """Val and test metrics of the ensemble, the best single trial and the top-K mean, each with a 95 %
    patient-level bootstrap CI, and the paired difference ensemble − best single. Test is read here, after the
    selection, once; its thresholds come from validation."""
    names = [t["trial"] for t in pool.trials]
    test = _stack([Path(t["dir"]) for t in pool.trials], names, "test", pool.classes)
    m = len(pool.trials)
    ranked = np.argsort(-pool.single, kind="stable")
    top = np.zeros(m)
    top[ranked[:min(topk, m)]] = 1.0 / min(topk, m)
    best = np.zeros(m)
    best[ranked[0]] = 1.0
    out = {}
    for split_name, split in (("val", pool.val), ("test", test)):
        split_score = split_scorer(split.y, pool.task, pool.metric, pool.classes, pool.rule)
        boot = patient_bootstrap(split.groups, resamples, seed)
        results = {}
        for label, w in (("ensemble", weights), ("best_single", best), ("top_k", top)):
            prob = np.tensordot(w, split.probs, axes=1)
            results[label] = (float(split_score(prob)[0]), split_score(prob, boot))
        out[split_name] = {label: _with_ci(values, point) for label, (point, values) in results.items()}
        out[split_name]["ensemble_minus_best_single"] = _with_ci(
            results["ensemble"][1] - results["best_single"][1], results["ensemble"][0] - results["best_single"][0])
    ens_val = np.tensordot(weights, pool.val.probs, axes=1)
    targets = pool.val.y if pool.task == "multilabel" else pool.val.y.argmax(1)
    thresholds = classification_metrics(pool.task, targets, ens_val, pool.classes, rule=pool.rule)["thresholds"]
    out["thresholds"] = thresholds  # chosen on validation for the ensemble itself
    out["hashes"] = {"val": pool.val.ids_hash, "test": test.ids_hash}
    out["test_probs"] = np.tensordot(weights, test.probs, axes=1)
    out["test_paths"] = test.paths
    return out


def run_ensemble(experiment_dir: str | Path, method: str = "caruana", size: int = 5, bags: int = 20,
                 seed: int = 0, resamples: int = 1000, tracking_uri: str | None = None) -> dict:
    """Select, record and write `ENSEMBLE_DIR/` (ensemble.json, members.csv, test predictions, model card);
    with a tracking URI, log it as an `ensemble` run and register its pyfunc model (tracking.log_ensemble)."""
    start = time.perf_counter()
    pool = load_pool(experiment_dir)
    weights, curve = select(pool, method, size, bags, seed=seed)
    recorded = record(pool, weights, size, resamples, seed)
    out_dir = pool.experiment_dir / ENSEMBLE_DIR
    out_dir.mkdir(exist_ok=True)
    members = pd.DataFrame([{"trial": t["trial"], "trial_id": t["trial_id"], "name": t.get("name", t["trial"]),
                             "weight": float(w), "val_" + pool.metric[len("val_"):]: float(s),
                             "mlflow_run_id": t.get("mlflow_run_id"), "dir": t["dir"]}
                            for t, w, s in zip(pool.trials, weights, pool.single)
                            if w > 0]).sort_values("weight", ascending=False)
    members.to_csv(out_dir / "members.csv", index=False)
    test_frame = pd.DataFrame(recorded.pop("test_probs"), columns=[f"p_{c}" for c in pool.classes])
    test_frame.insert(0, "path", recorded.pop("test_paths"))
    test_frame.to_csv(out_dir / "predictions_test.csv", index=False)
    result = {"method": method, "size": size, "bags": bags if method == "caruana" else 0, "seed": seed,
              "resamples": resamples, "metric": pool.metric, "task": pool.task, "classes": pool.classes,
              "pool": len(pool.trials), "selection_curve": curve, **recorded,
              "members": members.drop(columns="dir").to_dict("records")}
    result["wall_time_s"] = time.perf_counter() - start
    (out_dir / "ensemble.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / "model_card.md").write_text(model_card(pool, result))
    if tracking_uri:
        from . import tracking
        result["registered"] = tracking.log_ensemble(tracking_uri, pool.experiment_dir, result, members, out_dir)
        (out_dir / "ensemble.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def model_card(pool: Pool, result: dict) -> str:
    """A markdown model card: data, split hashes, members, metrics with CIs, and how the selection was made."""
    search = json.loads((pool.experiment_dir / "search.json").read_text()) if (
        pool.experiment_dir / "search.json").is_file() else {}
    rows = "\n".join(f"| {m['name']} | {m['weight']:.3f} |" for m in result["members"])
    metric = pool.metric[len("val_"):]
    lines = [f"# Ensemble of {pool.experiment_dir.name}", "",
             f"- Study: `{search.get('study', '?')}`; data: `{search.get('data') or 'synthetic (default)'}`; "
             f"smoke: {search.get('smoke', False)}",
             f"- Task: {pool.task}, classes: {', '.join(pool.classes)}",
             f"- Split image-id hashes: val `{result['hashes']['val']}`, test `{result['hashes']['test']}`",
             f"- Selection: {result['method']} (size {result['size']}, bags {result['bags']}) over {result['pool']} "
             f"completed trials, on **validation {metric} only**; the test split was read once, after selection, "
             "for the record.", "", "| member (trial and drawn configuration) | weight |", "|---|---|", rows, "",
             f"| {metric} (95 % patient bootstrap CI, {result['resamples']} resamples) | val | test |", "|---|---|---|"]
    for label in ("ensemble", "best_single", "top_k", "ensemble_minus_best_single"):
        lines.append(f"| {label} | {_fmt(result['val'][label])} | {_fmt(result['test'][label])} |")
    if result.get("thresholds"):
        chosen = ", ".join(f"{c} {t:.3f}" for c, t in zip(pool.classes if len(result["thresholds"]) > 1
                                                           else pool.classes[1:], result["thresholds"]))
        lines += ["", f"Decision thresholds (chosen on validation, rule `{pool.rule}`): {chosen}"]
    return "\n".join(lines) + "\n"


def print_result(result: dict) -> None:
    metric = result["metric"][len("val_"):]
    print(f"ensemble ({result['method']}, {len(result['members'])} members of {result['pool']}): {metric}, "
          "95 % patient-bootstrap CI; selected on val only")
    for label in ("ensemble", "best_single", "top_k", "ensemble_minus_best_single"):
        print(f"  {label:28s} val {_fmt(result['val'][label])}   test (record) {_fmt(result['test'][label])}")
    for m in result["members"]:
        print(f"  {m['weight']:.3f}  {m['name']}")
    if result.get("registered"):
        print(f"registered: {result['registered']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", help="a search's directory (tune_xray_runs/NAME)")
    parser.add_argument("--method", choices=("caruana", "topk", "best"), default="caruana")
    parser.add_argument("--size", type=int, default=5, help="ensemble size (selections, with replacement)")
    parser.add_argument("--bags", type=int, default=20, help="Caruana bagging: random halves of the pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--tracking-uri", help="MLflow (default: the search's own store; 'none' to skip)")
    args = parser.parse_args(argv)
    experiment_dir = Path(args.experiment_dir)
    uri = args.tracking_uri
    if uri is None:
        search = experiment_dir / "search.json"
        saved = json.loads(search.read_text()).get("tracking_uri") if search.is_file() else None
        uri = saved or f"sqlite:///{(experiment_dir / 'mlflow.db').resolve()}"
    try:
        result = run_ensemble(experiment_dir, args.method, args.size, args.bags, args.seed, args.resamples,
                              None if uri == "none" else uri)
    except EnsembleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
