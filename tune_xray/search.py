"""`python -m tune_xray.search STUDY`: a search-space file run as Ray Tune + Optuna (TPE) + ASHA, each trial
trained in its Tune trial (a Ray Train run when it has several DDP ranks), every trial an MLflow child run.
Optimises the study's validation metric (default val mean AUROC, max); trials store their test predictions, and
test is read once, at the end, for the record of the ensemble, the best single trial and the top-K.

    python -m tune_xray.search byol --smoke                 # the BYOL ablation at tiny scale (CPU, minutes)
    python -m tune_xray.search byol --data nih:/data/nih --gpus-per-trial 1 --cpus-per-trial 8
    python -m tune_xray.search byol --resume                # continue an interrupted search
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from . import tracking
from .config import ConfigError, merge, parse_overrides
from .cluster import alive_nodes, check_cluster_paths, download, storage_filesystem, upload
from .data.splits import DataError
from .models import WeightsError
from .space import BACKBONE_KEYS, Study, case_key, flatten, load_study
from .trial import RESULT_FILES, STATUS, TIME_ATTR

RAY_ENV = {
    # Train's controller polls workers this often (default 2 s): 0.5 s cuts per-report latency (STACK_NOTES)
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
LOCAL_RAY_ENV = {
    # Ray runs workers at nice 15, so on a small machine its own processes preempt the training threads:
    # 4.6 → 3.7 s per epoch, 3.0 s without Ray (2 cores, bench_search_overhead.py)
    "RAY_worker_niceness": "0",
}


class _ForcedSnapshots(logging.Filter):
    """Tune warns at every epoch of a trial that checkpoints each epoch with `num_to_keep=1` that it snapshots
    the experiment state (so that a resume never points at a deleted checkpoint): that is the point, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "snapshotting has been triggered" not in record.getMessage()


def _init_ray(address: str | None, verbose: bool) -> None:
    """Join the cluster at `address` (or the one `ray start` left running here), or start a local one.

    A local start passes RAY_ENV by inheritance: a job-level runtime_env would keep Ray's prestarted worker
    processes from being used, and each actor of a trial would start its own (bench_search_overhead.py).
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init itself resolves

    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_ForcedSnapshots())

    if address is None and canonicalize_bootstrap_address(None) is None:
        for key, value in {**RAY_ENV, **LOCAL_RAY_ENV}.items():
            os.environ.setdefault(key, value)  # the raylet and its workers inherit the driver's environment
        ray.init(log_to_driver=verbose)
    else:
        ray.init(address=address, runtime_env={"env_vars": RAY_ENV}, log_to_driver=verbose)


def absolute_data(source: str) -> str:
    """`nih:data/nih` → `nih:/abs/data/nih`: Ray runs trials in directories of its own (and on other nodes)."""
    kind, sep, path = source.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if sep and path and "://" not in source else source


def trial_overrides(study: Study, overrides: list[str], data: str | None, gpus_per_trial: float,
                    workers_per_trial: int = 1, record_test: bool = False) -> dict:
    """What every trial gets on top of the study file: `--set`, `--data`, the device its resources give and, on
    a GPU it shares with other trials, its share (`data.device_share`, what `device_cache: auto` counts), and
    `--record-test-per-trial` — resolved here, so every record shows them."""
    tree = parse_overrides(overrides)
    study.check_overrides(tree)
    if record_test:
        tree = merge(tree, {"supervised": {"record_test": True}})
    if data:
        tree = merge(tree, {"data": {"source": data}})
    if "device" not in tree:
        tree = merge(tree, {"device": "cuda" if gpus_per_trial else "cpu"})
    share = gpus_per_trial / workers_per_trial
    if 0 < share < 1 and "device_share" not in tree.get("data", {}):
        tree = merge(tree, {"data": {"device_share": share}})
    return tree


def global_batch_sizes(cfg, workers: int) -> dict:
    """`<phase>.global_batch_size`: what one optimizer step sees across a trial's DDP ranks (each rank's
    `batch_size` × the ranks; × `accum_steps` more per step)."""
    phases = [("supervised", cfg.supervised)] + [(name, getattr(cfg, name)) for name in ("byol", "cass")
                                                 if getattr(cfg, name).enabled]
    return {f"{name}.global_batch_size": phase.batch_size * workers for name, phase in phases}


class SearchError(RuntimeError):
    """A failure while the search runs (Ray did not start, say): one line, exit 1."""


def check_numbers(args) -> None:
    """Counts and resources the command line gives, before anything starts: one error naming the flag."""
    at_least = [("--trials", args.trials, 1), ("--workers-per-trial", args.workers_per_trial, 1),
                ("--max-concurrent", getattr(args, "max_concurrent", None), 1), ("--max-failures", args.max_failures, 0)]
    for flag, value, low in at_least:
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: at least {low}")
    if not args.cpus_per_trial > 0:
        raise ConfigError(f"--cpus-per-trial {args.cpus_per_trial:g}: more than 0 (a trial's process needs a CPU)")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial:g}: 0 or more")


LOCK_FILE = ".search.lock"


@contextlib.contextmanager
def search_lock(experiment_dir: Path, name: str):
    """One search owns its name: an exclusive lock (flock) on EXPERIMENT_DIR/.search.lock, taken before anything
    else is written, so a second start of the same name, or a --resume of it while it runs, is one error. The OS
    releases it on every exit, a crash included; the file then still names the crashed run, which is said and
    taken over. If the search fails before writing its invocation, what the lock made is removed again."""
    made = next((p for p in [experiment_dir, *experiment_dir.parents] if p.parent.exists()), experiment_dir)
    made = None if made.exists() else made  # the topmost directory this search creates, to remove on a failure
    try:
        experiment_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(experiment_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"--storage: cannot create {experiment_dir} ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1024).decode().strip()
        os.close(fd)
        raise ConfigError(f"search '{name}' is running ({holder}): wait for it to end, or give another --name") from None
    try:
        stale = os.read(fd, 1024).decode().strip()
        if stale:
            print(f"note: the earlier run of '{name}' ({stale}) ended without releasing it (killed?); taking over",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
                  0)
        yield
    except BaseException:
        if made is not None and not (experiment_dir / INVOCATION_FILE).exists():
            shutil.rmtree(made, ignore_errors=True)  # failed before writing anything: leave nothing
        raise
    finally:
        if (experiment_dir / LOCK_FILE).exists():
            os.ftruncate(fd, 0)  # released as it should be: nothing stale for the next run to report
        os.close(fd)  # closing releases the flock


def default_gpus_per_trial(cluster: dict) -> float:
    """--gpus-per-trial when not given: 1 when the cluster (ray.cluster_resources()) has a GPU, else 0 — the
    cluster's, not the driver's (a CPU-only head drives GPU workers)."""
    return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0


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


KEY_FIELDS = ("model.backbone", "model.pretrained_path", "augment.image_size", "device", "supervised.batch_size",
              "supervised.epochs")
SSL_KEY_FIELDS = {"byol": ("byol.batch_size", "byol.hidden_dim", "byol.epochs"),
                  "cass": ("cass.cnn", "cass.transformer", "cass.batch_size", "cass.epochs")}
TRIAL_NUMBER = "optuna_trial"  # in every Tune trial config: the Optuna trial it is


def trial_name(trial) -> str:
    """`t007-<trial id>`: the Optuna trial number first, in Tune's table and as the trial's directory."""
    return f"t{trial.config.get(TRIAL_NUMBER, -1):03d}-{trial.trial_id}"


def key_fields(cfg) -> tuple[str, ...]:
    """The resolved values a reader needs beside the drawn ones: what trained, at which size, where."""
    ssl = "byol" if cfg.byol.enabled else "cass" if cfg.cass.enabled else None
    return KEY_FIELDS + SSL_KEY_FIELDS.get(ssl, ())


class DefineByRun:
    """Optuna define-by-run for OptunaSearch: draws the study's parameters, then returns the values that will
    *train* (smoke shrinkage and `--set` applied) under the parameters' names, the drawn value beside each
    that differs (`sampled.<key>`), a few key resolved fields, and the Optuna trial number. Tune's trial table
    then shows what ran; the Optuna trial keeps the same resolved values as user attributes.
    (A class, not a closure: Tune pickles the searcher with the experiment.)"""

    def __init__(self, study: Study, overrides: dict, smoke: bool):
        self.study, self.overrides, self.smoke = study, overrides, smoke

    def __call__(self, trial) -> dict:
        sampled = self.study.sample(trial)
        cfg = self.study.trial_config(sampled, self.overrides, self.smoke)
        resolved = flatten(cfg.model_dump(mode="json"))
        out = {TRIAL_NUMBER: trial.number}
        for key, value in sampled.items():
            out[key] = resolved[key]
            if resolved[key] != value:
                out[f"sampled.{key}"] = value
        out.update({key: resolved[key] for key in key_fields(cfg)})
        for key, value in out.items():
            if key != TRIAL_NUMBER and not key.startswith("sampled."):
                trial.set_user_attr(key, value)
        trial.set_user_attr("smoke", self.smoke)
        return out


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
    name = f"t{config[TRIAL_NUMBER]:03d}"
    for word in words:
        if len(name) + 1 + len(word) <= width:
            name += " " + word
    return name


def optuna_storage(url: str):
    """An Optuna storage from `--optuna-storage`: a database URL (sqlite:///…, postgresql://…, mysql://…) or a
    journal file (`journal:PATH`, or a path ending .log) — Optuna's option for a file on shared storage."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:") or (url.endswith(".log") and "://" not in url):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    return optuna.storages.RDBStorage(url)


def shown_url(url: str) -> str:
    """A database URL as printed and written to summary.json: its password masked."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _optuna_search(study: Study, space, name: str, storage_url: str, seed: int, metric: str):
    """OptunaSearch (TPE, seeded) on the study's define-by-run space, its study in `storage_url` (default: sqlite
    beside the experiment).

    Differs from Ray's: results without the metric (the SSL phase) or with a non-finite value are not told to
    Optuna as intermediate values; what a trial is told as follows its status, not whether a value exists —
    complete → COMPLETE with its value; pruned by ASHA → PRUNED (a truncated value told as COMPLETE misleads
    TPE); diverged → PRUNED, so TPE counts the region among the bad ones (FAIL would be ignored by TPE, which
    would keep proposing it); error → FAIL (Ray told an errored trial with a last value COMPLETE). The status
    is kept as a user attribute."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from .trial import trial_status

    State = optuna.trial.TrialState

    class StatusAwareOptunaSearch(OptunaSearch):
        def _told(self, trial_id: str) -> bool:
            """Told already: here, or by the run before a kill whose searcher state was saved earlier than the
            study in sqlite (Tune then runs the trial again; the study keeps its first record)."""
            if trial_id not in self._completed_trials:
                ot_trial = self._ot_trials[trial_id]
                if not self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
                    return False
                self._completed_trials.add(trial_id)
            return True

        def on_trial_result(self, trial_id: str, result: dict):
            value = result.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value) and not self._told(trial_id):
                self._ot_trials[trial_id].report(value, int(result.get(TIME_ATTR, 0)))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if self._told(trial_id):
                return
            ot_trial, status = self._ot_trials[trial_id], trial_status(result, error)
            value = (result or {}).get(self.metric)
            if status == "pruned":  # the result ASHA stopped it on never reached on_trial_result
                self.on_trial_result(trial_id, result or {})
            ot_trial.set_user_attr("status", status)
            if status == "complete" and isinstance(value, (int, float)) and math.isfinite(value):
                self._ot_study.tell(ot_trial, value)
            else:
                self._ot_study.tell(ot_trial, state=State.FAIL if status in ("error", "complete") else State.PRUNED)
            self._completed_trials.add(trial_id)

    return StatusAwareOptunaSearch(
        space=space, metric=metric, mode=study.mode,
        sampler=optuna.samplers.TPESampler(seed=seed, **study.space.sampler.model_dump()),
        study_name=name, storage=optuna_storage(storage_url), points_to_evaluate=study.warm_start_points() or None)


def _close_optuna_orphans(storage_url: str, name: str) -> int:
    """After a search that ran to its end, an Optuna trial still RUNNING belongs to no Tune trial (asked just
    before the driver was killed; the restored searcher drew a new one): told FAIL, so the study holds no
    trial running forever. Returns how many were closed."""
    import optuna

    study = optuna.load_study(study_name=name, storage=optuna_storage(storage_url))
    orphans = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in orphans:
        study._storage.set_trial_user_attr(trial._trial_id, "status", "orphaned by an interruption")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


def _link_optuna_run(storage_url: str, name: str):
    """`on_run` for TrialRuns: the trial's Optuna record carries its MLflow run id."""
    def link(config: dict, run_id: str) -> None:
        storage = optuna_storage(storage_url)
        study_id = storage.get_study_id_from_name(name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, config[TRIAL_NUMBER])
        storage.set_trial_user_attr(trial_id, "mlflow_run_id", run_id)

    return link


def status_of(trial, failed: bool) -> tuple[str, str]:
    """A finished Tune trial's status and, where there is one, its reason (one line)."""
    from .trial import REASON, trial_status

    status = trial_status(trial.last_result, failed or trial.status == "ERROR")
    if status == "error":
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
        lines = [line for line in text.splitlines() if line.strip()]
        return status, lines[-1] if lines else "error"
    if status == "pruned":
        return status, f"stopped by ASHA after epoch {int(trial.last_result.get(TIME_ATTR, 0))}"
    return status, str(trial.last_result.get(REASON, ""))


class FinishAwareASHA(ASHAScheduler):
    """ASHA (max_t = the budget's epochs) that never stops a trial on the report that ends it (it carries a
    status): a trial that trained its whole budget is complete even when ASHA's last rung is its last epoch."""

    def __init__(self, budget, metric: str, mode: str):
        super().__init__(time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=budget.epochs,
                         grace_period=min(budget.grace_period, budget.epochs),
                         reduction_factor=budget.reduction_factor)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(STATUS) else decision


def summarize(trials, requested: int, study: Study, metric: str, experiment_dir: Path, tracking_uri: str,
              runs: dict[str, str], experiment_id: str, ended: set[str] | None = None, top: int = 5,
              optuna_url: str | None = None) -> dict:
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
            "trial": f"t{t.config.get(TRIAL_NUMBER, -1):03d}", "name": run_name(study, t.config) if TRIAL_NUMBER in
            t.config else t.trial_id, "trial_id": t.trial_id, "status": status,
            "reason": reason, metric: m.get(metric) if status == "complete" else None, TIME_ATTR: m.get(TIME_ATTR),
            "selected_epoch": m.get("selected_epoch"),
            "selection_ci": [m.get(f"selected_{study.metric}_selection_ci_low"),
                             m.get(f"selected_{study.metric}_selection_ci_high")],
            **({"record_test_mean_auroc": m["record_test_mean_auroc"],  # --record-test-per-trial only
                "record_test_mean_auroc_ci": [m.get("record_test_mean_auroc_ci_low"),
                                              m.get("record_test_mean_auroc_ci_high")]}
               if "record_test_mean_auroc" in m else {}),
            "mlflow_run_id": runs.get(t.trial_id),
            "node_id": m.get("node_id"),
            "scan_backend": m.get("scan_backend"),
            "resolved": {k: v for k, v in t.config.items() if ":" not in k and not k.startswith("sampled.")},
            "sampled": {k[len("sampled."):]: v for k, v in t.config.items() if k.startswith("sampled.")},
        })
    complete = [r for r in rows if r["status"] == "complete" and isinstance(r[metric], (int, float))
                and math.isfinite(r[metric])]
    complete.sort(key=lambda r: r[metric], reverse=study.mode == "max")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("complete", "pruned", "diverged", "error", "interrupted")}
    interrupted = counts["interrupted"] > 0 or len(rows) < requested
    status = "interrupted" if interrupted else "complete" if complete else "no trial completed"
    return {
        "study": study.name, "file": study.origin, "status": status, "metric": metric, "mode": study.mode,
        "requested": requested, "trials": len(rows), **counts, "best": complete[0] if complete else None,
        "top": complete[:top], "rows": rows,
        "mlflow": f"mlflow ui --backend-store-uri {tracking_uri}",
        "mlflow_runs_table": tracking.runs_table_url(tracking_uri, experiment_id),
        "optuna": f"optuna-dashboard {shown_url(optuna_url or default_optuna_url(experiment_dir))}",
        "experiment_dir": str(experiment_dir),
    }


def print_summary(summary: dict, resume_command: str) -> None:
    metric = summary["metric"]
    counts = ", ".join(f"{summary[s]} {s}" for s in ("complete", "pruned", "diverged", "error", "interrupted")
                       if summary[s] or s == "complete")
    print(f"\n{summary['study']}: {summary['status']} — {summary['trials']} of {summary['requested']} trials: "
          f"{counts}; objective {metric} ({summary['mode']}; [95 % bootstrap CI on the validation set that selected "
          "it: optimistic])")
    for rank, row in enumerate(summary["top"], 1):
        trained = ", ".join(f"{k}={row['resolved'][k]}" for k in row["sampled"])
        ci = row.get("selection_ci", [None])
        ci = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if None not in ci else ""
        print(f"{rank:2d}. {row[metric]:.4f}{ci}  {row['name']}  [epoch {row['selected_epoch']:.0f} of "
              f"{row[TIME_ATTR]} selected]" + (f"  trained as: {trained}" if trained else ""))
    if summary["status"] == "interrupted":
        print(f"interrupted: finished trials are kept; continue with\n    {resume_command}")
    elif summary["status"] != "complete":
        print("no trial completed: nothing to report as best (see each trial's status and reason)")
    if (summary.get("ensemble") or {}).get("members"):
        ens, metric = summary["ensemble"], summary["metric"][len("best_val_"):]
        registered = f"registered as {ens['registered']['uri']}" if ens.get("registered") else "not registered"
        print(f"ensemble ({ens['method']}, {len(ens['members'])} members, chosen on val): val {metric} "
              f"{ens['val']['ensemble']['value']:.4f} [{ens['val']['ensemble']['ci_low']:.4f}, "
              f"{ens['val']['ensemble']['ci_high']:.4f}] (on the selection set) vs best single "
              f"{ens['val']['best_single']['value']:.4f}; {registered}; the test record is in summary.json and "
              "the report")
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


INVOCATION_FILE = "search.json"
INVOCATION = ("study", "data", "trials", "smoke", "overrides", "seed", "no_asha", "name", "tracking_uri",
              "optuna_storage", "ensemble_size", "no_ensemble", "no_report", "repeats", "repeat_top",
              "record_test_per_trial")  # what a resume repeats


def default_optuna_url(experiment_dir: Path) -> str:
    return f"sqlite:///{(experiment_dir / 'optuna.db').resolve()}"


def _where(args) -> tuple[str, str, Path]:
    """(experiment name, storage path or URI, local experiment directory for optuna.db and mlflow.db)."""
    from .space import resolve_path

    if isinstance(args.resume, str):
        args.name = args.resume
    name = args.name or f"{resolve_path(args.study).stem}{'-smoke' if args.smoke else ''}"
    uri_storage = "://" in args.storage
    storage = args.storage.rstrip("/") if uri_storage else str(Path(args.storage).resolve())
    return name, storage, (Path(args.local_dir).resolve() if uri_storage else Path(storage)) / name


def sync_to_storage(experiment_dir: Path, storage: str, name: str, names=(INVOCATION_FILE, "summary.json", "ensemble")):
    """With a remote `--storage` (s3://, gs://) the search's own files go there too, beside Tune's: the machine
    that drove the search (a KubeRay head pod, say) may be gone when someone resumes or reads it."""
    if "://" in storage:
        for entry in names:
            if (experiment_dir / entry).exists():
                upload(experiment_dir / entry, f"{storage}/{name}/{entry}")


def fetch_results(experiment_dir: Path, storage: str, name: str, trial_dir: str) -> Path:
    """A trial's result files (trial.RESULT_FILES: best.pt, predictions, summary, config) in the local experiment
    directory: with a local or mounted storage they are there already; from a remote one those files alone are
    fetched, not the trial's directory with its checkpoints and their optimizer state (MLflow logs them from
    here, the ensemble reads them here; a pruned trial, or one that errored, has none)."""
    if "://" in storage:
        for file in RESULT_FILES:
            download(f"{storage}/{name}/{trial_dir}/{file}", experiment_dir / trial_dir / file)
    return experiment_dir / trial_dir


def _restore_invocation(args) -> None:
    """`--resume [NAME]`: the search must exist; it continues as it was started (study file, --set, --data,
    --smoke, trials, seed), whatever else this command line says; resources and cluster may differ."""
    from ray import tune

    name, storage, experiment_dir = _where(args)
    if not tune.Tuner.can_restore(f"{storage}/{name}"):
        raise ConfigError(f"--resume: no search named '{name}' to resume in {storage}/{name}")
    if not (experiment_dir / INVOCATION_FILE).is_file() and "://" in storage:  # a resume on another machine
        download(f"{storage}/{name}/{INVOCATION_FILE}", experiment_dir / INVOCATION_FILE)
    if not (experiment_dir / INVOCATION_FILE).is_file():
        raise ConfigError(f"--resume: no search named '{name}' to resume in {storage}/{name}")
    for key, value in json.loads((experiment_dir / INVOCATION_FILE).read_text()).items():
        if value is not None:
            setattr(args, key, value)


def resume_command(args) -> str:
    name, storage, _ = _where(args)
    return f"python -m tune_xray.search {args.study} --resume {name} --storage {storage}"


def run_search(args, extra_callbacks: list = ()) -> dict:
    """Validate everything, then run (or resume) the search; returns the summary written to summary.json.

    `extra_callbacks`: more Tune callbacks (tests use one to interrupt a search)."""
    if args.resume:
        _restore_invocation(args)  # before anything else: nothing to resume is one error, leaving nothing behind
    if args.workers_per_trial > 1 and 0 < (args.gpus_per_trial or 0) / args.workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial {args.workers_per_trial} with --gpus-per-trial {args.gpus_per_trial:g}: "
                          "each DDP rank needs a GPU of its own (NCCL refuses two ranks on one GPU); use "
                          f"--gpus-per-trial {args.workers_per_trial} or more")
    if getattr(args, "repeats", 0) < 0 or (getattr(args, "repeats", 0) and args.repeat_top < 1):
        raise ConfigError(f"--repeats {args.repeats} --repeat-top {args.repeat_top}: both must be at least 1")
    if getattr(args, "ensemble_size", 5) < 1:
        raise ConfigError(f"--ensemble-size {args.ensemble_size}: at least 1 (or --no-ensemble)")
    check_numbers(args)
    study = load_study(args.study)  # every search-space error before Ray starts
    if args.data:
        args.data = absolute_data(args.data)
    # checked now; the device part is resolved again once Ray tells the cluster's GPUs (--gpus-per-trial default)
    overrides = trial_overrides(study, args.overrides, args.data, args.gpus_per_trial or 0, args.workers_per_trial,
                                getattr(args, "record_test_per_trial", False))
    base_cfg = study.trial_config({}, overrides, args.smoke)
    check_candidates(study, overrides, args.smoke)
    budget = study.budget(args.smoke, overrides)
    trials = args.trials if args.trials is not None else budget.trials
    name, storage, experiment_dir = _where(args)
    if not args.resume and (experiment_dir / "tuner.pkl").exists():
        raise ConfigError(f"{experiment_dir} holds an earlier search '{name}': pass --resume, or --name for a new one")
    if "://" in storage:
        try:
            storage_filesystem(storage)
        except Exception as err:  # noqa: BLE001 — pyarrow's errors differ by scheme; all mean "not a storage"
            raise ConfigError(f"--storage {storage}: not a storage pyarrow can open ({err})") from None
    with search_lock(experiment_dir, name):
        return _run(args, extra_callbacks, study, overrides, base_cfg, budget, trials, name, storage, experiment_dir)


def _run(args, extra_callbacks, study, overrides, base_cfg, budget, trials, name, storage, experiment_dir) -> dict:
    """The search itself, under its lock: data, Ray, the Tuner, the summary and what comes after the trials."""
    from ray import tune

    from .data.loader import prepare
    prepare(base_cfg.data)  # check and cache the data once, before any trial starts

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # SSL-phase reports carry no objective
    import ray

    from .trial import TrialResources, remove_orphaned_workdirs, resolve_trial, trial_driver, tune_metric

    if not ray.is_initialized():
        # keep the dashboard (ray[default]'s State API): without it a Train run stopped by ASHA leaks its
        # placement group and the next trial waits for resources forever
        try:
            _init_ray(args.address, args.verbose)
        except Exception as err:  # noqa: BLE001 — a start-up timeout, a refused address, ...: one line, exit 1
            raise SearchError(f"Ray did not start{' at ' + args.address if args.address else ''}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if args.gpus_per_trial is None:
        args.gpus_per_trial = default_gpus_per_trial(ray.cluster_resources())
    overrides = trial_overrides(study, args.overrides, args.data, args.gpus_per_trial, args.workers_per_trial,
                                getattr(args, "record_test_per_trial", False))
    if len(alive_nodes()) > 1:  # every node must see the storage and the data; checked before anything is written
        kind, _, data_path = base_cfg.data.source.partition(":")
        check_cluster_paths(storage, data_path if kind != "synthetic" else None)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (experiment_dir / INVOCATION_FILE).write_text(json.dumps({k: getattr(args, k, None) for k in INVOCATION}))
        sync_to_storage(experiment_dir, storage, name, (INVOCATION_FILE,))
    metric = tune_metric(study.metric)
    tracking_uri = args.tracking_uri or tracking.default_tracking_uri(experiment_dir)
    optuna_url = getattr(args, "optuna_storage", None) or default_optuna_url(experiment_dir)
    resources = TrialResources(args.workers_per_trial, args.cpus_per_trial, args.gpus_per_trial,
                               getattr(args, "one_worker_trials", None) or "tune")
    parent = tracking.start_parent(
        tracking_uri, name, experiment_dir,
        {"study": study.origin, "trials": trials, "smoke": args.smoke, "metric": study.metric, "mode": study.mode,
         "budget.epochs": budget.epochs, "overrides": json.dumps(overrides, sort_keys=True)},
        {"tune_xray.smoke": str(args.smoke).lower()})
    experiment_path = f"{storage}/{name}"

    def describe(config: dict) -> tracking.TrialRecord:
        cfg = resolve_trial(study, config, overrides, args.smoke)
        params = flatten(cfg.model_dump(mode="json"))
        params.update({k: v for k, v in config.items() if k.startswith("sampled.")})
        params.update(global_batch_sizes(cfg, resources.workers))
        return tracking.TrialRecord(run_name(study, config), params,
                                    {"tune_xray.smoke": str(args.smoke).lower(),
                                     "tune_xray.optuna_trial": str(config[TRIAL_NUMBER])})

    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, study=study, overrides=overrides, smoke=args.smoke, resources=resources,
                             storage_path=experiment_path, max_failures=args.max_failures),
        resources.trial())
    callbacks = [tracking.TrialRuns(tracking_uri, parent, describe, status_of, _link_optuna_run(optuna_url, name),
                                    RESULT_FILES, lambda trial: fetch_results(experiment_dir, storage, name,
                                                                              Path(trial.path).name)),
                 *extra_callbacks]
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    start = time.perf_counter()
    if args.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        scheduler = FinishAwareASHA(budget, metric, study.mode) if not args.no_asha else None
        tuner = tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
            num_samples=trials, scheduler=scheduler, trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            search_alg=resources.limiter(_optuna_search(study, DefineByRun(study, overrides, args.smoke), name,
                                                        optuna_url, args.seed, metric),
                                         getattr(args, "max_concurrent", None))))
    results = tuner.fit()
    remove_orphaned_workdirs()  # scratch of trials stopped or killed before their own cleanup, on this machine
    all_trials = results._experiment_analysis.trials
    runs = tracking.child_runs(tracking_uri, parent)
    summary = summarize(all_trials, trials, study, metric, experiment_dir, tracking_uri, runs,
                        tracking.experiment_id_of(tracking_uri, parent), tracking.ended_trials(tracking_uri, parent),
                        optuna_url=optuna_url)
    summary["wall_time_s"] = time.perf_counter() - start
    summary["resources"] = {"workers_per_trial": resources.workers, "cpus_per_trial": resources.cpus,
                            "gpus_per_trial": resources.gpus, "one_worker_trials": resources.one_worker}
    summary["storage"] = experiment_path
    summary["optuna_study"] = name  # a copied or renamed experiment directory still finds its study
    known = {t.trial_id for t in all_trials}
    tracking.mark_runs(tracking_uri, {r["trial_id"]: r["mlflow_run_id"] for r in summary["rows"]
                                      if r["status"] == "interrupted" and r["mlflow_run_id"]}, "interrupted",
                       "the search was interrupted; --resume continues it")
    tracking.delete_runs(tracking_uri, [run_id for trial_id, run_id in runs.items() if trial_id not in known])
    if summary["status"] != "interrupted":
        summary["optuna_orphans_closed"] = _close_optuna_orphans(optuna_url, name)
    best = summary["best"]
    summary["best_mlflow_run_id"] = best["mlflow_run_id"] if best else None
    summary_file = experiment_dir / "summary.json"
    summary_file.write_text(json.dumps(summary, indent=1, default=str))
    summary["failed"] = {}  # what comes after the trials: each step may fail without costing the others

    def after_trials(step: str, run) -> None:
        """Run one step after the trials; a failure is one line, recorded in summary.json (`failed`) and on the
        parent run, and the steps after it still run."""
        try:
            run()
        except Exception as err:  # noqa: BLE001 — the trials stand; what failed is said, not raised
            summary["failed"][step] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{step} failed: {summary['failed'][step]}", file=sys.stderr)
        summary_file.write_text(json.dumps(summary, indent=1, default=str))

    def repeats() -> None:
        from .repeat import print_repeats, run_repeats
        summary["repeats"] = run_repeats(experiment_dir, args.repeat_top, args.repeats, max_failures=args.max_failures)
        print_repeats(summary["repeats"])

    def ensemble() -> None:
        from .ensemble import run_ensemble
        for row in summary["rows"]:  # trials that ended before a resume on another machine
            if row["status"] == "complete" and not (experiment_dir / f"{row['trial']}-{row['trial_id']}").is_dir():
                fetch_results(experiment_dir, storage, name, f"{row['trial']}-{row['trial_id']}")
        result = run_ensemble(experiment_dir, size=getattr(args, "ensemble_size", 5), seed=args.seed,
                              tracking_uri=tracking_uri, read_test=True)
        summary["ensemble"] = {k: result.get(k) for k in ("method", "members", "selection", "val", "test",
                                                          "test_per_label", "test_reads", "registered",
                                                          "wall_time_s")}
        if result.get("registration_error"):
            raise RuntimeError(f"the ensemble was chosen but not registered: {result['registration_error']}")

    def report() -> None:
        import torch  # the report runs here, in the driver: on its own device, whatever the trials had

        from .report import build_report
        summary["report"] = str(build_report(experiment_dir, device="cuda" if torch.cuda.is_available() else "cpu"))

    if summary["status"] == "complete":
        if getattr(args, "repeats", 0):
            after_trials("repeats", repeats)
        if not getattr(args, "no_ensemble", False):
            after_trials("ensemble", ensemble)
        if not getattr(args, "no_report", False):
            after_trials("report", report)
            if "report" in summary["failed"]:
                print(f"(python -m tune_xray.report {experiment_dir} retries the report)", file=sys.stderr)
    after_trials("storage", lambda: sync_to_storage(experiment_dir, storage, name, (INVOCATION_FILE, "summary.json",
                                                                                   "ensemble", "report.html")))
    best_trial = next((t for t in all_trials if best and t.trial_id == best["trial_id"]), None)
    report_file = Path(summary["report"]) if str(summary.get("report", "")).endswith(".html") else None
    tracking.finish_parent(
        tracking_uri, parent, summary["status"], summary["best_mlflow_run_id"],
        {m.key: m.value for m in tracking.epoch_metrics(best_trial.last_result, 0)
         if m.key.startswith(tracking.RECORD_PREFIXES) or m.key == metric} if best_trial else {}, summary_file,
        (report_file,) if report_file else (), failed=sorted(summary["failed"]))
    return summary


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="NAME",
                        help="continue the interrupted search NAME (default: --name, or the study's name) as it "
                        "was started")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP ranks) per trial")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--one-worker-trials", choices=["tune", "trainer"], default="tune",
                        help="a one-worker trial trains in the Tune trial's own process (tune: no Ray Train worker "
                        "group to start) or as a Ray Train run (trainer); two or more workers are always a Train run")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="default: 1 when the cluster has a GPU when the search starts, else 0 (an autoscaling "
                        "cluster whose GPU workers start from 0: pass it); fractions pack trials onto a GPU")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="at most N trials at once, N waiting for resources (an autoscaler sees them all); "
                        "default: as many as the cluster holds, read again as it grows, and one waiting")
    parser.add_argument("--address", help="Ray cluster address (default: start Ray locally, or RAY_ADDRESS)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the experiment dir; on a "
                        "cluster, an MLflow server http://…)")
    parser.add_argument("--optuna-storage", help="Optuna storage: a database URL (postgresql://…) or journal:PATH "
                        "(default: sqlite in the experiment dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed override on every trial, e.g. --set supervised.batch_size=64")
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    parser.add_argument("--max-failures", type=int, default=1, help="retries per trial (Tune and Train)")
    parser.add_argument("--no-asha", action="store_true", help="run every trial to its own end")
    parser.add_argument("--ensemble-size", type=int, default=5, help="Caruana ensemble size chosen on val at the end")
    parser.add_argument("--no-ensemble", action="store_true", help="end with the leaderboard, no ensemble")
    parser.add_argument("--repeats", type=int, default=0, metavar="K", help="then run the best --repeat-top "
                        "configurations again with K new seeds each (full budget, no ASHA): mean ± sd over seeds")
    parser.add_argument("--repeat-top", type=int, default=3, metavar="N",
                        help="how many of the best configurations --repeats re-runs")
    parser.add_argument("--no-report", action="store_true", help="no report.html at the end (python -m tune_xray.report)")
    parser.add_argument("--record-test-per-trial", action="store_true",
                        help="also score each trial on test (record_test_* in its run); by default test is read "
                        "once, at the end, for the record of the ensemble, the best single trial and the top-K")
    parser.add_argument("--verbose", action="store_true", help="show the trials' own output")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_search(args)
    except (ConfigError, DataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the trials started (Tune handles Ctrl-C while they run)
        print("interrupted before any trial ran", file=sys.stderr)
        return 130
    print_summary(summary, resume_command(args))
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
