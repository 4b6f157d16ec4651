"""Re-running a search's finalists as Tune trials beside it: what the repeats (tune_xray.repeat: new seeds) and the
cross-validation (tune_xray.cv: K folds) share — the finalists' configurations with each variant, a searcher that
hands them out in order, one Tune run on the search's own Ray with MLflow children of its parent run, and the
command line both stages take. Neither stage imports the other; both import this."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ray.tune.search import Searcher

from . import tracking
from .cluster import connect
from .config import ConfigError, objective
from .credentials import mask
from .experiment import Experiment, ExperimentError
from .record.names import COST_METRICS, RESULT_FILES
from .record.status import status_of
from .space import flatten, load_study
from .summary import run_name
from .trial import TrialResources, global_batch_sizes, resolve_trial, run_config, trainable


def finalist_configs(summary: dict, top: int, source: str, variants: list[dict]) -> list[dict]:
    """Tune configs of the `top` best completed trials, each once per variant (a seed, a fold): the trial's config
    (resolved values, and the drawn ones where they differ), the trial it comes from under `source`, the
    variant's keys."""
    configs = []
    for row in summary["top"][:top]:
        config = {**row["resolved"], **{f"sampled.{k}": v for k, v in row["sampled"].items()}, source: row["trial"]}
        configs += [{**config, **variant} for variant in variants]
    return configs


class FixedConfigs(Searcher):
    """Proposes the given configs (flat, dotted keys as the search's), once each, in order."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self.configs = list(configs)

    def suggest(self, trial_id: str):
        return self.configs.pop(0) if self.configs else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:  # Tune checkpoints its searcher: the configs still to propose
        Path(checkpoint_path).write_text(json.dumps(self.configs))

    def restore(self, checkpoint_path: str) -> None:
        self.configs = json.loads(Path(checkpoint_path).read_text())


class Rerun:
    """A finished search's configurations trained again beside it — as Tune trials in a directory of their own
    (`under`: repeats/, cv/), through the search's own trial path, with no scheduler (full budget), each an MLflow
    child of the search's parent tagged with its stage — under the search's study, overrides, resources, smoke
    scale and ensemble budget, read from the experiment; without its hard limits (only feasible configurations are
    re-run: each re-run inherits that verdict). `what`: what is re-run, for the errors (`repeat`, `cross-validate`)."""

    def __init__(self, experiment: Experiment, what: str):
        self.experiment, self.summary, request = experiment, experiment.summary(), experiment.request()
        if request is None:
            raise ConfigError(f"{experiment.directory}: not a finished tune_xray search (no search.json)")
        if not self.summary["top"]:
            raise ConfigError(f"{experiment.directory}: no completed trial to {what}")
        self.study = load_study(request.study)
        res = self.summary.get("resources", {})  # as the search ran them (its GPUs per trial resolved)
        self.resources = TrialResources(res.get("workers_per_trial", 1), res.get("cpus_per_trial", 1.0),
                                        res.get("gpus_per_trial", 0.0), res.get("one_worker_trials", "tune"))
        self.resolved = self.study.as_requested(request).placed(
            self.resources.gpus, self.resources.workers).unlimited()  # a re-run inherits its configuration's verdict
        self.metric = objective(self.study.metric)

    def record(self, config: dict, label: str, tags: dict, description: str = "") -> tracking.TrialRecord:
        """A trial's MLflow run: `t007 <label> <drawn values>`, its resolved config as params, `tags`."""
        cfg = resolve_trial(self.resolved, config)
        params = {**flatten(cfg.model_dump(mode="json")), **global_batch_sizes(cfg, self.resources.workers)}
        name = run_name(self.study, config)
        return tracking.TrialRecord(f"{name[:4]} {label}{name[4:]}", params,
                                    {**tags, "tune_xray.smoke": str(self.resolved.smoke).lower()}, description)

    def run(self, configs: list[dict], under: str, trial_name, describe, stage: str, interrupted: str,
            max_failures: int = 1, address: str | None = None, verbose: bool = False) -> list[dict]:
        """Train `configs` (Tune trials named by `trial_name`, MLflow runs by `describe(config)`); one row per
        trial: its config, status and reason (a trial cut short is `interrupted`, with that reason), the objective
        where it completed, its MLflow run, its directory and measured cost."""
        import ray
        from ray import tune

        experiment, storage = self.experiment, self.experiment.path  # beside the search's trials, in `under`/
        tracking_uri, parent = experiment.tracking_uri, tracking.find_parent(experiment.directory)
        if not ray.is_initialized():
            connect(address, verbose)
        driver = trainable(self.resolved, self.resources, f"{storage}/{under}", max_failures)
        callbacks = [tracking.TrialRuns(tracking_uri, parent, describe, status_of, artifacts=RESULT_FILES,
                                        results_dir=lambda trial: experiment.fetch(trial_name(trial), under),
                                        stage=stage)]
        tune.Tuner(driver, tune_config=tune.TuneConfig(
            num_samples=len(configs), search_alg=self.resources.limiter(FixedConfigs(configs)),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=run_config(under, storage, callbacks, max_failures)).fit()
        runs = tracking.child_runs(tracking_uri, parent, stage)
        rows = []
        for t in tune.ExperimentAnalysis(f"{storage}/{under}").trials:
            status, reason = status_of(t, t.status == "ERROR")
            if status == "pruned":  # no scheduler stops these: one that did not finish was cut short (Ctrl-C)
                status, reason = "interrupted", interrupted
                if runs.get(t.trial_id):
                    tracking.mark_runs(tracking_uri, {t.trial_id: runs[t.trial_id]}, status, reason)
            m = t.last_result or {}
            rows.append({"config": t.config, "trial_id": t.trial_id, "status": status, "reason": reason,
                         self.metric: m.get(self.metric) if status == "complete" else None,
                         "mlflow_run_id": runs.get(t.trial_id),
                         "dir": str(experiment.directory / under / trial_name(t)),
                         "cost": {k: m[k] for k in COST_METRICS if k in m}})
        return rows


def rerun_main(argv, prog: str, doc: str, count: tuple[str, int, str], run, show, what: str,
               flags: dict | None = None) -> int:
    """The command line of a step that re-runs a search's best configurations (repeat, cv): EXPERIMENT_DIR --top N
    and its `count` flag (name, default, help), and its own `flags` (name → add_argument's keywords, passed to
    `run` by name); `run(experiment, top, count, address, verbose=…, **flags)` → its entry,
    `show(entry)` prints it and says whether something after the trials failed. Exit 0 when every trial completed,
    2 for a bad directory or count, 130 when interrupted, 1 otherwise."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment_dir")
    parser.add_argument("--top", type=int, default=3, help="the best N completed configurations (of the 5 that "
                        "summary.json ranks)")
    parser.add_argument(count[0], type=int, default=count[1], help=count[2])
    parser.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    parser.add_argument("--verbose", action="store_true")
    for flag, options in (flags or {}).items():
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    try:
        entry = run(Experiment.at(args.experiment_dir), args.top, getattr(args, count[0].lstrip("-")), args.address,
                    verbose=args.verbose, **{f.lstrip("-"): getattr(args, f.lstrip("-")) for f in flags or {}})
    except (ConfigError, ExperimentError) as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted before any {what} ran", file=sys.stderr)
        return 130
    failed = show(entry)
    statuses = {t["status"] for t in entry["trials"]}
    if "interrupted" in statuses:
        return 130
    return 0 if statuses == {"complete"} and not failed else 1
