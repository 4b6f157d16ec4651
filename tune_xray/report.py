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
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .config import bare
from .experiment import (
    REPORT_FILE,
    STATUSES,
    Experiment,
    ExperimentError,
    predicted_classes,
    read_json,
    read_predictions,
)
from .figures import figure, optuna_figure

THUMBNAIL = 128  # Grad-CAM images and maps are kept at this size (pixels) in the data: what the page shows


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


def _budget_and_space(summary: dict, invocation: dict) -> list[tuple[str, str]]:
    """The budget the search ran with and its parameters as the file states them."""
    from .config import parse_overrides
    from .space import load_study

    try:
        study = load_study(summary["file"])
    except (OSError, ValueError):  # the file moved or changed since: the summary still stands
        return []
    budget = study.budget(bool(invocation.get("smoke")), parse_overrides(invocation.get("overrides") or []))
    space = "; ".join(f"{key}: " + ", ".join(f"{k} {v}" for k, v in spec.model_dump(exclude_none=True,
                                                                                     by_alias=True).items())
                      for key, spec in study.space.params.items())
    return [("budget", f"{budget.trials} trials, {budget.epochs} fine-tune epochs each at most; ASHA grace "
                       f"{budget.grace_period}, reduction factor {budget.reduction_factor}"), ("space", space)]


def study_facts(experiment: Experiment, summary: dict, invocation: dict) -> list[tuple[str, str]]:
    resources = summary.get("resources", {})
    hours = sum(_trial_seconds(experiment.trial_dir(r)) for r in summary["rows"]) / 3600
    facts = [("study file", summary["file"]),
             ("objective", f"{bare(summary['metric'])} ({summary['mode']}), on validation"),
             ("trials", f"{summary['trials']} of {summary['requested']} requested: "
                        + ", ".join(f"{summary[s]} {s}" for s in STATUSES if summary.get(s))),
             ("status", summary["status"]), ("smoke", invocation.get("smoke")), *_budget_and_space(summary, invocation),
             ("fixed overrides", " ".join(invocation.get("overrides") or []) or "none"),
             ("search wall time", f"{summary.get('wall_time_s', 0) / 60:.1f} min"),
             ("trial time", f"{hours:.3g} h: {hours * resources.get('cpus_per_trial', 1):.3g} CPU-hours, "
                            f"{hours * resources.get('gpus_per_trial', 0):.3g} GPU-hours")]
    return [(k, str(v)) for k, v in facts]


def search_data(experiment: Experiment, summary: dict) -> dict:
    """The Optuna study's finished trials (what its plots need), fANOVA importances, ASHA's epochs per trial."""
    import warnings

    import optuna
    from optuna.distributions import distribution_to_json
    from optuna.importance import FanovaImportanceEvaluator

    from .searcher import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=experiment.optuna_study(summary),
                              storage=optuna_storage(experiment.optuna_url))
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
               "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()}}
              for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importance = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        importance, why = {k: float(v) for k, v in importance.items()}, None
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        importance, why = {}, str(err)
    asha = [{"trial": r["trial"], "epochs_done": r["epochs_done"], "status": r["status"]} for r in summary["rows"]
            if r.get("epochs_done") is not None]
    return {"direction": study.direction.name, "trials": trials, "importance": importance,
            "importance_error": why, "asha": asha}


def model_data(experiment: Experiment, summary: dict, complete: list[dict]) -> dict:
    """Learning curves of the best three, per-label ROC and calibration (best trial, ensemble) on validation, the
    best trial's confusion matrix and thresholds."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

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
    roc, calibration = {}, {}
    for label, p in probs.items():
        roc[label] = {name: [list(a) for a in roc_curve(y[:, c], p[:, c])[:2]]
                      for c, name in enumerate(classes) if 0 < y[:, c].sum() < len(y)}
        mask = y.sum(0) > 0
        truth, predicted = calibration_curve(y[:, mask].ravel(), p[:, mask].ravel(), n_bins=10, strategy="quantile")
        calibration[label] = {"predicted": predicted.tolist(), "observed": truth.tolist()}
    supervised = read_json(best_dir / "summary.json", "a trial's summary").get("supervised", {})
    return {"metric": "val_" + metric, "histories": histories, "classes": classes, "roc": roc,
            "calibration": calibration, "confusion_matrix": supervised.get("val_confusion_matrix"),
            "thresholds": supervised.get("thresholds")}


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
    picks = []  # per class: the val images with that finding the model is most sure of
    for c in range(len(classes)):
        rows = np.flatnonzero(y[:, c] > 0)
        picks += [(i, c) for i in rows[np.argsort(-prob[rows, c])][:per_class]]
    # a member ensemble (both CASS arms fine-tuned) is explained through its first member
    classifier = member.model.members[0] if hasattr(member.model, "members") else member.model
    which = " (its first member)" if classifier is not member.model else ""
    cams = []
    if picks:
        raw = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i, _ in picks])).to(device)
        images = member.views(raw)[0]
        maps = gradcam(classifier, images, [c for _, c in picks])
        for k, ((i, c), cam) in enumerate(zip(picks, maps)):
            gray = images[k].mean(0).float().cpu().numpy()
            gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
            cams.append({"image": _thumbnail(gray), "cam": _thumbnail(cam), "label": classes[c],
                         "probability": float(prob[i, c])})
    keep = np.linspace(0, len(paths) - 1, min(max_points, len(paths))).astype(int)
    x = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i in keep])).to(device)
    points = tsne(embeddings(classifier, member.views(x)[0]))
    # colour: the label of each image (multi-label: its least frequent finding, "No finding" when none)
    order = np.argsort(y.sum(0))
    colour = [next((classes[c] for c in order if row[c]), "No finding") for row in y[keep]]
    return {"which": which, "gradcam": cams, "tsne": {"points": points.tolist(), "labels": colour}}


def cost_data(experiment: Experiment, complete: list[dict], device: str = "cpu") -> list[dict]:
    """Params, GFLOPs and img/s of each distinct fine-tuned backbone at its image size."""
    from .explain import inference_cost
    from .serving import Member

    rows, seen = [], set()
    for row in complete:
        fine_tuned = read_json(experiment.trial_dir(row) / "summary.json", "a trial's summary")["backbone"]
        member = Member(experiment.trial_dir(row) / "best.pt", device)
        key = (fine_tuned, member.cfg.augment.image_size)
        if key in seen:  # what was fine-tuned (a CASS arm, or both), at its size
            continue
        seen.add(key)
        shape = (member.cfg.model.in_chans, member.cfg.augment.image_size, member.cfg.augment.image_size)
        cost = inference_cost(member.model, shape, device)
        rows.append({"backbone": key[0], "image size": key[1], "params (M)": cost["params_m"],
                     "GFLOPs / image": cost["gflops"], f"img/s ({device}, batch 16)": cost["img_per_s"]})
    return rows


def report_data(experiment: Experiment, device: str = "cpu") -> dict:
    """Every number and array the report shows, JSON-ready."""
    start = time.perf_counter()
    summary, invocation = experiment.summary(), experiment.invocation()
    complete = summary["top"]
    data = {"name": experiment.name, "study": summary["study"], "summary": summary,
            "facts": study_facts(experiment, summary, invocation), "search": search_data(experiment, summary)}
    if complete:
        data.update(model=model_data(experiment, summary, complete),
                    explain=explain_data(experiment, complete[0], device=device),
                    cost=cost_data(experiment, complete, device), device=device)
    data["seconds"] = time.perf_counter() - start
    return data


# -- the page ---------------------------------------------------------------------------------------------------

def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}", na_rep="", escape=True)


def _ci(value, low, high) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:.4f} [{low:.4f}, {high:.4f}]" if low is not None and np.isfinite(low) else f"{value:.4f}"


def _entry(entry: dict) -> str:
    return _ci(entry["value"], entry["ci_low"], entry["ci_high"])


def render_study(data: dict) -> str:
    summary = data["summary"]
    out = "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                              for k, v in data["facts"]) + "</table>"
    metric = summary["metric"]
    rows = [{"rank": i + 1, "trial": r["name"],
             f"{bare(metric)} [95 % CI, selection set]": _ci(r[metric], *(r.get("selection_ci") or [None, None])),
             "epoch selected": int(r["selected_epoch"]), "epochs run": int(r["epochs_done"]),
             **{f"trained {k}": v for k, v in r["resolved"].items() if k in r["sampled"]}}
            for i, r in enumerate(summary["top"])]
    out += "<h3>Best configurations (validation)</h3>" + (_table(pd.DataFrame(rows)) if rows
                                                         else "<p>none completed</p>")
    ensemble = summary.get("ensemble") or {}
    if ensemble.get("members"):
        val = ensemble["val"]
        out += ("<h3>The ensemble (chosen on validation)</h3>"
                f"<p>{html.escape(ensemble['method'])}, {len(ensemble['members'])} members; val (CIs on the "
                f"selection set) {_entry(val['ensemble'])} vs best single {_entry(val['best_single'])}; paired "
                f"difference {_entry(val['ensemble_minus_best_single'])}; registered as "
                f"{html.escape(str((ensemble.get('registered') or {}).get('uri')))}</p>")
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
                                            "difference [95 % CI]": _ci(c["difference"], c["ci_low"], c["ci_high"]),
                                            "verdict": "within noise" if c["within_noise"] else "a real difference"}
                                           for c in repeats["comparisons"]])))
    return out


def _study_in_memory(search: dict):
    """The finished trials as an in-memory Optuna study: what Optuna's own plots draw."""
    import optuna
    from optuna.distributions import json_to_distribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=search["direction"].lower())
    study.add_trials([optuna.trial.create_trial(
        state=optuna.trial.TrialState[t["state"]], value=t["value"] if t["state"] == "COMPLETE" else None,
        params=t["params"], distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
        intermediate_values={int(k): v for k, v in t["intermediate_values"].items()}) for t in search["trials"]])
    return study


def render_search(search: dict) -> str:
    from optuna.visualization import matplotlib as ovm

    study = _study_in_memory(search)
    out = "<h3>Optimisation history</h3>" + optuna_figure(lambda: ovm.plot_optimization_history(study))
    importance = search["importance"]

    def bars(fig):
        ax = fig.add_subplot()
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names])
        ax.set_xlabel("fANOVA importance (objective variance explained)")
        ax.tick_params(axis="y", labelsize=7)

    out += "<h3>Parameter importance (fANOVA)</h3>" + (
        figure(bars, 7.5, 0.35 * len(importance) + 1) if importance
        else f"<p class=note>not drawn: {html.escape(str(search['importance_error']))}</p>")
    # parallel coordinates and slices of the parameters that mattered most: a dozen axes are unreadable
    top = list(importance)[:5] or None
    shown = f" of the {len(top)} most important parameters" if top else ""
    out += f"<h3>Parallel coordinates{shown}</h3>" + optuna_figure(
        lambda: ovm.plot_parallel_coordinate(study, params=top), 9, 4)
    out += f"<h3>Slices{shown}</h3>" + optuna_figure(lambda: ovm.plot_slice(study, params=top), 12, 3.2)
    rows = search["asha"]

    def rungs(fig):
        from matplotlib.patches import Patch

        ax = fig.add_subplot()
        colours = {"complete": "tab:green", "pruned": "tab:orange", "diverged": "tab:red", "error": "tab:gray",
                   "interrupted": "tab:purple"}
        ax.barh([r["trial"] for r in rows], [r["epochs_done"] for r in rows],
                color=[colours.get(r["status"], "k") for r in rows])
        ax.set_xlabel("fine-tune epochs run")
        ax.invert_yaxis()
        ax.legend(handles=[Patch(color=c, label=s) for s, c in colours.items() if any(r["status"] == s for r in rows)],
                  fontsize=7, loc="lower right")

    total = sum(r["epochs_done"] or 0 for r in rows)
    out += (f"<h3>ASHA: epochs spent per trial</h3><p>{total} trial-epochs in all; a full budget for every trial "
            f"would have been {max((r['epochs_done'] or 0) for r in rows) * len(rows) if rows else 0}.</p>")
    return out + (figure(rungs, height=0.3 * len(rows) + 1) if rows else "")


def render_model(model: dict) -> str:
    histories, classes = model["histories"], model["classes"]

    def curves(fig):
        keys = ("val_loss", model["metric"] if model["metric"] != "val_loss" else "train_loss")
        for i, key in enumerate(keys):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, history in histories.items():
                ax.plot([h["epoch"] for h in history], [np.nan if h.get(key) is None else h[key] for h in history],
                        marker="o", label=name[:40])
            ax.set_xlabel("epoch")
            ax.set_title(key)
        ax.legend(fontsize=6)

    out = "<h3>Learning curves (validation)</h3>" + (figure(curves, 9, 3.4) if histories else "<p>no history</p>")

    def rocs(fig):
        for i, (label, per_class) in enumerate(model["roc"].items()):
            ax = fig.add_subplot(1, len(model["roc"]), i + 1)
            for name, (fpr, tpr) in per_class.items():
                ax.plot(fpr, tpr, lw=1, label=name)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_title(f"{label}: per-label ROC (val)", fontsize=9)
            ax.set_xlabel("1 − specificity")
        ax.legend(fontsize=5, ncol=2)

    out += "<h3>ROC per label (validation)</h3>" + figure(rocs, 9, 3.8)

    def reliability(fig):
        ax = fig.add_subplot()
        for label, points in model["calibration"].items():
            ax.plot(points["predicted"], points["observed"], marker="o", label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.legend(fontsize=7)

    out += "<h3>Calibration (validation, all labels pooled)</h3>" + figure(reliability, 4.5, 3.6)
    if model.get("confusion_matrix"):
        matrix = np.asarray(model["confusion_matrix"])

        def confusion(fig):
            ax = fig.add_subplot()
            ax.imshow(matrix, cmap="Blues")
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")

        out += "<h3>Confusion matrix (validation)</h3>" + figure(confusion, 4.5, 4.5)
    if model.get("thresholds") is not None:
        out += ("<h3>Decision thresholds (chosen on validation)</h3>"
                + _table(pd.DataFrame({"label": classes[:len(model["thresholds"])],
                                       "threshold": model["thresholds"]})))
    return out


def render_explain(explain: dict) -> str:
    cams, which = explain["gradcam"], explain["which"]
    out = f"<h3>Grad-CAM (best trial{which}, validation images with the finding)</h3>"
    if cams:
        columns = min(6, len(cams))

        def overlays(fig):
            for k, cam in enumerate(cams):
                ax = fig.add_subplot(int(np.ceil(len(cams) / columns)), columns, k + 1)
                ax.imshow(np.asarray(cam["image"], dtype=np.uint8), cmap="gray", vmin=0, vmax=255)
                ax.imshow(np.asarray(cam["cam"], dtype=np.uint8), cmap="jet", alpha=0.4, vmin=0, vmax=255)
                ax.set_title(f"{cam['label']} p={cam['probability']:.2f}", fontsize=6)
                ax.axis("off")

        out += figure(overlays, 9, 1.6 * np.ceil(len(cams) / columns))
    points, labels = np.asarray(explain["tsne"]["points"]), np.asarray(explain["tsne"]["labels"])

    def scatter(fig):
        ax = fig.add_subplot()
        for label in sorted(set(labels)):
            ax.scatter(*points[labels == label].T, s=8, label=label)
        ax.legend(fontsize=6, markerscale=2, ncol=2)
        ax.set_xticks([])
        ax.set_yticks([])

    return out + f"<h3>t-SNE of validation embeddings (best trial's backbone{which})</h3>" + figure(scatter, 6, 4.5)


def render_record(summary: dict) -> str:
    """Test metrics: read once, at the search's end, after every choice, never ranked (the ensemble's record)."""
    ensemble = summary.get("ensemble") or {}
    test = ensemble.get("test")
    if not test:
        return ("<p>The test split has not been read for this experiment: the record is made at a search's end, "
                "with its ensemble (<code>python -m tune_xray.ensemble DIR --record</code>).</p>")
    per_label = ensemble.get("test_per_label") or {}
    rows = [{"label": k.removeprefix("auroc/"),
             **{f"{who.replace('_', ' ')} AUROC [95 % CI]": _entry(per_label[who][k]) for who in ("ensemble",
                                                                                               "best_single")}}
            for k in (per_label.get("ensemble") or {})]
    out = ("<p>The test split, read for the record after every choice (reads of test for this experiment: "
           f"{ensemble.get('test_reads')}); thresholds from validation. Nothing here chose anything.</p>")
    out += "<p>" + "; ".join(f"{k.replace('_', ' ')}: {_entry(v)}" for k, v in test.items()) + "</p>"
    return out + (_table(pd.DataFrame(rows)) if rows else "")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left}img{max-width:100%}.note{color:#888}.record{background:#fff8e6;padding:.5em 1em}"""


def render(data: dict) -> str:
    """The page, from `report_data`'s output (or its JSON) alone."""
    sections = [("The study", render_study(data)), ("The search", render_search(data["search"]))]
    if data.get("model"):
        sections += [("The model", render_model(data["model"])),
                     ("Explainability", render_explain(data["explain"])),
                     ("Cost", _table(pd.DataFrame(data["cost"]))),
                     ("The record: test split", '<div class="record">' + render_record(data["summary"]) + "</div>")]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    title = html.escape(data["study"])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body><h1>{title}: {html.escape(data['name'])}</h1><p class=note>tune_xray report; its numbers computed "
            f"in {data['seconds']:.0f} s. Intervals are 95 % bootstrap CIs over patients (images where the data name "
            "none); on validation they are computed on the data that made the choices (the selection set), so "
            f"optimistic.</p>{body}</body></html>")


def _plain(value):
    """numpy values as JSON's own (report.json)."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else str(value)


def build_report(experiment: Experiment, out: str | Path | None = None, device: str = "cpu") -> Path:
    """Write the report (default EXPERIMENT_DIR/report.html) and its numbers beside it (`.json`); returns its
    path."""
    data = report_data(experiment, device)
    path = Path(out) if out else experiment.directory / REPORT_FILE
    path.with_suffix(".json").write_text(json.dumps(data, default=_plain))
    path.write_text(render(data))
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
