"""Accuracy against cost (the Pareto front, every trial's latency, parameters and FLOPs, the budgeted ensemble)
and the cross-validation of the finalists (with the ensemble chosen out of fold)."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd

from ..figures import COLUMN, figure, wrap
from ..metrics import CORRECTED_T, ci_text, pareto_front
from ..record.names import bare
from ..record.text import cost_lines, plural
from .common import html_table, log_axis


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
    out += html_table(pd.DataFrame(table), escape=False)
    if cost.get("ensemble"):
        said = "; ".join(html.escape(line[2:]) for line in cost_lines(cost["ensemble"]))
        out += "<p>The ensemble chosen at the end: " + re.sub(r"`([^`]*)`", r"<code>\1</code>", said) + ".</p>"
    return out


def render_cv(cv: dict, metric: str) -> str:
    """The finalists cross-validated: each fold's value, the mean and its corrected resampled t-interval, the
    pooled out-of-fold metric, beside the single split's value and rank."""
    rows, name = cv["rows"], bare(metric)
    out = (f"<p>The {len(rows)} best configurations, each trained on {cv['folds']} "
           f"{cv.get('grouped', 'patient-grouped')}, "
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
                        label="mean, 95 % corrected resampled t" if i == 0 else None)
            ax.scatter(r["single_split"], i, marker="x", color="k", s=60,
                       label="the search's split" if i == 0 else None)
        ax.set_yticks(range(len(rows)), [wrap(r["name"], 40) for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(f"val {name}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))

    out += figure(folds, COLUMN, 1.0 + 0.7 * len(rows), f"val {name} of each fold, per configuration")
    table = [{"CV rank": r["cv_rank"], "configuration": html.escape(r["name"]),
              f"folds' val {name}": ", ".join(f"{v:.4f}" for v in r["values"]),
              f"mean ± sd [95 % {CORRECTED_T}]":
                  f"{r['mean']:.4f} ± {r['sd']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
              "out of fold, pooled [95 % CI]": ci_text(r["oof"]), "search rank": r["search_rank"],
              "single split": r["single_split"]} for r in rows]
    return out + html_table(pd.DataFrame(table), escape=False)
