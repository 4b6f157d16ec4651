"""The search itself: Optuna's history, fANOVA importance, parallel coordinates and slices, ASHA's epochs per
trial, and every trial's row."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from ..experiment import Experiment
from ..figures import COLUMN, figure, integer_ticks, pyplot, wrap
from ..metrics import ci_text
from ..record.names import bare
from ..record.text import plural
from ..space import short_names
from .common import html_table, log_axis


def _logical(key: str) -> str:
    """An Optuna parameter's logical name: `byol.optimizer.lr:sgd` (one per optimizer) → `byol.optimizer.lr`."""
    return key.split(":")[0]


def _plain_value(value):
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)


def search_data(experiment: Experiment, summary: dict) -> dict:
    """The finished trials with one value per logical parameter — the value each trained with (the LR whatever
    the optimizer; a conditional parameter only where it applied) — their objective and status (an infeasible
    trial's value, at the epoch its cost ended it, apart: never among the completed); fANOVA importance over the
    parameters every completed trial has, when enough completed; ASHA's epochs per trial."""
    import optuna

    from ..searcher import optuna_storage

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
        status = row.get("status", t.state.name.lower())
        # an infeasible trial is COMPLETE in Optuna (its constraints tell it so), never a completed trial here
        told = t.values[0] if t.state.name == "COMPLETE" else None
        trials.append({"number": t.number, "state": t.state.name, "status": status,
                       "value": told if status == "complete" else None,
                       "infeasible_value": told if status == "infeasible" else None, "params": params,
                       "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
                       "ssl_probe": t.user_attrs.get("ssl_probe") or {}})
    direction = study.directions[0].name  # the validation metric's (a Pareto search's costs follow it)
    importance, why = _importance(trials, keys, log, direction)
    asha = [{"trial": r["trial"], "epochs_done": r["epochs_done"], "status": r["status"],
             "ssl_epochs_done": r.get("ssl_epochs_done"), "ssl_phase": r.get("ssl_phase")} for r in summary["rows"]
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


def _objective(search: dict) -> tuple[list[dict], bool]:
    """The completed trials, and whether the study maximises."""
    return [t for t in search["trials"] if t["value"] is not None], search["direction"] == "MAXIMIZE"


def render_search(search: dict, metric: str) -> str:
    complete, maximize = _objective(search)
    short, log = search["short"], set(search["log"])
    n, total = len(complete), len(search["trials"])
    infeasible = [t for t in search["trials"] if t.get("infeasible_value") is not None]

    def history(fig):
        ax = fig.add_subplot()
        pruned = [(t["number"], list(t["intermediate_values"].values())[-1]) for t in search["trials"]
                  if t["value"] is None and t.get("infeasible_value") is None and t["intermediate_values"]]
        if pruned:
            ax.scatter(*zip(*pruned), marker="x", color="0.6", label="stopped early: its last value")
        if infeasible:
            ax.scatter([t["number"] for t in infeasible], [t["infeasible_value"] for t in infeasible], marker="s",
                       facecolor="none", edgecolor="tab:brown", label="infeasible (over a hard limit): its value")
        if complete:
            x, y = [t["number"] for t in complete], [t["value"] for t in complete]
            ax.scatter(x, y, color="C0", zorder=3, label="completed")
            best = np.maximum.accumulate(y) if maximize else np.minimum.accumulate(y)
            ax.step(x, best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial (Optuna number)")
        ax.set_ylabel(metric)
        integer_ticks(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))

    out = (f"<h3>Optimisation history</h3><p class=note>{plural(n, 'completed trial')} of {total} finished"
           + (f"; {len(infeasible)} infeasible (over a study's hard limit), shown apart and in no line, importance "
              "or plot of the completed" if infeasible else "") + ".</p>"
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


def _colours(values: np.ndarray):
    import matplotlib

    pyplot()
    return matplotlib.colormaps["viridis"], matplotlib.colors.Normalize(float(values.min()), float(values.max()))


def _mappable(cmap, norm):
    import matplotlib.cm

    return matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


STATUS_COLOURS = {"complete": "tab:green", "pruned": "tab:orange", "infeasible": "tab:brown", "diverged": "tab:red",
                  "collapsed": "tab:pink", "error": "tab:gray", "interrupted": "tab:purple"}


def _asha(search: dict) -> str:
    rows = search["asha"]

    ssl = [r for r in rows if r.get("ssl_epochs_done") is not None]
    phase = str(ssl[0]["ssl_phase"]).upper() if ssl else ""

    def rungs(fig):
        from matplotlib.patches import Patch

        panels = [("ssl_epochs_done", f"{phase} epochs run")] if ssl else []
        axes = fig.subplots(1, len(panels) + 1, sharey=True, squeeze=False)[0]
        for ax, (key, label) in zip(axes, [*panels, ("epochs_done", "fine-tune epochs run")]):
            ax.barh([r["trial"] for r in rows], [r.get(key) or 0 for r in rows],
                    color=[STATUS_COLOURS.get(r["status"], "k") for r in rows])
            ax.set_xlabel(label)
            integer_ticks(ax)
        axes[0].invert_yaxis()
        axes[-1].legend(handles=[Patch(color=c, label=s) for s, c in STATUS_COLOURS.items()
                                 if any(r["status"] == s for r in rows)], loc="upper left", bbox_to_anchor=(1.01, 1))

    total = sum(r["epochs_done"] or 0 for r in rows)
    full = max((r["epochs_done"] or 0) for r in rows) * len(rows) if rows else 0
    ssl_total = sum(r["ssl_epochs_done"] for r in ssl)
    ssl_full = max((r["ssl_epochs_done"] for r in ssl), default=0) * len(ssl)
    out = (f"<h3>ASHA: epochs spent per trial</h3><p>{plural(total, 'trial-epoch')} of fine-tuning in all over "
           f"{plural(len(rows), 'trial')}; a full budget for every trial would have been {full}."
           + (f" {phase}: {plural(ssl_total, 'SSL epoch')} in all (the longest phase's length for every trial: "
              f"{ssl_full})." if ssl else "") + "</p>")
    out += (figure(rungs, 8 + 3 * bool(ssl), 0.32 * len(rows) + 1.2,
                   f"{phase + ' and ' if ssl else ''}fine-tune epochs each trial ran, by status") if rows else "")
    return out + _probe_curves(search["trials"], phase)


def _probe_curves(trials: list[dict], phase: str) -> str:
    """The representation probe (phases.probe) of each trial along its SSL phase: what ASHA judged it on there."""
    curves = [(t["number"], t["status"], sorted((int(k), v) for k, v in t["ssl_probe"].items()))
              for t in trials if t.get("ssl_probe")]
    if not curves:
        return ""

    def draw(fig):
        ax = fig.add_subplot()
        for number, status, points in curves:
            ax.plot(*zip(*points), marker="o", color=STATUS_COLOURS.get(status, "k"), alpha=0.8,
                    label=f"t{number:03d} ({status})")
        ax.set_xlabel(f"{phase} epoch")
        ax.set_ylabel("probe: weighted kNN, val")
        integer_ticks(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")

    return ("<h3>The representation probe during self-supervision</h3><p class=note>A weighted kNN on the frozen "
            "backbone's features (20 neighbours, DINO's rule), scored with the study's metric on validation at each "
            f"probed {phase} epoch: what ASHA's SSL rungs compare and what ends a phase at chance as collapsed.</p>"
            + figure(draw, 9, 3.6, f"the probe of each trial along its {phase} phase"))


def render_trials(trials: list[dict], metric: str) -> str:
    """Every trial, one row: what it was, how it ended, its number, its MLflow run."""
    rows = [{"trial": html.escape(t["name"]), "status": t["status"], "epochs": t["epochs"] if t["epochs"] is not None
             else "", f"{bare(metric)} [95 % CI, selection set]": ci_text(t["value"], *(t["ci"] or [None, None])),
             "why it ended": html.escape(t["reason"]),
             "MLflow": f'<a href="{html.escape(t["url"])}">run</a>' if t["url"] else ""} for t in trials]
    return ("<p class=note>The links open the run in the MLflow UI the search printed (<code>mlflow ui</code> "
            "running).</p>" + html_table(pd.DataFrame(rows), escape=False))
