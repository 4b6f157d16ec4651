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

from ..credentials import mask
from ..driver import driver_device
from ..experiment import Experiment, ExperimentError, json_value
from ..record.names import REPORT_FILE, bare
from ..request import SearchRequest
from ..space import short_names, space_rows
from .cost import cost_data, render_cost, render_cv
from .explanation import explain_data, render_explain
from .model import model_data, render_model
from .record import render_record, warnings_of
from .search import render_search, render_trials, search_data, trial_rows
from .study import dataset_data, render_data, render_study, study_facts, study_file

__all__ = ["build_report", "main", "model_data", "render", "report_data", "short_names", "warnings_of"]


def report_data(experiment: Experiment, device: str = "cpu") -> dict:
    """Every number and array the report shows, JSON-ready."""
    from ..experiment import provenance

    start = time.perf_counter()
    summary, invocation = experiment.summary(), experiment.invocation()
    complete = summary["top"]
    study = study_file(summary)
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


def build_report(experiment: Experiment, out: str | Path | None = None, device: str = "cpu") -> Path:
    """Write the report (default EXPERIMENT_DIR/report.html) and its numbers beside it (`.json`); returns its
    path."""
    data = report_data(experiment, device)
    if out is None:  # in the experiment directory: the Experiment writes it
        experiment.write_json(str(Path(REPORT_FILE).with_suffix(".json")), data, indent=None)
        return experiment.write_text(REPORT_FILE, render(data))
    path = Path(out)
    path.with_suffix(".json").write_text(json.dumps(mask(data), default=json_value))
    path.write_text(mask(render(data)))
    return path


def wanted(request: SearchRequest) -> bool:
    return not request.no_report


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's last step: the report, drawn here in the driver (on its own device, whatever the trials had).
    Returns its part of the record (`report`: where it is)."""
    return {"report": str(build_report(experiment, device=driver_device()))}


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
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)")
    return 0
