"""`python -m tune_xray.report EXPERIMENT_DIR [--out report.html]`: the study on one self-contained HTML page.

What won, by how much and with what certainty (95 % patient-level bootstrap CIs), what mattered (Optuna's
history, fANOVA importance, parallel coordinates, slices; ASHA's epochs per trial), how the best models learn and
are calibrated, what they look at (Grad-CAM) and how they group images (t-SNE), and what they cost (params,
FLOPs, img/s). Every choice shown is made on validation data; the test split appears only in the section
labelled as the record. Figures are inline PNGs: the file opens offline. A search writes it at its end and
logs it to the parent MLflow run.

    python -m tune_xray.report tune_xray_runs/byol-smoke            # → tune_xray_runs/byol-smoke/report.html
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

STATUSES = ("complete", "pruned", "diverged", "error", "interrupted")


class ReportError(RuntimeError):
    """The directory is not a finished search (no summary.json, or one that cannot be read)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _inline_png(fig, draw=None) -> str:
    """`fig` (after `draw(fig)`, if given) as an inline PNG <img>; the figure is closed either way."""
    buffer = io.BytesIO()
    try:
        if draw is not None:
            draw(fig)
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _figure(draw, width: float = 7.0, height: float = 3.6) -> str:
    """An inline PNG of what `draw(fig)` puts on a new matplotlib figure."""
    return _inline_png(_pyplot().figure(figsize=(width, height)), draw)


def _optuna_figure(plot, width: float = 7.5, height: float = 3.8) -> str:
    """An optuna.visualization.matplotlib plot as an inline PNG (or why it cannot be drawn)."""
    _pyplot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's "experimental" notice, matplotlib's equal axis limits
            axes = plot()
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return f"<p class=note>not drawn: {html.escape(str(err))}</p>"
    fig = np.ravel(axes)[0].figure if isinstance(axes, np.ndarray) else axes.figure
    fig.set_size_inches(width, height)
    return _inline_png(fig)


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}", na_rep="", escape=True)


def _ci(value, low, high) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:.4f} [{low:.4f}, {high:.4f}]" if low is not None and np.isfinite(low) else f"{value:.4f}"


def _trial_dir(experiment_dir: Path, row: dict) -> Path:
    return experiment_dir / f"{row['trial']}-{row['trial_id']}"


def _predictions(directory: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, targets, probabilities, classes) of a trial's stored predictions."""
    from .ensemble import read_predictions

    header = pd.read_csv(directory / f"predictions_{split}.csv", nrows=0).columns
    classes = [c[2:] for c in header if c.startswith("p_")]
    paths, y, _, prob = read_predictions(directory, split, classes)
    return paths, y, prob, classes


def _trial_seconds(directory: Path) -> float:
    """The trial's own wall time (Tune's last result)."""
    lines = (directory / "result.json").read_text().strip().splitlines() if (directory / "result.json").is_file() else []
    return float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0


# -- sections ---------------------------------------------------------------------------------------------------

def _budget_and_space(summary: dict, invocation: dict) -> list[tuple[str, str]]:
    """The budget the search ran with and its parameters as the file states them."""
    from .config import parse_overrides
    from .space import load_study

    try:
        study = load_study(summary["file"])
    except (OSError, ValueError):  # the file moved or changed since: the summary still stands
        return []
    budget = study.budget(bool(invocation.get("smoke")), parse_overrides(invocation.get("overrides") or []))
    space = "; ".join(f"{key}: " + ", ".join(f"{k} {v}" for k, v in spec.model_dump(exclude_none=True, by_alias=True).items())
                      for key, spec in study.space.params.items())
    return [("budget", f"{budget.trials} trials, {budget.epochs} fine-tune epochs each at most; ASHA grace "
                       f"{budget.grace_period}, reduction factor {budget.reduction_factor}"), ("space", space)]


def study_section(summary: dict, invocation: dict, experiment_dir: Path, complete: list[dict]) -> str:
    resources = summary.get("resources", {})
    seconds = sum(_trial_seconds(_trial_dir(experiment_dir, r)) for r in summary["rows"])
    hours = seconds / 3600
    facts = [("study file", summary["file"]),
             ("objective", f"{summary['metric'].removeprefix('best_')} ({summary['mode']}), on validation"),
             ("trials", f"{summary['trials']} of {summary['requested']} requested: "
                        + ", ".join(f"{summary[s]} {s}" for s in STATUSES if summary.get(s))),
             ("status", summary["status"]), ("smoke", invocation.get("smoke")), *_budget_and_space(summary, invocation),
             ("fixed overrides", " ".join(invocation.get("overrides") or []) or "none"),
             ("search wall time", f"{summary.get('wall_time_s', 0) / 60:.1f} min"),
             ("trial time", f"{hours:.3g} h: {hours * resources.get('cpus_per_trial', 1):.3g} CPU-hours, "
                            f"{hours * resources.get('gpus_per_trial', 0):.3g} GPU-hours")]
    out = "<table>" + "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts) + "</table>"
    metric = summary["metric"]
    rows = [{"rank": i + 1, "trial": r["name"],
             f"{metric.removeprefix('best_')} [95 % CI, selection set]": _ci(r[metric],
                                                                              *(r.get("selection_ci") or [None, None])),
             "epoch selected": int(r["selected_epoch"]), "epochs run": int(r["epochs_done"]),
             **{f"trained {k}": v for k, v in r["resolved"].items() if k in r["sampled"]}} for i, r in enumerate(complete)]
    out += "<h3>Best configurations (validation)</h3>" + (_table(pd.DataFrame(rows)) if rows else "<p>none completed</p>")
    ensemble = summary.get("ensemble") or {}
    if ensemble.get("members"):
        val = ensemble["val"]
        out += ("<h3>The ensemble (chosen on validation)</h3>"
                f"<p>{html.escape(ensemble['method'])}, {len(ensemble['members'])} members; val (CIs on the "
                "selection set) "
                f"{_ci(val['ensemble']['value'], val['ensemble']['ci_low'], val['ensemble']['ci_high'])} vs best single "
                f"{_ci(val['best_single']['value'], val['best_single']['ci_low'], val['best_single']['ci_high'])}; "
                f"paired difference {_ci(*(val['ensemble_minus_best_single'][k] for k in ('value', 'ci_low', 'ci_high')))}"
                f"; registered as {html.escape(str(ensemble.get('registered', {}).get('uri')))}</p>")
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
                                        "values": ", ".join(f"{v:.4f}" for v in r["values"])} for r in repeats["rows"]])))
        if repeats.get("comparisons"):
            out += ("<p>The best against each other (validation), resampling seeds and then patients (a hierarchical "
                    "bootstrap):</p>"
                    + _table(pd.DataFrame([{"best − other": f"{c['best']} − {c['other']}",
                                            "difference [95 % CI]": _ci(c["difference"], c["ci_low"], c["ci_high"]),
                                            "verdict": "within noise" if c["within_noise"] else "a real difference"}
                                           for c in repeats["comparisons"]])))
    return out


def search_section(summary: dict, optuna_url: str, name: str) -> str:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    from .search import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=optuna_storage(optuna_url))
    out = "<h3>Optimisation history</h3>" + _optuna_figure(lambda: ovm.plot_optimization_history(study))
    out += "<h3>Parameter importance (fANOVA)</h3>" + _optuna_figure(
        lambda: ovm.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))
    try:  # parallel coordinates and slices of the parameters that mattered most: a dozen axes are unreadable
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            top = list(optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))[:5]
    except (ValueError, RuntimeError):
        top = None
    shown = f" of the {len(top)} most important parameters" if top else ""
    out += f"<h3>Parallel coordinates{shown}</h3>" + _optuna_figure(
        lambda: ovm.plot_parallel_coordinate(study, params=top), 9, 4)
    out += f"<h3>Slices{shown}</h3>" + _optuna_figure(lambda: ovm.plot_slice(study, params=top), 12, 3.2)

    rows = [r for r in summary["rows"] if r.get("epochs_done") is not None]

    def rungs(fig):
        ax = fig.add_subplot()
        colours = {"complete": "tab:green", "pruned": "tab:orange", "diverged": "tab:red", "error": "tab:gray",
                   "interrupted": "tab:purple"}
        ax.barh([r["trial"] for r in rows], [r["epochs_done"] for r in rows],
                color=[colours.get(r["status"], "k") for r in rows])
        ax.set_xlabel("fine-tune epochs run")
        ax.invert_yaxis()
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=c, label=s) for s, c in colours.items() if any(r["status"] == s for r in rows)],
                  fontsize=7, loc="lower right")

    total = sum(r["epochs_done"] or 0 for r in rows)
    out += (f"<h3>ASHA: epochs spent per trial</h3><p>{total} trial-epochs in all; a full budget for every trial "
            f"would have been {max((r['epochs_done'] or 0) for r in rows) * len(rows) if rows else 0}.</p>")
    return out + (_figure(rungs, height=0.3 * len(rows) + 1) if rows else "")


def model_section(experiment_dir: Path, summary: dict, complete: list[dict]) -> str:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    metric = summary["metric"].removeprefix("best_")  # the study's validation metric (the search reads its best)
    out = "<h3>Learning curves (validation)</h3>"
    histories = {r["name"]: json.loads((_trial_dir(experiment_dir, r) / "supervised_history.json").read_text())
                 for r in complete[:3] if (_trial_dir(experiment_dir, r) / "supervised_history.json").is_file()}

    def curves(fig):
        for i, key in enumerate(("val_loss", metric if metric != "val_loss" else "train_loss")):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, history in histories.items():
                ax.plot([h["epoch"] for h in history], [h.get(key, np.nan) for h in history], marker="o",
                        label=name[:40])
            ax.set_xlabel("epoch")
            ax.set_title(key)
        ax.legend(fontsize=6)

    out += _figure(curves, 9, 3.4) if histories else "<p>no history</p>"
    best = complete[0]
    best_dir = _trial_dir(experiment_dir, best)
    _, y, prob, classes = _predictions(best_dir, "val")
    curves_of = {f"best trial ({best['trial']})": prob}
    members = experiment_dir / "ensemble" / "members.csv"
    if members.is_file():
        table = pd.read_csv(members)
        curves_of["ensemble"] = sum(w * _predictions(Path(d), "val")[2] for w, d in zip(table["weight"], table["dir"]))

    def rocs(fig):
        for i, (label, p) in enumerate(curves_of.items()):
            ax = fig.add_subplot(1, len(curves_of), i + 1)
            for c, name in enumerate(classes):
                if 0 < y[:, c].sum() < len(y):
                    fpr, tpr, _ = roc_curve(y[:, c], p[:, c])
                    ax.plot(fpr, tpr, lw=1, label=name)
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_title(f"{label}: per-label ROC (val)", fontsize=9)
            ax.set_xlabel("1 − specificity")
        ax.legend(fontsize=5, ncol=2)

    out += "<h3>ROC per label (validation)</h3>" + _figure(rocs, 9, 3.8)

    def reliability(fig):
        ax = fig.add_subplot()
        for label, p in curves_of.items():
            mask = y.sum(0) > 0
            truth, pred = calibration_curve(y[:, mask].ravel(), p[:, mask].ravel(), n_bins=10, strategy="quantile")
            ax.plot(pred, truth, marker="o", label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.legend(fontsize=7)

    out += "<h3>Calibration (validation, all labels pooled)</h3>" + _figure(reliability, 4.5, 3.6)
    trial_summary = json.loads((best_dir / "summary.json").read_text())
    sup = trial_summary.get("supervised", {})
    if sup.get("val_confusion_matrix"):
        matrix = np.asarray(sup["val_confusion_matrix"])

        def confusion(fig):
            ax = fig.add_subplot()
            ax.imshow(matrix, cmap="Blues")
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)), classes, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")

        out += "<h3>Confusion matrix (validation)</h3>" + _figure(confusion, 4.5, 4.5)
    if sup.get("thresholds") is not None:
        out += ("<h3>Decision thresholds (chosen on validation)</h3>"
                + _table(pd.DataFrame({"label": classes[:len(sup["thresholds"])], "threshold": sup["thresholds"]})))
    return out


def explain_section(experiment_dir: Path, best: dict, per_class: int = 2, max_points: int = 400,
                    device: str = "cpu") -> str:
    import torch

    from .explain import embeddings, gradcam, tsne
    from .predict import Member, read_image

    member = Member(_trial_dir(experiment_dir, best) / "best.pt", device)
    paths, y, prob, classes = _predictions(_trial_dir(experiment_dir, best), "val")
    picks = []  # per class: the val images with that finding the model is most sure of
    for c, name in enumerate(classes):
        rows = np.flatnonzero(y[:, c] > 0)
        picks += [(i, c) for i in rows[np.argsort(-prob[rows, c])][:per_class]]
    # a member ensemble (both CASS arms fine-tuned) is explained through its first member
    classifier = member.model.members[0] if hasattr(member.model, "members") else member.model
    which = " (its first member)" if classifier is not member.model else ""
    out = f"<h3>Grad-CAM (best trial{which}, validation images with the finding)</h3>"
    if picks:
        raw = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i, _ in picks])).to(device)
        images = member.views(raw)[0]
        maps = gradcam(classifier, images, [c for _, c in picks])

        def overlays(fig):
            columns = min(6, len(picks))
            for k, ((i, c), cam) in enumerate(zip(picks, maps)):
                ax = fig.add_subplot(int(np.ceil(len(picks) / columns)), columns, k + 1)
                ax.imshow(images[k].mean(0).float().cpu().numpy(), cmap="gray")
                ax.imshow(cam, cmap="jet", alpha=0.4)
                ax.set_title(f"{classes[c]} p={prob[i, c]:.2f}", fontsize=6)
                ax.axis("off")

        out += _figure(overlays, 9, 1.6 * np.ceil(len(picks) / min(6, len(picks))))
    keep = np.linspace(0, len(paths) - 1, min(max_points, len(paths))).astype(int)
    x = torch.from_numpy(np.stack([member.layout(read_image(paths[i])) for i in keep])).to(device)
    points = tsne(embeddings(classifier, member.views(x)[0]))
    present = y[keep]
    # colour: the label of each image (multi-label: its least frequent finding, "No finding" when none)
    order = np.argsort(y.sum(0))
    colour = np.array([next((classes[c] for c in order if row[c]), "No finding") for row in present])

    def scatter(fig):
        ax = fig.add_subplot()
        for label in sorted(set(colour)):
            ax.scatter(*points[colour == label].T, s=8, label=label)
        ax.legend(fontsize=6, markerscale=2, ncol=2)
        ax.set_xticks([])
        ax.set_yticks([])

    return out + f"<h3>t-SNE of validation embeddings (best trial's backbone{which})</h3>" + _figure(scatter, 6, 4.5)


def cost_section(experiment_dir: Path, complete: list[dict], device: str = "cpu") -> str:
    from .explain import inference_cost
    from .predict import Member

    rows, seen = [], set()
    for row in complete:
        fine_tuned = json.loads((_trial_dir(experiment_dir, row) / "summary.json").read_text())["backbone"]
        member = Member(_trial_dir(experiment_dir, row) / "best.pt", device)
        key = (fine_tuned, member.cfg.augment.image_size)
        if key in seen:  # what was fine-tuned (a CASS arm, or both), at its size
            continue
        seen.add(key)
        shape = (member.cfg.model.in_chans, member.cfg.augment.image_size, member.cfg.augment.image_size)
        cost = inference_cost(member.model, shape, device)
        rows.append({"backbone": key[0], "image size": key[1], "params (M)": cost["params_m"],
                     "GFLOPs / image": cost["gflops"], f"img/s ({device}, batch 16)": cost["img_per_s"]})
    return _table(pd.DataFrame(rows))


def record_section(summary: dict) -> str:
    """Test metrics: read once, at the search's end, after every choice, never ranked (the ensemble's record)."""
    ensemble = summary.get("ensemble") or {}
    test = ensemble.get("test")
    if not test:
        return ("<p>The test split has not been read for this experiment: the record is made at a search's end, "
                "with its ensemble (<code>python -m tune_xray.ensemble DIR --record</code>).</p>")
    per_label = ensemble.get("test_per_label") or {}
    labels = list((per_label.get("ensemble") or {}).keys())
    rows = [{"label": k.removeprefix("auroc/"),
             **{f"{who.replace('_', ' ')} AUROC [95 % CI]": _ci(*(per_label[who][k][x] for x in ("value", "ci_low",
                                                                                              "ci_high")))
                for who in ("ensemble", "best_single")}} for k in labels]
    out = ("<p>The test split, read for the record after every choice (reads of test for this experiment: "
           f"{ensemble.get('test_reads')}); thresholds from validation. Nothing here chose anything.</p>")
    out += "<p>" + "; ".join(f"{k.replace('_', ' ')}: {_ci(v['value'], v['ci_low'], v['ci_high'])}"
                             for k, v in test.items()) + "</p>"
    return out + (_table(pd.DataFrame(rows)) if rows else "")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left}img{max-width:100%}.note{color:#888}.record{background:#fff8e6;padding:.5em 1em}"""


def build_report(experiment_dir: str | Path, out: str | Path | None = None, device: str = "cpu") -> Path:
    """Write the report; returns its path (default EXPERIMENT_DIR/report.html)."""
    from .search import INVOCATION_FILE, default_optuna_url

    from .ensemble import EnsembleError, read_summary

    experiment_dir = Path(experiment_dir).resolve()
    start = time.perf_counter()
    try:
        summary = read_summary(experiment_dir)
    except EnsembleError as err:
        raise ReportError(str(err)) from None
    invocation = json.loads((experiment_dir / INVOCATION_FILE).read_text()) if (
        experiment_dir / INVOCATION_FILE).is_file() else {}
    complete = summary["top"]
    optuna_url = invocation.get("optuna_storage") or default_optuna_url(experiment_dir)
    sections = [("The study", study_section(summary, invocation, experiment_dir, complete)),
                ("The search", search_section(summary, optuna_url, summary.get("optuna_study") or experiment_dir.name))]
    if complete:
        sections += [("The model", model_section(experiment_dir, summary, complete)),
                     ("Explainability", explain_section(experiment_dir, complete[0], device=device)),
                     ("Cost", cost_section(experiment_dir, complete, device)),
                     ("The record: test split", '<div class="record">' + record_section(summary) + "</div>")]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(summary['study'])}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(summary['study'])}: {html.escape(experiment_dir.name)}"
            f"</h1><p class=note>tune_xray report, written in {time.perf_counter() - start:.0f} s. Intervals are 95 % "
            "bootstrap CIs over patients (images where the data name none); on validation they are computed on the "
            f"data that made the choices (the selection set), so optimistic.</p>{body}</body></html>")
    path = Path(out) if out else experiment_dir / "report.html"
    path.write_text(page)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir")
    parser.add_argument("--out", help="default: EXPERIMENT_DIR/report.html")
    parser.add_argument("--device", default="cpu", help="for Grad-CAM, t-SNE embeddings and the img/s column")
    args = parser.parse_args(argv)
    from .ensemble import EnsembleError

    try:
        start = time.perf_counter()
        path = build_report(args.experiment_dir, args.out, args.device)
    except (ReportError, EnsembleError) as err:  # the latter: a trial's predictions missing or unreadable
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
