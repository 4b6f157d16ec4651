"""MLflow: one parent run per search, one nested child run per trial (the only module importing MLflow).

The store is sqlite at an absolute path (MLflow 3.17 refuses a plain ./mlruns file store, and Ray trial
actors change directory), by default inside the experiment directory; `--tracking-uri` points at a server.
The experiment and runs are made with `MlflowClient`: `mlflow.set_experiment()` in the driver would export
MLFLOW_EXPERIMENT_ID, which Ray's workers inherit and prefer (runs would land in the wrong experiment).

A child run is found again by its Tune trial id (a tag), never held only in memory: after `--resume` a trial
continues the run it had (Ray's MLflowLoggerCallback keeps its trial → run map in memory, so a restored
search got a second run per trial and left the first RUNNING).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune.logger import LoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from .trial import FINISHED, REPLAY, TIME_ATTR

PARENT_ID_FILE = "mlflow_parent_run_id"
TRIAL_TAG = "tune_xray.trial_id"
STATUS_TAG = "tune_xray.status"
# a trial's status → the MLflow run status: a pruned run is visibly not "finished"
RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED", "diverged": "FAILED",
              "error": "FAILED"}
# Tune's own bookkeeping in every result, and ASHA's clock: not metrics of the trial
BOOKKEEPING = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", TIME_ATTR, FINISHED,
               REPLAY}
RECORD_PREFIXES = ("selected_", "record_test_")
SSL_PHASES = ("byol", "cass")  # their epoch metrics come as `byol/…` with their own `byol/epoch`  # a trial's final record: one value each, not a curve


def default_tracking_uri(experiment_dir: Path) -> str:
    return f"sqlite:///{(experiment_dir / 'mlflow.db').resolve()}"


def runs_table_url(tracking_uri: str, experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table (MLflow 3's UI otherwise opens a GenAI overview)."""
    base = tracking_uri if tracking_uri.startswith("http") else ui
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def find_parent(experiment_dir: Path) -> Optional[str]:
    saved = experiment_dir / PARENT_ID_FILE
    return saved.read_text().strip() if saved.is_file() else None


def start_parent(tracking_uri: str, experiment: str, experiment_dir: Path, params: dict, tags: dict) -> str:
    """Create (or, on --resume, reopen) the search's parent run; returns its id."""
    client = MlflowClient(tracking_uri)
    run_id = find_parent(experiment_dir)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, STATUS_TAG, "running")
        return run_id
    found = client.get_experiment_by_name(experiment)
    # a local store keeps its artifacts beside it (MLflow's default would be ./mlruns in the working dir);
    # a tracking server decides for itself
    local = tracking_uri.startswith("sqlite:")
    artifacts = (experiment_dir / "mlartifacts").resolve().as_uri() if local else None
    # the classic runs table, not the GenAI overview, is what the UI opens for this experiment
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifacts, tags={"mlflow.experimentKind": "custom_model_development"})
    run = client.create_run(experiment_id, run_name=f"search:{experiment}",
                            tags={"tune_xray.role": "search", STATUS_TAG: "running", **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    (experiment_dir / PARENT_ID_FILE).write_text(run.info.run_id)
    return run.info.run_id


def experiment_id_of(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id


def _children(tracking_uri: str, parent_run_id: str) -> list:
    return [r for r in MlflowClient(tracking_uri).search_runs(
        [experiment_id_of(tracking_uri, parent_run_id)], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=50000) if TRIAL_TAG in r.data.tags]


def child_runs(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """Tune trial id → child run id (runs of this parent that are not deleted)."""
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(tracking_uri, parent_run_id)}


def ended_trials(tracking_uri: str, parent_run_id: str) -> set[str]:
    """Tune trial ids whose run has ended (its status tag set when Tune ended the trial). After Ctrl-C Tune
    lists a trial it cut short as TERMINATED, though it runs it again on resume: this tells them apart."""
    return {r.data.tags[TRIAL_TAG] for r in _children(tracking_uri, parent_run_id)
            if r.data.tags.get(STATUS_TAG, "running") in RUN_STATUS}


def finish_parent(tracking_uri: str, parent_run_id: str, status: str, best_run_id: Optional[str],
                  best_metrics: dict, summary_file: Optional[Path] = None) -> None:
    """The parent's status (`complete`, `interrupted`, `no trial completed`, `error`), the best completed
    trial's record under the same metric names as its child run, and a link to that run."""
    client = MlflowClient(tracking_uri)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0)
                                             for k, v in best_metrics.items()])
    if best_run_id:
        experiment_id = experiment_id_of(tracking_uri, parent_run_id)
        client.set_tag(parent_run_id, "best_trial_run_id", best_run_id)
        client.set_tag(parent_run_id, "best_trial_link", f"#/experiments/{experiment_id}/runs/{best_run_id}")
    if summary_file is not None and summary_file.is_file():
        client.log_artifact(parent_run_id, str(summary_file))
    client.set_tag(parent_run_id, STATUS_TAG, status)
    client.set_terminated(parent_run_id, status={"complete": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


def mark_runs(tracking_uri: str, runs: dict[str, str], status: str, reason: str = "") -> None:
    """Set trial runs (trial id → run id) to `status` (e.g. `interrupted`: KILLED, resumable)."""
    client = MlflowClient(tracking_uri)
    for run_id in runs.values():
        client.set_tag(run_id, STATUS_TAG, status)
        if reason:
            client.set_tag(run_id, "tune_xray.reason", reason)
        client.set_terminated(run_id, status=RUN_STATUS[status])


def delete_runs(tracking_uri: str, run_ids) -> None:
    """Soft-delete runs that hold no trial of the search (a trial started just before the driver was killed
    and never saved in Tune's state: Tune runs it again under a new id). `mlflow gc` or the UI can restore."""
    client = MlflowClient(tracking_uri)
    for run_id in run_ids:
        client.set_tag(run_id, "tune_xray.reason", "orphan: its trial was never saved before an interruption")
        client.delete_run(run_id)


@dataclass
class TrialRecord:
    """What a trial's child run shows before it trains: its name, params and tags."""

    name: str
    params: dict
    tags: dict


def report_epochs(report: dict):
    """(phase, epoch) of each phase epoch in a report: `""` for the fine-tune (`epoch`), `byol` for `byol/epoch`;
    ("record", 0) for a final record."""
    if any(key.startswith(RECORD_PREFIXES) for key in report):
        yield "record", 0
    for key in report:
        if key == "epoch" or (key.endswith("/epoch") and key.split("/")[0] in SSL_PHASES):
            yield key.split("/")[0] if "/" in key else "", int(report[key])


def epoch_metrics(result: dict, timestamp: int, skip: dict[str, set[int]] | None = None) -> list[Metric]:
    """A Tune result as MLflow metrics: each phase's epoch metrics at that phase's epoch (fine-tune epoch k is
    step k; BYOL/CASS under `byol/…`, `cass/…` at their own epochs), the final record (`selected_…`,
    `record_test_…`) as single values. Tune's bookkeeping is left out; NaN and inf are kept. `skip`: epochs
    (per phase) already logged."""
    out, skip = [], skip or {}
    for key, value in result.items():
        if key in BOOKKEEPING or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        phase = key.split("/")[0] if key.split("/")[0] in SSL_PHASES and f"{key.split('/')[0]}/epoch" in result else ""
        if key.startswith(RECORD_PREFIXES):
            step = 0
            if 0 in skip.get("record", ()):  # the final record is logged once
                continue
        elif key == "epoch" or key == f"{phase}/epoch":
            continue
        else:
            step = int(result[f"{phase}/epoch" if phase else "epoch"]) if (phase or "epoch" in result) else 0
            if step in skip.get(phase, ()):
                continue
        out.append(Metric(key, float(value), timestamp, step))
    return out


class TrialRuns(LoggerCallback):
    """Every Tune trial as a child run of the search's parent: named, its resolved config as params, per-epoch
    metrics at their epoch, its result files as artifacts, and a status tag with the MLflow status to match.

    `describe(trial config) → TrialRecord`; `on_run(trial config, run id)` tells the search which run a
    trial got (it keeps the run id on the Optuna trial); `status_of(trial, failed) → (status, reason)`."""

    def __init__(self, tracking_uri: str, parent_run_id: str, describe: Callable[[dict], TrialRecord],
                 status_of: Callable[[object, bool], tuple[str, str]],
                 on_run: Callable[[dict, str], None] = lambda config, run_id: None,
                 artifacts: tuple[str, ...] = ()):
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.describe, self.status_of, self.on_run, self.artifacts = describe, status_of, on_run, artifacts
        self._runs: dict[str, str] = {}
        self._logged: dict[str, dict[str, set[int]]] = {}

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; the maps are rebuilt from MLflow
        return {**self.__dict__, "_runs": {}, "_logged": {}}

    def _client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def run_id(self, trial) -> str:
        if trial.trial_id not in self._runs:
            self._runs.update(child_runs(self.tracking_uri, self.parent_run_id))
        return self._runs.get(trial.trial_id)

    def log_trial_start(self, trial) -> None:
        client, run_id = self._client(), self.run_id(trial)
        if run_id is not None:  # a resumed or retried trial continues its own run
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, STATUS_TAG, "running")
            return
        record = self.describe(trial.config)
        experiment_id = experiment_id_of(self.tracking_uri, self.parent_run_id)
        run = client.create_run(experiment_id, run_name=record.name, tags={
            "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial.trial_id, STATUS_TAG: "running",
            **record.tags})
        params = [Param(k, str(v)) for k, v in record.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        self._runs[trial.trial_id] = run.info.run_id
        self.on_run(trial.config, run.info.run_id)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        """One MLflow batch per result (one sqlite transaction; Ray's logger wrote each metric in its own).

        Idempotent per epoch: an epoch the run already has is not logged again (a finished trial's result
        re-sent when a killed search resumes). A resumed trial's first result carries the epochs its
        checkpoint holds (`replay`): those the run lacks — reported after the driver last saved its state,
        before it was killed — are added at their steps."""
        run_id, timestamp = self.run_id(trial), int(time.time() * 1000)
        logged, metrics = self._logged_epochs(run_id), []
        for report in [*result.get(REPLAY, ()), result]:
            metrics += epoch_metrics(report, timestamp, skip=logged)
            for phase, epoch in report_epochs(report):
                logged.setdefault(phase, set()).add(epoch)
        if metrics:
            self._client().log_batch(run_id, metrics=metrics)

    def _logged_epochs(self, run_id: str) -> dict[str, set[int]]:
        """Phase (`""` for the fine-tune, `byol`, `cass`) → epochs the run has logged, read from MLflow once per
        run and process (an epoch is logged whole, in one batch, so one metric per phase tells)."""
        if run_id not in self._logged:
            client, logged = self._client(), {}
            for key in sorted(client.get_run(run_id).data.metrics):
                phase = key.split("/")[0] if key.split("/")[0] in SSL_PHASES else ""
                if key.startswith(RECORD_PREFIXES):
                    logged["record"] = {0}
                elif phase not in logged:
                    logged[phase] = {m.step for m in client.get_metric_history(run_id, key)}
            self._logged[run_id] = logged
        return self._logged[run_id]

    def log_trial_end(self, trial, failed: bool = False) -> None:
        client, run_id = self._client(), self.run_id(trial)
        status, reason = self.status_of(trial, failed)
        tags = [RunTag(STATUS_TAG, status)] + ([RunTag("tune_xray.reason", reason[:5000])] if reason else [])
        client.log_batch(run_id, tags=tags)
        directory = Path(trial.local_path or "")
        for name in self.artifacts:
            if (directory / name).is_file():
                client.log_artifact(run_id, str(directory / name))
        client.set_terminated(run_id, status=RUN_STATUS[status])

