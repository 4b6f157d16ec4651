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

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune.logger import LoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from .addresses import run_link, run_url
from .credentials import mask, remember, reveal
from .driver import DRIVER
from .record.names import (
    COST_METRICS,
    FINISHED,
    PARENT_ID_FILE,
    PROBE,
    REPLAY,
    SCAN_BACKEND,
    SSL_FROM,
    SSL_TIME_ATTR,
    STARTED_FROM,
    TIME_ATTR,
)
from .record.status import ssl_from_text

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per artifact copied: 16 at the end
# with an MLflow server, two lines per run ended ("View run … at", "View experiment at"): the search says one per trial
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables...", ...

TRIAL_TAG = "tune_xray.trial_id"
REPEAT_TAG = "tune_xray.repeat_of"  # a repeat's run: the search trial whose configuration it repeats
CV_TAG = "tune_xray.cv_of"  # a cross-validation fold's run: the search trial whose configuration it trains
STAGE_TAGS = {"repeats": REPEAT_TAG, "cv": CV_TAG}  # the trial runs after a search's own, by the tag they carry
STATUS_TAG = "tune_xray.status"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description (markdown) in the MLflow UI
# a trial's status → the MLflow run status: a pruned trial ended as ASHA meant it to (FINISHED; its status tag says
# `pruned`); KILLED is kept for what --resume continues, FAILED for what broke
RUN_STATUS = {"complete": "FINISHED", "pruned": "FINISHED", "infeasible": "FINISHED", "interrupted": "KILLED",
              "diverged": "FAILED", "collapsed": "FAILED", "error": "FAILED"}
RECORD_TABLE = "selected_record.json"  # a trial's final record, every label and interval, as one MLflow table
# Tune's own bookkeeping in every result, and ASHA's clock: not metrics of the trial
BOOKKEEPING = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", TIME_ATTR, FINISHED,
               REPLAY, SSL_TIME_ATTR, PROBE}  # (the probe is logged as `byol/` or `cass/probe_val_…`, at its SSL epoch)
RECORD_PREFIXES = ("selected_", "record_test_")
SSL_PHASES = ("byol", "cass")  # their epoch metrics come as `byol/…` with their own `byol/epoch`


def find_parent(experiment_dir: Path) -> Optional[str]:
    saved = experiment_dir / PARENT_ID_FILE
    return saved.read_text().strip() if saved.is_file() else None


def start_parent(tracking_uri: str, experiment: str, experiment_dir: Path, params: dict, tags: dict) -> str:
    """Create (or, on --resume, reopen: the id kept in the experiment directory) the search's parent run; returns
    its id, for the Experiment to keep (PARENT_ID_FILE)."""
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
                            tags={"tune_xray.role": "search", STATUS_TAG: "running", **mask(tags)})
    client.log_batch(run.info.run_id, params=[Param(k, mask(str(v))) for k, v in params.items()])
    return run.info.run_id


def ended_description(run, ending: str) -> str:
    """A run's description (a run, or its description) with how it ended as its last paragraph (`**Status: …**`),
    in place of the one an earlier end wrote (a resumed search ends its runs again)."""
    described = run if isinstance(run, str) else run.data.tags.get(DESCRIPTION_TAG, "")
    return described.split("\n\n**Status")[0] + "\n\n" + ending


def experiment_id_of(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id


def _children(tracking_uri: str, parent_run_id: str, stage: str = "search") -> list:
    """The parent's trial runs of one stage: the search's own, its repeats' (tune_xray.repeat) or its
    cross-validation folds' (tune_xray.cv)."""
    def of_stage(tags: dict) -> bool:
        return all((tag in tags) == (stage == name) for name, tag in STAGE_TAGS.items())

    return [r for r in MlflowClient(tracking_uri).search_runs(
        [experiment_id_of(tracking_uri, parent_run_id)], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=50000) if TRIAL_TAG in r.data.tags and of_stage(r.data.tags)]


def child_runs(tracking_uri: str, parent_run_id: str, stage: str = "search") -> dict[str, str]:
    """Tune trial id → child run id (runs of this parent and stage that are not deleted)."""
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(tracking_uri, parent_run_id, stage)}


def ended_trials(tracking_uri: str, parent_run_id: str) -> set[str]:
    """Tune trial ids whose run has ended (its status tag set when Tune ended the trial). After Ctrl-C Tune
    lists a trial it cut short as TERMINATED, though it runs it again on resume: this tells them apart."""
    return {r.data.tags[TRIAL_TAG] for r in _children(tracking_uri, parent_run_id)
            if r.data.tags.get(STATUS_TAG, "running") in RUN_STATUS}


def finish_parent(tracking_uri: str, parent_run_id: str, status: str, best_run_id: Optional[str],
                  best_metrics: dict, summary_file: Optional[Path] = None, artifacts: tuple[Path, ...] = (),
                  failed: list[str] = ()) -> None:
    """The parent's status (`complete`, `interrupted`, `no trial completed`, `error`), the best completed
    trial's record as the search's own (`search_best_…`: names of the parent's, so that sorting the runs table by a
    trial metric ranks trials, not the search among them), a link to that run, and the search's files
    (summary.json, the report). `failed`: the steps after the trials that failed (repeats, ensemble, report):
    a tag; the search itself is still FINISHED. A metric whose value is already the run's latest is not logged
    again (a resumed search finishes its parent a second time); a changed one is logged at the next step."""
    client = MlflowClient(tracking_uri)
    logged = client.get_run(parent_run_id).data.metrics
    best_metrics = {search_metric(k): v for k, v in best_metrics.items()}
    changed = {k: float(v) for k, v in best_metrics.items() if logged.get(k) != float(v)}
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[
        Metric(k, v, now, len(client.get_metric_history(parent_run_id, k)) if k in logged else 0)
        for k, v in changed.items()])
    ending = f"**Status: {status}**"
    if best_run_id:
        experiment_id = experiment_id_of(tracking_uri, parent_run_id)
        client.set_tag(parent_run_id, "best_trial_run_id", best_run_id)
        client.set_tag(parent_run_id, "best_trial_link", run_url(tracking_uri, experiment_id, best_run_id))
        best_name = client.get_run(best_run_id).info.run_name
        ending += f"; best trial by validation: {run_link(experiment_id, best_run_id, best_name)}"
    if failed:
        ending += f"; failed after the trials: {', '.join(failed)}"
    client.set_tag(parent_run_id, DESCRIPTION_TAG, ended_description(client.get_run(parent_run_id), ending))
    for path in (summary_file, *artifacts):
        if path is not None and path.is_file():
            client.log_artifact(parent_run_id, str(path))
    client.set_tag(parent_run_id, STATUS_TAG, status)
    if failed:
        client.set_tag(parent_run_id, "tune_xray.failed", ", ".join(failed))
    client.set_terminated(parent_run_id, status={"complete": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


def search_metric(key: str) -> str:
    """A trial metric as the search's parent run logs its best: `best_val_mean_auroc` → `search_best_val_mean_auroc`,
    `selected_val_mean_auroc` → `search_best_selected_val_mean_auroc`."""
    return "search_best_" + key.removeprefix("best_")


def interrupt_search(tracking_uri: str, parent_run_id: str, reason: str) -> None:
    """A search that cannot go on (the Ray under it is gone): its running trial runs and the parent `interrupted`
    (KILLED: `--resume` continues them), the parent's description saying why."""
    running = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(tracking_uri, parent_run_id)
               if r.info.status == "RUNNING"}
    mark_runs(tracking_uri, running, "interrupted", reason)
    client = MlflowClient(tracking_uri)
    client.set_tag(parent_run_id, STATUS_TAG, "interrupted")
    client.set_tag(parent_run_id, DESCRIPTION_TAG,
                   ended_description(client.get_run(parent_run_id), f"**Status: interrupted** — {reason}"))
    client.set_terminated(parent_run_id, status=RUN_STATUS["interrupted"])


def mark_runs(tracking_uri: str, runs: dict[str, str], status: str, reason: str = "") -> None:
    """Set trial runs (trial id → run id) to `status` (e.g. `interrupted`: KILLED, resumable)."""
    client = MlflowClient(tracking_uri)
    for run_id in runs.values():
        client.set_tag(run_id, STATUS_TAG, status)
        if reason:
            client.set_tag(run_id, "tune_xray.reason", reason)
        client.set_terminated(run_id, status=RUN_STATUS[status])


PARETO_TAG = "tune_xray.pareto_front"  # on the runs of a multi-objective search's non-dominated trials


def tag_front(tracking_uri: str, run_ids) -> None:
    """Tag the Pareto front's trial runs (`tune_xray.pareto_front = true`: the runs table filters on it)."""
    client = MlflowClient(tracking_uri)
    for run_id in run_ids:
        client.set_tag(run_id, PARETO_TAG, "true")


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
    description: str = ""  # markdown: what the run is and what it trained (its status is added when it ends)


def report_epochs(report: dict):
    """(phase, epoch) of each phase epoch in a report: `""` for the fine-tune (`epoch`), `byol` for `byol/epoch`;
    ("record", 0) for a final record, ("cost", 0) for a measured cost."""
    if any(key.startswith(RECORD_PREFIXES) for key in report):
        yield "record", 0
    if any(key in COST_METRICS for key in report):
        yield "cost", 0
    for key in report:
        if key == "epoch" or (key.endswith("/epoch") and key.split("/")[0] in SSL_PHASES):
            yield key.split("/")[0] if "/" in key else "", int(report[key])


def _in_table(key: str) -> bool:
    """A final-record value that lives in the record table only: per label (`selected_val_auroc/Mass…`), with its
    interval bounds — dozens of single-value bar charts ahead of the curves otherwise."""
    return key.startswith(RECORD_PREFIXES) and "/" in key


def record_table(result: dict) -> Optional[pd.DataFrame]:
    """A result's final record as one table: metric, value, ci_low, ci_high (each interval beside its value)."""
    keys = [k for k in result if k.startswith(RECORD_PREFIXES) and isinstance(result[k], (int, float))
            and not k.endswith(("_ci_low", "_ci_high"))]
    if not keys:
        return None

    def bound(key: str, side: str):  # val's are named for the set they are computed on
        found = [result[k] for k in (f"{key}_selection_ci_{side}", f"{key}_ci_{side}") if k in result]
        return float(found[0]) if found else None

    return pd.DataFrame([{"metric": k, "value": float(result[k]), "ci_low": bound(k, "low"),
                          "ci_high": bound(k, "high")} for k in keys])


def log_table(client: MlflowClient, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    """MLflow's table artifact (the UI shows it as a table); MLflow's own pandas-4 notice about string columns
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="For backward compatibility, 'str' dtypes")
        client.log_table(run_id, data=frame, artifact_file=artifact_file)


def epoch_metrics(result: dict, timestamp: int, skip: dict[str, set[int]] | None = None) -> list[Metric]:
    """A Tune result as MLflow metrics: each phase's epoch metrics at that phase's epoch (fine-tune epoch k is
    step k; BYOL/CASS under `byol/…`, `cass/…` at their own epochs), the final record (`selected_…`,
    `record_test_…`) and the model's measured cost (in every fine-tune report, the same each time) as single
    values, its per-label values left to the record table (`record_table`). Tune's bookkeeping is left out; NaN
    and inf are kept. `skip`: epochs (per phase) already logged."""
    out, skip = [], skip or {}
    for key, value in result.items():
        if (key in BOOKKEEPING or not isinstance(value, (int, float)) or isinstance(value, bool)
                or _in_table(key)):
            continue
        phase = key.split("/")[0] if key.split("/")[0] in SSL_PHASES and f"{key.split('/')[0]}/epoch" in result else ""
        if key.startswith(RECORD_PREFIXES) or key in COST_METRICS:
            step = 0
            if 0 in skip.get("record" if key.startswith(RECORD_PREFIXES) else "cost", ()):  # each logged once
                continue
        elif key == "epoch" or key == f"{phase}/epoch":
            continue
        else:
            step = int(result[f"{phase}/epoch" if phase else "epoch"]) if (phase or "epoch" in result) else 0
            if step in skip.get(phase, ()):
                continue
        out.append(Metric(key, float(value), timestamp, step))
    return out


FLUSH_S = 2.0  # a trial's results that arrive faster than this are sent to MLflow together (one batch)


class TrialRuns(LoggerCallback):
    """Every Tune trial as a child run of the search's parent: named, its resolved config as params, per-epoch
    metrics at their epoch, its result files as artifacts, and a status tag with the MLflow status to match.

    `describe(trial config) → TrialRecord`; `on_run(trial config, run id)` tells the search which run a
    trial got (it keeps the run id on the Optuna trial); `status_of(trial, failed) → (status, reason)`;
    `results_dir(trial)`: a local directory holding the trial's result files (its directory on storage, fetched
    here when the storage is remote)."""

    def __init__(self, tracking_uri: str, parent_run_id: str, describe: Callable[[dict], TrialRecord],
                 status_of: Callable[[object, bool], tuple[str, str]],
                 on_run: Callable[[dict, str], None] = lambda config, run_id: None,
                 artifacts: tuple[str, ...] = (),
                 results_dir: Callable[[object], Path] = lambda trial: Path(trial.path),
                 stage: str = "search"):
        self.tracking_uri, self.parent_run_id = remember(tracking_uri), parent_run_id  # pickled masked
        self.describe, self.status_of, self.on_run, self.artifacts = describe, status_of, on_run, artifacts
        self.results_dir, self.stage = results_dir, stage
        self._runs: dict[str, str] = {}
        self._known: bool | None = None  # whether runs of an earlier driver were looked up
        self._logged: dict[str, dict[str, set[int]]] = {}
        self._experiment_id: str | None = None
        self._pending: dict[str, list[Metric]] = {}  # per run: metrics not sent yet (at most FLUSH_S old)
        self._flushed: dict[str, float] = {}  # per run: when its metrics were last sent
        self._made: dict[str, str] = {}  # runs created by this driver → their description (no read back at the end)
        self._mlflow: MlflowClient | None = None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; the maps are rebuilt from MLflow
        return {**self.__dict__, "_runs": {}, "_known": None, "_logged": {}, "_experiment_id": None, "_pending": {},
                "_flushed": {}, "_made": {}, "_mlflow": None}

    def _client(self) -> MlflowClient:
        if self._mlflow is None:
            self._mlflow = MlflowClient(reveal(self.tracking_uri))
        return self._mlflow

    def run_id(self, trial) -> str:
        """The trial's run: created here (kept in memory), or — after a restore — found by one look at the
        parent's children, the first time any trial is asked about; never a scan per trial."""
        if self._known is None:
            self._known = True
            self._runs.update(child_runs(reveal(self.tracking_uri), self.parent_run_id, self.stage))
        return self._runs.get(trial.trial_id)

    def log_trial_start(self, trial) -> None:
        client, run_id = self._client(), self.run_id(trial)
        if run_id is not None:  # a resumed or retried trial continues its own run
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, STATUS_TAG, "running")
            return
        record = (DRIVER.get("describe") or self.describe)(trial.config)  # this driver's (a resume's) own
        if self._experiment_id is None:
            self._experiment_id = experiment_id_of(reveal(self.tracking_uri), self.parent_run_id)
        run = client.create_run(self._experiment_id, run_name=record.name, tags={
            "mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial.trial_id, STATUS_TAG: "running",
            DESCRIPTION_TAG: record.description, **record.tags})
        params = [Param(k, str(v)) for k, v in record.params.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        self._runs[trial.trial_id] = run.info.run_id
        self._made[run.info.run_id], self._logged[run.info.run_id] = record.description, {}  # nothing logged yet
        self.on_run(trial.config, run.info.run_id)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        """Metrics in MLflow batches (one transaction each; Ray's logger wrote each metric in its own): a result
        is sent with those of its run that came within FLUSH_S of it (epochs minutes apart: one batch each; a burst
        of results: one for all), the rest when its trial ends.

        Idempotent per epoch: an epoch the run already has is not logged again (a finished trial's result
        re-sent when a killed search resumes). A resumed trial's first result carries the epochs its
        checkpoint holds (`replay`): those the run lacks — reported after the driver last saved its state,
        before it was killed — are added at their steps."""
        run_id, timestamp = self.run_id(trial), int(time.time() * 1000)
        logged, metrics = self._logged_epochs(run_id), self._pending.setdefault(run_id, [])
        for report in [*result.get(REPLAY, ()), result]:
            table = record_table(report) if "record" not in logged else None
            metrics += epoch_metrics(report, timestamp, skip=logged)
            for phase, epoch in report_epochs(report):
                logged.setdefault(phase, set()).add(epoch)
            if table is not None:
                log_table(self._client(), run_id, table, RECORD_TABLE)
        if time.monotonic() - self._flushed.get(run_id, -FLUSH_S) >= FLUSH_S:
            self._flush(run_id)

    def _flush(self, run_id: str) -> None:
        """A run's pending metrics to MLflow, in batches of MLflow's most (1,000)."""
        metrics = self._pending.pop(run_id, [])
        for start in range(0, len(metrics), 1000):
            self._client().log_batch(run_id, metrics=metrics[start:start + 1000])
        self._flushed[run_id] = time.monotonic()

    def on_experiment_end(self, trials, **info) -> None:
        for run_id in list(self._pending):
            self._flush(run_id)

    def _logged_epochs(self, run_id: str) -> dict[str, set[int]]:
        """Phase (`""` for the fine-tune, `byol`, `cass`) → epochs the run has logged, read from MLflow once per
        run and process (an epoch is logged whole, in one batch, so one metric per phase tells)."""
        if run_id not in self._logged:
            client, logged = self._client(), {}
            for key in sorted(client.get_run(run_id).data.metrics):
                phase = key.split("/")[0] if key.split("/")[0] in SSL_PHASES else ""
                if key.startswith(RECORD_PREFIXES):
                    logged["record"] = {0}
                elif key in COST_METRICS:
                    logged["cost"] = {0}
                elif phase not in logged:
                    logged[phase] = {m.step for m in client.get_metric_history(run_id, key)}
            self._logged[run_id] = logged
        return self._logged[run_id]

    def log_trial_end(self, trial, failed: bool = False) -> None:
        client, run_id = self._client(), self.run_id(trial)
        self._flush(run_id)
        status, reason = self.status_of(trial, failed)
        tags = [RunTag(STATUS_TAG, status)] + ([RunTag("tune_xray.reason", reason[:5000])] if reason else [])
        # a run of this driver is known here; one an earlier driver made is read back once
        run = None if run_id in self._made else client.get_run(run_id)
        described = self._made.pop(run_id, None) or run.data.tags.get(DESCRIPTION_TAG, "")
        ending = f"**Status: {status}**" + (f" — {reason}" if reason else "")
        tags.append(RunTag(DESCRIPTION_TAG, ended_description(described, ending)))
        node = (trial.last_result or {}).get("node_id")
        tags += [RunTag("tune_xray.node_id", node)] if isinstance(node, str) else []
        # known once the trial ran on its device: a param beside the config it resolves (model.scan_backend: auto)
        backend, logged = (trial.last_result or {}).get(SCAN_BACKEND), run.data.params if run else {}
        params = [Param(SCAN_BACKEND, backend)] if isinstance(backend, str) and SCAN_BACKEND not in logged else []
        params += [p for p in started_params((trial.last_result or {}).get(STARTED_FROM)) if p.key not in logged]
        reused = (trial.last_result or {}).get(SSL_FROM)
        tags += [RunTag("tune_xray.ssl_from", ssl_from_text(reused))] if isinstance(reused, dict) else []
        client.log_batch(run_id, tags=tags, params=params)
        directory = self.results_dir(trial)
        for name in self.artifacts:
            if (directory / name).is_file():
                client.log_artifact(run_id, str(directory / name))
        client.set_terminated(run_id, status=RUN_STATUS[status])


def started_params(started: dict | None) -> list[Param]:
    """A trial's pretrained files as MLflow params: `pretrained.file` and `pretrained.sha256` (with CASS, one pair per
    arm: `pretrained.<backbone>.file`); a backbone trained from scratch says so, and why."""
    if not isinstance(started, dict):
        return []
    params = []
    for backbone, entry in started.items():
        prefix = "pretrained" if len(started) == 1 else f"pretrained.{backbone}"
        params.append(Param(f"{prefix}.file", entry.get("file") or f"none: from scratch ({entry.get('scratch')})"))
        if entry.get("sha256"):
            params.append(Param(f"{prefix}.sha256", entry["sha256"]))
            params.append(Param(f"{prefix}.part", entry.get("part", "")))  # a trainer file's network or EMA copy
    return params


