"""`python -m tune_xray.repeat EXPERIMENT_DIR --top N --seeds K`: the best N completed configurations of a search
run again with K new seeds, at full budget and without ASHA, as Tune trials beside the search (`repeats/`) and
MLflow children of its parent run (tagged `tune_xray.repeat_of`).

S0 published 0.853 vs 0.849 from single runs whose seed-to-seed noise is ≈0.004. Each configuration gets its
validation metric over the fresh seeds: mean ± sd and a 95 % t-interval. The search's own trial is reported apart:
it was chosen for being best, so it counts a winner's luck (the winner's curse) and stays out of the mean. The
best configuration is compared with each other one by a hierarchical bootstrap — resampling seeds (matched by
index), then patients (images where there are none) with the same resamples for both — so that seed-to-seed
variance is part of the verdict: a difference whose interval holds 0 is within noise. Sets of repeats
accumulate: each run adds new seeds. The ensemble's pool then includes them. `python -m tune_xray.search …
--repeats K --repeat-top N` runs this at the end of a search.

    python -m tune_xray.repeat tune_xray_runs/byol-smoke --top 3 --seeds 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import tracking
from .config import ConfigError
from .experiment import Experiment, TrialTask, read_predictions, repeat_name
from .metrics import interval, patient_bootstrap, split_scorer
from .record.names import REPEAT_OF, REPEAT_SEED, REPEATS_DIR
from .record.text import plural
from .request import SearchRequest
from .rerun import Rerun, finalist_configs, rerun_main


def repeat_configs(summary: dict, top: int, seeds: list[int]) -> list[dict]:
    """The Tune configs of the repeats: each of the `top` best completed trials' config once per seed."""
    return finalist_configs(summary, top, REPEAT_OF, [{REPEAT_SEED: seed} for seed in seeds])


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of a mean over seeds (NaN for fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def compare(by_config: dict[str, list[Path]], best: str, task: str, metric: str, classes: list[str], rule: str,
            resamples: int = 1000, seed: int = 0, untrained=()) -> list[dict]:
    """best − each other configuration on val over their fresh seeds: the point difference of the seed means and
    its 95 % interval from a hierarchical bootstrap — each resample draws seeds with replacement (pairs matched by
    index), then patients, the same for both configurations — so seed-to-seed variance enters the verdict (with
    patients alone, two seeds would look like certainty)."""
    _, y, groups, _ = read_predictions(by_config[best][0], "val", classes)
    score = split_scorer(y, task, metric, classes, rule, untrained=untrained)
    boot = patient_bootstrap(groups, resamples, seed)
    rng = np.random.default_rng(seed)

    def per_seed(dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """(seeds,) values and (seeds, resamples) values under each patient resample."""
        probs = [read_predictions(d, "val", classes)[3] for d in dirs]
        return np.array([score(p)[0] for p in probs]), np.stack([score(p, boot) for p in probs])

    out = []
    for other, dirs in by_config.items():
        if other == best:
            continue
        n = min(len(dirs), len(by_config[best]))
        (a, a_boot), (b, b_boot) = per_seed(by_config[best][:n]), per_seed(dirs[:n])
        seeds = rng.integers(0, n, size=(resamples, n))  # a resample of the seed pairs for each patient resample
        columns = np.arange(resamples)[:, None]
        differences = (a_boot[seeds, columns] - b_boot[seeds, columns]).mean(1)
        low, high = interval(differences)
        out.append({"best": best, "other": other, "seeds": n, "difference": float(a.mean() - b.mean()),
                    "ci_low": low, "ci_high": high, "within_noise": bool(low <= 0 <= high)})
    return out


def run_repeats(experiment: Experiment, top: int = 3, seeds: int = 3, address: str | None = None,
                max_failures: int = 1, verbose: bool = False) -> dict:
    """Run the repeats of a finished search and add them to its summary.json (`repeats`); returns that entry."""
    rerun = Rerun(experiment, "repeat")
    if top < 1 or seeds < 1:
        raise ConfigError(f"--top and --seeds must be at least 1 (got {top}, {seeds})")
    summary = rerun.summary
    base_seed = rerun.resolved.trial_config({}).seed
    earlier = summary.get("repeats") or {}  # sets of repeats accumulate: new seeds after the earlier ones
    done_seeds = len(earlier.get("seeds", []))
    new_seeds = [base_seed + 1000 * k for k in range(done_seeds + 1, done_seeds + seeds + 1)]

    def describe(config: dict) -> tracking.TrialRecord:
        return rerun.record(config, f"seed={config[REPEAT_SEED]}", {
            tracking.REPEAT_TAG: config[REPEAT_OF], "tune_xray.repeat_seed": str(config[REPEAT_SEED])})

    start = time.perf_counter()
    rows = rerun.run(repeat_configs(summary, top, new_seeds), REPEATS_DIR, repeat_name, describe, "repeats",
                     "the repeats were interrupted; run tune_xray.repeat again", max_failures, address, verbose)
    trials = [{"trial": f"{r['config'][REPEAT_OF]}/seed{r['config'][REPEAT_SEED]}", "repeat_of": r["config"][REPEAT_OF],
               "seed": r["config"][REPEAT_SEED], "name": describe(r["config"]).name,
               **{k: v for k, v in r.items() if k != "config"}} for r in rows]
    entry = aggregate(summary, earlier.get("trials", []) + trials, rerun.study, rerun.metric)
    entry.update(seeds=earlier.get("seeds", []) + new_seeds, sets=earlier.get("sets", 0) + 1,
                 wall_time_s=earlier.get("wall_time_s", 0) + time.perf_counter() - start)
    summary["repeats"] = entry
    experiment.write_summary(summary)
    return entry


def aggregate(summary: dict, trials: list[dict], study, metric: str) -> dict:
    """Per configuration: the search's own trial (`selection_run`, apart) and its fresh seeds' values, their mean ±
    sd and t-interval; ranked by that mean; and the best's paired comparison with each other."""
    by_config: dict[str, list[Path]] = {}
    rows = []
    for source, original in {r["trial"]: r for r in summary["top"]}.items():
        done = [t for t in trials if t["repeat_of"] == source and t["status"] == "complete"]
        if not done:
            continue
        values = np.array([t[metric] for t in done], dtype=float)
        low, high = t_interval(values)
        rows.append({"config": source, "name": original["name"], "selection_run": original[metric],
                     "seeds": len(values), "mean": float(values.mean()),
                     "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"), "ci_low": low,
                     "ci_high": high, "values": [float(v) for v in values]})
        by_config[source] = [Path(t["dir"]) for t in done]
    rows.sort(key=lambda r: r["mean"], reverse=study.mode == "max")
    comparisons = []
    if len(rows) > 1:
        task = TrialTask.of(by_config[rows[0]["config"]][0])
        comparisons = compare(by_config, rows[0]["config"], task.task, study.metric, task.classes, task.rule,
                              untrained=task.untrained)
    return {"rows": rows, "comparisons": comparisons, "trials": trials}


def wanted(request: SearchRequest) -> bool:
    return bool(request.repeats)


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's step: `--repeats` new seeds of its `--repeat-top` best (run_repeats), said in a table; returns
    its part of the record (`repeats`)."""
    entry = run_repeats(experiment, request.repeat_top, request.repeats, max_failures=request.max_failures)
    print_repeats(entry)
    return {"repeats": entry}


def main(argv=None) -> int:
    return rerun_main(argv, "python -m tune_xray.repeat", __doc__, ("--seeds", 3, "new seeds per configuration"),
                      run_repeats, print_repeats, "repeat")


def print_repeats(entry: dict) -> None:
    print(f"\nrepeats: {plural(len(entry['trials']), 'trial')} in {plural(entry.get('sets', 1), 'set')}, "
          f"seeds {entry['seeds']}")
    for row in entry["rows"]:
        print(f"  {row['mean']:.4f} ± {row['sd']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] over "
              f"{row['seeds']} fresh seeds  {row['name']}  (the search's own run, apart: {row['selection_run']:.4f})")
    for c in entry["comparisons"]:
        verdict = "within noise" if c["within_noise"] else "a real difference"
        print(f"  {c['best']} − {c['other']}: {c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
              f"(resampling {c['seeds']} seeds and the patients): {verdict}")


if __name__ == "__main__":
    sys.exit(main())
