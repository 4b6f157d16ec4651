"""What the search's driver costs per trial, and whether that stays flat as trials accumulate.

N trials (default 1,000) of the real search path — the Optuna searcher (ask/tell on its storage), ASHA, the
concurrency limiter, the MLflow callback (a child run per trial with its params, a metric batch per result, its
end), the console lines, summary.json — with training replaced by a trainable that reports E epochs of made-up
metrics at once; no ensemble, no report. Prints the driver process's CPU ms per trial (every thread of the driver:
Tune's loop, Ray's core worker, the callbacks) and wall ms per trial, for the first and the last 10 % of trials,
and their ratio. Goal (issue 28): ≤ 20 ms of driver CPU per trial at 1,000 trials on sqlite, and last / first ≤ 1.5.

Ray Tune's own scalability release test runs 10,000 one-second trials on 16 CPUs in 715 s against 625 s ideal
(≈ 9 ms of driver time per trial).

    python scripts/bench_driver.py [--trials 1000] [--epochs 5] [--stores sqlite,postgresql]

`postgresql`: Optuna on a PostgreSQL server and MLflow on an `mlflow server` with its backend on the same
PostgreSQL (tune_xray.cluster.LocalServices: pgserver's PostgreSQL binaries, started here and stopped after).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_xray.trial as trial_module  # noqa: E402
from tune_xray.command import build_parser  # noqa: E402
from tune_xray.config import objective  # noqa: E402
from tune_xray.request import SearchRequest  # noqa: E402

SPACE = {  # a study like the shipped ones: a choice, a log-uniform, a conditional; 6 epochs of budget
    "metric": "val_mean_auroc",
    "budget": {"trials": 10, "epochs": 6, "grace_period": 1, "reduction_factor": 3},
    "base": {"data": {"synthetic_images": 300, "synthetic_size": 64, "cache_size": 64},
             "augment": {"image_size": 56}, "model": {"backbone": "test_resnet"}},
    "params": {"supervised.optimizer.name": {"choice": ["adamw", "sgd"]},
               "supervised.optimizer.lr": {"loguniform": [1.0e-4, 1.0e-1]},
               "supervised.scheduler.name": {"choice": ["none", "cosine"]},
               "supervised.scheduler.t_max": {"choice": [6, 12], "when": {"supervised.scheduler.name": "cosine"}},
               "supervised.batch_size": {"choice": [16, 32, 64]}},
}


def made_up_trial(config: dict, *, resolved, resources, storage_path, max_failures) -> None:
    """In place of trial_driver (same signature): the epochs' reports of a trial, at once (a val AUROC from the
    drawn LR), then the final record a finished trial reports."""
    metric = resolved.study.metric
    best, lr = 0.0, config.get("supervised.optimizer.lr", 1e-3)
    rng = random.Random(config[trial_module.TRIAL_NUMBER])
    epochs = int(os.environ.get("BENCH_DRIVER_EPOCHS", "5"))  # Ray's workers inherit the driver's environment
    for epoch in range(1, epochs + 1):
        value = 0.5 + 0.4 * (1 - abs(lr - 3e-3) / 0.1) * epoch / epochs + 0.02 * rng.random()
        best = max(best, value)
        report = {"epoch": epoch, "train_loss": 1 / epoch, "val_loss": 1 / epoch + 0.1, metric: value,
                  objective(metric): best, trial_module.TIME_ATTR: epoch, trial_module.SCAN_BACKEND: "none",
                  "latency_ms": 1.0, "params_m": 0.4}
        if epoch < epochs:
            tune.report(report)
    tune.report({**report, trial_module.FINISHED: 1.0, trial_module.STATUS: "complete", "selected_epoch": epochs,
                 f"selected_{metric}": best, f"selected_{metric}_selection_ci_low": best - 0.1,
                 f"selected_{metric}_selection_ci_high": best + 0.05})


class DriverClock(tune.Callback):
    """The driver process's CPU time and the wall clock at each trial's end, in order."""

    def __init__(self):
        self.ticks: list[tuple[float, float]] = []

    def setup(self, **info) -> None:
        self.ticks.append((time.process_time(), time.perf_counter()))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ticks.append((time.process_time(), time.perf_counter()))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)


def per_trial(ticks: list[tuple[float, float]], first: int, last: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per trial ended between tick `first` and tick `last`."""
    n = last - first
    return 1000 * (ticks[last][0] - ticks[first][0]) / n, 1000 * (ticks[last][1] - ticks[first][1]) / n


def run(store: str, trials: int, epochs: int, work: Path, services=None) -> dict:
    from tune_xray.pipeline import run_search

    os.environ["BENCH_DRIVER_EPOCHS"] = str(epochs)
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    argv = [str(space), "--trials", str(trials), "--storage", str(work / store), "--name", f"driver-{store}",
            "--no-ensemble", "--no-report", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0"]
    if services is not None:
        argv += ["--optuna-storage", services.postgres_url("optuna"), "--tracking-uri", services.mlflow_url]
    request = SearchRequest.from_values(vars(build_parser().parse_args(argv)), command=" ".join(argv))
    clock = DriverClock()
    start = time.perf_counter()
    summary = run_search(request, extra_callbacks=[clock])
    wall = time.perf_counter() - start
    ticks, tenth = clock.ticks, max(1, trials // 10)
    return {"store": store, "trials": summary["trials"], "complete": summary["complete"],
            "pruned": summary["pruned"], "wall_s": wall, "first": per_trial(ticks, 0, tenth),
            "last": per_trial(ticks, len(ticks) - 1 - tenth, len(ticks) - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5, help="reports per trial (the budget is 6 epochs)")
    parser.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgresql")
    args = parser.parse_args()
    os.environ.setdefault("TUNE_XRAY_CACHE", tempfile.mkdtemp(prefix="bench-driver-cache-"))
    trial_module.trial_driver = made_up_trial  # the search path as it is, training replaced
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        for store in args.stores.split(","):
            work = Path(tmp) / store
            work.mkdir()
            if store == "postgresql":
                from tune_xray.cluster import LocalServices

                with LocalServices(work / "services", s3=False) as services:
                    rows.append(run(store, args.trials, args.epochs, work, services))
            else:
                rows.append(run(store, args.trials, args.epochs, work))
            import ray

            ray.shutdown()
    print(f"\n{args.trials} trials of {args.epochs} reports each; driver CPU and wall per trial, first and last 10 %")
    print(f"{'store':>11s} {'trials':>7s} {'CPU ms first':>13s} {'CPU ms last':>12s} {'last/first':>10s} "
          f"{'wall ms first':>14s} {'wall ms last':>13s} {'total s':>8s}")
    for r in rows:
        (cpu_first, wall_first), (cpu_last, wall_last) = r["first"], r["last"]
        print(f"{r['store']:>11s} {r['trials']:>7d} {cpu_first:13.1f} {cpu_last:12.1f} {cpu_last / cpu_first:10.2f} "
              f"{wall_first:14.1f} {wall_last:13.1f} {r['wall_s']:8.0f}")


if __name__ == "__main__":
    main()
