"""`python -m tune_xray.cv EXPERIMENT_DIR --top N --folds K`: the best N completed configurations of a search, each
trained K times on patient-grouped, label-stratified folds of train + val (fold k validation, the others training;
test untouched), at full budget and without ASHA, as Tune trials beside the search (`cv/`) and MLflow children of
its parent run (tagged `tune_xray.cv_of` and `tune_xray.cv_fold`).

Repeats (tune_xray.repeat) re-run seeds on one split; with a few thousand images the split itself is a large
source of variance (MONAI's recipes cross-validate for it; the seed studies never did). Per configuration: the
validation metric of each fold, their mean ± sd and 95 % interval (Nadeau & Bengio's corrected resampled t: the
folds' training sets overlap, so the plain t-interval is too narrow), ranked, beside the search's single-split
ranking (Kendall's tau between the two); the out-of-fold predictions (every train + val image predicted once, by
the model that did not train on it) stored, and their pooled metric with a patient-bootstrap interval.

Then an ensemble chosen on those out-of-fold predictions, as AutoGluon chooses its weighted ensemble on bagged
models' out-of-fold predictions and nnU-Net its configurations on pooled 5-fold predictions: Caruana over the
configurations on every train + val image (K× what one validation split holds), each chosen configuration served
as its K fold models (weights from the selection, split evenly over the folds), each fold model deciding at the
threshold chosen on its own validation fold and the ensemble deciding by their weighted vote — a threshold fits
the probabilities it was chosen on, and an average of K models is narrower than any one of them. Compared once on
test with the search's own ensemble (paired, patient resamples; the read counted), beside the same models at
thresholds chosen on the averaged out-of-fold probabilities (the mismatch a vote avoids), and registered in MLflow
as `<experiment>-cv`; with `--select` (or the study's `ensemble: {select_on: oof}`) also as `<experiment>`, the
search's model.

Honest about itself: each fold's value comes from a checkpoint early-stopped on that same fold (optimistic, as a
single split's is); the finalists were picked on the search's validation split, which lies inside the folds, so the
cross-validated ranking leans toward the search's own; the out-of-fold predictions are checked to cover every
train + val image exactly once. `python -m tune_xray.search … --cv-top N --cv-folds K` runs this at the end of a
search.

    python -m tune_xray.cv tune_xray_runs/supervised-smoke --top 3 --folds 3 [--select]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import registry, tracking
from .config import ConfigError, metric_mode, objective
from .credentials import mask
from .data.splits import UNLABELLED
from .driver import driver_device
from .experiment import Experiment, ExperimentError, TrialTask, cv_name, file_sha256, read_json, read_predictions
from .metrics import (
    CORRECTED_T,
    ci_text,
    classification_metrics,
    corrected_t_interval,
    decisions,
    interval,
    nanmean_rows,
    patient_bootstrap,
    resampling_units,
    split_scorer,
    vote,
    weighted_decision_metrics,
)
from .record.names import CV_DIR, CV_FOLD, CV_FOLDS, CV_OF, ENSEMBLE_DIR, SUMMARY_FILE, bare
from .record.status import StepFailed
from .record.text import cost_lines, no_fit_text, plural, search_model_text
from .request import SearchRequest
from .rerun import Rerun, finalist_configs, rerun_main
from .selection import CaruanaSelector, NoFit, absolute_budget
from .serving import measured_latency
from .summary import search_model

EARLY_STOPPING = ("each fold's value is that fold model's checkpoint early-stopped on the same fold (optimistic, "
                  "as a single split's is)")
LEANING = ("the finalists were picked on the search's validation split, which lies inside the folds: the "
           "cross-validated ranking leans toward the search's own")


def cv_configs(summary: dict, top: int, folds: int) -> list[dict]:
    """The Tune configs of the fold trials: each of the `top` best completed trials' config once per fold."""
    return finalist_configs(summary, top, CV_OF, [{CV_FOLD: k, CV_FOLDS: folds} for k in range(folds)])


def run_cv(experiment: Experiment, top: int = 3, folds: int = 5, address: str | None = None,
           max_failures: int = 1, verbose: bool = False, select: bool | None = None, size: int = 5) -> dict:
    """Cross-validate a finished search's finalists, choose an ensemble on their out-of-fold predictions (of at
    most `size` selections) and add the result to its summary.json (`cv`); returns it. `select`: that ensemble is
    the search's model, registered under the experiment's name too (None: as the study's `ensemble.select_on`)."""
    rerun = Rerun(experiment, "cross-validate")
    if top < 1 or folds < 2:
        raise ConfigError(f"--top {top} --folds {folds}: at least 1 configuration and 2 folds")
    if experiment.cv_dir.exists():
        raise ConfigError(f"{experiment.cv_dir} holds an earlier cross-validation of this search; move it away "
                          "to run another")
    rerun.resolved.trial_config({}, {"data": {"folds": folds}})  # checked first
    summary = rerun.summary

    def describe(config: dict) -> tracking.TrialRecord:
        return rerun.record(
            config, f"fold={config[CV_FOLD]}/{folds}",
            {tracking.CV_TAG: config[CV_OF], "tune_xray.cv_fold": str(config[CV_FOLD]),
             "tune_xray.cv_folds": str(folds)},
            f"Fold {config[CV_FOLD]} of {folds} of trial {config[CV_OF]}'s configuration: trained on the other folds "
            "of train + val, validated on this one (patient-grouped, label-stratified); test untouched.")

    start = time.perf_counter()
    rows = rerun.run(cv_configs(summary, top, folds), CV_DIR, cv_name, describe, "cv",
                     "the cross-validation was interrupted", max_failures, address, verbose)
    trials = [{"trial": f"{r['config'][CV_OF]}/fold{r['config'][CV_FOLD]}", "cv_of": r["config"][CV_OF],
               "fold": r["config"][CV_FOLD], **{k: v for k, v in r.items() if k != "config"}} for r in rows]
    entry = aggregate(experiment, summary, trials, rerun.study.metric, rerun.study.mode, folds)
    by = "--select on the command line"
    if select is None:
        select, by = rerun.study.space.ensemble.select_on == "oof", "the study's `ensemble: {select_on: oof}`"
    budget, note = absolute_budget(rerun.resolved.ensemble, summary["rows"])  # the search's ensemble budget
    entry["oof_ensemble"] = oof_ensemble(experiment, summary, entry, experiment.tracking_uri, size, select,
                                         budget, note, by)
    if (entry["oof_ensemble"] or {}).get("search_model"):
        summary["search_model"] = entry["oof_ensemble"]["search_model"]
        card = f"{ENSEMBLE_DIR}/model_card.md"
        if experiment.file(card).is_file():  # the validation ensemble's card says it is not the search's model any more
            experiment.write_text(card, experiment.file(card).read_text()
                                  + f"\nNot the search's model: {search_model_text(summary)}.\n")
    entry.update(metric=rerun.metric, folds=folds, top=top, trials=trials, notes=[EARLY_STOPPING, LEANING],
                 wall_time_s=time.perf_counter() - start)
    summary["cv"] = entry
    experiment.write_summary(summary)
    experiment.sync([str(Path(p).relative_to(experiment.directory)) for p in experiment.cv_dir.glob("oof_*.csv")]
                    + [f"{CV_DIR}/ensemble", SUMMARY_FILE])  # a remote storage gets what was made here
    return entry


def out_of_fold(dirs: list[Path], folds: list[int], classes: list[str], every_fold: bool = False) -> pd.DataFrame:
    """The fold trials' validation predictions together: each train + val image once, predicted by the model
    that did not train on it, with its fold. Checked: no image twice, and with `every_fold` (all K ran) as many
    images as a fold trial had in train + val."""
    frames = [pd.read_csv(Path(d) / "predictions_val.csv").assign(fold=k) for d, k in zip(dirs, folds)]
    frame = pd.concat(frames, ignore_index=True)
    if frame["path"].duplicated().any():
        raise ExperimentError(f"{dirs[0]}: the folds' validation sets overlap: not a K-fold partition")
    sizes = read_json(Path(dirs[0]) / "summary.json", "a fold trial's summary").get("split_sizes") or {}
    expected = sum(sizes.get(split, 0) for split in ("train", UNLABELLED, "val"))  # a label fraction's hidden too
    if every_fold and expected and len(frame) != expected:
        raise ExperimentError(f"{Path(dirs[0]).parent}: the out-of-fold predictions cover {len(frame)} images, not "
                              f"the {expected} of train + val once each")
    return frame


def _scorer(y: np.ndarray, task: TrialTask, thresholds=None):
    """`score(prob, weights)` of the study's metric in its own sense (split_scorer's is "higher is better", a loss
    negated: undone here), threshold metrics at `thresholds`."""
    score = split_scorer(y, task.task, task.metric, task.classes, task.rule,
                         None if thresholds is None else np.asarray(thresholds, dtype=np.float64), task.untrained)
    sign = 1.0 if metric_mode(task.metric) == "max" else -1.0
    return lambda prob, weights=None: sign * score(prob, weights)


def _with_interval(score, prob: np.ndarray, boot: np.ndarray) -> tuple[dict, np.ndarray]:
    """({value, ci_low, ci_high}, the resampled values) of `score` on `prob` under the patient resamples `boot`."""
    values = score(prob, boot)
    low, high = interval(values)
    return {"value": float(score(prob)[0]), "ci_low": low, "ci_high": high}, values


def aggregate(experiment: Experiment, summary: dict, trials: list[dict], metric: str, mode: str,
              folds: int) -> dict:
    """Per configuration: its folds' values, mean ± sd and corrected resampled t-interval, and its pooled
    out-of-fold metric (written to cv/oof_<trial>.csv); ranked by the fold mean, with its rank in the search (one
    split) beside it."""
    key = objective(metric)
    search_rank = {r["trial"]: i for i, r in enumerate(summary["top"], 1)}
    rows = []
    for source in search_rank:
        done = sorted((t for t in trials if t["cv_of"] == source and t["status"] == "complete"),
                      key=lambda t: t["fold"])
        if not done:
            continue
        values = np.array([t[key] for t in done], dtype=float)
        low, high = corrected_t_interval(values, test_train_ratio([Path(t["dir"]) for t in done], folds))
        task = TrialTask.of(done[0]["dir"])
        oof = out_of_fold([Path(t["dir"]) for t in done], [t["fold"] for t in done], task.classes,
                          len(done) == folds)
        name = f"{CV_DIR}/oof_{source}.csv"
        experiment.write_table(name, oof)
        path = experiment.file(name)
        original = next(r for r in summary["top"] if r["trial"] == source)
        y = oof[[f"y_{c}" for c in task.classes]].to_numpy()
        pooled, _ = _with_interval(_scorer(y, task), oof[[f"p_{c}" for c in task.classes]].to_numpy(float),
                                   patient_bootstrap(resampling_units(oof["patient_id"], oof["path"])))
        named = oof["patient_id"].notna() & (oof["patient_id"].astype(str) != "")
        rows.append({"config": source, "name": original["name"], "search_rank": search_rank[source],
                     "grouped": "patients" if named.any() else "images",
                     "single_split": original[key], "folds": len(values), "complete": len(values) == folds,
                     "values": values.tolist(), "mean": float(values.mean()),
                     "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"), "ci_low": low,
                     "ci_high": high, "oof": pooled, "oof_file": str(path), "dirs": [t["dir"] for t in done],
                     "fold_costs": [t.get("cost") or {} for t in done]})
    rows.sort(key=lambda r: (not r["complete"], -r["mean"] if mode == "max" else r["mean"]))
    for rank, row in enumerate(rows, 1):
        row["cv_rank"] = rank
    tau = None
    if len(rows) > 2:
        from scipy.stats import kendalltau

        tau = float(kendalltau([r["search_rank"] for r in rows], [r["cv_rank"] for r in rows]).statistic)
    patients = any(r["grouped"] == "patients" for r in rows)
    return {"rows": rows, "kendall_tau": tau,
            "grouped": "patient-grouped" if patients else "image-grouped (no patient ids)"}


def test_train_ratio(dirs: list[Path], folds: int) -> float:
    """n_test / n_train of the fold trials (their validation fold over the images they trained on, a label
    fraction's hidden ones included: the data the folds share), averaged; 1/(K − 1) where a fold says no sizes."""
    ratios = []
    for directory in dirs:
        sizes = read_json(directory / "summary.json", "a fold trial's summary").get("split_sizes") or {}
        trained = sizes.get("train", 0) + sizes.get(UNLABELLED, 0)
        if trained and sizes.get("val"):
            ratios.append(sizes["val"] / trained)
    return float(np.mean(ratios)) if ratios else 1 / (folds - 1)


def fold_thresholds(directory: str | Path):
    """The thresholds a fold trial chose on its own validation fold (None: none chosen)."""
    summary = read_json(Path(directory) / "summary.json", "a fold trial's summary")
    return (summary.get("supervised") or {}).get("thresholds")


def decision_record(y: np.ndarray, decided: np.ndarray, single_label: bool, boot: np.ndarray) -> dict:
    """Of fixed 0/1 decisions, each with its patient-bootstrap interval: accuracy and balanced accuracy
    (single-label); sensitivity and specificity — of the positive class (binary), else their mean over the decided
    labels or classes."""
    columns = np.flatnonzero(np.isfinite(decided).all(0))
    if single_label and y.shape[1] == 2:
        columns = np.array([1])
    every = np.vstack([np.ones(len(y)), boot])
    resampled = weighted_decision_metrics(y, np.nan_to_num(decided), every, single_label)
    out = {}
    for key, values in resampled.items():
        if values.ndim == 2:
            values = nanmean_rows(values[:, columns])
        low, high = interval(values[1:])
        out[key] = {"value": float(values[0]), "ci_low": low, "ci_high": high}
    return out


def configuration_costs(rows: list[dict], budget: dict, device: str) -> np.ndarray:
    """What each cross-validated configuration costs as the out-of-fold ensemble serves it — its K fold models,
    all of them run on every image — (n, budget's costs): latency measured as the front's is (ensemble.
    measured_latency: as served, alone on the driver's `device`, median of repeats) on its fold models together;
    parameters the fold models' summed."""
    costs = np.full((len(rows), len(budget)), np.nan)
    for i, row in enumerate(rows):
        checkpoints = [str(Path(d) / "best.pt") for d in row["dirs"]]
        example = pd.read_csv(Path(row["dirs"][0]) / "predictions_val.csv", usecols=["path"], nrows=1)["path"][0]
        for k, name in enumerate(budget):
            if name == "latency_ms":
                costs[i, k] = measured_latency(checkpoints, [1.0] * len(checkpoints), example, device)
            else:
                costs[i, k] = sum(cost.get(name, np.nan) for cost in row["fold_costs"])
    return costs


def oof_ensemble(experiment: Experiment, summary: dict, entry: dict, tracking_uri: str | None, size: int = 5,
                 select: bool = False, budget: dict | None = None, budget_note: str = "", by: str = "",
                 device: str | None = None) -> dict | None:
    """Caruana over the configurations every fold of which completed, on their pooled out-of-fold predictions
    (validation data only: each train + val image predicted by the model that did not train on it); served as the
    chosen configurations' fold models, a configuration's weight split evenly over its K folds, deciding by their
    weighted vote, each fold model at the threshold chosen on its own validation fold (`metrics.vote`). Scored
    once on test beside the search's ensemble (the paired difference on the same patient resamples) and beside
    the same models at thresholds chosen on the averaged out-of-fold probabilities (applied to an average of K
    models, which is narrower: the mismatch the vote avoids); registered in MLflow as `<experiment>-cv`, and with
    `select` as `<experiment>` too — the search's model, `by` what.

    Under the search's ensemble `budget` (ms per image, M parameters; `budget_note`: how a relative one was
    reached), a configuration costs what it is served as: its K fold models together, measured alone on the
    driver's `device` as the front is (`configuration_costs`); Caruana adds a configuration only while the chosen
    ones sum within it. The chosen ensemble's cost is said in every case, budget or not: the members' sum and the
    whole ensemble as served. A budget no configuration fits alone is an outcome (`fits: False`), nothing
    registered. The comparison with the search's ensemble reads that ensemble's test predictions only when their
    content hash is the one the search recorded with its thresholds; otherwise it says why it did not compare."""
    if device is None:
        device = driver_device()  # in the driver, with no trial running: the front's rule
    budget = {k: v for k, v in (budget or {}).items() if v is not None}
    rows = [r for r in entry["rows"] if r["complete"]]
    if not rows:
        return None
    task = TrialTask.of(rows[0]["dirs"][0])
    classes = task.classes
    p_cols, y_cols = [f"p_{c}" for c in classes], [f"y_{c}" for c in classes]
    frames = [pd.read_csv(r["oof_file"]).set_index("path") for r in rows]
    if any(set(f.index) != set(frames[0].index) for f in frames[1:]):
        raise ExperimentError(f"{experiment.cv_dir}: the configurations' out-of-fold predictions are of different "
                              "images (not one K-fold partition)")
    oof_paths = frames[0].index
    probs = np.stack([f.loc[oof_paths, p_cols].to_numpy(float) for f in frames])
    y_oof = frames[0].loc[oof_paths, y_cols].to_numpy()
    hill = split_scorer(y_oof, task.task, task.metric, classes, task.rule, untrained=task.untrained)
    costs = configuration_costs(rows, budget, device) if budget else None
    bounds = np.array(list(budget.values()), dtype=np.float64) if budget else None
    if budget and not (costs <= bounds).all(1).any():
        near = int(np.argmin((costs / bounds).max(1)))
        nearest = {"trial": rows[near]["config"], "name": rows[near]["name"],
                   **{k: float(costs[near, j]) for j, k in enumerate(budget)}}
        outcome = NoFit("no cross-validated configuration fits the budget alone, served as its "
                        f"{len(rows[near]['dirs'])} fold models", budget, nearest).outcome(None)
        remedy = ("the cross-validation is held to the search's ensemble budget: the study's `ensemble:` budget or "
                  "the search's --latency-budget / --params-budget, raised")
        return {**outcome, "budget_note": budget_note, "device": device, "remedy": remedy}
    selector = CaruanaSelector(size, seed=0).fit(probs, y_oof, lambda y, p: float(hill(p)[0]), costs, bounds)
    weights = selector.weights_
    oof_prob = np.tensordot(weights, probs, axes=1)
    oof_boot = patient_bootstrap(resampling_units(frames[0].loc[oof_paths, "patient_id"], oof_paths))
    chosen = [(r, float(w)) for r, w in zip(rows, weights) if w > 0]
    dirs = [d for r, _ in chosen for d in r["dirs"]]
    member_weights = [w / len(r["dirs"]) for r, w in chosen for _ in r["dirs"]]
    member_thresholds = [fold_thresholds(d) for d in dirs]
    out = {"configs": [{"config": r["config"], "name": r["name"], "weight": w, "folds": len(r["dirs"])}
                       for r, w in chosen],
           "members": len(dirs), "metric": task.metric, "selected": bool(select),
           "oof": _with_interval(_scorer(y_oof, task), oof_prob, oof_boot)[0], "oof_images": len(oof_paths),
           "member_thresholds": member_thresholds}
    names = list(budget) if budget else ["latency_ms", "params_m"]  # what the members' sum is given of
    served = costs[weights > 0] if costs is not None else configuration_costs([r for r, _ in chosen],
                                                                              dict.fromkeys(names), device)
    out["cost"] = {"budget": budget, **({"budget_note": budget_note} if budget_note else {}),
                   **{f"{k}_sum": float(served[:, j].sum()) for j, k in enumerate(names)
                      if np.isfinite(served[:, j]).all()},
                   "device": device, "latency_where": "each configuration as its fold models served together, "
                   "measured again after the trials, alone, on the driver's device",
                   "served_latency_ms": measured_latency([str(Path(d) / "best.pt") for d in dirs], member_weights,
                                                         str(oof_paths[0]), device)}
    tests = [read_predictions(Path(d), "test", classes) for d in dirs]
    paths, y, groups, _ = tests[0]
    if any(t[0] != paths for t in tests):
        raise ExperimentError(f"{dirs[0]}: the fold models predicted different test images")
    members = np.stack([t[3] for t in tests])
    prob = np.tensordot(np.asarray(member_weights) / np.sum(member_weights), members, axes=1)
    boot = patient_bootstrap(groups, 1000, 0)
    single_label = task.task != "multilabel"
    if single_label and len(classes) > 2:  # no thresholds: the argmax of the weighted mean, as every ensemble
        voted = averaged = decisions(task.task, prob)
    else:
        _, voted = vote(task.task, members, member_thresholds, member_weights)
        targets = y_oof if task.task == "multilabel" else y_oof.argmax(1)
        out["oof_thresholds"] = classification_metrics(task.task, targets, oof_prob, classes, rule=task.rule,
                                                       untrained=task.untrained)["thresholds"]
        averaged = decisions(task.task, prob, out["oof_thresholds"])
    out["decisions_test"] = {"vote": decision_record(y, voted.astype(float), single_label, boot),
                             "averaged_oof_thresholds": decision_record(y, averaged.astype(float), single_label,
                                                                        boot)}
    name = bare(task.metric)
    if name in ("accuracy", "macro_f1"):  # a threshold metric: the vote's decisions, as served
        out["test"], mine = _with_interval(_decided_scorer(y, voted.astype(float), task), prob, boot)
    else:
        out["test"], mine = _with_interval(_scorer(y, task), prob, boot)
    ensemble = summary.get("ensemble") or {}
    frame, out["not_compared"] = search_ensemble_test(experiment, ensemble)
    if frame is not None:  # the search's ensemble at its own validation thresholds
        frame = frame.set_index("path").loc[paths]
        out["search_ensemble"] = ensemble["test_predictions"]
        out["search_ensemble_val"] = (ensemble.get("val") or {}).get("ensemble")
        out["search_ensemble_test"], theirs = _with_interval(
            _scorer(y, task, ensemble.get("thresholds")), frame[p_cols].to_numpy(float), boot)
        low, high = interval(mine - theirs)
        out["minus_search_ensemble"] = {"value": out["test"]["value"] - out["search_ensemble_test"]["value"],
                                        "ci_low": low, "ci_high": high}
    out["test_reads"] = experiment.note_test_read("the cross-validation's out-of-fold ensemble, beside the search's")
    test_frame = pd.DataFrame(prob, columns=p_cols)
    test_frame.insert(0, "path", paths)
    experiment.write_table(f"{CV_DIR}/ensemble/predictions_test.csv", test_frame)
    out["selected_by"] = by if select else None
    out["card"] = model_card(out)
    experiment.write_text(f"{CV_DIR}/ensemble/model_card.md", out["card"])
    if tracking_uri and tracking.find_parent(experiment.directory):
        try:
            out["registered"] = registry.log_oof_ensemble(tracking_uri, experiment.directory, out,
                                                          [str(Path(d) / "best.pt") for d in dirs], member_weights,
                                                          str(oof_paths[0]), select)
        except Exception as err:  # noqa: BLE001 — the cross-validation stands; what failed is said
            out["registered"], out["registration_error"] = None, mask(f"{type(err).__name__}: {err}")
    if select and out.get("registered"):
        out["search_model"] = search_model(
            out["registered"], f"the out-of-fold ensemble (Caruana over {plural(len(rows), 'configuration')}, each "
            f"served as its fold models, chosen on {len(oof_paths)} out-of-fold images)", by)
    return out


def search_ensemble_test(experiment: Experiment, ensemble: dict) -> tuple[pd.DataFrame | None, str | None]:
    """The search's ensemble's test predictions, read from its record — the file it wrote, checked against the
    content hash it kept with its thresholds — or (None, why there is nothing to compare with): no ensemble, no test
    record, the file gone, or another ensemble's (`python -m tune_xray.ensemble --record` wrote it since)."""
    told = ensemble.get("test_predictions") or {}
    if ensemble.get("fits") is False:
        return None, "the search chose no ensemble (no trial fitted its budget)"
    if not ensemble.get("test") or not told.get("sha256"):
        return None, "the search's ensemble has no test record with its predictions' hash"
    path = experiment.directory / told["file"]
    if not path.is_file():
        return None, f"{told['file']}, the search's ensemble's test predictions, is gone"
    found = file_sha256(path)
    if found != told["sha256"]:
        return None, (f"{told['file']} is not the search's ensemble's (sha256 {found[:12]}, the search's "
                      f"{told['sha256'][:12]}: another selection wrote it since, e.g. python -m tune_xray.ensemble "
                      "--record)")
    return pd.read_csv(path), None


def _decided_scorer(y: np.ndarray, decided: np.ndarray, task: TrialTask):
    """`score(prob, weights)` of the study's threshold metric (accuracy, macro F1) of fixed decisions — the vote's,
    as served — computed by the very code that scores the search's ensemble (`split_scorer`, hence
    `metrics.classification_metrics`): the decisions given as probabilities of 0 or 1 at threshold 0.5, a label
    no member decided given no threshold. So a label undecided, or without both classes in a resample, is left out
    of the mean exactly where the compared metric leaves it out (the probabilities passed are unused)."""
    thresholds = None
    if task.task == "multilabel":
        thresholds = [0.5 if np.isfinite(column).all() else None for column in decided.T]
    elif len(task.classes) == 2:
        thresholds = [0.5]
    score, filled = _scorer(y, task, thresholds), np.nan_to_num(decided)
    return lambda prob, weights=None: score(filled, weights)


def model_card(out: dict) -> str:
    """What the out-of-fold ensemble is and how it decides, for the MLflow version and cv/ensemble/."""
    members = "; ".join(f"{c['name']} (weight {c['weight']:.3g}, {c['folds']} fold models)" for c in out["configs"])
    lines = [f"# Out-of-fold ensemble ({plural(out['members'], 'fold model')})",
             f"**Chosen on out-of-fold predictions**: Caruana over the cross-validated configurations on "
             f"{out['oof_images']} train + val images, each predicted by the fold model that did not train on it "
             f"(val {bare(out['metric'])} out of fold {ci_text(out['oof'])}: the data that chose it, optimistic).",
             f"**Members**: {members}; a configuration's weight split evenly over its fold models; the probability "
             "is their weighted mean.",
             "**Decisions**: each fold model decides at the threshold chosen on its own validation fold (a threshold "
             "fits the probabilities it was chosen on; the average of K models is narrower than any one), and a "
             "label is decided when members holding more than half the weight decide it, a tie at half by their "
             "weighted mean margin, probability − own threshold (predict's `vote_<label>` "
             "column is that share)." if "oof_thresholds" in out else
             "**Decisions**: the most probable class of the weighted mean.",
             "**Cost**: " + "; ".join(line[2:] for line in cost_lines(out["cost"], compared=False)),
             f"**Test (the record)**: {bare(out['metric'])} {ci_text(out['test'])}"
             + (f"; {compared_text(out)} {ci_text(out['search_ensemble_test'])}, difference "
                f"{ci_text(out['minus_search_ensemble'])} (paired, patient resamples)."
                if out.get("minus_search_ensemble") else f"; not compared with the search's ensemble: "
                f"{out.get('not_compared')}."),
             *([f"**The search's model**: this ensemble is registered under the experiment's name too (its latest "
                f"version), chosen as the search's model by {out['selected_by']}."] if out.get("selected_by")
               else [])]
    return "\n\n".join(lines) + "\n"


def compared_text(out: dict) -> str:
    """What the out-of-fold ensemble was compared with, named: the search's ensemble by its run and the hash of
    the test predictions read."""
    told = out.get("search_ensemble") or {}
    run = f"MLflow run {told['run_id']}, " if told.get("run_id") else ""
    return f"the search's validation-chosen ensemble ({run}test predictions sha256 {told.get('sha256', '')[:12]})"


def print_cv(entry: dict) -> None:
    name = bare(entry["metric"])
    print(f"\ncross-validation: {plural(len(entry['rows']), 'configuration')} × {entry['folds']} folds of train + val "
          f"({entry.get('grouped', 'patient-grouped')}, label-stratified; test untouched): val "
          f"{name} per fold, mean ± sd [95 % {CORRECTED_T}]; pooled out of fold [95 % bootstrap CI]; {EARLY_STOPPING}")
    for row in entry["rows"]:
        print(f"  {row['cv_rank']}. {row['mean']:.4f} ± {row['sd']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
              f" over {row['folds']} folds; out of fold {ci_text(row['oof'])}; search rank {row['search_rank']} "
              f"({row['single_split']:.4f} on one split)  {row['name']}"
              + ("" if row["complete"] else "  (not every fold completed)"))
    if entry.get("kendall_tau") is not None:
        print(f"  single-split vs cross-validated ranking: Kendall's tau {entry['kendall_tau']:+.2f} ({LEANING})")
    ens = entry.get("oof_ensemble")
    if ens and ens.get("fits") is False:
        print(f"  out-of-fold ensemble: none — {no_fit_text(ens)}")
    elif ens:
        chosen = " + ".join(f"{c['weight']:.2g}×{c['config']}" for c in ens["configs"])
        print(f"  out-of-fold ensemble ({chosen}: {plural(ens['members'], 'fold model')}, chosen on "
              f"{ens['oof_images']} out-of-fold images, {name} {ci_text(ens['oof'])}): test {name} "
              f"{ci_text(ens['test'])}"
              + (f"; {compared_text(ens)} {ci_text(ens['search_ensemble_test'])}, difference "
                 f"{ci_text(ens['minus_search_ensemble'])}" if ens.get("minus_search_ensemble") else
                 f"; not compared with the search's ensemble: {ens.get('not_compared')}"))
        for line in cost_lines(ens["cost"], compared=False):
            print(f"    {line[2:]}")
        if "oof_thresholds" in ens:
            matched, mismatched = (ens["decisions_test"][k] for k in ("vote", "averaged_oof_thresholds"))
            print("    test decisions, each fold model at its own threshold (served) vs the average at out-of-fold "
                  "thresholds: " + "; ".join(f"{k.replace('_', ' ')} {matched[k]['value']:.4f} vs "
                                             f"{mismatched[k]['value']:.4f}" for k in matched))
        if ens.get("registered"):
            print(f"    registered as {ens['registered']['uri']}"
                  + (f" (the search's model; also {ens['registered']['also']})" if ens["registered"].get("also")
                     else ""))


def show(entry: dict) -> bool:
    """Print the cross-validation; whether registering its out-of-fold ensemble failed."""
    print_cv(entry)
    error = (entry.get("oof_ensemble") or {}).get("registration_error")
    if error:
        print(f"error: not registered: {error}", file=sys.stderr)
    return bool(error)


def wanted(request: SearchRequest) -> bool:
    return bool(request.cv_folds)


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's step: its `--cv-top` finalists cross-validated in `--cv-folds` folds (run_cv), with the
    out-of-fold ensemble the search's model where the study selects on it; said in a table. Returns its part of the
    record (`cv`, and `search_model` when it is the one); an out-of-fold ensemble chosen but not registered is a
    StepFailed that keeps it."""
    entry = run_cv(experiment, request.cv_top, request.cv_folds, max_failures=request.max_failures,
                   size=request.ensemble_size)
    part = {"cv": entry}
    chosen = (entry.get("oof_ensemble") or {}).get("search_model")
    if chosen:
        part["search_model"] = chosen
    print_cv(entry)
    error = (entry.get("oof_ensemble") or {}).get("registration_error")
    if error:
        raise StepFailed(f"the out-of-fold ensemble was chosen but not registered: {error}", part)
    return part


def main(argv=None) -> int:
    return rerun_main(argv, "python -m tune_xray.cv", __doc__, ("--folds", 5, "K folds of train + val"), run_cv, show,
                      "fold trial", {"--select": dict(action="store_true", default=None, help=(
                          "the out-of-fold ensemble becomes the search's model: registered under the experiment's "
                          "name too (default: the study's ensemble.select_on)")),
                                     "--size": dict(type=int, default=5, help="Caruana's selections over the "
                                                    "configurations (default: 5)")})


if __name__ == "__main__":
    sys.exit(main())
