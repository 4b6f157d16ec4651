"""Ensemble selection over a search's own completed trials, on validation predictions only.

Caruana et al. 2004 ("Ensemble selection from libraries of models"): greedy forward selection **with
replacement** from a sorted initialisation (the best few), bagged over random halves of the pool — the
paper's guards against over-fitting the selection set; a member's weight is how often it was chosen. The
objective is the study's selection metric on validation. Averaging is over probabilities; thresholds (binary
and F1 rules) are chosen on validation for the ensemble itself. The test split is read at a search's end, after
every choice, for the record; a re-run reads it again only with `--record`, and every read is counted (S0 picked
its ensemble exhaustively on test).

    python -m tune_xray.ensemble tune_xray_runs/byol-smoke [--size 5] [--method caruana|topk|best] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .credentials import mask
from .data.sources import describe_data, describe_untrained
from .driver import driver_device
from .experiment import Experiment, ExperimentError, TrialTask, read_predictions
from .figures import selection_curve
from .metrics import (
    auroc_intervals,
    auroc_per_label,
    both_classes,
    classification_metrics,
    decisions,
    interval,
    patient_bootstrap,
    scored_labels,
    split_scorer,
    thresholds_list,
    weighted_decision_metrics,
)
from .models.pretrained import started_text
from .record.models import EnsembleRecord
from .record.names import ENSEMBLE_DIR, ENSEMBLE_FILE, TEST_READS, bare
from .record.status import StepFailed
from .record.text import averaged_text, cost_lines, no_fit_text, plural
from .request import SearchRequest
from .selection import CaruanaSelector, EnsembleError, NoFit, absolute_budget
from .summary import search_model


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
    experiment: Experiment
    trials: list[dict]  # summary rows of the completed trials, each with its `dir`
    classes: list[str]
    task: str
    metric: str  # the study's selection metric, e.g. val_mean_auroc
    rule: str  # threshold rule of the trials (youden | f1)
    val: Split
    untrained: tuple[str, ...] = ()  # no positive in train: never decided or averaged

    @cached_property
    def single(self) -> np.ndarray:
        """Each member's own validation score (the study's metric, higher is better)."""
        score = scorer(self)
        return np.array([float(score(p)[0]) for p in self.val.probs])


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


def load_pool(experiment: Experiment) -> Pool:
    """The completed trials of a search and its repeats (tune_xray.repeat: the best configurations with new seeds)
    and their stored validation predictions, in one order whatever summary.json's."""
    trials = experiment.completed()
    if not trials:
        raise EnsembleError(f"{experiment.directory}: no completed trial with stored predictions to ensemble")
    task = TrialTask.of(trials[0]["dir"])
    val = _stack([Path(t["dir"]) for t in trials], [t["trial"] for t in trials], "val", task.classes)
    return Pool(experiment, trials, task.classes, task.task, task.metric, task.rule, val, task.untrained)


def scorer(pool: Pool) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    """`score(prob, weights)` → the study's metric (higher is better) of `prob` on validation targets, under
    each row of `weights` (bootstrap resamples; None: the split as it is)."""
    return split_scorer(pool.val.y, pool.task, pool.metric, pool.classes, pool.rule, untrained=pool.untrained)


BUDGET_FLAGS = {"latency_ms": "--latency-budget", "params_m": "--params-budget"}  # the costs a budget bounds


def budget_costs(pool: Pool, budget: dict | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each pool member's measured costs (M, K) for the budget's K bounds (`{"latency_ms": 20}`), and the bounds;
    (None, None) without a budget. A member without the measurement, or a budget no member fits alone, is one
    error naming the flag."""
    budget = {k: v for k, v in (budget or {}).items() if v is not None}
    if not budget:
        return None, None
    costs = np.full((len(pool.trials), len(budget)), np.nan)
    for i, trial in enumerate(pool.trials):
        for k, name in enumerate(budget):
            value = (trial.get("cost") or {}).get(name)
            if not isinstance(value, (int, float)):
                raise EnsembleError(f"{BUDGET_FLAGS[name]}: {trial['trial']} has no measured {name} (a trial "
                                    "measures its cost at its first epoch's end; this one did not)")
            costs[i, k] = value
    bounds = np.array(list(budget.values()), dtype=np.float64)
    if not (costs <= bounds).all(1).any():
        cheapest = ", ".join(f"{BUDGET_FLAGS[name]} {bound:g}: the least is {costs[:, k].min():.3g}"
                             for k, (name, bound) in enumerate(budget.items()))
        near = int(np.argmin((costs / bounds).max(1)))
        nearest = {"trial": pool.trials[near]["trial"], "name": pool.trials[near].get("name"),
                   **{name: float(costs[near, k]) for k, name in enumerate(budget)}}
        raise NoFit(f"no completed trial fits the budget alone ({cheapest})", budget, nearest)
    return costs, bounds


def select(pool: Pool, method: str = "caruana", size: int = 5, bags: int = 20, bag_fraction: float = 0.5,
           seed: int = 0, budget: dict | None = None) -> tuple[np.ndarray, dict]:
    """Member weights (summing to 1) over the pool, from validation predictions only, and how they were chosen:
    the curve of the returned weights' making (`curve`: [x, val score] pairs along `axis`), the x returned
    (`chosen`), `bagged`, `init` (Caruana) — for `best` and `topk` the score of the top-1 … top-k means. With a
    `budget` (cost name → most the distinct members may sum to), only members that fit it together."""
    probs, score = pool.val.probs, scorer(pool)
    costs, bounds = budget_costs(pool, budget)
    if method == "caruana":
        selector = CaruanaSelector(size, None, bags, bag_fraction, seed).fit(
            probs, pool.val.y, lambda y, p: float(score(p)[0]), costs, bounds)
        return selector.weights_, {"curve": selector.curve_, "axis": selector.curve_axis_,
                                   "chosen": selector.chosen_, "bagged": selector.bagged_,
                                   "init": selector.init_size_}
    m = len(probs)
    kept: list[int] = []
    for j in np.argsort(-pool.single, kind="stable"):  # best first, each while the budget holds
        if len(kept) < (1 if method == "best" else size) and (
                costs is None or (costs[kept + [j]].sum(0) <= bounds).all()):
            kept.append(int(j))
    weights = np.zeros(m)
    weights[kept] = 1.0 / len(kept)
    curve = [(i, float(score(probs[kept[:i]].mean(0))[0])) for i in range(1, len(kept) + 1)]
    return weights, {"curve": curve, "axis": "top-k members", "chosen": len(kept), "bagged": False,
                     "init": len(kept)}


def _with_ci(values: np.ndarray, point: float) -> dict:
    """A value, its bootstrap interval, and the share of resamples dropped for an undefined value (one held no
    positive or no negative)."""
    lo, hi = interval(values)
    return {"value": point, "ci_low": lo, "ci_high": hi, "dropped": float(np.mean(~np.isfinite(values)))}


LABELS = ("ensemble", "best_single", "top_k")


def _val_thresholds(pool: Pool, prob: np.ndarray):
    targets = pool.val.y if pool.task == "multilabel" else pool.val.y.argmax(1)
    chosen = classification_metrics(pool.task, targets, prob, pool.classes, rule=pool.rule,
                                    untrained=pool.untrained)["thresholds"]
    return None if chosen is None else np.asarray(chosen, dtype=np.float64)


def record(pool: Pool, weights: np.ndarray, topk: int, resamples: int = 1000, seed: int = 0,
           read_test: bool = False, budget: dict | None = None) -> dict:
    """The ensemble, the best single trial and the top-K mean (under a `budget`, those that fit it: the choices the
    ensemble had), each with a 95 % bootstrap CI over patients (images where there are none), and the paired
    difference ensemble − best single: on validation, the data that chose them (selection-set intervals:
    optimistic) and, with `read_test`, on test — read here, after every choice, with each one's thresholds from
    validation for every threshold metric, in every resample."""
    chosen = dict(zip(LABELS, (weights, select(pool, "best", budget=budget)[0],
                               select(pool, "topk", size=topk, budget=budget)[0])))
    thresholds = {label: _val_thresholds(pool, np.tensordot(w, pool.val.probs, axes=1)) for label, w in chosen.items()}
    splits = [("val", pool.val)]
    if read_test:
        splits.append(("test", _stack([Path(t["dir"]) for t in pool.trials], [t["trial"] for t in pool.trials],
                                      "test", pool.classes)))
    out = {"thresholds": None if thresholds["ensemble"] is None else thresholds_list(thresholds["ensemble"]),
           "val_intervals": "selection set: the validation data that chose the epochs, trials and weights"}
    boots = {}  # each split's patient resamples: every interval of that split is on the same ones
    for name, split in splits:
        boot = boots[name] = patient_bootstrap(split.groups, resamples, seed)
        results = {}
        for label, w in chosen.items():
            score = split_scorer(split.y, pool.task, pool.metric, pool.classes, pool.rule,
                                 thresholds[label] if name == "test" else None, pool.untrained)
            prob = np.tensordot(w, split.probs, axes=1)
            results[label] = (float(score(prob)[0]), score(prob, boot))
        out[name] = {label: _with_ci(values, point) for label, (point, values) in results.items()}
        out[name]["ensemble_minus_best_single"] = _with_ci(
            results["ensemble"][1] - results["best_single"][1], results["ensemble"][0] - results["best_single"][0])
        out.setdefault("hashes", {})[name] = split.ids_hash
        columns = scored_labels(pool.task, pool.classes, pool.untrained)
        out.setdefault("labels_averaged", {})[name] = int(sum(both_classes(split.y[:, j]) for j in columns))
        if pool.task != "multilabel":  # what a clinician reads first of a single-label classifier
            out.setdefault("single_label", {})[name] = {
                label: _decision_record(split, np.tensordot(w, split.probs, axes=1), pool.task, thresholds[label],
                                        boot, ("accuracy", "balanced_accuracy"))
                for label, w in chosen.items()}
    if read_test:
        test = splits[1][1]
        out["test_per_label"] = {}
        for label in ("ensemble", "best_single"):  # AUROC, and at validation's thresholds what a user gets
            prob = np.tensordot(chosen[label], test.probs, axes=1)
            out["test_per_label"][label] = {
                **_per_label(test, prob, pool, boots["test"]),
                **_decision_record(test, prob, pool.task, thresholds[label], boots["test"],
                                   ("sensitivity", "specificity"), pool.classes)}
        out["test_probs"], out["test_paths"] = np.tensordot(weights, test.probs, axes=1), test.paths
        out["test_reads"] = pool.experiment.note_test_read("the ensemble's record")
    return out


def _decision_record(split: Split, prob: np.ndarray, task: str, thresholds, boot: np.ndarray, names: tuple,
                     classes=None) -> dict:
    """Decision metrics (`names`) at fixed thresholds, each with its bootstrap interval: per label
    (`sensitivity/<label>`) where `classes` are given, else the task-level ones (accuracy, balanced accuracy)."""
    decided = decisions(task, prob, thresholds)
    point = weighted_decision_metrics(split.y, decided, np.ones(len(split.y)), task != "multilabel")
    values = weighted_decision_metrics(split.y, decided, boot, task != "multilabel")
    out = {}
    for name in names:
        if classes is None:
            out[name] = _with_ci(values[name], float(point[name][0]))
        else:
            for c, label in enumerate(classes):
                if np.isfinite(point[name][0, c]):
                    out[f"{name}/{label}"] = _with_ci(values[name][:, c], float(point[name][0, c]))
    return out


def _per_label(split: Split, prob: np.ndarray, pool: Pool, boot: np.ndarray) -> dict:
    """AUROC of each scored label (and their mean) with its bootstrap interval on the split's resamples `boot`."""
    columns = scored_labels(pool.task, pool.classes, pool.untrained)
    classes = [pool.classes[j] for j in columns]
    values, _ = auroc_per_label(split.y[:, columns], prob[:, columns], classes)
    intervals = auroc_intervals(split.y[:, columns], prob[:, columns], split.groups, classes, weights=boot)
    points = {"mean_auroc": float(np.mean(list(values.values()))) if values else float("nan"),
              **{f"auroc/{k}": v for k, v in values.items()}}
    return {k: dict(zip(("value", "ci_low", "ci_high"), (v, *intervals.get(k, (float("nan"), float("nan"))))))
            for k, v in points.items()}


def selection_cost(pool: Pool, weights: np.ndarray, budget: dict | None, device: str | None) -> dict:
    """What the chosen ensemble costs: its members' measured costs summed (latency as `remeasure_costs` measured it
    after the trials, alone, else as each trial measured it on its device), the budget they were held to, and (with a
    `device`) the ensemble's own latency as served, measured there."""
    chosen = [t for t, w in zip(pool.trials, weights) if w > 0]
    sums = {f"{name}_sum": float(sum(t["cost"][name] for t in chosen)) for name in ("latency_ms", "params_m", "gflops")
            if all(isinstance((t.get("cost") or {}).get(name), (int, float)) for t in chosen)}
    out = {"budget": {k: v for k, v in (budget or {}).items() if v is not None}, **sums, "device": device,
           "latency_where": "each latency measured again after the trials, alone, on the driver's device"
           if chosen and all("cost_in_trial" in t for t in chosen) else "each measured in its trial on its device"}
    if device:
        from .serving import measured_latency  # torch and MLflow's pyfunc: loaded only to measure

        out["served_latency_ms"] = measured_latency([str(Path(t["dir"]) / "best.pt") for t in chosen],
                                                    [float(w) for w in weights if w > 0], pool.val.paths[0], device)
    return out


RECORDED = ("method", "members", "selection", "cost", "val", "test", "test_per_label", "single_label", "thresholds",
            "classes", "task", "rule", "test_reads", "registered", "labels_averaged", "wall_time_s",
            "test_predictions")  # what summary.json keeps of ensemble.json


def run_ensemble(experiment: Experiment, method: str = "caruana", size: int = 5, bags: int = 20,
                 seed: int = 0, resamples: int = 1000, tracking_uri: str | None = None,
                 read_test: bool = False, budget: dict | None = None, device: str | None = None,
                 budget_note: str = "") -> dict:
    """Select on validation and write `ENSEMBLE_DIR/` (ensemble.json, members.csv, model card); with
    `read_test`, the record on test too (its predictions, counted in test_reads.json); with a tracking URI, log
    it as an `ensemble` run and register its pyfunc model (registry.log_ensemble). `budget`: the most its members'
    measured costs may sum to (`{"latency_ms": 20, "params_m": 50}`; `budget_note`: how it was reached, where it is
    relative: `absolute_budget`); `device`: where its latency as served is measured (None: not measured). A budget
    no completed trial fits alone raises NoFit."""
    start = time.perf_counter()
    if size < 1 or bags < 0:
        raise EnsembleError(f"--size {size} --bags {bags}: the ensemble size must be at least 1, bags at least 0")
    for name, value in (budget or {}).items():
        if value is not None and not value > 0:
            raise EnsembleError(f"{BUDGET_FLAGS[name]} {value:g}: more than 0")
    pool = load_pool(experiment)
    weights, selection = select(pool, method, size, bags, seed=seed, budget=budget)
    cost = {**selection_cost(pool, weights, budget, device), **({"budget_note": budget_note} if budget_note else {})}
    recorded = record(pool, weights, size, resamples, seed, read_test, budget)
    members = pd.DataFrame([{"trial": t["trial"], "trial_id": t["trial_id"], "name": t.get("name", t["trial"]),
                             "weight": float(w), pool.metric: float(s),
                             "mlflow_run_id": t.get("mlflow_run_id"),
                             "started_from": started_text(t.get("started_from")), "dir": t["dir"]}
                            for t, w, s in zip(pool.trials, weights, pool.single)
                            if w > 0]).sort_values("weight", ascending=False)
    experiment.write_table(f"{ENSEMBLE_DIR}/members.csv", members)
    if read_test:
        test_frame = pd.DataFrame(recorded.pop("test_probs"), columns=[f"p_{c}" for c in pool.classes])
        test_frame.insert(0, "path", recorded.pop("test_paths"))
        recorded["test_predictions"] = experiment.write_table(f"{ENSEMBLE_DIR}/predictions_test.csv", test_frame)
    else:  # an earlier selection's: not this one's
        experiment.remove(f"{ENSEMBLE_DIR}/predictions_test.csv")
    result = {"method": method, "size": size, "bags": bags if method == "caruana" else 0, "seed": seed,
              "resamples": resamples, "metric": pool.metric, "task": pool.task, "rule": pool.rule,
              "classes": pool.classes, "pool": len(pool.trials), "selection": selection, "cost": cost,
              "test": None, **recorded,
              "example_path": pool.val.paths[0], "members": members.drop(columns="dir").to_dict("records")}
    result["wall_time_s"] = time.perf_counter() - start
    experiment.write_json(ENSEMBLE_FILE, result, EnsembleRecord)
    experiment.write_text(f"{ENSEMBLE_DIR}/model_card.md", model_card(pool, result))
    experiment.write_figure(f"{ENSEMBLE_DIR}/selection_curve.png",
                            lambda path: selection_curve(selection, pool.metric, path))
    if tracking_uri:
        from . import registry  # MLflow pyfunc and the serving model: loaded only to register

        try:
            result["registered"] = registry.log_ensemble(tracking_uri, experiment.directory, result, members,
                                                         experiment.ensemble_dir)
        except Exception as err:  # noqa: BLE001 — the selection and its files stand; the caller says what failed
            result["registered"], result["registration_error"] = None, mask(f"{type(err).__name__}: {err}")
        if result.get("test_predictions") and result.get("registered"):  # the run that holds them, by its id
            result["test_predictions"]["run_id"] = result["registered"]["run_id"]
        experiment.write_json(ENSEMBLE_FILE, result, EnsembleRecord)
    return result


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]"


def model_card(pool: Pool, result: dict) -> str:
    """A markdown model card: data, split hashes, members, metrics with CIs, and how the selection was made."""
    search = pool.experiment.invocation()
    rows = "\n".join(f"| {m['name']} | {m['weight']:.3f} | {m.get('started_from', 'not recorded')} |"
                     for m in result["members"])
    metric = bare(pool.metric)
    test = result.get("test")
    hashes = f"val `{result['hashes']['val']}`" + (f", test `{result['hashes']['test']}`" if test else "")
    read = (f"the test split was read after selection, for the record (reads of test for this experiment: "
            f"{result['test_reads']})" if test else "the test split was not read (`python -m tune_xray.ensemble "
            "DIR --record` records it)")
    data = pool.experiment.summary().get("data")
    binary = pool.task == "multiclass" and len(pool.classes) == 2
    lines = [f"# Ensemble of {pool.experiment.name}", "",
             f"- Study: `{search.get('study', '?')}`; data: `{search.get('data') or 'synthetic (default)'}`; "
             f"smoke: {search.get('smoke', False)}",
             *([f"- Data: {describe_data(data)}"] if data else []),
             *([f"- {describe_untrained(data)}"] if data and data.get("untrained") else []),
             f"- Task: {'binary' if binary else pool.task}, classes: {', '.join(pool.classes)}"
             + (f" (positive: {pool.classes[1]})" if binary else ""),
             *([f"- {metric}: {averaged_text(result, len(pool.classes))}"
                + ("" if binary else " (labels without both classes in "
                   "a split, or with no positive in train, are left out)")] if metric == "mean_auroc" else []),
             f"- Split image-id hashes: {hashes}",
             f"- Selection: {result['method']} (size {result['size']}, bags {result['bags']}) over {result['pool']} "
             f"completed trials, on **validation {metric} only**; {read}.",
             *cost_lines(result["cost"]), "",
             "| member (trial and drawn configuration) | weight | started from |", "|---|---|---|", rows, "",
             f"| {metric} (95 % bootstrap CI, {result['resamples']} resamples) | val (selection set) |"
             + (" test (record) |" if test else ""), "|---|---|" + ("---|" if test else "")]
    for label in (*LABELS, "ensemble_minus_best_single"):
        lines.append(f"| {label} | {_fmt(result['val'][label])} |" + (f" {_fmt(test[label])} |" if test else ""))
    single = result.get("single_label") or {}
    for label in LABELS if single else ():
        for name, entry in single["val"][label].items():
            lines.append(f"| {label} {name.replace('_', ' ')} | {_fmt(entry)} |"
                         + (f" {_fmt(single['test'][label][name])} |" if test else ""))
    if result.get("thresholds"):
        decided = pool.classes if pool.task == "multilabel" else pool.classes[1:]
        chosen = ", ".join(f"{c} {t:.3f}" for c, t in zip(decided, result["thresholds"]) if t is not None)
        lines += ["", f"Decision thresholds (chosen on validation, rule `{pool.rule}`): {chosen or 'none'}"]
        undecided = [c for c, t in zip(decided, result["thresholds"]) if t is None and c not in pool.untrained]
        if undecided:  # (the labels no training image has are named once, above)
            lines.append(f"No threshold, so no decision, for {plural(len(undecided), 'label')} with one class in "
                         f"validation: {', '.join(undecided)}")
    return "\n".join(lines) + "\n"


def print_result(result: dict) -> None:
    metric, test = bare(result["metric"]), result.get("test")
    averaged = f" ({averaged_text(result, len(result['classes']))})" if metric == "mean_auroc" else ""
    print(f"ensemble ({result['method']}, {plural(len(result['members']), 'member')} of {result['pool']}): {metric}"
          f"{averaged}, 95 % bootstrap CI; selected on val only (its intervals: on the selection set)")
    for label in (*LABELS, "ensemble_minus_best_single"):
        print(f"  {label:28s} val {_fmt(result['val'][label])}"
              + (f"   test (record) {_fmt(test[label])}" if test else ""))
    single = result.get("single_label") or {}
    for label in LABELS if single else ():  # single-label tasks: at validation's decision thresholds
        for name, entry in single["val"][label].items():
            print(f"  {label + ' ' + name.replace('_', ' '):28s} val {_fmt(entry)}"
                  + (f"   test (record) {_fmt(single['test'][label][name])}" if test else ""))
    if test:
        print(f"  test read {plural(result['test_reads'], 'time')} for this experiment ({TEST_READS})")
    for line in cost_lines(result["cost"]):
        print(f"  {line[2:]}")
    for m in result["members"]:
        print(f"  {m['weight']:.3f}  {m['name']}")
    if result.get("registered"):
        print(f"registered: {result['registered']}")


def wanted(request: SearchRequest) -> bool:
    return not request.no_ensemble


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's step: the ensemble chosen on validation (Caruana, `--ensemble-size`) under the study's
    ensemble budget, its record on test, registered as the search's model; its latency as served measured here,
    on the driver's device. Returns its part of the record (`ensemble_budget`, `ensemble`, `search_model`); a
    budget no trial fits is an outcome (said, nothing registered); an ensemble chosen but not registered is a
    StepFailed that keeps it."""
    summary = experiment.summary()
    for row in summary["rows"]:  # trials that ended before a resume on another machine
        if row["status"] == "complete" and not experiment.trial_dir(row).is_dir():
            experiment.fetch(experiment.trial_dir(row).name)
    asked = (summary.get("asked") or {}).get("ensemble") or {}  # the study's budget, as the search resolved it
    budget, note = absolute_budget(asked, summary["rows"])  # (a relative one: from the cheapest)
    part = {"ensemble_budget": {**budget, **({"from": note} if note else {})}}
    try:
        result = run_ensemble(experiment, size=request.ensemble_size, seed=request.seed,
                              tracking_uri=experiment.tracking_uri, read_test=True, budget=budget,
                              device=driver_device(), budget_note=note)
    except NoFit as no_fit:  # an outcome, not a failure: said, and nothing registered (see the README)
        best = summary["best"]
        part["ensemble"] = no_fit.outcome({k: best.get(k) for k in ("trial", "name", summary["metric"], "cost")})
        print(f"ensemble: none — {no_fit_text(part['ensemble'])}", flush=True)
        return part
    part["ensemble"] = {k: result.get(k) for k in RECORDED}
    if result.get("registration_error"):
        raise StepFailed(f"the ensemble was chosen but not registered: {result['registration_error']}", part)
    part["search_model"] = search_model(result["registered"], "the ensemble chosen on validation (Caruana over "
                                        f"{plural(result['pool'], 'completed trial')})",
                                        "the study's `ensemble: {select_on: val}`, the default")
    return part


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir", help="a search's directory (tune_xray_runs/NAME)")
    parser.add_argument("--method", choices=("caruana", "topk", "best"), default="caruana")
    parser.add_argument("--size", type=int, default=5, help="ensemble size (selections, with replacement)")
    parser.add_argument("--bags", type=int, default=20, help="Caruana bagging: random halves of the pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--latency-budget", type=float, metavar="MS", help="members only while their measured "
                        "latencies (ms per image, batch 1) sum to at most MS")
    parser.add_argument("--params-budget", type=float, metavar="M", help="members only while their parameters "
                        "sum to at most M million")
    parser.add_argument("--device", help="measure the ensemble's latency as served on this device (cpu, cuda; "
                        "the search measures it on its own)")
    parser.add_argument("--tracking-uri", help="MLflow (default: the search's own store; 'none' to skip)")
    parser.add_argument("--record", action="store_true", help="also read the test split for the record (the search "
                        "did at its end; each read is counted in the experiment's test_reads.json)")
    args = parser.parse_args(argv)
    try:
        experiment = Experiment.at(args.experiment_dir)
        uri = args.tracking_uri or experiment.tracking_uri
        result = run_ensemble(experiment, args.method, args.size, args.bags, args.seed, args.resamples,
                              None if uri == "none" else uri, read_test=args.record, device=args.device,
                              budget={"latency_ms": args.latency_budget, "params_m": args.params_budget})
    except ExperimentError as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    print_result(result)
    if result.get("registration_error"):
        print(f"error: not registered: {result['registration_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
