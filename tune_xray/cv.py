"""`python -m tune_xray.cv EXPERIMENT_DIR --top N --folds K`: the best N completed configurations of a search, each
trained K times on patient-grouped, label-stratified folds of train + val (fold k validation, the others training;
test untouched), at full budget and without ASHA, as Tune trials beside the search (`cv/`) and MLflow children of
its parent run (tagged `tune_xray.cv_of` and `tune_xray.cv_fold`).

Repeats (tune_xray.repeat) re-run seeds on one split; with a few thousand images the split itself is a large
source of variance (MONAI's recipes cross-validate for it; the seed studies never did). Per configuration: the
validation metric of each fold, their mean ± sd and 95 % t-interval, ranked, beside the search's single-split
ranking (Kendall's tau between the two); the out-of-fold predictions (every train + val image predicted once, by
the model that did not train on it) stored, and their pooled metric with a patient-bootstrap interval. The K fold
models of the best configuration are an ensemble (their probabilities averaged, thresholds chosen out of fold),
compared once on test with the search's own ensemble and registered in MLflow as `<experiment>-cv`.
`python -m tune_xray.search … --cv-top N --cv-folds K` runs this at the end of a search.

    python -m tune_xray.cv tune_xray_runs/supervised-smoke --top 3 --folds 3
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import tracking
from .config import ConfigError, bare, merge, metric_mode, objective, plural
from .ensemble import split_scorer
from .experiment import CV_DIR, SUMMARY_FILE, Experiment, ExperimentError, TrialTask, cv_name, read_predictions
from .metrics import ci_text, classification_metrics, interval, patient_bootstrap, resampling_units
from .repeat import Rerun, finalist_configs, rerun_main, t_interval
from .trial import CV_FOLD, CV_FOLDS, CV_OF


def cv_configs(summary: dict, top: int, folds: int) -> list[dict]:
    """The Tune configs of the fold trials: each of the `top` best completed trials' config once per fold."""
    return finalist_configs(summary, top, CV_OF, [{CV_FOLD: k, CV_FOLDS: folds} for k in range(folds)])


def run_cv(experiment: Experiment, top: int = 3, folds: int = 5, address: str | None = None,
           max_failures: int = 1, verbose: bool = False) -> dict:
    """Cross-validate a finished search's finalists and add the result to its summary.json (`cv`); returns it."""
    rerun = Rerun(experiment, "cross-validate")
    if top < 1 or folds < 2:
        raise ConfigError(f"--top {top} --folds {folds}: at least 1 configuration and 2 folds")
    if experiment.cv_dir.exists():
        raise ConfigError(f"{experiment.cv_dir} holds an earlier cross-validation of this search; move it away "
                          "to run another")
    rerun.study.trial_config({}, merge(rerun.overrides, {"data": {"folds": folds}}), rerun.smoke)  # checked first
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
    entry["fold_ensemble"] = fold_ensemble(experiment, summary, entry, experiment.tracking_uri) if entry["rows"] \
        else None
    entry.update(metric=rerun.metric, folds=folds, top=top, trials=trials, wall_time_s=time.perf_counter() - start)
    summary["cv"] = entry
    experiment.write_summary(summary)
    experiment.sync([str(Path(p).relative_to(experiment.directory)) for p in experiment.cv_dir.glob("oof_*.csv")]
                    + [f"{CV_DIR}/ensemble", SUMMARY_FILE])  # a remote storage gets what was made here
    return entry


def out_of_fold(dirs: list[Path], folds: list[int], classes: list[str]) -> pd.DataFrame:
    """The fold trials' validation predictions together: each train + val image once, predicted by the model
    that did not train on it, with its fold."""
    frames = [pd.read_csv(Path(d) / "predictions_val.csv").assign(fold=k) for d, k in zip(dirs, folds)]
    frame = pd.concat(frames, ignore_index=True)
    if frame["path"].duplicated().any():
        raise ExperimentError(f"{dirs[0]}: the folds' validation sets overlap: not a K-fold partition")
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
    """Per configuration: its folds' values, mean ± sd and t-interval, and its pooled out-of-fold metric (written
    to cv/oof_<trial>.csv); ranked by the fold mean, with its rank in the search (one split) beside it."""
    key = objective(metric)
    search_rank = {r["trial"]: i for i, r in enumerate(summary["top"], 1)}
    rows = []
    for source in search_rank:
        done = sorted((t for t in trials if t["cv_of"] == source and t["status"] == "complete"),
                      key=lambda t: t["fold"])
        if not done:
            continue
        values = np.array([t[key] for t in done], dtype=float)
        low, high = t_interval(values)
        task = TrialTask.of(done[0]["dir"])
        oof = out_of_fold([Path(t["dir"]) for t in done], [t["fold"] for t in done], task.classes)
        path = experiment.cv_dir / f"oof_{source}.csv"
        oof.to_csv(path, index=False)
        original = next(r for r in summary["top"] if r["trial"] == source)
        y = oof[[f"y_{c}" for c in task.classes]].to_numpy()
        pooled, _ = _with_interval(_scorer(y, task), oof[[f"p_{c}" for c in task.classes]].to_numpy(float),
                                   patient_bootstrap(resampling_units(oof["patient_id"], oof["path"])))
        rows.append({"config": source, "name": original["name"], "search_rank": search_rank[source],
                     "single_split": original[key], "folds": len(values), "complete": len(values) == folds,
                     "values": values.tolist(), "mean": float(values.mean()),
                     "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"), "ci_low": low,
                     "ci_high": high, "oof": pooled, "oof_file": str(path), "dirs": [t["dir"] for t in done]})
    rows.sort(key=lambda r: (not r["complete"], -r["mean"] if mode == "max" else r["mean"]))
    for rank, row in enumerate(rows, 1):
        row["cv_rank"] = rank
    tau = None
    if len(rows) > 2:
        from scipy.stats import kendalltau

        tau = float(kendalltau([r["search_rank"] for r in rows], [r["cv_rank"] for r in rows]).statistic)
    return {"rows": rows, "kendall_tau": tau}


def fold_ensemble(experiment: Experiment, summary: dict, entry: dict, tracking_uri: str | None) -> dict | None:
    """The K fold models of the CV's best configuration, averaged: thresholds chosen on its out-of-fold
    predictions (validation data), scored once on test beside the search's own ensemble (the paired difference on
    the same patient resamples), and registered in MLflow as `<experiment>-cv`."""
    best = entry["rows"][0]
    if not best["complete"]:
        return None
    task = TrialTask.of(best["dirs"][0])
    classes = task.classes
    tests = [read_predictions(Path(d), "test", classes) for d in best["dirs"]]
    paths, y, groups, _ = tests[0]
    if any(t[0] != paths for t in tests):
        raise ExperimentError(f"{best['dirs'][0]}: the fold models predicted different test images")
    prob = np.mean([t[3] for t in tests], axis=0)
    oof = pd.read_csv(best["oof_file"])
    targets = oof[[f"y_{c}" for c in classes]].to_numpy()
    chosen = classification_metrics(task.task, targets if task.task == "multilabel" else targets.argmax(1),
                                    oof[[f"p_{c}" for c in classes]].to_numpy(float), classes,
                                    rule=task.rule, untrained=task.untrained)["thresholds"]
    boot = patient_bootstrap(groups, 1000, 0)
    out = {"config": best["config"], "name": best["name"], "members": len(tests), "thresholds": chosen,
           "metric": task.metric}
    out["test"], mine = _with_interval(_scorer(y, task, chosen), prob, boot)
    searched = experiment.ensemble_dir / "predictions_test.csv"
    ensemble = summary.get("ensemble") or {}
    if searched.is_file() and ensemble.get("test"):  # the search's ensemble at its own validation thresholds
        frame = pd.read_csv(searched).set_index("path").loc[paths]
        out["search_ensemble_test"], theirs = _with_interval(
            _scorer(y, task, ensemble.get("thresholds")), frame[[f"p_{c}" for c in classes]].to_numpy(float), boot)
        low, high = interval(mine - theirs)
        out["minus_search_ensemble"] = {"value": out["test"]["value"] - out["search_ensemble_test"]["value"],
                                        "ci_low": low, "ci_high": high}
    out["test_reads"] = experiment.note_test_read("the cross-validation's fold ensemble, beside the search's")
    fold_dir = experiment.cv_dir / "ensemble"
    fold_dir.mkdir(parents=True, exist_ok=True)
    test_frame = pd.DataFrame(prob, columns=[f"p_{c}" for c in classes])
    test_frame.insert(0, "path", paths)
    test_frame.to_csv(fold_dir / "predictions_test.csv", index=False)
    if tracking_uri and tracking.find_parent(experiment.directory):
        try:
            out["registered"] = tracking.log_fold_ensemble(tracking_uri, experiment.directory, out, best,
                                                           str(oof["path"].iloc[0]))
        except Exception as err:  # noqa: BLE001 — the cross-validation stands; what failed is said
            out["registered"], out["registration_error"] = None, f"{type(err).__name__}: {err}"
    return out


def print_cv(entry: dict) -> None:
    name = bare(entry["metric"])
    print(f"\ncross-validation: {plural(len(entry['rows']), 'configuration')} × {entry['folds']} folds of train + val "
          "(patient-grouped, label-stratified; test untouched): val "
          f"{name} per fold, mean ± sd [95 % t-interval]; pooled out of fold [95 % bootstrap CI]")
    for row in entry["rows"]:
        print(f"  {row['cv_rank']}. {row['mean']:.4f} ± {row['sd']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
              f" over {row['folds']} folds; out of fold {ci_text(row['oof'])}; search rank {row['search_rank']} "
              f"({row['single_split']:.4f} on one split)  {row['name']}"
              + ("" if row["complete"] else "  (not every fold completed)"))
    if entry.get("kendall_tau") is not None:
        print(f"  single-split vs cross-validated ranking: Kendall's tau {entry['kendall_tau']:+.2f}")
    ens = entry.get("fold_ensemble")
    if ens:
        line = (f"  fold ensemble ({ens['members']} fold models of {ens['config']}, averaged): test {name} "
                f"{ci_text(ens['test'])}")
        if ens.get("minus_search_ensemble"):
            line += (f"; the search's ensemble {ci_text(ens['search_ensemble_test'])}; difference "
                     f"{ci_text(ens['minus_search_ensemble'])}")
        print(line + (f"; registered as {ens['registered']['uri']}" if ens.get("registered") else ""))


def show(entry: dict) -> bool:
    """Print the cross-validation; whether registering its fold ensemble failed."""
    print_cv(entry)
    error = (entry.get("fold_ensemble") or {}).get("registration_error")
    if error:
        print(f"error: not registered: {error}", file=sys.stderr)
    return bool(error)


def main(argv=None) -> int:
    return rerun_main(argv, "python -m tune_xray.cv", __doc__, ("--folds", 5, "K folds of train + val"), run_cv, show,
                      "fold trial")


if __name__ == "__main__":
    sys.exit(main())
