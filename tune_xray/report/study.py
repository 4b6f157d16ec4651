"""The study and its data: what was searched, how, on what (the facts table, the splits, what the data say of
patients, labels without positives), as numbers and as the page shows them."""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.sources import describe_data, describe_untrained
from ..experiment import Experiment
from ..metrics import ci_text
from ..record.names import STATUSES, bare
from ..record.text import labels_averaged, no_fit_text, plural
from ..space import flatten
from .common import FEW, bullets, html_table


def _trial_seconds(directory: Path) -> float:
    """The trial's own wall time (Tune's last result)."""
    path = directory / "result.json"
    lines = path.read_text().strip().splitlines() if path.is_file() else []
    return float(json.loads(lines[-1]).get("time_total_s", 0.0)) if lines else 0.0


def trial_hours(hours: float, resources: dict, runs: list[dict]) -> str:
    """`; CPU-hours N, GPU-hours M` of the trials' time on the resources each held — unknown where the search's
    runs gave their trials different resources (a resume that changed them: Tune shows every trial with the last)."""
    held = [(r.get("cpus_per_trial", 1), r.get("gpus_per_trial", 0)) for r in runs or [resources]]
    changes = [each for each, _ in itertools.groupby(held)]
    if len(set(changes)) > 1:
        shown = ", then ".join(f"{cpus:g} CPU + {gpus:g} GPU" for cpus, gpus in changes)
        return f" (CPU- and GPU-hours not given: the search's runs gave each trial {shown})"
    cpus, gpus = held[0]
    return f"; CPU-hours {hours * cpus:.3g}, GPU-hours {hours * gpus:.3g}"


def study_file(summary: dict):
    from ..space import load_study

    try:
        return load_study(summary["file"])
    except (OSError, ValueError):  # the file moved or changed since: the summary still stands
        return None


def study_facts(experiment: Experiment, summary: dict, invocation: dict) -> list[tuple[str, str]]:
    from ..config import parse_overrides

    resources = summary.get("resources", {})
    hours = sum(_trial_seconds(experiment.trial_dir(r)) for r in summary["rows"]) / 3600
    study = study_file(summary)
    budget = study.resolve(parse_overrides(invocation.get("overrides") or []), bool(invocation.get("smoke"))).budget \
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
             ("status", summary["status"]), ("smoke", "on" if invocation.get("smoke") else "off"),
             *([("budget", f"{plural(summary['requested'], 'trial')} requested"
                           + (f" (the file's budget: {budget.trials})" if budget.trials != summary["requested"] else "")
                           + f", {plural(budget.epochs, 'fine-tune epoch')} each at most; ASHA grace "
                           f"{budget.grace_period}, reduction factor {budget.reduction_factor}"
                           + (f"; SSL rungs at {budget.ssl_grace_period}·"
                              f"{budget.ssl_reduction_factor or budget.reduction_factor}^k SSL epochs, on the probe"
                              if budget.ssl_grace_period else ""))] if budget else []),
             ("--set", " ".join(invocation.get("overrides") or []) or "none"),
             ("every trial also got", ", ".join(f"{k}={v}" for k, v in flatten(applied).items()) or "nothing more"),
             ("search wall time", f"{summary.get('wall_time_s', 0) / 60:.1f} min"
              + (f", summed over its {len(summary['search_runs_s'])} runs (a run killed before its end counts nothing)"
                 if len(summary.get("search_runs_s") or []) > 1 else "")),
             ("trial time", f"{hours:.3g} h" + trial_hours(hours, resources, summary.get("resources_runs") or [])),
             ("started from", started_facts(summary["rows"]))]
    return [(k, str(v)) for k, v in facts]


def started_facts(rows: list[dict]) -> str:
    """What the trials' backbones started from, once per file (or reason for scratch), with how many trials."""
    from collections import Counter

    from ..models.pretrained import started_text

    counts = Counter()
    for row in rows:
        for backbone, entry in (row.get("started_from") or {}).items():
            counts[started_text({backbone: entry})] += 1
    if not counts:
        return "not recorded"
    return "; ".join(f"{text} — {plural(n, 'trial')}" for text, n in sorted(counts.items()))


def dataset_data(experiment: Experiment, best: dict) -> dict:
    """Split sizes (images, patients) and each label's positives per split, of the data the best trial trained on
    (its config, its cache): what every number in the report is an estimate on."""
    from ..data.loader import prepare
    from ..data.splits import SPLITS, UNLABELLED
    from ..serving import Member

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
    entries = index.label_entries()  # what each cell said, per split and label
    positives = {s: {c: int(np.nansum(frame.loc[frame["split"] == s, c])) for c in classes} for s in splits}
    negatives = {s: {c: int((frame.loc[frame["split"] == s, c] == 0).sum()) for c in classes} for s in splits}
    untrained = set(index.untrained())
    return {**index.facts(), "sizes": sizes, "positives": positives,
            "entries": {s: entries[s] for s in splits} if index.codes is not None else None,
            "absent": {s: [c for c in classes if positives[s][c] == 0 and c not in untrained]
                       for s in ("val", "test") if s in positives},
            "few": {s: [c for c in (classes[1:] if index.binary else classes)
                        if c not in untrained and 0 < min(positives[s][c], negatives[s][c]) < FEW]
                    for s in ("val", "test") if s in positives}}


def render_study(data: dict) -> str:
    summary = data["summary"]
    out = "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                              for k, v in data["facts"]) + "</table>"
    if data.get("space"):
        out += "<h3>The search space</h3>" + html_table(pd.DataFrame(data["space"]))
    metric = summary["metric"]
    rows = [{"rank": i + 1, "trial": r["name"],
             f"{bare(metric)} [95 % CI, selection set]": ci_text(r[metric], *(r.get("selection_ci") or [None, None])),
             **{f"{k.replace('_', ' ')} [95 % CI]": ci_text(r[k]) for k in ("accuracy", "balanced_accuracy")
                if r.get(k)},
             "epoch selected": int(r["selected_epoch"]), "epochs run": int(r["epochs_done"]),
             **{f"trained {k}": v for k, v in r["resolved"].items() if k in r["sampled"]}}
            for i, r in enumerate(summary["top"])]
    out += "<h3>Best configurations (validation)</h3>" + (html_table(pd.DataFrame(rows)) if rows
                                                         else "<p>none completed</p>")
    if rows and labels_averaged(summary):
        out += f"<p class=note>{bare(metric)}: {labels_averaged(summary)[2:]}.</p>"
    ensemble = summary.get("ensemble") or {}
    if ensemble.get("fits") is False:
        out += f"<h3>The ensemble</h3><p>None: {html.escape(no_fit_text(ensemble))}.</p>"
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
        out += html_table(pd.DataFrame([{"member": m["name"], "weight": m["weight"]} for m in ensemble["members"]]))
    repeats = summary.get("repeats")
    if repeats and repeats.get("rows"):
        out += ("<h3>Repeats: the best configurations with fresh seeds (full budget), ranked by their mean</h3>"
                "<p>The search's own run of each is shown apart: it was kept for being best, so its luck is in it."
                "</p>"
                + html_table(pd.DataFrame([{"configuration": r["name"], "search's run": f"{r['selection_run']:.4f}",
                                        "fresh seeds": r["seeds"],
                                        "mean ± sd": f"{r['mean']:.4f} ± {r['sd']:.4f}",
                                        "95 % t-interval": f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
                                        "values": ", ".join(f"{v:.4f}" for v in r["values"])}
                                       for r in repeats["rows"]])))
        if repeats.get("comparisons"):
            out += ("<p>The best against each other (validation), resampling seeds and then patients (a hierarchical "
                    "bootstrap):</p>"
                    + html_table(pd.DataFrame([{"best − other": f"{c['best']} − {c['other']}",
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
    out += html_table(pd.DataFrame(dataset["sizes"]))
    splits = list(dataset["positives"])
    sizes = {r["split"]: r["images"] for r in dataset["sizes"]}
    untrained = set(dataset.get("untrained") or [])
    entries = dataset.get("entries") or {}
    labelled = {s: {c: sizes[s] - entries[s][c]["masked"] if s in entries else sizes[s] for c in dataset["classes"]}
                for s in splits}  # a masked entry is no image's label: not in the denominator
    rows = [{"label": c + (" (never decided: no positive in train)" if c in untrained else ""),
             **{f"{s}: positives (%)": f"{dataset['positives'][s][c]} "
                                       f"({100 * dataset['positives'][s][c] / max(labelled[s][c], 1):.1f} %)"
                for s in splits}} for c in dataset["classes"]]
    out += "<h3>Label prevalence per split</h3>" + html_table(pd.DataFrame(rows))
    if dataset.get("entries"):
        out += (f"<h3>What the label table's cells said, per split</h3><p>Policy: {html.escape(dataset['labels'])}. "
                "Masked entries are in no loss, metric, threshold or interval.</p>"
                + html_table(pd.DataFrame(entry_rows(dataset["entries"], dataset["classes"]))))
    for split, labels in dataset.get("absent", {}).items():
        if labels:
            out += (f"<p class=warn>No positive in {split}: {html.escape(bullets(labels))}. Their {split} AUROC is "
                    "undefined and left out of the means; " + ("no threshold is chosen for them."
                                                               if split == "val" else "the record cannot test them.")
                    + "</p>")
    return out


def entry_rows(entries: dict, classes) -> list[dict]:
    """One row per label: positive / negative / uncertain / missing (masked) counts of each split."""
    return [{"label": c, **{f"{s}: +/−/?/blank (masked)": f"{e[c]['positive']} / {e[c]['negative']} / "
                                                          f"{e[c]['uncertain']} / {e[c]['missing']} ({e[c]['masked']})"
                            for s, e in entries.items()}} for c in classes]
