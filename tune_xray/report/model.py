"""How the best models learn and are calibrated: training curves, ROC and calibration per label (or class)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from ..experiment import (
    Experiment,
    TrialTask,
    read_json,
)
from ..figures import COLUMN, figure, integer_ticks, wrap
from ..metrics import both_classes, labelled, scored_labels
from ..record.names import bare
from ..record.text import plural, search_model_text
from .common import html_table, stored_predictions


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
    _, y, prob, classes = stored_predictions(best_dir, "val")
    probs = {f"best trial ({complete[0]['trial']})": prob}
    members = experiment.ensemble_dir / "members.csv"
    if members.is_file():
        table = pd.read_csv(members)
        probs["ensemble"] = sum(w * stored_predictions(Path(d), "val")[2]
                                for w, d in zip(table["weight"], table["dir"]))
    task = TrialTask.of(best_dir)
    # the curves a reader can use: binary, the positive class's; otherwise each trained label (one-vs-rest for a
    # class) with both classes in validation — never complementary columns pooled
    shown = [c for c in scored_labels(task.task, classes, task.untrained) if both_classes(y[:, c])]
    known = {c: labelled(y[:, c]) for c in shown}  # each label over its labelled images
    roc, auc, calibration = {}, {}, {}
    for label, p in probs.items():
        roc[label] = {classes[c]: [list(a) for a in roc_curve(y[known[c], c], p[known[c], c])[:2]] for c in shown}
        auc[label] = {classes[c]: float(roc_auc_score(y[known[c], c], p[known[c], c])) for c in shown}
        for c in shown:
            truth = y[known[c], c]
            bins = int(min(10, truth.sum(), len(truth) - truth.sum()))  # quantile bins: none emptier than a class
            if bins >= 2:
                observed, predicted = calibration_curve(truth, p[known[c], c], n_bins=bins, strategy="quantile")
                calibration.setdefault(classes[c], {})[label] = {"predicted": predicted.tolist(),
                                                                "observed": observed.tolist()}
    supervised = read_json(best_dir / "summary.json", "a trial's summary").get("supervised", {})
    ensemble = summary.get("ensemble") or {}
    registered = bool(ensemble.get("members")) and "thresholds" in ensemble
    chosen = summary.get("search_model") or {}
    superseded = registered and chosen.get("uri") != (ensemble.get("registered") or {}).get("uri")
    thresholds = ensemble.get("thresholds") if registered else supervised.get("thresholds")
    decided = classes if task.task == "multilabel" else classes[1:]  # binary: the positive class
    return {"metric": "val_" + metric, "histories": histories, "classes": classes, "task": task.task,
            "roc": roc, "auc": auc, "calibration": calibration,
            "confusion_matrix": supervised.get("val_confusion_matrix"),
            "thresholds": thresholds, "threshold_labels": decided[:len(thresholds or [])],
            "untrained": list(task.untrained),
            "thresholds_of": thresholds_of(registered, superseded, complete[0]["trial"]),
            "search_model": search_model_text(summary),
            "rule": ensemble.get("rule") or "youden",
            "no_val_positives": [c for j, c in enumerate(classes)
                                 if np.nansum(y[:, j]) == 0 and c not in task.untrained]}


def thresholds_of(registered: bool, superseded: bool, best: str) -> str:
    """Whose decision thresholds the model section shows, and whether that is the search's model."""
    if not registered:
        return f"the best trial ({best})"
    if superseded:
        return "the ensemble chosen on validation (not the search's model: the out-of-fold ensemble is)"
    return "the ensemble chosen on validation, the search's model"


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

    out = (f"<p><b>{html.escape(model['search_model'][0].upper() + model['search_model'][1:])}.</b></p>"
           if model.get("search_model") else "")
    out += "<h3>Learning curves (validation, the three best trials)</h3>" + (
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
                f"validation, rule {model.get('rule', 'youden')})</h3>" + html_table(pd.DataFrame(table))
                + (f"<p class=note>None for the {plural(len(untrained), 'label')} no training image has: the model "
                   "never decides them.</p>" if untrained else ""))
    return out
