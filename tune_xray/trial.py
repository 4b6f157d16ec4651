"""One Tune trial: the Tune function trainable (`trial_driver`) runs the phases (`run_trial`), reporting every
epoch — in its own process when the trial has one worker (`TuneSession`), else as a Ray Train run whose workers
(`train_worker`, N ranks, DDP) do.

Ray 2.60's supported pattern for the latter (Train V2): a TorchTrainer is built and fit inside a plain Tune
function; `TuneReportCallback` forwards rank 0's reports to Tune. The Train run is named after the Tune trial
id, so a retried trial (tune.FailureConfig) finds its own snapshot and resumes; a worker failure restarts the
worker group from the last epoch's checkpoint (ray.train.FailureConfig). A one-worker trial checkpoints to Tune
itself, and Tune's retry resumes it from there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import ConcurrencyLimiter, Searcher

from .cluster import upload
from .config import build_config, objective
from .driver import DRIVER
from .record.names import (
    CV_FOLD,
    CV_FOLDS,
    FINAL_FILE,
    FINISHED,
    PROBE,
    RAN_WITH,
    REASON,
    REPEAT_SEED,
    REPLAY,
    RESULT_FILES,
    SCAN_BACKEND,
    SSL_FROM,
    SSL_PHASE,
    SSL_STORE,
    SSL_TIME_ATTR,
    STARTED_FROM,
    STATUS,
    TIME_ATTR,
    TRIAL_NAME,
    TRIAL_NUMBER,
)
from .record.status import ssl_from_text, status_of
from .record.text import plural


class TrialLines(tune.Callback):
    """One console line per trial as it ends — status, epochs, the objective — instead of Tune's tables: `name`
    (a trial config → its run name)."""

    def __init__(self, metric: str, name=lambda config: str(config.get(TRIAL_NUMBER, "?"))):
        self.metric, self.name = metric, name

    def _say(self, trial, failed: bool) -> None:
        status, reason = status_of(trial, failed)
        result = trial.last_result or {}
        value = result.get(self.metric) if status == "complete" else None
        epochs, ssl_epochs = int(result.get(TIME_ATTR) or 0), int(result.get(SSL_TIME_ATTR) or 0)
        latency = result.get("latency_ms")
        ssl = f"{plural(ssl_epochs, str(result.get(SSL_PHASE)).upper() + ' epoch')}, " if ssl_epochs else ""
        reused = result.get(SSL_FROM)
        if isinstance(reused, dict):  # no SSL epoch of its own: the phase it fine-tuned from, said
            ssl = f"{str(result.get(SSL_PHASE) or 'SSL').upper()} {ssl_from_text(reused)}, "
        print(f"{self.name(trial.config)}: {status}, {ssl}{epochs} fine-tune epoch{'' if epochs == 1 else 's'}"
              + (f", {self.metric} {value:.4f}" if isinstance(value, (int, float)) else "")
              + (f", {latency:.1f} ms/image" if isinstance(latency, (int, float)) else "")
              + (f" ({reason[:160]})" if reason and status != "complete" else ""), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._say(trial, False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, True)


def global_batch_sizes(cfg, workers: int) -> dict:
    """`<phase>.global_batch_size`: what one optimizer step sees across a trial's DDP ranks (each rank's
    `batch_size` × the ranks; × `accum_steps` more per step)."""
    phases = [("supervised", cfg.supervised)] + [(name, getattr(cfg, name)) for name in ("byol", "cass")
                                                 if getattr(cfg, name).enabled]
    return {f"{name}.global_batch_size": phase.batch_size * workers for name, phase in phases}


def _numbers(metrics: dict, prefix: str = "") -> dict:
    """Numeric values (NaN and inf included: a non-finite metric is never silently dropped)."""
    return {prefix + k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stored_ssl(cfg, store: str | None, trial: str | None, world_size: int, resume: dict | None, scratch):
    """(ssl_start, after_ssl) for run_phases: `model.init_from`'s stored phase; else, for a fresh trial with an SSL
    phase, the store's phase of its key when there is one (pre-trained by an earlier trial: reused), or a hook that
    keeps its own there once it has run. A resumed trial carries its own phase in its state."""
    from .phases.ssl_store import check_fits, fetch, keep, read, resolve_init, save, ssl_inputs, ssl_key, ssl_phase

    names = fine_tuned_names(cfg)
    if cfg.model.init_from:
        meta = resolve_init(cfg.model.init_from)
        states, meta = read(Path(meta["dir"]))
        check_fits(meta, names, cfg.model.init_from)
        return {"states": states, "meta": meta, "from": {"init_from": cfg.model.init_from, "trial": meta["trial"],
                                                         "key": meta["key"]}}, None
    phase = ssl_phase(cfg)
    if phase is None or store is None or resume is not None:
        return None, None
    key = ssl_key(cfg, world_size)
    local = fetch(store, key)
    if local is not None:
        states, meta = read(local)
        shutil.rmtree(local, ignore_errors=True)
        return {"states": states, "meta": meta, "from": {"reused": True, "trial": meta["trial"], "key": key}}, None
    def after_ssl(backbones, summary: dict) -> None:
        from .phases.ssl_store import probe_curve

        meta = {"key": key, "trial": trial.rsplit("-", 1)[0] if trial else None, "trial_name": trial, "phase": phase,
                "backbones": names, "inputs": ssl_inputs(cfg, world_size), "summary": summary,
                "probe": probe_curve(summary.get("history") or [])}
        keep(store, key, save(scratch("ssl"), backbones, meta))

    return None, after_ssl


def fine_tuned_names(cfg) -> list[str]:
    """The backbones a trial fine-tunes, in the fine-tune's order: the model's, or its CASS arm(s)."""
    if not cfg.cass.enabled:
        return [cfg.model.backbone]
    if cfg.cass.finetune == "both":
        return [cfg.cass.cnn, cfg.cass.transformer]
    return [getattr(cfg.cass, cfg.cass.finetune)]


def _ssl_epochs_done(resume: dict | None, ssl: str | None) -> int:
    """The SSL epochs a resumed trial had done: its SSL phase's restored epoch, or the whole phase when it resumes
    in the fine-tune."""
    if resume is None or ssl is None:
        return 0
    if resume["phase"] == ssl:
        return int(resume["epoch"])
    return len((resume.get("ssl") or {}).get("history") or [])


def _format(phase: str, metrics: dict) -> dict:
    """A phase's epoch metrics as reported: the fine-tune's as they are, an SSL phase's (byol, cass) in its own
    namespace with its own epoch (`byol/epoch`)."""
    numbers = _numbers({k: v for k, v in metrics.items() if k not in ("phase", "last")})
    return numbers if phase == "supervised" else {f"{phase}/{k}": v for k, v in numbers.items()}


class TrainSession:
    """One rank of a Ray Train worker group (TorchTrainer): its rank, device, checkpoints and reports."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = str(ray.train.torch.get_device())

    def get_checkpoint(self) -> Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint: Checkpoint | None = None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)

    def store(self, result_dir: str) -> None:
        """The driver stores the results from the Train run's last checkpoint (trial_driver)."""


class TuneSession:
    """A one-worker trial run in the Tune trial's own process, reporting to Tune directly: Ray Train's local
    mode without its report (which keeps only the last metrics). No controller, placement group or worker actor
    to start; ASHA, per-epoch checkpoints, resume and Tune's retries work as with a worker group. The final
    result's files go straight to the trial's directory on storage."""

    rank, world_size = 0, 1

    def __init__(self, device: str, results_to: str):
        self.device, self.results_to = device, results_to

    def get_checkpoint(self) -> Checkpoint | None:
        return tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint: Checkpoint | None = None) -> None:
        tune.report(metrics, checkpoint=checkpoint)

    def store(self, result_dir: str) -> None:
        upload(result_dir, self.results_to)


def train_worker(config: dict) -> None:
    """Ray Train's per-rank function (a trial of two or more ranks, or `--one-worker-trials trainer`)."""
    run_trial(config, TrainSession())


WORKDIR_PREFIX = "tune_xray-"  # a trial's scratch directories: tune_xray-<kind>-<pid>-… in the system temp dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_orphaned_workdirs() -> int:
    """Scratch directories on this machine whose process has ended — a trial stopped or killed before its own
    cleanup ran — are removed; returns how many. Every trial runs it as it starts, and the search at its end."""
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def scratch_dirs():
    """`make(kind)` → a new scratch directory named for this process; all are removed on every exit of the block
    (a trial complete, diverged, failed or stopped), and orphans of ended processes as it starts."""
    remove_orphaned_workdirs()
    made: list[Path] = []

    def make(kind: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{kind}-{os.getpid()}-")))
        return made[-1]

    try:
        yield make
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def run_trial(config: dict, session: TrainSession | TuneSession) -> None:
    """One rank of a trial: resume from the last checkpoint if any, run the phases, report every epoch.

    The fine-tune's last epoch (its budget or an early stop) is reported together with the final record, so
    that ASHA never stops a trial on the report that ends it. A diverged run reports `status: diverged` and
    returns normally: neither Ray Train nor Tune retries a deterministic divergence. Its scratch directories are
    gone whichever way it ends (scratch_dirs)."""
    with scratch_dirs() as scratch:
        _run_trial(config, session, scratch)


def _run_trial(config: dict, session: TrainSession | TuneSession, scratch) -> None:
    from .models.pretrained import backbones_of, started_from
    from .phases import resolve_scan_backend, run_phases  # here: only the process that trains needs timm, kornia
    from .phases.common import Collapsed, Diverged, load_state
    from .phases.probe import study_probe
    from .phases.ssl_store import ssl_phase

    cfg = build_config(config["trial_config"], "trial config")
    rank, world_size = session.rank, session.world_size
    cfg.device = session.device
    scan_backend = resolve_scan_backend(cfg, cfg.device)
    run_dir = scratch("run")
    resume = None
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_FILE).is_file():  # the run had finished: report its result again
                final = json.loads((Path(directory) / FINAL_FILE).read_text())
                session.report(final, checkpoint=checkpoint if rank == 0 else None)
                return
            resume = load_state(directory, run_dir)
    supervised_epochs = [resume["epoch"] if resume and resume["phase"] == "supervised" else 0]
    ssl = ssl_phase(cfg)
    ssl_start, after_ssl = stored_ssl(cfg, config.get(SSL_STORE), config.get(TRIAL_NAME), world_size, resume,
                                      scratch)
    ssl_epochs = [_ssl_epochs_done(resume, ssl)]
    ran_with = {"device": str(cfg.device), **global_batch_sizes(cfg, world_size)}
    # the files its backbones start from, fetched into this node's cache if the driver's is not this one's
    started = {b: started_from(b, cfg.model.pretrained, cfg.model.pretrained_ema) for b in backbones_of(cfg)}
    every = {SCAN_BACKEND: scan_backend, RAN_WITH: ran_with, STARTED_FROM: started,  # in every report
             **({SSL_PHASE: ssl} if ssl else {}), **({SSL_FROM: ssl_start["from"]} if ssl_start else {})}
    held: dict = {}  # the fine-tune's last epoch, reported with the final record
    # a resumed run re-sends the epochs its state holds: those reported after the driver's last save reach
    # the record this way (the tracker keeps the epochs it already has)
    replay = [] if resume is None else [_format(resume["phase"], m) for m in resume["history"]]
    if resume is not None and resume["phase"] == "supervised" and resume.get("ssl"):
        replay = [_format(ssl, m) for m in resume["ssl"]["history"]] + replay

    def clocks() -> dict:
        """ASHA's clocks: the fine-tune's epochs, and the SSL phase's where there is one."""
        return {TIME_ATTR: supervised_epochs[0], **({SSL_TIME_ATTR: ssl_epochs[0]} if ssl else {})}

    def formatted(metrics: dict) -> dict:
        """An epoch's report: its metrics (an SSL phase's under its name, with the probe as PROBE) and clocks."""
        phase = metrics["phase"]
        if phase == "supervised":
            supervised_epochs[0] = metrics["epoch"]
        else:
            ssl_epochs[0] = metrics["epoch"]
        out = {**_format(phase, metrics), **clocks(), **every}
        probe = study_probe(metrics)
        if phase != "supervised" and probe is not None:
            out[PROBE] = probe
        return out

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        phase = metrics["phase"]
        out = formatted(metrics)
        if replay:
            out[REPLAY] = replay.copy()
            replay.clear()
        if phase == "supervised" and metrics["last"]:
            held.update(out)
        else:
            session.report(out, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted by Ray Train by now (or not needed)

    try:
        summary = run_phases(cfg, run_dir, report, rank=rank, world_size=world_size, checkpoints=True, resume=resume,
                             ssl_start=ssl_start, after_ssl=after_ssl)
    except Diverged as err:  # every rank raises it (the non-finite check is agreed across ranks)
        session.report({**held, **clocks(), **every, STATUS: "diverged", REASON: str(err),
                        "diverged_epoch": float(err.epoch)})
        return
    except Collapsed as err:  # every rank raises it (judged on the agreed metrics): its last epoch's metrics with it
        session.report({**formatted({"phase": err.phase, **err.metrics, "epoch": err.epoch}), STATUS: "collapsed",
                        REASON: str(err), "collapsed_epoch": float(err.epoch)})
        return
    over = cfg.supervised.over_limits(held)
    if over:  # the study's hard limits: an infeasible configuration, told so (not a failure, not complete)
        session.report({**held, **clocks(), **every, STATUS: "infeasible", REASON: over})
        return
    sup, metric = summary["supervised"], cfg.supervised.selection_metric
    final = {**held, **clocks(), **every, FINISHED: 1.0, STATUS: "complete",
             "selected_epoch": float(sup["best_epoch"]), **_numbers(summary["val"], "selected_val_"),
             **_numbers(summary["test"], "record_test_")}
    final[objective(metric)] = sup["history"][sup["best_epoch"] - 1][metric] if sup["best_epoch"] else math.nan
    final["node_id"] = ray.get_runtime_context().get_node_id()  # where it trained (rank 0), for the record
    result_dir = None
    if rank == 0:  # the selected checkpoint, predictions and summary travel as the run's last checkpoint
        result_dir = scratch("result")
        (run_dir / FINAL_FILE).write_text(json.dumps(final))
        for name in RESULT_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, result_dir)
        session.store(result_dir)  # before the report: the trial's end is processed once it is in
    session.report(final, checkpoint=Checkpoint.from_directory(result_dir) if result_dir else None)


@dataclass(frozen=True)
class TrialResources:
    """What one trial uses: `workers` ranks sharing `cpus` CPUs and `gpus` GPUs (fractions allowed)."""

    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    one_worker: str = "tune"  # how a one-worker trial runs: "tune" (in the trial's process) or "trainer"

    @property
    def in_trial(self) -> bool:
        return self.workers == 1 and self.one_worker == "tune"

    def trial(self) -> dict:
        """What Tune reserves for the trial itself: everything when it trains in its own process; otherwise
        nothing (it only waits on its Train run, whose workers hold the resources)."""
        if self.in_trial:
            return {"cpu": self.cpus, "gpu": self.gpus}
        return {"cpu": 0, "memory": 2**20}

    def scaling(self) -> ScalingConfig:
        per_worker = {"CPU": self.cpus / self.workers}
        if self.gpus:
            per_worker["GPU"] = self.gpus / self.workers
        return ScalingConfig(num_workers=self.workers, use_gpu=self.gpus > 0, resources_per_worker=per_worker)

    def placeable(self, cluster: dict) -> int:
        """How many such trials `cluster` (ray.cluster_resources()) holds at once; 0 when not one fits."""
        fits = [cluster.get("CPU", 0) // self.cpus] if self.cpus else []
        if self.gpus:
            fits.append(cluster.get("GPU", 0) // self.gpus)
        return int(min(fits, default=1))

    def limiter(self, searcher: Searcher, cap: int | None = None, pending: int | None = None) -> Searcher:
        """`searcher` behind the limit on live trials the search runs with (`ClusterConcurrency`): `cap`
        (--max-concurrent), else as many as the cluster holds now and `pending` more waiting (--max-pending)."""
        return ClusterConcurrency(searcher, self, pending, cap)


class ClusterConcurrency(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter with a limit that follows the cluster: the trials its resources hold now, plus the
    waiting ones whose requests an autoscaler sees and adds nodes for — `pending` (--max-pending), by default as
    many as one new node like the cluster's largest can start. Read again at each suggestion, so a cluster that
    grows (GPU workers autoscaled from 0, a resume on a bigger one) runs more trials at once.

    Tune sees the resources of a trial that trains in its own process and queues such trials itself; it does not
    see a Ray Train run's workers (the trial itself holds nothing), and without a limit it would start every such
    trial at once, each waiting on its worker group, the searcher told nothing in between.

    `cap` (--max-concurrent) fixes the limit instead. The limiter is pickled with the search; a resume runs trials
    with the resources, `pending` and `cap` it is given: this driver's (`this_driver(concurrency=…)`), which every
    limiter of it reads."""

    def __init__(self, searcher: Searcher, resources: TrialResources, pending: int | None = None,
                 cap: int | None = None):
        self.resources, self.pending, self.cap = resources, pending, cap
        super().__init__(searcher, max_concurrent=self._limit())

    def _limit(self) -> int:
        resources, pending, cap = DRIVER.get("concurrency") or (self.resources, self.pending,
                                                                 getattr(self, "cap", None))
        if cap:
            return cap
        if pending is None:  # one new node like the largest here: what an autoscaler adds for the waiting requests
            pending = max([resources.placeable(n["Resources"]) for n in ray.nodes() if n["Alive"]] + [1])
        return resources.placeable(ray.cluster_resources()) + pending

    def suggest(self, trial_id: str):
        self.max_concurrent = self._limit()
        return super().suggest(trial_id)


def resolve_trial(resolved, config: dict, *before):
    """The TrialConfig a Tune trial's config trains: its drawn values on the search's resolved study, and a repeat's
    seed (tune_xray.repeat: the same configuration with a new seed) or a fold's split (tune_xray.cv: fold k of K
    over train + val is validation). (`before`: the overrides and smoke flag a search started before the study was
    resolved once passes from its pickled run record, with its Study.)"""
    if before:
        resolved = resolved.resolve(*before)
    extra = {}
    if REPEAT_SEED in config:
        extra["seed"] = config[REPEAT_SEED]
    if CV_FOLD in config:
        extra["data"] = {"folds": config[CV_FOLDS], "fold": config[CV_FOLD]}
    return resolved.trial_config(resolved.study.sampled_from(config), extra)


def trial_driver(config: dict, *, resolved, resources: TrialResources, storage_path: str,
                 max_failures: int) -> None:
    """Tune function trainable: resolve the drawn config and run it — in this process when it has one worker
    (`TuneSession`), else as a Ray Train run of `resources.workers` ranks (DDP).

    A Train run lives in the experiment directory (`storage_path`) as `train-<trial id>`. Either way the result
    files are written straight into the trial's directory there (on a cluster this trial may run on any node:
    its local trial directory is not the driver's)."""
    cfg = resolve_trial(resolved, config)
    context = tune.get_context()
    from .phases.ssl_store import STORE_DIR

    name = Path(context.get_trial_dir()).name
    train_config = {"trial_config": cfg.model_dump(mode="json"), SSL_STORE: f"{storage_path}/{STORE_DIR}",
                    TRIAL_NAME: name}
    results_to = f"{storage_path}/{name}"
    if resources.in_trial:
        run_trial(train_config, TuneSession("cuda" if resources.gpus else "cpu", results_to))
        return
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=train_config,
        scaling_config=resources.scaling(),
        run_config=ray.train.RunConfig(
            name=f"train-{context.get_trial_id()}",  # deterministic: a retried trial resumes from it
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if result.checkpoint is not None:  # the trial's results: MLflow artifacts, the ensemble's pool
        with result.checkpoint.as_directory() as directory:
            upload(directory, results_to)


def trainable(resolved, resources: TrialResources, storage_path: str, max_failures: int):
    """`trial_driver` as Tune runs it, for the search and its repeats alike: the resolved study (placed on
    `resources`) and the rest bound, the resources its trial holds reserved."""
    return tune.with_resources(
        tune.with_parameters(trial_driver, resolved=resolved, resources=resources, storage_path=storage_path,
                             max_failures=max_failures),
        resources.trial())


def quiet_console(verbose: bool = False) -> None:
    """Tune's console as a search shows it, a new run or a resumed one (whose RunConfig comes from its pickle): no
    TensorBoard logger or hint, and Tune's tables and configuration box only `verbose`."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # JSON and CSV loggers only, not TensorBoard's as a third
    if not verbose:  # Tune's newer console prints its configuration box whatever the verbosity; the older is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def run_config(name: str, storage: str, callbacks: list, max_failures: int, verbose: bool = False) -> tune.RunConfig:
    """How a Tune run of trials keeps them: `max_failures` retries each, and one checkpoint, the last; result.json
    and progress.csv per trial (no TensorBoard files: MLflow has the curves); Tune's own tables only `verbose`
    (the callbacks say one line per trial)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    quiet_console(verbose)
    return tune.RunConfig(name=name, storage_path=storage,
                          callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), *callbacks],
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1 if verbose else 0)
