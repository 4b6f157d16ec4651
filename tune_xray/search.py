"""`python -m tune_xray.search STUDY`: a search-space file run as Ray Tune + Optuna (TPE) + ASHA, each trial
a Ray Train run, every trial an MLflow child run. Optimises the study's validation metric (default val mean
AUROC, max); test metrics are logged for the record and never read by the searcher or the scheduler.

    python -m tune_xray.search byol --smoke                 # the BYOL ablation at tiny scale (CPU, minutes)
    python -m tune_xray.search byol --data nih:/data/nih --gpus-per-trial 1 --cpus-per-trial 8
    python -m tune_xray.search byol --resume                # continue an interrupted search
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, merge, parse_overrides
from .data.splits import DataError
from .models import WeightsError
from .space import Study, load_study

RAY_ENV = {
    # Train's controller polls workers this often (default 2 s): 0.5 s cuts per-report latency (STACK_NOTES)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
LOCAL_RAY_ENV = {
    # Ray runs workers at nice 15, so on a small machine its own processes preempt the training threads:
    # 4.6 → 3.7 s per epoch, 3.0 s without Ray (2 cores, bench_search_overhead.py)
    "RAY_worker_niceness": "0",
}


def _init_ray(address: str | None, verbose: bool) -> None:
    """Join the cluster at `address` (or the one `ray start` left running here), or start a local one.

    A local start passes RAY_ENV by inheritance: a job-level runtime_env would keep Ray's prestarted worker
    processes from being used, and each actor of a trial would start its own (bench_search_overhead.py).
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init itself resolves

    if address is None and canonicalize_bootstrap_address(None) is None:
        for key, value in {**RAY_ENV, **LOCAL_RAY_ENV}.items():
            os.environ.setdefault(key, value)  # the raylet and its workers inherit the driver's environment
        ray.init(log_to_driver=verbose)
    else:
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=verbose)


def check_candidates(study: Study, overrides: dict, smoke: bool) -> None:
    """Before Ray starts: every backbone a trial could draw is a timm model (ours included) and every weights
    file it could load exists here — a trial that would only fail on its worker is one error now."""
    import timm

    from . import models  # noqa: F401  (registers MambaVision and VMamba)

    for where, key, value in study.candidates():
        cfg = study.trial_config({key: value}, overrides, smoke)
        names = {"model.backbone": cfg.model.backbone}
        if cfg.cass.enabled:
            names = {"cass.cnn": cfg.cass.cnn, "cass.transformer": cfg.cass.transformer}
        for field, name in names.items():
            if not timm.is_model(name.split(".")[0]):
                raise ConfigError(f"{study.origin}: {where}={value!r}: {field} '{name}' is not a timm model")
        path = cfg.model.pretrained_path
        if path and not Path(path).is_file():
            raise ConfigError(f"{study.origin}: {where}={value!r}: model.pretrained_path {path}: no such "
                              "file (weights load from local files only)")


def _optuna_search(study: Study, name: str, experiment_dir: Path, seed: int, metric: str):
    """OptunaSearch (TPE, seeded) on the study's define-by-run space, its study in sqlite beside the experiment.

    Differs from Ray's in two ways: results without the metric (the BYOL phase) are not told to Optuna,
    and a trial that ASHA stopped before its own end is told as PRUNED, not COMPLETE with a truncated value
    (which would mislead TPE)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from .trial import FINISHED, TIME_ATTR

    class PrunedAwareOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict):
            if self.metric in result and trial_id not in self._completed_trials:
                self._ot_trials[trial_id].report(result[self.metric], int(result.get(TIME_ATTR, 0)))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if not error and result is not None and not result.get(FINISHED) and trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result, error)

    storage = optuna.storages.RDBStorage(f"sqlite:///{(experiment_dir / 'optuna.db').resolve()}")
    return PrunedAwareOptunaSearch(
        space=study.sample, metric=metric, mode=study.mode, sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=name, storage=storage, points_to_evaluate=study.warm_start_points() or None)


def summarize(results, study: Study, metric: str, experiment_dir: Path, tracking_uri: str, top: int = 5) -> dict:
    """Top trials by the validation objective, their key parameters, and where to look next."""
    from .trial import FINISHED, TIME_ATTR

    rows = []
    for r in results:
        m = r.metrics or {}
        value = m.get(metric)
        rows.append({
            "trial_id": m.get("trial_id"),
            "status": "error" if r.error else ("complete" if m.get(FINISHED) else "pruned"),
            metric: value, TIME_ATTR: m.get(TIME_ATTR),
            "test_mean_auroc (record only)": m.get("test_mean_auroc"),
            "params": {k: v for k, v in (r.config or {}).items() if ":" not in k},
        })
    scored = [r for r in rows if isinstance(r[metric], (int, float)) and not math.isnan(r[metric])]
    scored.sort(key=lambda r: r[metric], reverse=study.mode == "max")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("complete", "pruned", "error")}
    return {
        "study": study.name, "file": study.origin, "metric": metric, "mode": study.mode, "trials": len(rows),
        **counts, "best": scored[0] if scored else None, "top": scored[:top],
        "mlflow": f"mlflow ui --backend-store-uri {tracking_uri}",
        "optuna": f"optuna-dashboard sqlite:///{(experiment_dir / 'optuna.db').resolve()}",
        "experiment_dir": str(experiment_dir),
    }


def print_summary(summary: dict) -> None:
    metric = summary["metric"]
    print(f"\n{summary['study']}: {summary['trials']} trials — {summary['complete']} complete, "
          f"{summary['pruned']} pruned by ASHA, {summary['error']} errored; objective {metric} ({summary['mode']})")
    for rank, row in enumerate(summary["top"], 1):
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        print(f"{rank:2d}. {row[metric]:.4f}  [{row['status']}, {row['epochs_done']} epochs]  {params}")
    print(f"summary: {summary['experiment_dir']}/summary.json")
    print(f"runs:    {summary['mlflow']}")
    print(f"study:   {summary['optuna']}")


def run_search(args, extra_callbacks: list = ()) -> dict:
    """Validate everything, then run (or resume) the search; returns the summary written to summary.json.

    `extra_callbacks`: more Tune callbacks (tests use one to interrupt a search)."""
    study = load_study(args.study)  # every search-space error before Ray starts
    overrides = parse_overrides(args.overrides)
    if args.data:
        overrides = merge(overrides, {"data": {"source": args.data}})
    base_cfg = study.trial_config({}, overrides, args.smoke)
    check_candidates(study, overrides, args.smoke)
    budget = study.budget(args.smoke)
    trials = args.trials or budget.trials
    storage = Path(args.storage).resolve() if "://" not in args.storage else args.storage
    name = args.name or f"{study.name}{'-smoke' if args.smoke else ''}"
    experiment_dir = Path(storage) / name if isinstance(storage, Path) else Path(args.local_dir).resolve() / name
    if experiment_dir.exists() and not args.resume and (experiment_dir / "tuner.pkl").exists():
        raise ConfigError(f"{experiment_dir} holds an earlier search '{name}': pass --resume, or --name for a new one")

    from .data.loader import prepare
    prepare(base_cfg.data)  # check and cache the data once, before any trial starts

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # BYOL-phase reports carry no objective
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from . import tracking
    from .trial import TIME_ATTR, TrialResources, trial_driver, tune_metric

    experiment_dir.mkdir(parents=True, exist_ok=True)
    metric = tune_metric(study.metric)
    tracking_uri = args.tracking_uri or tracking.default_tracking_uri(experiment_dir)
    if not ray.is_initialized():
        # keep the dashboard (ray[default]'s State API): without it a Train run stopped by ASHA leaks its
        # placement group and the next trial waits for resources forever
        _init_ray(args.address, args.verbose)
    resources = TrialResources(args.workers_per_trial, args.cpus_per_trial, args.gpus_per_trial)
    parent = tracking.start_parent(tracking_uri, name, experiment_dir,
                                   {"study": study.origin, "trials": trials, "smoke": args.smoke,
                                    "metric": study.metric, "mode": study.mode})
    resolve = lambda sampled: study.trial_config(sampled, overrides, args.smoke).model_dump(mode="json")  # noqa: E731
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, study=study, overrides=overrides, smoke=args.smoke, resources=resources,
                             storage_path=str(storage), max_failures=args.max_failures),
        {"cpu": 0, "memory": 2**20})  # the driver only waits on its Train run, whose workers hold the resources
    run_config = tune.RunConfig(name=name, storage_path=str(storage),
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                callbacks=[tracking.TrialRuns(tracking_uri, name, parent, resolve), *extra_callbacks])
    start = time.perf_counter()
    if args.resume:
        restore_path = f"{storage}/{name}"
        if not tune.Tuner.can_restore(restore_path):
            raise ConfigError(f"--resume: no search to resume in {restore_path}")
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
    else:
        # max_t one past the budget: ASHA stops a trial whose clock reaches max_t, which at the last epoch
        # would cut off the trial's own final report (test metrics for the record, artifacts)
        scheduler = (ASHAScheduler(time_attr=TIME_ATTR, max_t=budget.epochs + 1, grace_period=budget.grace_period,
                                   reduction_factor=budget.reduction_factor) if not args.no_asha else FIFOScheduler())
        tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
            metric=metric, mode=study.mode, num_samples=trials, scheduler=scheduler,
            search_alg=_optuna_search(study, name, experiment_dir, args.seed, metric),
            max_concurrent_trials=resources.max_concurrent(ray.cluster_resources())))
    results = tuner.fit()
    summary = summarize(results, study, metric, experiment_dir, tracking_uri)
    summary["wall_time_s"] = time.perf_counter() - start
    best = summary["best"]
    summary["best_mlflow_run_id"] = tracking.finish_parent(
        tracking_uri, parent, best["trial_id"] if best else None,
        {k: v for k, v in (results.get_best_result().metrics or {}).items()
         if k.startswith(("best_", "val_", "test_", TIME_ATTR))} if best else {})
    (experiment_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a file stem in search_spaces/ (byol, supervised, ...) or a YAML path")
    parser.add_argument("--data", help="synthetic (default) | nih:PATH | folder:PATH")
    parser.add_argument("--trials", type=int, help="number of trials (default: the file's budget)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, image size, epochs and test_* backbone")
    parser.add_argument("--storage", default="tune_xray_runs", help="experiment storage: a directory or s3://, gs://")
    parser.add_argument("--local-dir", default="tune_xray_runs", help="where optuna.db and mlflow.db live "
                        "when --storage is a URI")
    parser.add_argument("--name", help="experiment name (default: the study name)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="default: 1 when CUDA is available, else 0; fractions pack trials onto a GPU")
    parser.add_argument("--address", help="Ray cluster address (default: start Ray locally, or RAY_ADDRESS)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the experiment dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed override on every trial, e.g. --set supervised.batch_size=64")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--max-failures", type=int, default=1, help="retries per trial (Tune and Train)")
    parser.add_argument("--no-asha", action="store_true", help="run every trial to its own end")
    parser.add_argument("--verbose", action="store_true", help="show the trials' own output")
    args = parser.parse_args(argv)
    if args.gpus_per_trial is None:
        import torch
        args.gpus_per_trial = 1.0 if torch.cuda.is_available() else 0.0
    try:
        summary = run_search(args)
    except (ConfigError, DataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
