"""`python -m tune_xray.report EXPERIMENT_DIR [--out report.html]`: the study on one self-contained HTML page.

What won, by how much and with what certainty (95 % patient-level bootstrap CIs), what mattered (Optuna's
history, fANOVA importance, parallel coordinates, slices; ASHA's epochs per trial), how the best models learn and
are calibrated, what they look at (Grad-CAM) and how they group images (t-SNE), and what they cost (params,
FLOPs, img/s). Every choice shown is made on validation data; the test split appears only in the section
labelled as the record. Figures are inline PNGs: the file opens offline. A search writes it at its end and
logs it to the parent MLflow run.

In two steps: `report_data(experiment)` computes every number and array the page shows (models loaded, Grad-CAM,
t-SNE and timing run) and is saved as JSON beside the page (report.json); `render(data)` draws and writes HTML
from that alone.

    python -m tune_xray.report tune_xray_runs/byol-smoke            # → tune_xray_runs/byol-smoke/report.html
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .config import bare, plural
from .credentials import mask
from .data.sources import describe_data, describe_untrained
from .ensemble import averaged_text, cost_lines
from .experiment import (
    REPORT_FILE,
    STATUSES,
    Experiment,
    ExperimentError,
    TrialTask,
    predicted_classes,
    read_json,
    read_predictions,
)
from .figures import COLUMN, figure, integer_ticks, pyplot, wrap
from .metrics import ci_text, pareto_front, scored_labels
from .space import flatten, short_names, space_rows
from .summary import labels_averaged

THUMBNAIL = 128  # Grad-CAM images and maps are kept at this size (pixels) in the data: what the page shows
FEW = 10  # a label with fewer positives or negatives in a split: its selection and intervals there are noise


# -- the numbers ------------------------------------------------------------------------------------------------

def _predictions(directory: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, targets, probabilities, classes) of a trial's stored predictions."""
    classes = predicted_classes(directory, split)
    paths, y, _, prob = read_predictions(directory, split, classes)
    return paths, y, prob, classes


def _trial_seconds(directory: Path) -> float:
    """The trial's own wall time (Tune's last result)."""
    path = directory / "result.json"
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0


def _study_file(summary: dict):
    from .space import load_study

    try:
        return load_study(summary["file"])
    except (OSError, ValueError):  # the file moved or changed since: the summary still stands
        return None


def study_facts(experiment: Experiment, summary: dict, invocation: dict) -> list[tuple[str, str]]:
    from .config import parse_overrides

    resources = summary.get("resources", {})
    hours = sum(_trial_seconds(experiment.trial_dir(r)) for r in summary["rows"]) / 3600
    study = _study_file(summary)
    budget = study.budget(bool(invocation.get("smoke")), parse_overrides(invocation.get("overrides") or [])) \
        if study else None
    applied = summary.get("overrides") or {}
    facts = [("study file", summary["file"]),
             ("objective", f"{bare(summary['metric'])} ({summary['mode']}), on validation"
              if summary.get("pareto_front") is None else
              "; ".join(f"{o['name']} ({o['mode']})" for o in summary["objectives"])
              + f": a Pareto search ({summary.get('asha') or 'ASHA on ' + bare(summary['metric']) + ' alone'}); its "
                f"front holds "
                f"{plural(len(summary['pareto_front']), 'trial')}"),
             ("trials", f"{summary['trials']} of {summary['requested']} requested: "
                        + ", ".join(f"{summary[s]} {s}" for s in STATUSES if summary.get(s))),
             ("status", summary["status"]), ("smoke", invocation.get("smoke")),
             *([("budget", f"{summary['requested']} trials requested"
                           + (f" (the file's budget: {budget.trials})" if budget.trials != summary["requested"] else "")
                           + f", {budget.epochs} fine-tune epochs each at most; ASHA grace "
                           f"{budget.grace_period}, reduction factor {budget.reduction_factor}")] if budget else []),
             ("--set", " ".join(invocation.get("overrides") or []) or "none"),
             ("every trial also got", ", ".join(f"{k}={v}" for k, v in flatten(applied).items()) or "nothing more"),
             ("search wall time", f"{summary.get('wall_time_s', 0) / 60:.1f} min"
              + (f", summed over its {len(summary['search_runs_s'])} runs (a run killed before its end counts nothing)"
                 if len(summary.get("search_runs_s") or []) > 1 else "")),
             ("trial time", f"{hours:.3g} h: {hours * resources.get('cpus_per_trial', 1):.3g} CPU-hours, "
                            f"{hours * resources.get('gpus_per_trial', 0):.3g} GPU-hours")]
    return [(k, str(v)) for k, v in facts]


def dataset_data(experiment: Experiment, best: dict) -> dict:
    """Split sizes (images, patients) and each label's positives per split, of the data the best trial trained on
    (its config, its cache): what every number in the report is an estimate on."""
    from .data.loader import prepare
    from .data.splits import SPLITS, UNLABELLED
    from .serving import Member

    cfg = Member(experiment.trial_dir(best) / "best.pt").cfg
    try:
        index = prepare(cfg.data).index
    except Exception as err:  # noqa: BLE001 — data not reachable from here: the rest of the report stands
        return {"source": cfg.data.source, "error": f"{type(err).__name__}: {err}"}
    frame, classes = index.frame, list(index.classes)
    splits = [s for s in (*SPLITS, UNLABELLED) if (frame["split"] == s).any()]
    sizes = [{"split": s, "images": int((frame["split"] == s).sum()),
              **({"patients": int(frame.loc[frame["split"] == s, "patient_id"].dropna().nunique())}
                 if index.has_patients else {})} for s in splits]
    positives = {s: {c: int(frame.loc[frame["split"] == s, c].sum()) for c in classes} for s in splits}
    negatives = {s: {c: int((frame["split"] == s).sum()) - positives[s][c] for c in classes} for s in splits}
    untrained = set(index.untrained())
    return {**index.facts(), "sizes": sizes, "positives": positives,
            "absent": {s: [c for c in classes if positives[s][c] == 0 and c not in untrained]
                       for s in ("val", "test") if s in positives},
            "few": {s: [c for c in (classes[1:] if index.binary else classes)
                        if c not in untrained and 0 < min(positives[s][c], negatives[s][c]) < FEW]
                    for s in ("val", "test") if s in positives}}


def _logical(key: str) -> str:
    """An Optuna parameter's logical name: `byol.optimizer.lr:sgd` (one per optimizer) → `byol.optimizer.lr`."""
    return key.split(":")[0]


def _plain_value(value):
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)


def search_data(experiment: Experiment, summary: dict) -> dict:
    """The finished trials with one value per logical parameter — the value each trained with (the LR whatever
    the optimizer; a conditional parameter only where it applied) — their objective and status; fANOVA
    importance over the parameters every completed trial has, when enough completed; ASHA's epochs per trial."""
    import optuna

    from .searcher import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=experiment.optuna_study(summary),
                              storage=optuna_storage(experiment.optuna_url))
    rows = {int(r["trial"][1:]): r for r in summary["rows"] if r["trial"][1:].isdigit()}
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    log = {_logical(k) for t in finished for k, d in t.distributions.items() if getattr(d, "log", False)}
    keys = list(dict.fromkeys(_logical(k) for t in finished for k in t.params))
    trials = []
    for t in finished:
        row = rows.get(t.number) or {}
        trained = row.get("resolved") or {}
        params = {k: _plain_value(trained.get(k, t.params.get(k))) for k in keys
                  if k in trained or any(_logical(p) == k for p in t.params)}
        trials.append({"number": t.number, "state": t.state.name, "status": row.get("status", t.state.name.lower()),
                       "value": t.values[0] if t.state.name == "COMPLETE" else None, "params": params,
                       "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()}})
    direction = study.directions[0].name  # the validation metric's (a Pareto search's costs follow it)
    importance, why = _importance(trials, keys, log, direction)
    asha = [{"trial": r["trial"], "epochs_done": r["epochs_done"], "status": r["status"]} for r in summary["rows"]
            if r.get("epochs_done") is not None]
    return {"direction": direction, "trials": trials, "parameters": keys, "log": sorted(log),
            "short": short_names(keys), "importance": importance, "importance_note": why, "asha": asha}


MIN_IMPORTANCE_TRIALS = 10  # fANOVA's forest on fewer completed trials ranks noise (optuna-dashboard disagreed)


def _importance(trials: list[dict], keys: list[str], log: set, direction: str) -> tuple[dict, str]:
    """fANOVA importances (Optuna's evaluator, seeded) over the logical parameters every completed trial has, or
    why there are none; the note says what they rest on and what they leave out."""
    import warnings

    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator

    complete = [t for t in trials if t["value"] is not None]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"not computed: {plural(len(complete), 'completed trial')}; fANOVA needs at least "
                    f"{MIN_IMPORTANCE_TRIALS} to rank anything but noise")
    shared = [k for k in keys if all(k in t["params"] for t in complete)]
    partial = [k for k in keys if k not in shared]
    distributions = {}
    for k in shared:
        values = [t["params"][k] for t in complete]
        if all(isinstance(v, (int, float)) for v in values):
            if min(values) < max(values):
                distributions[k] = FloatDistribution(min(values), max(values), log=k in log and min(values) > 0)
        elif len(set(map(str, values))) > 1:
            distributions[k] = CategoricalDistribution(sorted(set(map(str, values))))
    if not distributions:
        return {}, "not computed: no parameter varied across the completed trials"
    study = optuna.create_study(direction=direction.lower())
    study.add_trials([optuna.trial.create_trial(
        value=t["value"], distributions=distributions,
        params={k: t["params"][k] if isinstance(d, FloatDistribution) else str(t["params"][k])
                for k, d in distributions.items()}) for t in complete])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importance = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    note = f"on {len(complete)} completed trials"
    if partial:
        note += "; left out (they apply to some trials only): " + ", ".join(partial)
    return {k: float(v) for k, v in importance.items()}, note


def trial_rows(summary: dict) -> list[dict]:
    """Every trial of the search: status, epochs, the objective with its interval, why it ended, its MLflow run
    (in the UI the search printed)."""
    table = summary.get("mlflow_runs_table", "")
    base, _, route = table.partition("/#/")
    experiment = route.split("/")[1] if route.startswith("experiments/") else None
    metric = summary["metric"]
    return [{"trial": r["trial"], "name": r["name"], "status": r["status"], "epochs": r.get("epochs_done"),
             "value": r.get(metric), "ci": r.get("selection_ci") if r["status"] == "complete" else None,
             "reason": r.get("reason") or "",
             "url": f"{base}/#/experiments/{experiment}/runs/{r['mlflow_run_id']}?workflowType=machine_learning"
             if r.get("mlflow_run_id") and experiment else None} for r in summary["rows"]]


def model_data(experiment: Experiment, summary: dict, complete: list[dict]) -> dict:
    """Learning curves of the best three, per-label ROC and calibration (best trial, ensemble) on validation, the
    best trial's confusion matrix and thresholds."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_auc_score, roc_curve

    metric = bare(summary["metric"])
    histories = {}
    for row in complete[:3]:
        path = experiment.trial_dir(row) / "supervised_history.json"
        if path.is_file():
            histories[row["name"]] = [{"epoch": h["epoch"], "val_loss": h.get("val_loss"),
                                       "val_" + metric: h.get("val_" + metric), "train_loss": h.get("train_loss")}
                                      for h in read_json(path, "a trial's history")]
    best_dir = experiment.trial_dir(complete[0])
    _, y, prob, classes = _predictions(best_dir, "val")
    probs = {f"best trial ({complete[0]['trial']})": prob}
    members = experiment.ensemble_dir / "members.csv"
    if members.is_file():
        table = pd.read_csv(members)
        probs["ensemble"] = sum(w * _predictions(Path(d), "val")[2] for w, d in zip(table["weight"], table["dir"]))
    task = TrialTask.of(best_dir)
    # the curves a reader can use: binary, the positive class's; otherwise each trained label (one-vs-rest for a
    # class) with both classes in validation — never complementary columns pooled
    shown = [c for c in scored_labels(task.task, classes, task.untrained) if 0 < y[:, c].sum() < len(y)]
    roc, auc, calibration = {}, {}, {}
    for label, p in probs.items():
        roc[label] = {classes[c]: [list(a) for a in roc_curve(y[:, c], p[:, c])[:2]] for c in shown}
        auc[label] = {classes[c]: float(roc_auc_score(y[:, c], p[:, c])) for c in shown}
        for c in shown:
            bins = int(min(10, y[:, c].sum(), len(y) - y[:, c].sum()))  # quantile bins: none emptier than a class
            if bins >= 2:
                observed, predicted = calibration_curve(y[:, c], p[:, c], n_bins=bins, strategy="quantile")
                calibration.setdefault(classes[c], {})[label] = {"predicted": predicted.tolist(),
                                                                "observed": observed.tolist()}
    supervised = read_json(best_dir / "summary.json", "a trial's summary").get("supervised", {})
    ensemble = summary.get("ensemble") or {}
    registered = bool(ensemble.get("members")) and "thresholds" in ensemble
    thresholds = ensemble.get("thresholds") if registered else supervised.get("thresholds")
    decided = classes if task.task == "multilabel" else classes[1:]  # binary: the positive class
    return {"metric": "val_" + metric, "histories": histories, "classes": classes, "task": task.task,
            "roc": roc, "auc": auc, "calibration": calibration,
            "confusion_matrix": supervised.get("val_confusion_matrix"),
            "thresholds": thresholds, "threshold_labels": decided[:len(thresholds or [])],
            "untrained": list(task.untrained),
            "thresholds_of": "the registered ensemble" if registered else f"the best trial ({complete[0]['trial']})",
            "rule": ensemble.get("rule") or "youden",
            "no_val_positives": [c for j, c in enumerate(classes) if y[:, j].sum() == 0 and c not in task.untrained]}


def _thumbnail(a: np.ndarray) -> list:
    """A 2-D array in [0, 1] as uint8 at most THUMBNAIL pixels wide (what the page shows)."""
    import torch

    t = torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]
    if max(t.shape[-2:]) > THUMBNAIL:
        t = torch.nn.functional.interpolate(t, size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True)
    return (t[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).tolist()


def explain_data(experiment: Experiment, best: dict, per_class: int = 2, max_points: int = 400,
                 device: str = "cpu") -> dict:
    """Grad-CAM of the best trial on the validation images with each finding it is surest of, and t-SNE of its
    validation embeddings."""
    import torch

    from .explain import embeddings, gradcam, tsne
    from .serving import Member, read_image

    member = Member(experiment.trial_dir(best) / "best.pt", device)
    paths, y, prob, classes = _predictions(experiment.trial_dir(best), "val")
    task = TrialTask.of(experiment.trial_dir(best))
    picks = []  # per class it decides (binary: the positive one): the val images with it the model is surest of
    for c in scored_labels(task.task, classes, task.untrained):
        rows = np.flatnonzero(y[:, c] > 0)
        picks += [(i, c) for i in rows[np.argsort(-prob[rows, c])][:per_class]]
    # a member ensemble (both CASS arms fine-tuned) is explained through its first member
    classifier = member.model.members[0] if hasattr(member.model, "members") else member.model
    which = " (its first member)" if classifier is not member.model else ""
    cams, layer = [], None
    if picks:
        raw = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i, _ in picks])).to(device)
        images = member.views(raw)[0]
        maps, constant, layer = gradcam(classifier, images, [c for _, c in picks])
        for k, ((i, c), cam) in enumerate(zip(picks, maps)):
            gray = images[k].mean(0).float().cpu().numpy()
            gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
            cams.append({"image": _thumbnail(gray), "cam": _thumbnail(cam), "label": classes[c],
                         "probability": float(prob[i, c]), "constant": bool(constant[k])})
    keep = np.linspace(0, len(paths) - 1, min(max_points, len(paths))).astype(int)
    x = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i in keep])).to(device)
    points = tsne(embeddings(classifier, member.views(x)[0]))
    # colour: the label of each image (multi-label: its least frequent finding, "No finding" when none)
    order = np.argsort(y.sum(0))
    colour = [next((classes[c] for c in order if row[c]), "No finding") for row in y[keep]]
    return {"which": which, "gradcam": cams, "layer": layer, "backbone": member.cfg.model.backbone,
            "image_size": member.cfg.augment.image_size, "tsne": {"points": points.tolist(), "labels": colour}}


def cost_data(summary: dict) -> dict:
    """What each completed trial's model costs, as its trial measured it on its own device at its first epoch's
    end (latency per image at batch 1 and at 32, parameters, GFLOPs), and the Pareto front: the search's on its
    objectives, or for a search of one objective the trials non-dominated on its metric and latency."""
    metric, mode = summary["metric"], summary["mode"]
    front = summary.get("pareto_front")
    rows = [{"trial": r["trial"], "name": r["name"], "value": r[metric], **r.get("cost", {}),
             "device": r["resolved"].get("device"), "tta": r["resolved"].get("augment.tta"),
             "in_trial_ms": (r.get("cost_in_trial") or {}).get("latency_ms")}
            for r in summary["rows"] if r["status"] == "complete" and isinstance(r.get(metric), (int, float))]
    measured = [r for r in rows if isinstance(r.get("latency_ms"), (int, float))]
    if front is None and measured:
        objectives = [{"name": metric, "mode": mode}, {"name": "latency_ms", "mode": "min"}]
        kept = pareto_front([[r["value"], r["latency_ms"]] for r in measured], [mode, "min"])
        front, on = [r for r, k in zip(measured, kept) if k], objectives
    else:
        on = summary.get("objectives") or [{"name": metric, "mode": mode}]
    members = {r["trial"] for r in front or []}
    for r in rows:
        r["front"] = r["trial"] in members
    return {"rows": rows, "objectives": on, "searched": summary.get("pareto_front") is not None,
            "ensemble": (summary.get("ensemble") or {}).get("cost"), "remeasured": summary.get("cost_remeasured")}


def warnings_of(data: dict) -> list[str]:
    """What a reader must not miss, said at the top, and nothing that is true by construction: the registered model
    at or below chance or below always answering the majority class on test, labels too rare in validation or test
    for their selection and intervals to mean much, bootstrap resamples dropped, an ensemble of several members no
    better than its best, repeats or folds that rank otherwise than the single runs, trials at or below chance,
    intervals wider than the metric's range."""
    summary, out = data["summary"], []
    metric = bare(summary["metric"])
    ensemble = summary.get("ensemble") or {}
    dataset = data.get("dataset") or {}
    out += _record_warnings(ensemble, dataset, metric)
    for split, labels in (dataset.get("few") or {}).items():
        if labels:
            counts = ", ".join(f"{c} {dataset['positives'][split][c]} positive / "
                               f"{dataset['images'][split] - dataset['positives'][split][c]} negative"
                               for c in labels)
            out.append(f"{'Validation' if split == 'val' else 'Test'} holds fewer than {FEW} positives or negatives "
                       f"of {plural(len(labels), 'label')} ({counts}): "
                       + ("the epoch, trial, ensemble and threshold chosen on it are close to chance picks, and its "
                          "intervals wide." if split == "val" else "its test numbers rest on a handful of images."))
    for split, where in (("val", "on validation (the selection set)"), ("test", "on test (the record)")):
        entry = (ensemble.get(split) or {}).get("ensemble_minus_best_single")
        if entry and entry["value"] <= 0 and len(ensemble.get("members") or []) > 1:  # one member: the best itself
            out.append(f"The ensemble of {len(ensemble['members'])} members is not better than its best member "
                       f"{where}: {metric} difference {entry['value']:+.4f} [{entry['ci_low']:+.4f}, "
                       f"{entry['ci_high']:+.4f}].")
    repeats = (summary.get("repeats") or {}).get("rows") or []
    if repeats and summary.get("best") and repeats[0]["name"].split()[0] != summary["best"]["trial"]:
        out.append(f"Over fresh seeds, {repeats[0]['name'].split()[0]} ranks first (mean {repeats[0]['mean']:.4f}), "
                   f"not the single-run winner {summary['best']['trial']}; the best-trial sections below show "
                   f"{summary['best']['trial']}, the search's own pick.")
    chance = 0.5 if metric == "mean_auroc" else None  # AUROC's chance level whatever the prevalence
    if chance is not None:
        below = [r["trial"] for r in summary["rows"] if r["status"] == "complete"
                 and isinstance(r.get(summary["metric"]), (int, float)) and r[summary["metric"]] <= chance]
        if below:
            verb = "scores" if len(below) == 1 else "score"
            out.append(f"{plural(len(below), 'completed trial')} {verb} at or below chance ({metric} ≤ {chance}) on "
                       f"validation: {', '.join(below)}.")
    bounded = metric in ("mean_auroc", "accuracy", "balanced_accuracy", "macro_f1")
    for r in repeats if bounded else ():
        if r["ci_low"] < 0 or r["ci_high"] > 1:
            out.append(f"The repeats' t-interval for {r['name'].split()[0]} is [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                       f", wider than {metric}'s range [0, 1]: {r['seeds']} seeds are too few to say more than that "
                       "the values vary.")
    cv = (summary.get("cv") or {}).get("rows") or []
    if cv and summary.get("best") and cv[0]["config"] != summary["best"]["trial"]:
        out.append(f"Cross-validated over {summary['cv']['folds']} folds, {cv[0]['config']} ranks first (mean "
                   f"{cv[0]['mean']:.4f}), not the single-split winner {summary['best']['trial']}.")
    cost = ensemble.get("cost") or {}
    bound = (cost.get("budget") or {}).get("latency_ms")
    if bound and cost.get("served_latency_ms", 0) > bound:
        out.append(f"The registered ensemble as served took {cost['served_latency_ms']:.3g} ms per image on "
                   f"{cost['device']}, over its latency budget of {bound:g} ms (the budget holds its members' "
                   f"latencies as measured: {cost.get('latency_ms_sum', float('nan')):.3g} ms).")
    if dataset.get("untrained"):
        out.append(describe_untrained(dataset) + ".")
    absent = dataset.get("absent") or {}
    if absent.get("val"):
        out.append(f"{plural(len(absent['val']), 'label')} {'has' if len(absent['val']) == 1 else 'have'} no positive "
                   f"in validation ({', '.join(absent['val'])}): no threshold is chosen and nothing is decided for "
                   "them, and the validation means leave them out.")
    return out


def _record_warnings(ensemble: dict, dataset: dict, metric: str) -> list[str]:
    """The registered model on test at or below chance (AUROC 0.5; accuracy at or below always answering the most
    frequent class), and the share of bootstrap resamples its intervals dropped."""
    out = []
    test = (ensemble.get("test") or {}).get("ensemble")
    if test and metric == "mean_auroc" and test["value"] <= 0.5:
        out.append(f"The registered model's test {metric} ({test['value']:.4f}) is at or below chance (0.5).")
    accuracy = (((ensemble.get("single_label") or {}).get("test") or {}).get("ensemble") or {}).get("accuracy")
    positives, images = (dataset.get("positives") or {}).get("test"), (dataset.get("images") or {}).get("test")
    if accuracy and positives and images:
        majority, share = max(positives.items(), key=lambda kv: kv[1])
        if accuracy["value"] <= share / images:
            out.append(f"The registered model's test accuracy ({accuracy['value']:.4f}) is at or below answering "
                       f"'{majority}' for every image ({share / images:.4f}): it does not beat the majority class.")
    for split in ("val", "test"):
        record = (ensemble.get(split) or {}).get("ensemble") or {}
        if record.get("dropped"):
            out.append(f"{100 * record['dropped']:.1f} % of the bootstrap resamples of the ensemble's {split} {metric} "
                       "held no positive or no negative of any label, so no value, and were dropped: its interval "
                       "is computed from the others alone.")
    return out


def report_data(experiment: Experiment, device: str = "cpu") -> dict:
    """Every number and array the report shows, JSON-ready."""
    from .experiment import provenance

    start = time.perf_counter()
    summary, invocation = experiment.summary(), experiment.invocation()
    complete = summary["top"]
    study = _study_file(summary)
    data = {"name": experiment.name, "study": summary["study"], "summary": summary,
            "generated": time.strftime("%Y-%m-%d %H:%M %Z"), "command": summary.get("command"),
            "provenance": summary.get("provenance") or provenance(),
            "facts": study_facts(experiment, summary, invocation), "space": space_rows(study) if study else [],
            "search": search_data(experiment, summary), "trials": trial_rows(summary)}
    if complete:
        data.update(dataset=dataset_data(experiment, complete[0]), model=model_data(experiment, summary, complete),
                    explain=explain_data(experiment, complete[0], device=device),
                    cost=cost_data(summary), device=device)
    data["warnings"] = warnings_of(data)
    data["seconds"] = time.perf_counter() - start
    return data


# -- the page ---------------------------------------------------------------------------------------------------

def _table(frame: pd.DataFrame, escape: bool = True) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}", na_rep="", escape=escape)


def _list(items) -> str:
    return ", ".join(map(str, items))


def render_study(data: dict) -> str:
    summary = data["summary"]
    out = "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                              for k, v in data["facts"]) + "</table>"
    if data.get("space"):
        out += "<h3>The search space</h3>" + _table(pd.DataFrame(data["space"]))
    metric = summary["metric"]
    rows = [{"rank": i + 1, "trial": r["name"],
             f"{bare(metric)} [95 % CI, selection set]": ci_text(r[metric], *(r.get("selection_ci") or [None, None])),
             **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(r[k]) for k in ("accuracy", "balanced_accuracy")
                if r.get(k)},
             "epoch selected": int(r["selected_epoch"]), "epochs run": int(r["epochs_done"]),
             **{f"trained {k}": v for k, v in r["resolved"].items() if k in r["sampled"]}}
            for i, r in enumerate(summary["top"])]
    out += "<h3>Best configurations (validation)</h3>" + (_table(pd.DataFrame(rows)) if rows
                                                         else "<p>none completed</p>")
    if rows and labels_averaged(summary):
        out += f"<p class=note>{bare(metric)}: {labels_averaged(summary)[2:]}.</p>"
    ensemble = summary.get("ensemble") or {}
    if ensemble.get("members"):
        val = ensemble["val"]
        single = ((ensemble.get("single_label") or {}).get("val") or {}).get("ensemble") or {}
        out += ("<h3>The ensemble (chosen on validation)</h3>"
                f"<p>{html.escape(ensemble['method'])}, {plural(len(ensemble['members']), 'member')}, registered as "
                f"{html.escape(str((ensemble.get('registered') or {}).get('uri')))}. On <b>validation, the data that "
                f"chose it</b> (optimistic): {bare(metric)} {ci_text(val['ensemble'])}"
                + "".join(f", {k.replace('_', ' ')} {ci_text(v)}" for k, v in single.items())
                + f" vs best single {ci_text(val['best_single'])}; paired difference "
                f"{ci_text(val['ensemble_minus_best_single'])}. Its test numbers are in the record, at the end.</p>")
        out += _table(pd.DataFrame([{"member": m["name"], "weight": m["weight"]} for m in ensemble["members"]]))
    repeats = summary.get("repeats")
    if repeats and repeats.get("rows"):
        out += ("<h3>Repeats: the best configurations with fresh seeds (full budget), ranked by their mean</h3>"
                "<p>The search's own run of each is shown apart: it was kept for being best, so its luck is in it."
                "</p>"
                + _table(pd.DataFrame([{"configuration": r["name"], "search's run": f"{r['selection_run']:.4f}",
                                        "fresh seeds": r["seeds"],
                                        "mean ± sd": f"{r['mean']:.4f} ± {r['sd']:.4f}",
                                        "95 % t-interval": f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
                                        "values": ", ".join(f"{v:.4f}" for v in r["values"])}
                                       for r in repeats["rows"]])))
        if repeats.get("comparisons"):
            out += ("<p>The best against each other (validation), resampling seeds and then patients (a hierarchical "
                    "bootstrap):</p>"
                    + _table(pd.DataFrame([{"best − other": f"{c['best']} − {c['other']}",
                                            "difference [95 % CI]": ci_text(c["difference"], c["ci_low"], c["ci_high"]),
                                            "verdict": "within noise" if c["within_noise"] else "a real difference"}
                                           for c in repeats["comparisons"]])))
    return out


def render_data(dataset: dict) -> str:
    if dataset.get("error"):
        return f"<p class=note>{html.escape(dataset['source'])}: not readable here ({html.escape(dataset['error'])})"
    out = f"<p>{html.escape(describe_data(dataset))}.</p>"
    if dataset.get("untrained"):
        out += f"<p class=warn>{html.escape(describe_untrained(dataset))}.</p>"
    out += _table(pd.DataFrame(dataset["sizes"]))
    splits = list(dataset["positives"])
    sizes = {r["split"]: r["images"] for r in dataset["sizes"]}
    untrained = set(dataset.get("untrained") or [])
    rows = [{"label": c + (" (never decided: no positive in train)" if c in untrained else ""),
             **{f"{s}: positives (%)": f"{dataset['positives'][s][c]} "
                                       f"({100 * dataset['positives'][s][c] / max(sizes[s], 1):.1f} %)"
                for s in splits}} for c in dataset["classes"]]
    out += "<h3>Label prevalence per split</h3>" + _table(pd.DataFrame(rows))
    for split, labels in dataset.get("absent", {}).items():
        if labels:
            out += (f"<p class=warn>No positive in {split}: {html.escape(_list(labels))}. Their {split} AUROC is "
                    "undefined and left out of the means; " + ("no threshold is chosen for them."
                                                               if split == "val" else "the record cannot test them.")
                    + "</p>")
    return out


def _objective(search: dict) -> tuple[list[dict], bool]:
    """The completed trials, and whether the study maximises."""
    return [t for t in search["trials"] if t["value"] is not None], search["direction"] == "MAXIMIZE"


def render_search(search: dict, metric: str) -> str:
    complete, maximize = _objective(search)
    short, log = search["short"], set(search["log"])
    n, total = len(complete), len(search["trials"])

    def history(fig):
        ax = fig.add_subplot()
        pruned = [(t["number"], list(t["intermediate_values"].values())[-1]) for t in search["trials"]
                  if t["value"] is None and t["intermediate_values"]]
        if pruned:
            ax.scatter(*zip(*pruned), marker="x", color="0.6", label="stopped early: its last value")
        if complete:
            x, y = [t["number"] for t in complete], [t["value"] for t in complete]
            ax.scatter(x, y, color="C0", zorder=3, label="completed")
            best = np.maximum.accumulate(y) if maximize else np.minimum.accumulate(y)
            ax.step(x, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial (Optuna number)")
        ax.set_ylabel(metric)
        integer_ticks(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))

    out = (f"<h3>Optimisation history</h3><p class=note>{n} completed trials of {total} finished.</p>"
           + figure(history, 9, 3.4, f"{metric} of each trial by trial number, with the best so far"))
    importance = search["importance"]

    def bars(fig):
        ax = fig.add_subplot()
        names = list(importance)[::-1]
        ax.barh([short.get(k, k) for k in names], [importance[k] for k in names])
        ax.set_xlabel("fANOVA importance (share of the objective's variance)")

    out += "<h3>Parameter importance (fANOVA)</h3>" + (
        f"<p class=note>{html.escape(search['importance_note'])}.</p>"
        + (figure(bars, 8, 0.4 * len(importance) + 1.2, "fANOVA importance of each parameter") if importance
           else ""))
    varying = [k for k in search["parameters"]
               if len({str(t["params"].get(k)) for t in complete if k in t["params"]}) > 1]
    order = [k for k in importance if k in varying] + [k for k in varying if k not in importance]
    if len(complete) < 2 or not order:
        return out + f"<p class=note>Parallel coordinates and slices: not drawn ({plural(n, 'completed trial')}).</p>" \
            + _asha(search)
    values = np.array([t["value"] for t in complete])
    cmap, norm = _colours(values)

    def axis_values(k):
        """Positions in [0, 1] of each complete trial's value (NaN where it does not apply) and tick labels."""
        column = [t["params"].get(k) for t in complete]
        present = [v for v in column if v is not None]
        if all(isinstance(v, (int, float)) for v in present):
            transform = np.log10 if k in log and min(present) > 0 else (lambda v: np.asarray(v, dtype=float))
            low, high = transform(min(present)), transform(max(present))
            pos = [np.nan if v is None else (transform(v) - low) / (high - low or 1) for v in column]
            ticks = sorted(set(present))
            ticks = ticks if len(ticks) <= 5 else [min(present), max(present)]
            return pos, [((transform(v) - low) / (high - low or 1), f"{v:.3g}") for v in ticks]
        categories = sorted({str(v) for v in present})
        step = 1 / max(len(categories) - 1, 1)
        return ([np.nan if v is None else categories.index(str(v)) * step for v in column],
                [(i * step, wrap(c, 12)) for i, c in enumerate(categories)])

    def parallel(fig):
        ax = fig.add_subplot()
        axes = [axis_values(k) for k in order]
        for j, t in enumerate(complete):
            ys = [a[0][j] for a in axes]
            ax.plot(range(len(order)), ys, color=cmap(norm(t["value"])), lw=2, alpha=0.85, marker="o", ms=3)
        for i, (_, ticks) in enumerate(axes):
            ax.axvline(i, color="0.3", lw=0.8)
            for y, label in ticks:
                ax.text(i + 0.04, y, label, fontsize=9, va="center", ha="left",
                        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1})
        ax.set_xticks(range(len(order)), [short.get(k, k) for k in order], rotation=30, ha="right")
        ax.set_yticks([])
        ax.set_xlim(-0.2, len(order) - 0.3)
        ax.set_ylim(-0.08, 1.08)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        fig.colorbar(_mappable(cmap, norm), ax=ax, label=metric, pad=0.01)

    out += (f"<h3>Parallel coordinates</h3><p class=note>{n} completed trials, one line each, coloured by {metric}; "
            "one axis per parameter as it trained (most important first where importance was computed); a gap is a "
            "parameter that did not apply to that trial.</p>"
            + figure(parallel, COLUMN, 4.2, f"parallel coordinates of {len(order)} parameters over {n} trials"))
    columns = min(4, len(order))
    rows = int(np.ceil(len(order) / columns))

    def slices(fig):
        for i, k in enumerate(order):
            ax = fig.add_subplot(rows, columns, i + 1)
            column = [(t["params"].get(k), t["value"]) for t in complete if t["params"].get(k) is not None]
            xs, ys = zip(*column)
            if all(isinstance(v, (int, float)) for v in xs):
                ax.scatter(xs, ys, c=[cmap(norm(v)) for v in ys], edgecolor="k", lw=0.5)
                if k in log and min(xs) > 0:
                    log_axis(ax, xs)
            else:
                categories = sorted({str(v) for v in xs})
                ax.scatter([categories.index(str(v)) for v in xs], ys, c=[cmap(norm(v)) for v in ys],
                           edgecolor="k", lw=0.5)
                ax.set_xticks(range(len(categories)), [wrap(c, 12) for c in categories], rotation=30, ha="right")
                ax.set_xlim(-0.5, len(categories) - 0.5)
            ax.set_xlabel(short.get(k, k))
            if i % columns == 0:
                ax.set_ylabel(metric)
            ax.set_title(f"n = {len(xs)}", fontsize=9, loc="right")

    out += (f"<h3>Slices</h3><p class=note>{metric} against each parameter, completed trials only.</p>"
            + figure(slices, COLUMN, 3.0 * rows, f"{metric} against each of {len(order)} parameters"))
    return out + _asha(search)


def log_axis(ax, values) -> None:
    """A log x axis labelled at its decades only (minor labels ran together); within one decade, at its two ends."""
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if max(values) / min(values) < 10:
        ends = sorted({min(values), max(values)})
        ax.set_xticks(ends, [f"{v:.2g}" for v in ends])


def _colours(values: np.ndarray):
    import matplotlib

    pyplot()
    return matplotlib.colormaps["viridis"], matplotlib.colors.Normalize(float(values.min()), float(values.max()))


def _mappable(cmap, norm):
    import matplotlib.cm

    return matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


STATUS_COLOURS = {"complete": "tab:green", "pruned": "tab:orange", "infeasible": "tab:brown", "diverged": "tab:red",
                  "error": "tab:gray", "interrupted": "tab:purple"}


def _asha(search: dict) -> str:
    rows = search["asha"]

    def rungs(fig):
        from matplotlib.patches import Patch

        ax = fig.add_subplot()
        ax.barh([r["trial"] for r in rows], [r["epochs_done"] for r in rows],
                color=[STATUS_COLOURS.get(r["status"], "k") for r in rows])
        ax.set_xlabel("fine-tune epochs run")
        integer_ticks(ax)
        ax.invert_yaxis()
        ax.legend(handles=[Patch(color=c, label=s) for s, c in STATUS_COLOURS.items()
                           if any(r["status"] == s for r in rows)], loc="upper left", bbox_to_anchor=(1.01, 1))

    total = sum(r["epochs_done"] or 0 for r in rows)
    full = max((r["epochs_done"] or 0) for r in rows) * len(rows) if rows else 0
    out = (f"<h3>ASHA: epochs spent per trial</h3><p>{total} trial-epochs in all over {len(rows)} trials; a full "
           f"budget for every trial would have been {full}.</p>")
    return out + (figure(rungs, 8, 0.32 * len(rows) + 1.2, "fine-tune epochs each trial ran, by status")
                  if rows else "")


def render_trials(trials: list[dict], metric: str) -> str:
    """Every trial, one row: what it was, how it ended, its number, its MLflow run."""
    rows = [{"trial": html.escape(t["name"]), "status": t["status"], "epochs": t["epochs"] if t["epochs"] is not None
             else "", f"{bare(metric)} [95 % CI, selection set]": ci_text(t["value"], *(t["ci"] or [None, None])),
             "why it ended": html.escape(t["reason"]),
             "MLflow": f'<a href="{html.escape(t["url"])}">run</a>' if t["url"] else ""} for t in trials]
    return ("<p class=note>The links open the run in the MLflow UI the search printed (<code>mlflow ui</code> "
            "running).</p>" + _table(pd.DataFrame(rows), escape=False))


def render_model(model: dict) -> str:
    histories, classes = model["histories"], model["classes"]
    keys = ("val_loss", model["metric"] if model["metric"] != "val_loss" else "train_loss")

    def curves(fig):
        for i, key in enumerate(keys):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, history in histories.items():
                ax.plot([h["epoch"] for h in history], [np.nan if h.get(key) is None else h[key] for h in history],
                        marker="o", label=name)
            ax.set_xlabel("fine-tune epoch")
            ax.set_ylabel(key)
            integer_ticks(ax)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=1)

    out = "<h3>Learning curves (validation, the three best trials)</h3>" + (
        figure(curves, COLUMN, 4.2 + 0.3 * len(histories), f"{keys[0]} and {keys[1]} per epoch of the best trials")
        if histories else "<p>no history</p>")
    panels = list(model["roc"])

    def rocs(fig):
        for i, label in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for name, (fpr, tpr) in model["roc"][label].items():
                ax.plot(fpr, tpr, lw=1.2, label=f"{name} {model['auc'][label][name]:.3f}")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_title(label)
            ax.set_xlabel("1 − specificity")
            ax.set_ylabel("sensitivity")
            ax.set_aspect("equal")
            ax.legend(title="label, AUROC", loc="upper left", bbox_to_anchor=(0, -0.18), ncols=2, fontsize=9)

    most = max((len(v) for v in model["roc"].values()), default=0)
    binary = model.get("task") == "multiclass" and len(classes) == 2
    out += (f"<h3>ROC {f'of the positive class, {classes[1]}' if binary else 'per label'} (validation)</h3>"
            + figure(rocs, COLUMN, 5.2 + 0.17 * most, "per-label ROC curves on validation with each label's AUROC"))

    calibration = model["calibration"]
    columns = min(4, len(calibration))
    rows = int(np.ceil(len(calibration) / max(columns, 1)))

    def reliability(fig):
        for i, (name, curves) in enumerate(calibration.items()):
            ax = fig.add_subplot(rows, columns, i + 1)
            for label, points in curves.items():
                ax.plot(points["predicted"], points["observed"], marker="o", label=label)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_title(name)
            ax.set_xlabel("predicted probability")
            if i % columns == 0:
                ax.set_ylabel("observed frequency")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)

    which = ("the positive class" if binary else "each class against the rest" if model.get("task") == "multiclass"
             else "each label")
    out += (f"<h3>Calibration (validation, {which}; quantile bins of predicted probability)</h3>"
            + (figure(reliability, min(COLUMN, 4.2 * columns + 1.0), 3.2 * rows + 0.8,
                      "observed frequency against predicted probability for "
                      f"{plural(len(calibration), 'label')}") if calibration
               else "<p class=note>Not drawn: no label has two positive and two negative validation images.</p>"))
    if model.get("confusion_matrix"):
        matrix = np.asarray(model["confusion_matrix"])

        def confusion(fig):
            ax = fig.add_subplot()
            ax.imshow(matrix, cmap="Blues")
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if v > matrix.max() / 2 else "black")
            ax.set_xticks(range(len(classes)), [wrap(c, 12) for c in classes], rotation=45, ha="right")
            ax.set_yticks(range(len(classes)), classes)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")

        out += "<h3>Confusion matrix (validation, best trial)</h3>" + figure(
            confusion, 6, 6, "confusion matrix of the best trial on validation")
    if model.get("thresholds") is not None:
        untrained = set(model.get("untrained") or [])
        labels = model.get("threshold_labels") or classes[:len(model["thresholds"])]
        table = [{"label": c, "threshold": t, "chosen how": "on validation" if t is not None else
                  "none: one class in validation, so no decision"}
                 for c, t in zip(labels, model["thresholds"]) if c not in untrained]
        out += (f"<h3>Decision thresholds of {html.escape(model.get('thresholds_of', 'the best trial'))} (chosen on "
                f"validation, rule {model.get('rule', 'youden')})</h3>" + _table(pd.DataFrame(table))
                + (f"<p class=note>None for the {plural(len(untrained), 'label')} no training image has: the model "
                   "never decides them.</p>" if untrained else ""))
    return out


def render_explain(explain: dict) -> str:
    cams, which = explain["gradcam"], explain["which"]
    shown = [c for c in cams if not c.get("constant")]
    constant = len(cams) - len(shown)
    out = (f"<h3>Grad-CAM (best trial{which}, validation images with the finding)</h3><p class=note>Layer "
           f"<code>{html.escape(str(explain.get('layer')))}</code> of {html.escape(str(explain.get('backbone')))} at "
           f"{explain.get('image_size')} px: the deepest stage whose map is at least 7 × 7."
           + (f" {constant} of {len(cams)} maps came out constant (no weighted activation above zero): they explain "
              "nothing and are not drawn." if constant else "") + "</p>")
    if shown:
        columns = min(4, len(shown))
        rows = int(np.ceil(len(shown) / columns))

        def overlays(fig):
            for k, cam in enumerate(shown):
                ax = fig.add_subplot(rows, columns, k + 1)
                ax.imshow(np.asarray(cam["image"], dtype=np.uint8), cmap="gray", vmin=0, vmax=255)
                ax.imshow(np.asarray(cam["cam"], dtype=np.uint8), cmap="jet", alpha=0.4, vmin=0, vmax=255)
                ax.set_title(f"{cam['label']}, p = {cam['probability']:.2f}")
                ax.axis("off")

        out += figure(overlays, COLUMN, 2.9 * rows, f"Grad-CAM overlays of {len(shown)} validation images")
    points, labels = np.asarray(explain["tsne"]["points"]), np.asarray(explain["tsne"]["labels"])

    def scatter(fig):
        ax = fig.add_subplot()
        for label in sorted(set(labels)):
            ax.scatter(*points[labels == label].T, s=12, label=label)
        ax.legend(markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1), title="label (rarest finding)")
        ax.set_xticks([])
        ax.set_yticks([])

    return out + (f"<h3>t-SNE of validation embeddings (best trial's backbone{which}, {len(points)} images)</h3>"
                  + figure(scatter, 9, 5.5, "t-SNE map of validation embeddings coloured by label"))


def render_cost(cost: dict, metric: str) -> str:
    """Accuracy against cost: the front plotted over every completed trial (dominated ones faint), and the table."""
    rows, name = cost["rows"], bare(metric)
    measured = [r for r in rows if isinstance(r.get("latency_ms"), (int, float))]
    if not measured:
        return "<p>No trial of this search measured its cost (trials measure it from tune_xray 0.4 on).</p>"
    on = ", ".join(f"{o['name']} ({o['mode']})" for o in cost["objectives"])
    devices = sorted({str(r["device"]) for r in measured})
    out = (f"<p>Each trial measured its model as it is evaluated (its eval view and every TTA view) on its own "
           f"device ({', '.join(devices)}) at its first epoch's end: ms per image alone (batch 1) and per image at "
           f"batch 32, parameters and GFLOPs per image. The Pareto front — the trials no other matches or beats on "
           f"every objective at once — on {on}"
           + ("" if cost["searched"] else " (this search optimised its metric alone; the front is drawn for reading)")
           + f": {sum(r['front'] for r in measured)} of {len(measured)} completed trials. Trials that share a CPU "
           "measure slower than alone.</p>")
    again = cost.get("remeasured")
    if again:
        out += (f"<p>Latency measured again after the trials, alone, on the driver's {again['device']} ("
                f"{html.escape(again['why'])}: {plural(len(again['trials']), 'trial')}; batch 1 and 32, the median "
                f"of up to {again['repeats']} runs after a warm-up): those figures are the ones plotted, on the front "
                "and summed against the ensemble's budget; each trial's own is in the table as measured while "
                "training.</p>")

    objectives = [o["name"] for o in cost["objectives"]]

    def panels(fig):
        axes = [("latency_ms", "ms per image (batch 1)"), ("params_m", "parameters (M)")]
        for i, (key, label) in enumerate(axes):
            ax = fig.add_subplot(1, 2, i + 1)
            dominated = [r for r in measured if not r["front"]]
            ax.scatter([r[key] for r in dominated], [r["value"] for r in dominated], color="0.6", alpha=0.35,
                       label="dominated")
            front = sorted((r for r in measured if r["front"]), key=lambda r: r[key])
            # the staircase of what each cost attains, where the front is on this cost alone
            line = "-" if objectives[1:] == [key] else ""
            ax.plot([r[key] for r in front], [r["value"] for r in front], f"o{line}", color="C3",
                    drawstyle="steps-post", label="Pareto front")
            for r in front:
                ax.annotate(r["trial"], (r[key], r["value"]), textcoords="offset points", xytext=(4, 4), fontsize=9)
            log_axis(ax, [r[key] for r in measured])
            ax.set_xlabel(label)
            ax.set_ylabel(f"val {name}")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2)

    out += figure(panels, COLUMN, 4.4, f"val {name} against latency and against parameters, the Pareto front marked")
    table = [{"trial": html.escape(r["name"]), f"val {name}": r["value"], "ms (b1)": r.get("latency_ms"),
              "ms/image (b32)": r.get("latency_ms_b32"), "ms (b1) while training": r.get("in_trial_ms"),
              "params (M)": r.get("params_m"),
              "GFLOPs / image": r.get("gflops"), "TTA": r.get("tta"), "front": "✓" if r["front"] else ""}
             for r in sorted(rows, key=lambda r: (not r["front"], -r["value"] if cost["objectives"][0]["mode"] == "max"
                                                  else r["value"]))]
    out += _table(pd.DataFrame(table), escape=False)
    if cost.get("ensemble"):
        said = "; ".join(html.escape(line[2:]) for line in cost_lines(cost["ensemble"]))
        out += "<p>The ensemble chosen at the end: " + re.sub(r"`([^`]*)`", r"<code>\1</code>", said) + ".</p>"
    return out


def render_cv(cv: dict, metric: str) -> str:
    """The finalists cross-validated: each fold's value, the mean and its t-interval, the pooled out-of-fold
    metric, beside the single split's value and rank."""
    rows, name = cv["rows"], bare(metric)
    out = (f"<p>The {len(rows)} best configurations, each trained on {cv['folds']} patient-grouped, "
           "label-stratified folds of train + val (each fold validation once; test untouched), at full budget. "
           "Ranked by the mean over folds; the single split's value is the search's own trial, chosen for being "
           "best (the winner's curse).</p>")
    early, leaning = cv.get("notes") or ("", "")
    out += f"<p class=\"note\">{html.escape(early[:1].upper() + early[1:])}.</p>" if early else ""
    if cv.get("kendall_tau") is not None:
        out += (f"<p>Single-split against cross-validated ranking: Kendall's tau {cv['kendall_tau']:+.2f} "
                f"(1: the same order){'; ' + html.escape(leaning) if leaning else ''}.</p>")

    def folds(fig):
        ax = fig.add_subplot()
        for i, r in enumerate(rows):
            ax.scatter(r["values"], [i] * len(r["values"]), color="C0", alpha=0.6, label="a fold" if i == 0 else None)
            ax.errorbar(r["mean"], i, xerr=[[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
                        if np.isfinite(r["ci_low"]) else None, fmt="D", color="C3", capsize=4,
                        label="mean, 95 % t-interval" if i == 0 else None)
            ax.scatter(r["single_split"], i, marker="x", color="k", s=60,
                       label="the search's split" if i == 0 else None)
        ax.set_yticks(range(len(rows)), [wrap(r["name"], 40) for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"val {name}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))

    out += figure(folds, COLUMN, 1.0 + 0.7 * len(rows), f"val {name} of each fold, per configuration")
    table = [{"CV rank": r["cv_rank"], "configuration": html.escape(r["name"]),
              f"folds' val {name}": ", ".join(f"{v:.4f}" for v in r["values"]),
              "mean ± sd [95 % t-interval]": f"{r['mean']:.4f} ± {r['sd']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
              "out of fold, pooled [95 % CI]": ci_text(r["oof"]), "search rank": r["search_rank"],
              "single split": r["single_split"]} for r in rows]
    return out + _table(pd.DataFrame(table), escape=False)


def render_record(summary: dict) -> str:
    """Test metrics: read once, at the search's end, after every choice, never ranked (the ensemble's record)."""
    ensemble = summary.get("ensemble") or {}
    test = ensemble.get("test")
    if not test:
        return ("<p>The test split has not been read for this experiment: the record is made at a search's end, "
                "with its ensemble (<code>python -m tune_xray.ensemble DIR --record</code>).</p>")
    metric = bare(summary["metric"])
    averaged = ensemble.get("labels_averaged") or {}
    out = ("<p>The test split, read for the record after every choice (reads of test for this experiment: "
           f"{ensemble.get('test_reads')}), at thresholds chosen on validation. Nothing here chose anything."
           + (f" {metric}: {averaged_text(ensemble, len(ensemble.get('classes') or []))}."
              if metric == "mean_auroc" and "test" in averaged else "") + "</p>")
    single = (ensemble.get("single_label") or {}).get("test") or {}
    rows = [{"": label.replace("_", " "), f"{metric} [95 % CI]": ci_text(test[label]),
             **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in (single.get(label) or {}).items()}}
            for label in ("ensemble", "best_single", "top_k", "ensemble_minus_best_single") if label in test]
    out += _table(pd.DataFrame(rows))
    per_label = ensemble.get("test_per_label") or {}
    labels = [k.removeprefix("auroc/") for k in (per_label.get("ensemble") or {}) if k.startswith("auroc/")]
    if labels:
        who = {"ensemble": "ensemble", "best_single": "best single"}
        table = [{"label": c, **{f"{who[w]} {m} [95 % CI]": ci_text(per_label[w][f"{m}/{c}"])
                                 for w in who for m in ("auroc", "sensitivity", "specificity")
                                 if f"{m}/{c}" in per_label.get(w, {})}} for c in labels]
        out += "<h3>Per label (test)</h3>" + _table(pd.DataFrame(table))
    folded = (summary.get("cv") or {}).get("oof_ensemble")
    if folded:
        chosen = " + ".join(f"{c['weight']:.2g} × {c['config']}" for c in folded["configs"])
        rows = [{"": f"out-of-fold ensemble ({chosen}; {plural(folded['members'], 'fold model')})",
                 "chosen on": f"{folded['oof_images']} out-of-fold images",
                 f"{metric} there [95 % CI]": ci_text(folded["oof"]),
                 f"test {metric} [95 % CI]": ci_text(folded["test"])}]
        if folded.get("minus_search_ensemble"):
            rows += [{"": "the search's ensemble", "chosen on": "the validation split",
                      f"{metric} there [95 % CI]": ci_text(folded.get("search_ensemble_val") or {}),
                      f"test {metric} [95 % CI]": ci_text(folded["search_ensemble_test"])},
                     {"": "out of fold − the search's (paired)", "chosen on": "", f"{metric} there [95 % CI]": "",
                      f"test {metric} [95 % CI]": ci_text(folded["minus_search_ensemble"])}]
        out += ("<h3>The ensemble chosen out of fold, beside the one chosen on validation (test)</h3><p>Test read "
                f"once more, for this comparison (reads of test for this experiment: {folded['test_reads']}). Each "
                "value where it was chosen is on the data that chose it (optimistic)."
                + (" <b>This is the search's model</b> (the study's <code>ensemble: {select_on: oof}</code>)."
                   if folded.get("selected") else "") + "</p>" + _table(pd.DataFrame(rows)))
        if "oof_thresholds" in folded:
            voted, averaged = (folded["decisions_test"][k] for k in ("vote", "averaged_oof_thresholds"))
            table = [{"decisions": "each fold model at its own fold's threshold, then their weighted vote (served)",
                      **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in voted.items()}},
                     {"decisions": "their average at thresholds chosen on the averaged out-of-fold probabilities",
                      **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(v) for k, v in averaged.items()}}]
            out += ("<p>Thresholds: an average of K fold models is narrower than any one of them, so a threshold "
                    "chosen out of fold (on single models' probabilities) sits elsewhere on it; the served ensemble "
                    "applies each fold's threshold to that fold model's own output.</p>" + _table(pd.DataFrame(table)))
    return out


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}img{max-width:100%;display:block;margin:.5em 0}.note{color:#666}
.record{background:#fff8e6;padding:.5em 1em}.warnings{background:#fdecea;border-left:4px solid #c62828;
padding:.5em 1em}.warn{color:#b71c1c}"""


def render(data: dict) -> str:
    """The page, from `report_data`'s output (or its JSON) alone."""
    metric = bare(data["summary"]["metric"])
    sections = [("The study", render_study(data))]
    if data.get("dataset"):
        sections.append(("The data", render_data(data["dataset"])))
    sections += [("The search", render_search(data["search"], metric)),
                 ("Every trial", render_trials(data.get("trials") or [], data["summary"]["metric"]))]
    if data.get("model"):
        sections += [("The model", render_model(data["model"])),
                     ("Explainability", render_explain(data["explain"])),
                     ("Accuracy against cost", render_cost(data["cost"], data["summary"]["metric"]))]
        if data["summary"].get("cv"):
            sections.append(("Cross-validation of the finalists", render_cv(data["summary"]["cv"],
                                                                             data["summary"]["metric"])))
        sections.append(("The record: test split", f'<div class="record">{render_record(data["summary"])}</div>'))
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    warned = data.get("warnings") or []
    box = ('<div class="warnings"><b>Read this first</b><ul>' + "".join(f"<li>{html.escape(w)}</li>" for w in warned)
           + "</ul></div>") if warned else ""
    made = data.get("provenance") or {}
    title = html.escape(data["study"])
    header = (f"<p class=note>tune_xray {html.escape(str(made.get('tune_xray')))}"
              + (f", git {html.escape(made['git_commit'])}" if made.get("git_commit") else "")
              + f"; report made {html.escape(data.get('generated', ''))}, its numbers computed in "
              f"{data['seconds']:.0f} s."
              + (f"<br>Command: <code>{html.escape(data['command'])}</code>" if data.get("command") else "")
              + "<br>Intervals are 95 % bootstrap CIs over patients (images where the data name none); on validation "
              "they are computed on the data that made the choices (the selection set), so optimistic. Test numbers "
              "appear only in the record, at the end.</p>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body><h1>{title}: {html.escape(data['name'])}</h1>{header}{box}{body}</body></html>")


def _plain(value):
    """numpy values as JSON's own (report.json)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)


def build_report(experiment: Experiment, out: str | Path | None = None, device: str = "cpu") -> Path:
    """Write the report (default EXPERIMENT_DIR/report.html) and its numbers beside it (`.json`); returns its
    path."""
    data = report_data(experiment, device)
    path = Path(out) if out else experiment.directory / REPORT_FILE
    path.with_suffix(".json").write_text(json.dumps(mask(data), default=_plain))
    path.write_text(mask(render(data)))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir")
    parser.add_argument("--out", help="default: EXPERIMENT_DIR/report.html (its numbers: report.json beside it)")
    parser.add_argument("--device", default="cpu", help="for Grad-CAM, t-SNE embeddings and the img/s column")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        path = build_report(Experiment.at(args.experiment_dir), args.out, args.device)
    except ExperimentError as err:  # no summary, or one (or a trial's predictions) missing or unreadable
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
