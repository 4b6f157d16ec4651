"""A search from its command line to its end: everything checked before Ray starts, the Tuner (Optuna TPE + ASHA,
each trial a Tune trial or a Ray Train run, each an MLflow child run), the summary, and what comes after the
trials — repeats, the ensemble, cross-validation, the report — sibling stages over the `Experiment` (STEPS), in turn,
a failure of one said without costing the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ray import tune

from . import costs, cv, ensemble, external, repeat, report, tracking
from .asha import FinishAwareASHA, ParetoASHA
from .cluster import alive_nodes, check_cluster_paths, connect, storage_filesystem, watch_ray, which_ray
from .config import ConfigError, objective, parse_overrides
from .credentials import mask, remember, same_place
from .data.loader import check_split_keys
from .data.sources import describe_data, describe_untrained
from .driver import DRIVER, this_driver
from .experiment import Experiment, provenance, trial_name
from .external import ExternalSource, check_external
from .models.pretrained import WeightsMissing, backbones_of, caches_text, prefetch, resolve, size_text
from .phases.ssl_store import check_fits, resolve_init
from .record.names import INVOCATION_FILE, PARENT_ID_FILE, RESULT_FILES, SUMMARY_FILE, TRIAL_NUMBER
from .record.status import StepFailed, status_of
from .record.text import plural
from .request import TUNE_STATE, SearchRequest
from .searcher import DefineByRun, close_orphans, link_run, optuna_searcher
from .space import ResolvedStudy, Study, flatten, load_study, resolve_path
from .summary import run_name, summarize
from .trial import (
    TrialLines,
    TrialResources,
    fine_tuned_names,
    global_batch_sizes,
    quiet_console,
    remove_orphaned_workdirs,
    resolve_trial,
    run_config,
    trainable,
)
from .weights import study_files

SECRET_KEYS = ("optuna_storage", "tracking_uri")  # URLs that may carry a password


class SearchError(RuntimeError):
    """A failure while the search runs (Ray did not start, say): one line, exit 1."""


def check_numbers(request: SearchRequest) -> None:
    """Counts and resources the command line gives, before anything starts: one error naming the flag."""
    at_least = [("--trials", request.trials, 1), ("--workers-per-trial", request.workers_per_trial, 1),
                ("--max-concurrent", request.max_concurrent, 1), ("--max-pending", request.max_pending, 0),
                ("--max-failures", request.max_failures, 0)]
    for flag, value, low in at_least:
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: at least {low}")
    if not request.cpus_per_trial > 0:
        raise ConfigError(f"--cpus-per-trial {request.cpus_per_trial:g}: more than 0 (a trial's process needs a CPU)")
    if request.gpus_per_trial is not None and request.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial {request.gpus_per_trial:g}: 0 or more")
    if request.workers_per_trial > 1 and 0 < (request.gpus_per_trial or 0) / request.workers_per_trial < 1:
        raise ConfigError(f"--workers-per-trial {request.workers_per_trial} with --gpus-per-trial "
                          f"{request.gpus_per_trial:g}: each DDP rank needs a GPU of its own (NCCL refuses two ranks "
                          "on one GPU); use "
                          f"--gpus-per-trial {request.workers_per_trial} or more")
    if request.repeats < 0 or (request.repeats and request.repeat_top < 1):
        raise ConfigError(f"--repeats {request.repeats} --repeat-top {request.repeat_top}: both must be at least 1")
    if request.cv_folds < 0 or request.cv_folds == 1 or request.cv_top < 1:
        raise ConfigError(f"--cv-folds {request.cv_folds} --cv-top {request.cv_top}: at least 2 folds (0: none) and 1 "
                          "configuration")
    if request.ensemble_size < 1:
        raise ConfigError(f"--ensemble-size {request.ensemble_size}: at least 1 (or --no-ensemble)")
    for flag, value in (("--latency-budget", request.latency_budget), ("--params-budget", request.params_budget)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value:g}: more than 0")


def absolute_data(source: str) -> str:
    """`nih:data/nih` → `nih:/abs/data/nih`: Ray runs trials in directories of its own (and on other nodes)."""
    kind, sep, path = source.partition(":")
    return f"{kind}:{Path(path).expanduser().resolve()}" if sep and path and "://" not in source else source


def default_gpus_per_trial(cluster: dict) -> float:
    """--gpus-per-trial when not given: 1 when the cluster (ray.cluster_resources()) has a GPU, else 0 — the
    cluster's, not the driver's (a CPU-only head drives GPU workers)."""
    return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0


def check_candidates(resolved: ResolvedStudy) -> None:
    """Before Ray starts: every backbone a trial could draw is a timm model (ours included) and every weights
    file it could load exists here — a trial that would only fail on its worker is one error now."""
    import timm

    from . import models  # noqa: F401  (registers MambaVision and VMamba)

    study = resolved.study
    for where, key, value in study.candidates():
        cfg = resolved.trial_config({key: value})
        names = {"model.backbone": cfg.model.backbone}
        if cfg.cass.enabled:
            names = {"cass.cnn": cfg.cass.cnn, "cass.transformer": cfg.cass.transformer}
        for field, name in names.items():
            if not timm.is_model(name.split(".")[0]):
                raise ConfigError(f"{study.origin}: {where}={value!r}: {field} '{name}' is not a timm model")
        for name in backbones_of(cfg):
            try:
                weight = resolve(name, cfg.model.pretrained)
            except ConfigError as err:
                raise ConfigError(f"{study.origin}: {where}={value!r}: {err}") from None
            if weight is not None and weight.source == "file" and not Path(weight.location).is_file():
                raise ConfigError(f"{study.origin}: {where}={value!r}: model.pretrained {weight.location}: no such "
                                  "file")
        if cfg.model.init_from:  # the stored SSL phase it fine-tunes from: there, and of the backbones it trains
            try:
                check_fits(resolve_init(cfg.model.init_from), fine_tuned_names(cfg), cfg.model.init_from)
            except ConfigError as err:
                raise ConfigError(f"{study.origin}: {where}={value!r}: {err}") from None


def fetch_weights(resolved: ResolvedStudy, address: str | None) -> None:
    """Before Ray starts: every pretrained file the study can draw in this machine's caches, the missing ones
    fetched in parallel (weights.prefetch), said in one line. Offline with files missing: one ConfigError naming
    each and its fetch command (exit 2), nothing started."""
    files, scratch = study_files(resolved)
    if scratch:
        print(f"pretrained: timm has no weights for {', '.join(scratch)}: trained from scratch (said in each record)")
    if not files:
        return
    try:
        paths, fetched = prefetch(files)
    except WeightsMissing as err:
        raise ConfigError(str(err)) from None
    where = "" if address is None else ("; on other nodes the first trial to need a file fetches it into that "
                                        "node's cache under a file lock (once per node)")
    print(f"pretrained: {plural(len(files), 'file')}, {size_text(paths)}, in {caches_text(paths)} "
          f"({len(fetched)} fetched now){where}")


def locate(request: SearchRequest) -> Experiment:
    """The experiment a request names: `--resume NAME`, `--name`, or the study's name (`-smoke` added)."""
    name = request.resume if isinstance(request.resume, str) else request.name
    name = name or f"{resolve_path(request.study).stem}{'-smoke' if request.smoke else ''}"
    return Experiment.locate(name, request.storage, request.local_dir)


def flag_of(key: str) -> str:
    """The command-line flag of a request key."""
    return {"study": "the study file", "overrides": "--set"}.get(key, "--" + key.replace("_", "-"))


def restore_request(request: SearchRequest) -> SearchRequest:
    """`--resume [NAME]`: the search must exist; it continues as it was started (study file, --set, --data, --smoke,
    trials, seed, the steps after the trials: request.KEPT), compared by meaning (the study by its file, --data by
    its resolved path). One of those given again (`request.given`) with another value is refused, naming its stored
    value, and so is another --max-failures (request.TUNE_STATE: Tune restores it from its own state); resources
    (request.RESUMABLE) may change — each change said in one line and applied: the pickled limiter, trial records
    and sync follow this driver (trial.this_driver), and each trial records the device and global batch it ran
    with — and not given again are the search's own. Returns the request the resume runs."""
    from ray import tune

    experiment = locate(request)
    missing = f"--resume: no search named '{experiment.name}' to resume in {experiment.path}"
    if not tune.Tuner.can_restore(experiment.path):
        raise ConfigError(missing)
    experiment.fetch_resume()  # a resume on another machine: search.json, the parent run's id, sqlite stores
    kept, resources = experiment.stored_request()
    if not kept:
        raise ConfigError(missing)
    changed, restored = [], {}
    for key, value in kept.items():
        ours = getattr(request, key)
        ours = list(ours) if isinstance(ours, tuple) else ours  # --set, as JSON holds it
        if key in SECRET_KEYS and value is not None and same_place(value, ours):
            continue  # a store's credentials are never stored: this command line's URL for the same store keeps them
        same = same_meaning(key, ours, value)
        if key in request.given and key != "name" and not same:
            shown = [", ".join(map(str, v)) or "none" if isinstance(v, list) else ("on" if v else "off")
                     if isinstance(v, bool) else v for v in (ours, value)]
            changed.append(f"{flag_of(key)} {shown[0]} (the search's: {shown[1]})")
        restored[key] = value
    for key in TUNE_STATE:  # kept in Tune's pickled state, which a resume restores as it was: it cannot change
        if key in request.given and key in resources and getattr(request, key) != resources[key]:
            changed.append(f"{flag_of(key)} {getattr(request, key)} (the search's: {resources[key]}, kept in Tune's "
                           "own state)")
    if changed:
        raise ConfigError(f"--resume {experiment.name}: {'; '.join(changed)}: a resume continues the search as it "
                          "was started; start a new --name to change it")
    for key, value in resources.items():
        if key not in request.given:
            restored[key] = value
        elif getattr(request, key) != value:
            print(f"--resume: {flag_of(key)} {getattr(request, key)} (the search started with {value})"
                  + RECORDED.get(key, ""), flush=True)
    return dataclasses.replace(request, **restored)


# what a resource a resume changes does to the record: said beside the change
RECORDED = {"workers_per_trial": "; the trials started from here train with it, each recording its global batch",
            "gpus_per_trial": "; the trials started from here run with it, each recording its device (and so the "
                              "latency it measures)",
            "one_worker_trials": "; the trials started from here run so",
            "max_concurrent": "; for the trials the search has yet to propose (those it holds already, interrupted or "
                              "waiting, run as the cluster's resources allow)",
            "max_pending": "; for the trials the search has yet to propose"}


def same_meaning(key: str, given, stored) -> bool:
    """Whether a flag given again names what the search stored: the study by its file (a name or a path to it),
    --data and each --external by its resolved path (the stored ones were made absolute), anything else by
    value."""
    if key == "study" and given and stored:
        return resolve_path(given).resolve() == resolve_path(stored).resolve()
    if key == "data" and given and stored:
        return absolute_data(given) == stored
    if key == "external":
        return [absolute_data(spec) for spec in given] == list(stored)
    return given == stored


def earlier_gpus(experiment: Experiment) -> str:
    """`; its last run had 0`: the GPUs per trial the search's last run resolved ('' where no run wrote it)."""
    if not (experiment.directory / SUMMARY_FILE).is_file():
        return ""
    runs = experiment.summary().get("resources_runs") or []
    return f"; its last run had {runs[-1]['gpus_per_trial']:g}" if runs else ""


def search_params(request: SearchRequest, resolved: ResolvedStudy, trials: int, resources) -> dict:
    """The parent run's params: everything that decides what the search does, so runs compare on them."""
    study, budget = resolved.study, resolved.budget
    return {"study": study.origin, "trials": trials, "smoke": request.smoke, "metric": study.metric, "mode": study.mode,
            "budget.epochs": budget.epochs, "scheduler": asha_text(request, study, objective(study.metric), budget),
            "asha.grace_period": budget.grace_period, "asha.reduction_factor": budget.reduction_factor,
            "asha.ssl_grace_period": budget.ssl_grace_period or "off",
            "asha.ssl_reduction_factor": budget.ssl_reduction_factor or budget.reduction_factor,
            "sampler": f"{study.space.sampler.name} (Optuna)",
            **{f"sampler.{k}": v for k, v in study.space.sampler.options().items()},
            "objectives": objectives_text(study),
            "seed": request.seed, "ensemble_size": "off" if request.no_ensemble else request.ensemble_size,
            **{f"ensemble.budget.{k}": "none" if v is None else v for k, v in resolved.ensemble.items()},
            "repeats": request.repeats,
            "set": " ".join(request.overrides) or "none", "overrides": json.dumps(resolved.overrides, sort_keys=True),
            "data": request.data or "synthetic", "workers_per_trial": resources.workers,
            "cpus_per_trial": resources.cpus, "gpus_per_trial": resources.gpus, **provenance()}


def objectives_text(study: Study) -> str:
    """`val_mean_auroc (max), latency_ms (min)`: what the search optimises, in the file's order."""
    return ", ".join(f"{k} ({m})" for k, m in [(study.metric, study.mode), *study.costs])


def asha_text(request: SearchRequest, study: Study, metric: str, budget=None) -> str:
    """How ASHA stops the trials of a search: off, on its metric, or (a Pareto search) on every objective; and,
    where the `budget` sets SSL rungs, during the SSL phase on the probe."""
    if request.no_asha:
        return "no early stopping"
    ssl = ""
    if budget is not None and budget.ssl_grace_period:
        eta = budget.ssl_reduction_factor or budget.reduction_factor
        ssl = (f"; through the SSL phase on the probe (phases.probe), rungs at {budget.ssl_grace_period}·{eta}^k SSL "
               "epochs")
    if study.costs and request.asha_on == "objectives":
        return f"multi-objective ASHA: promotion by non-dominated sorting on every objective{ssl}"
    return f"ASHA on {metric} alone{ssl}"


def search_description(request: SearchRequest, study: Study, trials: int, metric: str, data: dict) -> str:
    sampler = {"tpe": "TPE", "nsga2": "NSGA-II"}[study.space.sampler.name]
    objectives = (f"objectives {objectives_text(study)}, a Pareto search ({asha_text(request, study, metric)})"
                  if study.costs else f"objective {metric} ({study.mode})")
    return (f"**Search** `{locate(request).name}`: {plural(trials, 'trial')} of `{study.origin}` "
            f"({study.space.description or study.name}), Optuna {sampler} proposing, "
            f"{'no early stopping' if request.no_asha else 'ASHA stopping'}; {objectives} on "
            f"validation. Data {describe_data(data)}. {describe_untrained(data) + '. ' if data['untrained'] else ''}"
            "Its trials are the nested runs below; the ensemble chosen on validation, the `ensemble` run.")


def trial_description(study: Study, config: dict, cfg, name: str) -> str:
    """What a trial run is and what it trained (the drawn values where the smoke scale changed them)."""
    phases = [p for p in ("byol", "cass") if getattr(cfg, p).enabled]
    sampled = {k.removeprefix("sampled."): v for k, v in config.items() if k.startswith("sampled.")}
    trained = "; ".join(f"{k} {config.get(k)} (drawn {v})" for k, v in sampled.items())
    files = {b: resolve(b, cfg.model.pretrained) for b in backbones_of(cfg)}
    started = "; ".join(f"`{b}` from `{w.name}`" if w else f"`{b}` from scratch" for b, w in files.items())
    return (f"Trial {config[TRIAL_NUMBER]} of search `{name}`: {' then '.join([*phases, 'fine-tuning'])} of "
            f"`{cfg.model.backbone if not cfg.cass.enabled else cfg.cass.cnn + ' + ' + cfg.cass.transformer}` at "
            f"{cfg.augment.image_size} px on {cfg.device}, at most {cfg.supervised.epochs} epochs."
            + f" Starts {started}."
            + (f" Trained at smoke scale: {trained}." if trained else ""))


def resume_command(request: SearchRequest) -> str:
    experiment = locate(request)
    return f"python -m tune_xray.search {request.study} --resume {experiment.name} --storage {experiment.storage}"


def run_search(request: SearchRequest, extra_callbacks: list = ()) -> dict:
    """Validate everything, then run (or resume) the search `request` asks for; returns the summary written to
    summary.json.

    `extra_callbacks`: more Tune callbacks (tests use one to interrupt a search)."""
    if request.resume:
        request = restore_request(request)  # before anything else: nothing to resume is one error, nothing written
    for key in SECRET_KEYS:  # the real URLs stay in this process; what is stored and logged has them masked
        remember(getattr(request, key))
    check_numbers(request)
    which_ray(request.address)  # `--address auto` with no `ray start` cluster here: one error before anything
    study = load_study(request.study)  # every search-space error before Ray starts
    if study.space.ensemble.select_on == "oof" and not request.cv_folds:
        raise ConfigError(f"{study.origin}: ensemble.select_on: oof chooses the ensemble on the cross-validation's "
                          "out-of-fold predictions; pass --cv-folds K (and --cv-top N), or select_on: val")
    if request.data:
        request = dataclasses.replace(request, data=absolute_data(request.data))
    request = dataclasses.replace(request, external=tuple(absolute_data(spec) for spec in request.external))
    # the study as this search runs it, resolved once (placed on the trials' device once Ray tells the cluster's GPUs)
    resolved = study.as_requested(request)
    base_cfg = resolved.trial_config({})
    check_split_keys(base_cfg.data, lambda key: study.origin_of(f"data.{key}", parse_overrides(request.overrides)))
    check_candidates(resolved)
    fetch_weights(resolved, request.address)
    trials = request.trials if request.trials is not None else resolved.budget.trials
    experiment = locate(request)
    if not request.resume and (experiment.directory / "tuner.pkl").exists():
        raise ConfigError(f"{experiment.directory} holds an earlier search '{experiment.name}': pass --resume, or "
                          "--name for a new one")
    if experiment.remote:
        try:
            storage_filesystem(experiment.storage)
        except Exception as err:  # noqa: BLE001 — pyarrow's errors differ by scheme; all mean "not a storage"
            raise ConfigError(mask(f"--storage {experiment.storage}: not a storage pyarrow can open ({err})")) from None
    with experiment.lock():
        return _run(request, extra_callbacks, resolved, base_cfg, trials, experiment)


def _start_ray(request: SearchRequest) -> str:
    """Join or start the search's Ray (cluster.connect); returns which, in words."""
    import ray

    if ray.is_initialized():
        return "the Ray this process already holds"
    # keep the dashboard (ray[default]'s State API): without it a Train run stopped by ASHA leaks its placement
    # group and the next trial waits for resources forever
    try:
        return connect(request.address, request.verbose)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 — a start-up timeout, a refused address, ...: one line, exit 1
        raise SearchError(mask(f"Ray did not start{' at ' + request.address if request.address else ''}: "
                               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")) from None


def _run(asked: SearchRequest, extra_callbacks, resolved: ResolvedStudy, base_cfg, trials: int,
         experiment: Experiment) -> dict:
    """The search itself, under its lock, as named steps: the data, Ray, the trials' placement, the MLflow parent,
    the Tuner, the trials, the summary, what comes after the trials, the parent's end. `asked`: the request as given
    (stored so); the search runs it with its GPUs per trial resolved."""
    began = time.perf_counter()
    data, external = prepare_data(asked, base_cfg)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # SSL-phase reports carry no objective
    ray_text = _start_ray(asked)
    request, resolved = place_trials(asked, resolved, experiment)
    check_nodes(experiment, base_cfg)
    if not request.resume:  # (the lock made the directory)
        experiment.write_request(asked)
        experiment.sync((INVOCATION_FILE,))
    metric = objective(resolved.study.metric)
    resources = TrialResources(request.workers_per_trial, request.cpus_per_trial, request.gpus_per_trial,
                               request.one_worker_trials or "tune")
    parent = open_parent(request, resolved, trials, resources, experiment, data, metric)
    describe = trial_records(resolved, resources, experiment, request.smoke)
    tuner = build_tuner(request, resolved, trials, metric, resources, experiment, parent, describe, extra_callbacks)
    announce(experiment, trials, resolved.study, data, external, ray_text)
    fit(tuner, request, experiment, parent, resources, describe)
    summary, all_trials, runs = search_summary(request, resolved, trials, metric, experiment, parent, data, resources,
                                               time.perf_counter() - began)
    tidy_runs(summary, all_trials, runs, experiment)
    summary["failed"] = {}  # what comes after the trials: each step may fail without costing the others
    experiment.write_summary(summary)  # the record the steps after the trials read
    if summary["status"] == "complete":
        _step(experiment, summary, "latency", lambda: costs.run(experiment, request))
    if summary.get("pareto_front"):
        tracking.tag_front(experiment.tracking_uri,
                           [r["mlflow_run_id"] for r in summary["pareto_front"] if r["mlflow_run_id"]])
    best = summary["best"]
    summary["best_mlflow_run_id"] = best["mlflow_run_id"] if best else None
    experiment.write_summary(summary)
    if summary["status"] == "complete":
        after_trials(experiment, summary, request)
    _step(experiment, summary, "storage", lambda: store(experiment))
    close_parent(summary, all_trials, experiment, parent, metric)
    return summary


def prepare_data(asked: SearchRequest, base_cfg) -> tuple[dict, list[ExternalSource]]:
    """The data checked and cached once, before any trial starts; its facts, and the external sources checked
    against its classes."""
    from .data.loader import prepare

    index = prepare(base_cfg.data).index
    external = check_external(asked.external, asked.external_split, base_cfg.data, list(index.classes), index.task,
                              index.untrained())
    return index.facts(), external


def place_trials(asked: SearchRequest, resolved: ResolvedStudy,
                 experiment: Experiment) -> tuple[SearchRequest, ResolvedStudy]:
    """GPUs per trial, where not given: 1 where the cluster has a GPU, else 0 (a resume chooses again, and says
    so); the study placed on the trials' device."""
    import ray

    request = asked
    if asked.gpus_per_trial is None:
        request = dataclasses.replace(asked, gpus_per_trial=default_gpus_per_trial(ray.cluster_resources()))
    if asked.resume and asked.gpus_per_trial is None:  # an automatic choice, made again on this cluster: said
        print(f"--resume: --gpus-per-trial was not given when the search started (1 where the cluster has a GPU, else "
              f"0): on this cluster {request.gpus_per_trial:g}{earlier_gpus(experiment)}", flush=True)
    return request, resolved.placed(request.gpus_per_trial, request.workers_per_trial)


def check_nodes(experiment: Experiment, base_cfg) -> None:
    """On a cluster, every node must see the storage and the data: checked before anything is written."""
    if len(alive_nodes()) > 1:
        kind, _, data_path = base_cfg.data.source.partition(":")
        check_cluster_paths(experiment.storage, data_path if kind != "synthetic" else None)


def open_parent(request: SearchRequest, resolved: ResolvedStudy, trials: int, resources: TrialResources,
                experiment: Experiment, data: dict, metric: str) -> str:
    """The search's MLflow parent run (a resume reopens its own); from here on a killed driver can be resumed from
    another machine."""
    study = resolved.study
    parent = tracking.start_parent(experiment.tracking_uri, experiment.name, experiment.directory,
                                   search_params(request, resolved, trials, resources),
                                   {"tune_xray.smoke": str(request.smoke).lower(),
                                    tracking.DESCRIPTION_TAG: search_description(request, study, trials, metric, data)})
    experiment.write_text(PARENT_ID_FILE, parent)
    experiment.sync_resume()
    return parent


def trial_records(resolved: ResolvedStudy, resources: TrialResources, experiment: Experiment, smoke: bool):
    """`describe(config)`: a trial's MLflow record — run name, params, tags, description. It is pickled with Tune's
    state, so it holds no command line (whose URLs may hold a password)."""
    study = resolved.study

    def describe(config: dict) -> tracking.TrialRecord:
        cfg = resolve_trial(resolved, config)
        params = flatten(cfg.model_dump(mode="json"))
        params.update({k: v for k, v in config.items() if k.startswith("sampled.")})
        params.update(global_batch_sizes(cfg, resources.workers))
        return tracking.TrialRecord(run_name(study, config), params,
                                    {"tune_xray.smoke": str(smoke).lower(),
                                     "tune_xray.optuna_trial": str(config[TRIAL_NUMBER])},
                                    trial_description(study, config, cfg, experiment.name))

    return describe


def scheduler_of(request: SearchRequest, resolved: ResolvedStudy, metric: str):
    """ASHA on the objective (through the SSL phase where the budget says so), MO-ASHA on every objective of a
    multi-objective study (`--asha-on objectives`), or none (`--no-asha`)."""
    study, budget = resolved.study, resolved.budget
    if request.no_asha:
        return None
    if study.costs and request.asha_on == "objectives":
        return ParetoASHA(budget, metric, study.mode, study.costs)
    return FinishAwareASHA(budget, metric, study.mode)


def build_tuner(request: SearchRequest, resolved: ResolvedStudy, trials: int, metric: str,
                resources: TrialResources, experiment: Experiment, parent: str, describe, extra_callbacks):
    """The Tuner: restored from the experiment on --resume, else new, with Optuna's searcher under the cluster's
    concurrency, the scheduler, and the callbacks (MLflow runs, the console lines, the resume sync)."""
    study = resolved.study
    driver = trainable(resolved, resources, experiment.path, request.max_failures)
    callbacks = [tracking.TrialRuns(experiment.tracking_uri, parent, describe, status_of,
                                    link_run(experiment.optuna_url, experiment.name), RESULT_FILES,
                                    lambda trial: experiment.fetch(Path(trial.path).name)),
                 TrialLines(metric, lambda config: run_name(study, config)), ResumeSync(experiment),
                 *extra_callbacks]
    if request.resume:
        quiet_console(request.verbose)
        return tune.Tuner.restore(experiment.path, trainable=driver, resume_errored=True)
    searcher = optuna_searcher(DefineByRun(resolved), experiment.name, experiment.optuna_url, request.seed, metric)
    return tune.Tuner(driver, tune_config=tune.TuneConfig(
        num_samples=trials, scheduler=scheduler_of(request, resolved, metric), trial_name_creator=trial_name,
        trial_dirname_creator=trial_name, reuse_actors=True,
        search_alg=resources.limiter(searcher, request.max_concurrent, request.max_pending)),
        run_config=run_config(experiment.name, experiment.storage, callbacks, request.max_failures, request.verbose))


def announce(experiment: Experiment, trials: int, study: Study, data: dict, external: list[ExternalSource],
             ray_text: str) -> None:
    """The search's first lines: what runs, on which data and which Ray."""
    print(f"{experiment.name}: {plural(trials, 'trial')} of {study.origin}, objective{'s' if study.costs else ''} "
          f"{objectives_text(study)}; data {describe_data(data)}", flush=True)
    if describe_untrained(data):
        print(describe_untrained(data), flush=True)
    for source in external:
        print(source.line(), flush=True)
    print(f"on {ray_text}; one line per trial as it ends", flush=True)


def watchdog(request: SearchRequest, experiment: Experiment, parent: str):
    """`lost(address)`, called from cluster.watch_ray's thread when the Ray under the search is gone: it says so,
    leaves the search resumable (its parent run marked) and ends the process at once — Ray's threads would hold it a
    minute more; the lock goes with the process."""
    def lost(address: str) -> None:
        why = (f"the Ray under the search is gone (its GCS at {address} stopped answering: a node crashed or its "
               "processes were killed)")
        print(f"error: {why}; finished trials are kept. Continue with\n    {resume_command(request)}", file=sys.stderr,
              flush=True)
        try:
            tracking.interrupt_search(experiment.tracking_uri, parent, f"{why}; --resume continues it")
        finally:
            os._exit(1)

    return lost


def fit(tuner, request: SearchRequest, experiment: Experiment, parent: str, resources: TrialResources,
        describe) -> None:
    """The trials, watched. A resumed search's pickled limiter, trial records and sync follow this driver's values,
    not those they were pickled with."""
    with watch_ray(watchdog(request, experiment, parent)), this_driver(
            concurrency=(resources, request.max_pending, request.max_concurrent), describe=describe,
            experiment=experiment):
        tuner.fit()
    remove_orphaned_workdirs()  # scratch of trials stopped or killed before their own cleanup, on this machine


def search_summary(request: SearchRequest, resolved: ResolvedStudy, trials: int, metric: str,
                   experiment: Experiment, parent: str, data: dict, resources: TrialResources,
                   wall_s: float) -> tuple[dict, list, dict[str, str]]:
    """The summary of the trials (summary.summarize) with what this run adds: its wall time and resources (a
    resumed search's are its runs', each), where it ran from, the data every number is an estimate on, the ASHA
    rule. Returns it with Tune's trials and the parent's child runs (trial id → run id)."""
    study, tracking_uri = resolved.study, experiment.tracking_uri
    all_trials = tune.ExperimentAnalysis(experiment.path).trials
    runs = tracking.child_runs(tracking_uri, parent)
    summary = summarize(all_trials, trials, study, metric, experiment, tracking_uri, runs,
                        tracking.experiment_id_of(tracking_uri, parent), tracking.ended_trials(tracking_uri, parent))
    before = {}
    if request.resume and (experiment.directory / SUMMARY_FILE).is_file():
        before = experiment.summary()
    earlier = before.get("search_runs_s") or ([before["wall_time_s"]] if "wall_time_s" in before else [])
    summary["search_runs_s"] = [*earlier, wall_s]
    summary["wall_time_s"] = sum(summary["search_runs_s"])
    summary["resources"] = {"workers_per_trial": resources.workers, "cpus_per_trial": resources.cpus,
                            "gpus_per_trial": resources.gpus, "one_worker_trials": resources.one_worker}
    # each run's (a resume may change them): a trial's CPU- and GPU-hours are only known where they never changed
    summary["resources_runs"] = [*before.get("resources_runs", [before["resources"]] if "resources" in before else []),
                                 summary["resources"]]
    summary["storage"] = experiment.path
    summary["command"], summary["provenance"] = request.command, provenance()
    summary["overrides"] = resolved.overrides  # what every trial got on top of the file: --set, --data, the device
    summary["optuna_study"] = experiment.name  # a copied or renamed experiment directory still finds its study
    summary["data"] = data  # what every number is an estimate on, and how its splits were made
    summary["asha"] = asha_text(request, study, metric, resolved.budget)
    summary["asked"] = {"limits": resolved.limits, "ensemble": resolved.ensemble}  # read by the steps after it
    return summary, all_trials, runs


def tidy_runs(summary: dict, all_trials: list, runs: dict[str, str], experiment: Experiment) -> None:
    """MLflow and Optuna left as the trials ended: the runs of interrupted trials marked so (--resume continues
    them), runs of no trial of this search deleted, and — unless interrupted — Optuna trials no Tune trial holds
    closed."""
    known = {t.trial_id for t in all_trials}
    tracking.mark_runs(experiment.tracking_uri, {r["trial_id"]: r["mlflow_run_id"] for r in summary["rows"]
                                                 if r["status"] == "interrupted" and r["mlflow_run_id"]},
                       "interrupted", "the search was interrupted; --resume continues it")
    orphans = [run_id for trial_id, run_id in runs.items() if trial_id not in known]
    tracking.delete_runs(experiment.tracking_uri, orphans)
    if summary["status"] != "interrupted":
        summary["optuna_orphans_closed"] = close_orphans(experiment.optuna_url, experiment.name)


def close_parent(summary: dict, all_trials: list, experiment: Experiment, parent: str, metric: str) -> None:
    """The parent run ended with the search's status, the best trial's record metrics, summary.json and the
    report attached, and the steps that failed named."""
    best = summary["best"]
    best_trial = next((t for t in all_trials if best and t.trial_id == best["trial_id"]), None)
    record = {}
    if best_trial:
        record = {m.key: m.value for m in tracking.epoch_metrics(best_trial.last_result, 0)
                  if m.key.startswith(tracking.RECORD_PREFIXES) or m.key == metric}
    report_file = Path(summary["report"]) if str(summary.get("report", "")).endswith(".html") else None
    tracking.finish_parent(experiment.tracking_uri, parent, summary["status"], summary["best_mlflow_run_id"], record,
                           experiment.directory / SUMMARY_FILE, (report_file,) if report_file else (),
                           failed=sorted(summary["failed"]))


class ResumeSync(tune.Callback):
    """With a remote --storage, what a resume on another machine needs (Experiment.sync_resume) sent there as
    trials end, at most every `every` seconds: a driver that dies loses at most that much of the sqlite stores."""

    def __init__(self, experiment: Experiment, every: float = 60.0):
        self.experiment, self.every, self.sent = experiment, every, 0.0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        experiment = DRIVER.get("experiment") or self.experiment  # a resume's: its own local directory
        if experiment.remote and time.monotonic() - self.sent >= self.every:
            experiment.sync_resume()
            self.sent = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)


def store(experiment: Experiment) -> None:
    """With a remote --storage: the search's own files, and what a resume elsewhere needs, sent there."""
    experiment.sync()
    experiment.sync_resume()


def _step(experiment: Experiment, summary: dict, step: str, run) -> None:
    """Run one step after the trials and keep its part of the record (what `run()` returns); a failure is one
    line, recorded in summary.json (`failed`) and on the parent run — a StepFailed keeps the result it had — and
    the steps after it still run."""
    start = time.perf_counter()
    try:
        summary.update(run() or {})
        if step not in ("storage", "latency"):  # (latency says what it did in a line of its own)
            print(f"{step}: done in {time.perf_counter() - start:.0f} s", flush=True)
    except Exception as err:  # noqa: BLE001 — the trials stand; what failed is said, not raised
        if isinstance(err, StepFailed):  # its result stands
            summary.update(err.partial)
        summary["failed"][step] = mask(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        print(f"{step} failed: {summary['failed'][step]}", file=sys.stderr)
    experiment.write_summary(summary)


# what comes after the trials, in turn: sibling stages, each `wanted(request)` and `run(experiment, request)`,
# reading the record the step before left (summary.json) and returning its part of it; none imports another
STEPS = (("repeats", repeat), ("ensemble", ensemble), ("cv", cv),
         ("external", external),  # after every choice: nothing that selects reads it
         ("report", report))


def after_trials(experiment: Experiment, summary: dict, request: SearchRequest) -> None:
    """Repeats (`--repeats`), the ensemble, the cross-validation of the finalists (`--cv-folds`), the external
    record of the search's model (`--external`) and the report, in turn (STEPS), each recorded in `summary`."""
    for step, stage in STEPS:
        if stage.wanted(request):
            _step(experiment, summary, step, lambda stage=stage: stage.run(experiment, request))
    if "report" in summary["failed"]:
        print(f"(python -m tune_xray.report {experiment.directory} retries the report)", file=sys.stderr)
