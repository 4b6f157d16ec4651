"""MLflow: one parent run per search, one nested child run per trial (the only module importing MLflow).

The store is sqlite at an absolute path (MLflow 3.17 refuses a plain ./mlruns file store, and Ray trial
actors change directory), by default inside the experiment directory; `--tracking-uri` points at a server.
The experiment and parent run are made with `MlflowClient`: `mlflow.set_experiment()` in the driver would
export MLFLOW_EXPERIMENT_ID, which Ray's workers inherit and prefer (runs would land in the wrong experiment).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.utils.util import flatten_dict

PARENT_ID_FILE = "mlflow_parent_run_id"


def default_tracking_uri(experiment_dir: Path) -> str:
    return f"sqlite:///{(experiment_dir / 'mlflow.db').resolve()}"


def start_parent(tracking_uri: str, experiment: str, experiment_dir: Path, params: dict) -> str:
    """Create (or, on --resume, reopen) the search's parent run; returns its id."""
    client = MlflowClient(tracking_uri)
    saved = experiment_dir / PARENT_ID_FILE
    if saved.is_file():
        run_id = saved.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    found = client.get_experiment_by_name(experiment)
    # a local store keeps its artifacts beside it (MLflow's default would be ./mlruns in the working dir);
    # a tracking server decides for itself
    local = tracking_uri.startswith("sqlite:")
    artifacts = (experiment_dir / "mlartifacts").resolve().as_uri() if local else None
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifacts)
    run = client.create_run(experiment_id, run_name=f"search:{experiment}", tags={"tune_xray.role": "search"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    saved.write_text(run.info.run_id)
    return run.info.run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """Trial name (`trial_driver_<trial id>`) → child run id."""
    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags.get("trial_name", r.info.run_name): r.info.run_id for r in runs}


def finish_parent(tracking_uri: str, parent_run_id: str, best_trial_id: Optional[str], best_metrics: dict,
                  status: str = "FINISHED") -> Optional[str]:
    """Log the best trial's metrics on the parent and link its child run; returns that run id."""
    client = MlflowClient(tracking_uri)
    runs = child_runs(tracking_uri, parent_run_id)
    best_trial = next((name for name in runs if best_trial_id and name.endswith(f"_{best_trial_id}")), None)
    child = runs.get(best_trial)
    for key, value in best_metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(parent_run_id, key.replace("/", "."), float(value))
    if child:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        client.set_tag(parent_run_id, "best_trial", best_trial)
        client.set_tag(parent_run_id, "best_trial_run_id", child)
        client.set_tag(parent_run_id, "best_trial_link", f"#/experiments/{experiment_id}/runs/{child}")
    client.set_terminated(parent_run_id, status=status)
    return child


class TrialRuns(MLflowLoggerCallback):
    """Ray's MLflow logger, nested under the search's parent run, also logging each trial's full resolved
    TrialConfig as params (Tune's config holds only the sampled values). Artifacts: the trial directory
    (config.yaml, summary.json, best.pt, val/test predictions) when the trial ends."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, resolve: Callable[[dict], dict]):
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment,
                         tags={"mlflow.parentRunId": parent_run_id}, save_artifact=True)
        self.resolve = resolve

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        """A result's numbers as one MLflow batch at step `training_iteration`. Ray's logger writes each metric
        in its own transaction: about 55 sqlite commits an epoch, most of the Tune driver's CPU (cProfile)."""
        timestamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), timestamp, result[TRAINING_ITERATION])
                   for key, value in flatten_dict(result).items() if isinstance(value, (int, float))]
        MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)

    def log_trial_start(self, trial) -> None:
        fresh = trial not in self._trial_runs
        super().log_trial_start(trial)
        if fresh:
            full = flatten_dict(self.resolve(trial.config), delimiter=".")
            extra = {k: v for k, v in full.items() if k not in trial.config}
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=extra)
