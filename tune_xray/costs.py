"""The cost re-measurement after the search: a trial's latency measured again alone, where it is fair, and the
limits no trial judges itself judged on those figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import tracking
from .driver import driver_device
from .experiment import Experiment
from .metrics import pareto_ranks
from .record.names import JUDGED_IN_TRIAL
from .record.text import plural
from .request import SearchRequest
from .serving import EnsemblePredictor, ms_per_image, read_image
from .summary import judge_limits, ranked


def needed(summary: dict, request: SearchRequest) -> tuple[dict, dict]:
    """What of the study's asks (the record's `asked`) makes a trial's latency decide something after the trials:
    (the limits judged here — a latency limit, judged alone, never in the trial — and the ensemble's budget, where
    the search chooses an ensemble). Both empty and no cost objective (a Pareto search): nothing to measure."""
    asked = summary.get("asked") or {}
    judged = {k: v for k, v in (asked.get("limits") or {}).items() if k not in JUDGED_IN_TRIAL}
    budget = {} if request.no_ensemble else {k: v for k, v in (asked.get("ensemble") or {}).items() if v is not None}
    return judged, budget


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's step, where a trial's latency decides something (needed): the latency of the trials whose cost
    does (the front and the next, or every candidate under the ensemble's budget or a latency limit) measured again
    here, alone (remeasure_costs), said in one line; then the limits no trial judges itself (its latency) judged on
    those figures: a trial over one is infeasible, its MLflow run said so, each in one line. Returns the record as
    it leaves it: the rows' costs, the front, and — where a trial became infeasible — the statuses and the ranking
    are its part ({} where nothing decides on latency)."""
    summary = experiment.summary()
    judged, budget = needed(summary, request)
    costs = [(o["name"], o["mode"]) for o in summary["objectives"][1:]]  # (after the validation metric)
    if not (judged or budget or costs):
        return {}
    device = driver_device()  # with no trial running
    done = remeasure_costs(experiment, summary, costs, budget, device, judged)
    if done:
        summary["cost_remeasured"] = done
        # the record's best, top and front are copies of rows (JSON keeps no shared objects): made again from the
        # rows as re-measured
        summary.update(ranked(summary["rows"], summary["requested"], summary["objectives"]))
        print(f"latency: {plural(len(done['trials']), 'trial')} measured again on the driver's {device}, alone "
              f"({done['why']}; batch 1 and 32, median of up to 10 runs); their in-trial figures kept as "
              "cost_in_trial")
    over = judge_limits(summary, judged, f"alone on the driver's {device}, after the trials")
    for row in over:
        print(f"{row['name']}: infeasible, {row['reason']}", flush=True)
        if row["mlflow_run_id"]:
            tracking.mark_runs(experiment.tracking_uri, {row["trial_id"]: row["mlflow_run_id"]}, "infeasible",
                               row["reason"])
    return summary


def remeasure_costs(experiment: Experiment, summary: dict, costs: list, budget: dict, device: str,
                    judged: dict | None = None) -> dict | None:
    """Latency measured where it is fair: a trial measures its own at its first epoch's end, on a device it may
    share with packed trials, or on another node's hardware. After the trials, with none running, each completed
    trial whose cost decides something is measured again here, alone, on the driver's `device`, as served
    (serving.EnsemblePredictor: decoding to its cache layout, its eval views and TTA): `latency_ms` at batch 1 and
    `latency_ms_b32` per image at batch 32, each the median of up to 10 runs after a warm-up. Measured: in a
    Pareto search (`costs`), the trials on the front and on the next front (the candidates it could move); under an
    ensemble `budget`, or hard limits judged here (`judged`: a latency limit, which no trial judges on a figure taken
    while it shared its device), every completed trial. Those numbers replace the row's `cost`
    entries — the budgeted ensemble sums them, the front and the report use them — and the trial's own are kept as
    `cost_in_trial` ("measured while training"). Returns what was done (None: nothing to measure)."""
    complete = [r for r in summary["rows"] if r["status"] == "complete" and r.get("cost")]
    metric, mode = summary["metric"], summary["mode"]
    if any(v is not None for v in (budget or {}).values()) or judged:
        chosen = complete
    elif costs:
        names = [metric, *(name for name, _ in costs)]
        points = [[r[metric] if n == metric else r["cost"].get(n, math.nan) for n in names] for r in complete]
        ranks = pareto_ranks(np.array(points, dtype=float), [mode, *(m for _, m in costs)]) if points else []
        chosen = [r for r, rank in zip(complete, ranks) if rank <= 1]
    else:
        return None
    for row in chosen:
        directory = experiment.trial_dir(row)
        predictor = EnsemblePredictor([str(directory / "best.pt")], [1.0], device=device)
        image = read_image(pd.read_csv(directory / "predictions_val.csv", usecols=["path"], nrows=1)["path"][0])
        row["cost_in_trial"] = {k: row["cost"][k] for k in ("latency_ms", "latency_ms_b32") if k in row["cost"]}
        row["cost"].update(latency_ms=ms_per_image(predictor, image, 1, device),
                           latency_ms_b32=ms_per_image(predictor, image, 32, device))
    why = "the trials on the Pareto front and on the next front"
    if judged:
        why = "every completed trial, each judged against the study's latency limit"
    elif chosen is complete:
        why = "every completed trial, each a candidate under the ensemble's budget"
    return {"device": device, "trials": [r["trial"] for r in chosen], "batch_sizes": [1, 32], "repeats": 10,
            "why": why}
