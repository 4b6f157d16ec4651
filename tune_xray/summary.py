"""What a search ended with: its trials by status, the best completed ones by the validation objective, where to
look next (summary.json, printed at the end), run names, and the exit code."""

from __future__ import annotations

import math

from .addresses import runs_table_url
from .config import over_limits
from .credentials import mask
from .experiment import Experiment, trial_label
from .metrics import ci_text, front
from .record.names import (
    COST_METRICS,
    JUDGED_IN_TRIAL,
    RAN_WITH,
    SSL_FROM,
    SSL_PHASE,
    SSL_TIME_ATTR,
    STARTED_FROM,
    STATUSES,
    TIME_ATTR,
    TRIAL_NUMBER,
    bare,
)
from .record.status import status_of
from .record.text import labels_averaged, no_fit_text, plural, search_model_text
from .space import Study, case_key

SINGLE_LABEL = ("accuracy", "balanced_accuracy")  # a single-label task's decision metrics, beside its AUROC


def _name_rank(key: str, value) -> int:
    """Which drawn values a run name shows first: backbones, optimizer, LR, batch size, other choices."""
    order = ("backbone", "cnn", "transformer", "optimizer.name", "optimizer.lr", "batch_size")
    return next((i for i, part in enumerate(order) if key.endswith(part)), len(order) + (not isinstance(value, str)))


def run_name(study: Study, config: dict, width: int = 72) -> str:
    """`t007 mambavision_t2 lars lr=0.2 batch_size=256 …`: the Optuna trial number, then the drawn values (as
    drawn: a smoke run's resolved backbone is in its params), labelled choices by their label."""
    words, sampled = [], study.sampled_from(config)
    for key, value in sorted(sampled.items(), key=lambda kv: _name_rank(*kv)):
        spec = study.space.params[key]
        if spec.cases is not None:
            spec = spec.cases.get(case_key(sampled.get(spec.by)), spec)
        if spec.kind == "value":
            continue
        short = key.split(".")[-1]
        if isinstance(spec.choice, dict):
            label = next((k for k, v in spec.choice.items() if v == value), value)
            words.append(f"{short}={label}")
        elif isinstance(value, str) and _name_rank(key, value) < 5 or key.endswith("scheduler.name"):
            words.append(str(value))
        elif isinstance(value, float):
            words.append(f"{short}={value:.3g}")
        else:
            words.append(f"{short}={value}")
    name = trial_label(config)
    for word in words:
        if len(name) + 1 + len(word) <= width:
            name += " " + word
    return name


def summarize(trials, requested: int, study: Study, metric: str, experiment: Experiment, tracking_uri: str,
              runs: dict[str, str], experiment_id: str, ended: set[str] | None = None, top: int = 5) -> dict:
    """Trials by status, the best *completed* trials by the validation objective, and where to look next.

    A trial that had not ended when the search returned (Ctrl-C; `ended`: the trial ids Tune ended, default
    all TERMINATED / ERROR) is `interrupted`, never pruned; fewer trials than requested also means the search
    was interrupted."""
    rows = []
    for t in trials:
        if t.status in ("TERMINATED", "ERROR") and (ended is None or t.trial_id in ended):
            status, reason = status_of(t, t.status == "ERROR")
        else:
            status, reason = "interrupted", ""
        m = t.last_result or {}
        rows.append({
            "trial": trial_label(t.config), "name": run_name(study, t.config) if TRIAL_NUMBER in t.config
            else t.trial_id, "trial_id": t.trial_id, "status": status,
            "reason": reason, metric: m.get(metric) if status == "complete" else None, TIME_ATTR: m.get(TIME_ATTR),
            **({SSL_TIME_ATTR: m[SSL_TIME_ATTR], SSL_PHASE: m.get(SSL_PHASE)} if SSL_TIME_ATTR in m else {}),
            **({SSL_FROM: m[SSL_FROM]} if m.get(SSL_FROM) else {}),  # the stored SSL phase it fine-tuned from
            "selected_epoch": m.get("selected_epoch"),
            "labels_averaged": m.get("selected_val_mean_auroc_labels"),  # what its mean AUROC is over
            "selection_ci": [m.get(f"selected_{study.metric}_selection_ci_low"),
                             m.get(f"selected_{study.metric}_selection_ci_high")],
            **({name: [m[f"selected_val_{name}"], m.get(f"selected_val_{name}_selection_ci_low"),
                       m.get(f"selected_val_{name}_selection_ci_high")] for name in SINGLE_LABEL}
               if "selected_val_balanced_accuracy" in m and status == "complete" else {}),
            **({"record_test_mean_auroc": m["record_test_mean_auroc"],  # --record-test-per-trial only
                "record_test_mean_auroc_ci": [m.get("record_test_mean_auroc_ci_low"),
                                              m.get("record_test_mean_auroc_ci_high")]}
               if "record_test_mean_auroc" in m else {}),
            "mlflow_run_id": runs.get(t.trial_id),
            "cost": {k: m[k] for k in COST_METRICS if k in m},  # measured on its device at its first epoch's end
            "node_id": m.get("node_id"),
            "scan_backend": m.get("scan_backend"),
            "ran_with": m.get(RAN_WITH),  # its device and global batch (a resume may start trials on others)
            "started_from": m.get(STARTED_FROM),  # each backbone's pretrained file and sha256, or from scratch
            "resolved": {k: v for k, v in t.config.items() if ":" not in k and not k.startswith("sampled.")},
            "sampled": {k.removeprefix("sampled."): v for k, v in t.config.items() if k.startswith("sampled.")},
        })
    objectives = [{"name": metric, "mode": study.mode}] + [{"name": k, "mode": m} for k, m in study.costs]
    return {
        "study": study.name, "file": study.origin, "metric": metric, "mode": study.mode,
        "requested": requested, "objectives": objectives, **ranked(rows, requested, objectives, top),
        "mlflow": f"mlflow ui --backend-store-uri {mask(tracking_uri)}",
        "mlflow_runs_table": runs_table_url(tracking_uri, experiment_id, f"selected_{study.metric}", study.mode),
        "optuna": f"optuna-dashboard {mask(experiment.optuna_url)}",
        "experiment_dir": str(experiment.directory),
    }


def ranked(rows: list[dict], requested: int, objectives: list[dict], top: int = 5) -> dict:
    """What a search's trial rows decide: the search's status, its trials by status, the completed ones best first
    by the objective (`best`, `top`) and, with cost objectives, the Pareto front."""
    metric, mode = objectives[0]["name"], objectives[0]["mode"]
    complete = [r for r in rows if r["status"] == "complete" and isinstance(r[metric], (int, float))
                and math.isfinite(r[metric])]
    complete.sort(key=lambda r: r[metric], reverse=mode == "max")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    interrupted = counts["interrupted"] > 0 or len(rows) < requested
    status = "interrupted" if interrupted else "complete" if complete else "no trial completed"
    return {"status": status, "trials": len(rows), **counts, "best": complete[0] if complete else None,
            "top": complete[:top], "rows": rows,
            "pareto_front": front(complete, objectives) if len(objectives) > 1 else None}


def judge_limits(summary: dict, limits: dict, where: str) -> list[dict]:
    """The hard limits a trial does not judge itself (its latency: measured while other trials may share its
    device) judged on the completed trials' costs as measured again alone (`where`, in words): a trial over one is
    `infeasible`, neither complete nor a member, with the reason; the summary ranked again. Returns the rows it
    made infeasible."""
    judged = {k: v for k, v in limits.items() if k not in JUDGED_IN_TRIAL}
    over = []
    for row in summary["rows"]:
        reason = over_limits(row.get("cost") or {}, judged) if row["status"] == "complete" else ""
        if reason:
            row.update(status="infeasible", reason=f"{reason} (measured again {where})")
            row[summary["metric"]] = None
            over.append(row)
    if over:
        summary.update(ranked(summary["rows"], summary["requested"], summary["objectives"]))
    return over


def search_model(registered: dict | None, chosen: str, by: str) -> dict | None:
    """"The search's model", one entry every reader takes it from (the summary, predict, the report, the model
    cards): the version registered under the experiment's name last — `models:/<experiment>/latest` — how it was
    chosen and what decided that it is the one."""
    if not registered:
        return None
    return {"uri": registered["uri"], "latest": f"models:/{registered['name']}/latest", "name": registered["name"],
            "version": registered["version"], "tracking_uri": registered["tracking_uri"], "chosen": chosen, "by": by}


def print_front(summary: dict) -> None:
    """The Pareto front as a table: metric, latency (batch 1 and per image at 32), parameters, GFLOPs."""
    rows, metric = summary["pareto_front"], summary["metric"]
    objectives = ", ".join("{name} ({mode})".format(**o) for o in summary["objectives"])
    again = summary.get("cost_remeasured")
    where = f"measured again on the driver's {again['device']}, alone" if again else "on each trial's device"
    print(f"Pareto front on {objectives}: {len(rows)} of {summary['complete']} completed trials (latency per "
          f"image {where})")
    print(f"    {bare(metric):>10s} {'ms (b1)':>9s} {'ms (b32)':>9s} {'params M':>9s} {'GFLOPs':>8s}  trial")
    for row in rows:
        cost = [row.get(k, math.nan) for k in ("latency_ms", "latency_ms_b32", "params_m", "gflops")]
        print(f"    {row[metric]:10.4f} {cost[0]:9.2f} {cost[1]:9.3f} {cost[2]:9.2f} {cost[3]:8.3f}  {row['name']}")


def print_summary(summary: dict, resume_command: str) -> None:
    metric = summary["metric"]
    counts = ", ".join(f"{summary[s]} {s}" for s in STATUSES if summary[s] or s == "complete")
    print(f"\n{summary['study']}: {summary['status']} — {summary['trials']} of {summary['requested']} trials: "
          f"{counts}; {'ranked by' if summary.get('pareto_front') is not None else 'objective'} {metric} "
          f"({summary['mode']}{labels_averaged(summary)}; [95 % bootstrap CI on the validation set that selected it: "
          "optimistic])"
          + ("; the Pareto front on every objective below" if summary.get("pareto_front") is not None else ""))
    for rank, row in enumerate(summary["top"], 1):
        trained = ", ".join(f"{k}={row['resolved'][k]}" for k in row["sampled"])
        ci = row.get("selection_ci", [None])
        ci = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if None not in ci else ""
        decided = "".join(f"; val {name.replace('_', ' ')} {ci_text(row[name])}" for name in SINGLE_LABEL
                          if row.get(name))
        print(f"{rank:2d}. {row[metric]:.4f}{ci}  {row['name']}  [epoch {row['selected_epoch']:.0f} of "
              f"{row[TIME_ATTR]} selected{decided}]" + (f"  trained as: {trained}" if trained else ""))
    if summary.get("pareto_front"):
        print_front(summary)
    if summary["status"] == "interrupted":
        print(f"interrupted: finished trials are kept; continue with\n    {resume_command}")
    elif summary["status"] != "complete":
        print("no trial completed: nothing to report as best (see each trial's status and reason)")
    if (summary.get("ensemble") or {}).get("fits") is False:
        print(f"ensemble: none — {no_fit_text(summary['ensemble'])}")
    if (summary.get("ensemble") or {}).get("members"):
        ens, metric = summary["ensemble"], bare(summary["metric"])
        registered = f"registered as {ens['registered']['uri']}" if ens.get("registered") else "not registered"
        val = ens["val"]
        decided = ((ens.get("single_label") or {}).get("val") or {}).get("ensemble") or {}
        print(f"ensemble ({ens['method']}, {plural(len(ens['members']), 'member')}, chosen on val): val {metric} "
              f"{ci_text(val['ensemble'])}" + "".join(f", {k.replace('_', ' ')} {ci_text(v)}" for k, v in
                                                       decided.items())
              + f" (on the selection set) vs best single {val['best_single']['value']:.4f}; {registered}; the test "
              "record is in summary.json and the report")
        cost = ens.get("cost") or {}
        if cost:
            bound = (cost.get("budget") or {}).get("latency_ms")
            print(f"  its latency: {cost.get('latency_ms_sum', math.nan):.3g} ms per image, its members' summed, "
                  f"{cost.get('latency_where', 'each measured in its trial on its device')}"
                  + (f" (budget {bound:.3g} ms)" if bound else "")
                  + (f"; {cost['served_latency_ms']:.3g} ms as served, measured on {cost['device']}"
                     if "served_latency_ms" in cost else ""))
    if summary.get("search_model") or (summary.get("ensemble") or {}).get("fits") is False:
        print(search_model_text(summary)[0].upper() + search_model_text(summary)[1:])
    for step, why in (summary.get("failed") or {}).items():
        print(f"{step} failed after the trials: {why}")
    print(f"summary: {summary['experiment_dir']}/summary.json")
    if str(summary.get("report", "")).endswith(".html"):
        print(f"report:  {summary['report']}")
    print(f"runs:    {summary['mlflow']}\n         then open {summary['mlflow_runs_table']}")
    print(f"study:   {summary['optuna']}")


def exit_code(summary: dict) -> int:
    """0: the search did what was asked; 130: interrupted (resumable); 1: no trial completed, or a step after the
    trials (repeats, ensemble, report) failed."""
    if summary["status"] == "complete" and summary.get("failed"):
        return 1
    return {"complete": 0, "interrupted": 130}.get(summary["status"], 1)
