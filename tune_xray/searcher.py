"""The Optuna side of a search: a Ray Tune `Searcher` over an Optuna study (TPE) through Optuna's ask/tell API,
the define-by-run space it draws, and the study's storage.

What a trial is told follows its status, not whether a value exists (Ray's OptunaSearch tells COMPLETE whenever
the last result has one): complete → COMPLETE with its value; pruned by ASHA → PRUNED (a truncated value told as
COMPLETE misleads TPE); diverged and collapsed → PRUNED, so TPE counts the region among the bad ones (FAIL would
be ignored by TPE, which would keep proposing it); error → FAIL. Results without the objective (the SSL phase) or with a
non-finite value are not reported as intermediate values. The study lives in its storage (sqlite beside the
experiment by default): a resumed search continues it, and `optuna-dashboard` reads it.

With hard limits (`limits:` in the study file) each trial is given Optuna's constraints (`Trial.set_constraint`,
which replaced the samplers' deprecated `constraints_func` in Optuna 5): its measured cost minus the limit, one per
limited cost, feasible at ≤ 0. A trial over a limit stops at its first epoch's end as `infeasible` and is told
COMPLETE with that epoch's values, so TPE and NSGA-II (constrained) learn where the infeasible region is, and
Optuna's best trials leave it out.

With cost objectives (`objectives:` in the study file) the study is multi-objective: a complete trial is told its
validation metric and its measured costs, in the file's order. Such a study keeps no intermediate values: Optuna's
TPE ranks pruned trials by their last intermediate value against the study's one direction, which a study of
several directions has not (it raises); a pruned trial then counts among the worse ones, as it should.
"""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import optuna
from ray.tune.search import Searcher

from .credentials import remember, reveal
from .record.names import PROBE, SSL_TIME_ATTR, TIME_ATTR, TRIAL_NUMBER
from .record.status import trial_status
from .space import ResolvedStudy, flatten

KEY_FIELDS = ("model.backbone", "model.pretrained", "augment.image_size", "device", "supervised.batch_size",
              "supervised.epochs")
SSL_KEY_FIELDS = {"byol": ("byol.batch_size", "byol.hidden_dim", "byol.epochs"),
                  "cass": ("cass.cnn", "cass.transformer", "cass.batch_size", "cass.epochs")}
State = optuna.trial.TrialState


def key_fields(cfg) -> tuple[str, ...]:
    """The resolved values a reader needs beside the drawn ones: what trained, at which size, where."""
    ssl = "byol" if cfg.byol.enabled else "cass" if cfg.cass.enabled else None
    return KEY_FIELDS + SSL_KEY_FIELDS.get(ssl, ())


TRAINED = "trained"  # the Optuna user attribute holding what a trial trained (its resolved values)



BAD_ENDS = ("pruned", "diverged", "collapsed")  # told PRUNED: TPE counts their region among the bad ones


def _unfinished_state(status: str):
    """The Optuna state of a trial that did not complete: PRUNED for BAD_ENDS, FAIL otherwise (an error)."""
    return State.PRUNED if status in BAD_ENDS else State.FAIL

class DefineByRun:
    """Optuna define-by-run: draws the study's parameters, then returns the values that will *train* (smoke
    shrinkage and `--set` applied) under the parameters' names, the drawn value beside each that differs
    (`sampled.<key>`), a few key resolved fields, and the Optuna trial number. Tune's trial table then shows what
    ran; the Optuna trial keeps the same resolved values as its user attribute `trained`.
    (A class, not a closure: Tune pickles the searcher with the experiment.)"""

    def __init__(self, resolved: ResolvedStudy):
        self.resolved = resolved

    def __setstate__(self, state: dict) -> None:  # pickled by a search started before the study was resolved once
        if "resolved" not in state:
            state = {"resolved": state["study"].resolve(state["overrides"], state["smoke"])}
        self.__dict__.update(state)

    def __call__(self, trial: optuna.Trial) -> dict:
        sampled = self.resolved.study.sample(trial)
        cfg = self.resolved.trial_config(sampled)
        resolved = flatten(cfg.model_dump(mode="json"))
        out = {TRIAL_NUMBER: trial.number}
        for key, value in sampled.items():
            out[key] = resolved[key]
            if resolved[key] != value:
                out[f"sampled.{key}"] = value
        out.update({key: resolved[key] for key in key_fields(cfg)})
        trained = {k: v for k, v in out.items() if k != TRIAL_NUMBER and not k.startswith("sampled.")}
        trial.set_user_attr(TRAINED, {**trained, "smoke": self.resolved.smoke})  # one write: one database transaction
        return out


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from `--optuna-storage`: a database URL (sqlite:///…, postgresql://…, mysql://…) or a
    journal file (`journal:PATH`, or a path ending .log) — Optuna's option for a file on shared storage."""
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:") or (url.endswith(".log") and "://" not in url):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    # Optuna's cache in front of the database (what optuna.create_study(storage=URL) uses): finished trials are read
    # once, so TPE's read of every trial at each ask does not grow into a full read per trial
    return optuna.storages.get_storage(optuna.storages.RDBStorage(url))


def storage_trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of a study (what the storage's own setters take)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


class OptunaSearcher(Searcher):
    """Ray Tune's Searcher interface over an Optuna study, by ask/tell: `suggest` asks for a trial and runs the
    define-by-run space on it; results are reported as intermediate values at their epoch; the end is told by
    status (see the module). Warm-start points are enqueued once, in a study that has no trials yet.

    The searcher keeps the Tune trial id → Optuna trial number map and its sampler (whose random state a resume
    continues); the study is opened again from its storage after a restore. A trial is told once: a trial the
    study already holds as finished (told by the run before a kill whose searcher state was saved earlier than the
    study) is not told again."""

    def __init__(self, space: DefineByRun, study_name: str, storage_url: str, sampler: optuna.samplers.BaseSampler,
                 metric: str, mode: str, points_to_evaluate: list[dict] = (), costs: list[tuple[str, str]] = (),
                 limits: dict[str, float] | None = None):
        super().__init__(metric=metric, mode=mode)
        self.limits = dict(limits or {})  # cost → its hard limit: each trial's Optuna constraints
        self.space, self.study_name, self.sampler = space, study_name, sampler
        self.storage_url = remember(storage_url)  # pickled with the experiment: masked
        self.costs = list(costs)  # (result key, mode) objectives after the metric: a multi-objective study
        self.points_to_evaluate = list(points_to_evaluate)
        self.numbers: dict[str, int] = {}  # Tune trial id → Optuna trial number
        self.told: set[str] = set()
        self.probes: dict[str, dict[str, float]] = {}  # each trial's probe curve so far (SSL epoch → value)
        self.rerun: set[str] = set()  # trials told FAIL whose later run's end was added (see _rerun_ended)
        self._ids: dict[str, int] = {}  # Tune trial id → the storage's id of its Optuna trial (looked up once)
        self._open: set[str] = set()  # trials this driver found unfinished in the study (only it tells them)
        self._storage: optuna.storages.BaseStorage | None = None
        self._study: optuna.Study | None = None

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = optuna_storage(reveal(self.storage_url))
        return self._storage

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            modes = [self.mode] + [mode for _, mode in self.costs]
            self._study = optuna.create_study(storage=self.storage, sampler=self.sampler, study_name=self.study_name,
                                              load_if_exists=True,
                                              directions=["maximize" if m == "max" else "minimize" for m in modes])
            if not self._study.get_trials(deepcopy=False):  # a new study; a resumed one holds them already
                with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still there
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    # optuna-dashboard shows them, not "Objective 0"
                    self._study.set_metric_names([self.metric] + [name for name, _ in self.costs])
                for point in self.points_to_evaluate:
                    self._study.enqueue_trial(point)
        return self._study

    def suggest(self, trial_id: str) -> dict:
        trial = self.study.ask()
        self.numbers[trial_id] = trial.number
        return self.space(trial)

    def _trial_id(self, trial_id: str) -> int:
        """The Optuna storage's id of a Tune trial's Optuna trial."""
        if trial_id not in self._ids:
            self._ids[trial_id] = storage_trial_id(self.storage, self.study_name, self.numbers[trial_id])
        return self._ids[trial_id]

    def _told(self, trial_id: str) -> bool:
        """Whether the study holds the trial as finished: read from the storage once per trial and driver (told by
        the run before a kill, say), then known here — no database read per result."""
        if trial_id in self.told:
            return True
        if trial_id not in self._open:
            if self.storage.get_trial(self._trial_id(trial_id)).state.is_finished():
                self.told.add(trial_id)
                return True
            self._open.add(trial_id)
        return False

    def _probe(self, trial_id: str, result: dict) -> None:
        probe = result.get(PROBE)
        if trial_id in self.numbers and _finite(probe) and not result.get(TIME_ATTR) and not self._told(trial_id):
            # the SSL phase's probe curve, on its own clock: a user attribute (the fine-tune's epochs are the
            # intermediate values), which the report draws and optuna-dashboard shows
            curve = {**self.probes.get(trial_id, {}), str(int(result.get(SSL_TIME_ATTR, 0))): float(probe)}
            self.probes[trial_id] = curve
            self.storage.set_trial_user_attr(self._trial_id(trial_id), "ssl_probe", curve)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._probe(trial_id, result)
        value = result.get(self.metric)
        if (trial_id in self.numbers and not self.costs and _finite(value) and not self._told(trial_id)):
            self.storage.set_trial_intermediate_value(self._trial_id(trial_id), int(result.get(TIME_ATTR, 0)), value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.numbers:
            return
        status, value = trial_status(result, error), (result or {}).get(self.metric)
        if self._told(trial_id):
            if status != "error":  # an errored trial that a resume ran again (resume_errored): its real end
                self._rerun_ended(trial_id, status, result or {})
            return
        if status in ("pruned", "collapsed"):  # the result that ended it never reached on_trial_result
            self.on_trial_result(trial_id, result or {})
        self.storage.set_trial_user_attr(self._trial_id(trial_id), "status", status)
        constrain(optuna.trial.Trial(self.study, self._trial_id(trial_id)), result or {}, self.limits)
        number = self.numbers[trial_id]
        values = [value] + [(result or {}).get(name) for name, _ in self.costs]
        if status in ("complete", "infeasible") and all(_finite(v) for v in values):
            self.study.tell(number, values if self.costs else value)
        else:
            self.study.tell(number, state=State.FAIL if status in ("error", "complete") else State.PRUNED)
        self.told.add(trial_id)

    def _rerun_ended(self, trial_id: str, status: str, result: dict) -> None:
        """The study holds the trial as FAIL (its error, before a resume ran it again): a finished Optuna trial
        cannot change, so its real end is added as a trial of its own, with the same parameters and attributes
        (`rerun_of` its number), so TPE learns from it."""
        first = self.storage.get_trial(self._trial_id(trial_id))
        if first.state != State.FAIL or trial_id in self.rerun:
            return
        values = [result.get(self.metric)] + [result.get(name) for name, _ in self.costs]
        complete = status in ("complete", "infeasible") and all(_finite(v) for v in values)
        told = {"values": values} if self.costs else {"value": values[0]}
        again = optuna.trial.create_trial(
            params=first.params, distributions=first.distributions, **(told if complete else {}),
            state=State.COMPLETE if complete else _unfinished_state(status),
            user_attrs={**first.user_attrs, "status": status, "rerun_of": first.number})
        constrain(again, result, self.limits)
        self.study.add_trial(again)
        self.rerun.add(trial_id)

    def __getstate__(self) -> dict:  # Tune pickles the searcher; the study is opened again from its storage
        return {**self.__dict__, "_storage": None, "_study": None, "_open": set()}

    def __setstate__(self, state: dict) -> None:  # a searcher pickled before `rerun` and `_open` existed
        self.__dict__.update({"rerun": set(), "_open": set(), "probes": {}, **state})

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__getstate__()))

    def restore(self, checkpoint_path: str) -> None:
        self.__setstate__(pickle.loads(Path(checkpoint_path).read_bytes()))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def constrain(trial, result: dict, limits: dict[str, float]) -> None:
    """A trial's Optuna constraints under the study's hard limits: each limited cost it measured minus its limit
    (feasible at ≤ 0)."""
    for name, limit in limits.items():
        if _finite(result.get(name)):
            trial.set_constraint(name, float(result[name]) - limit)


def optuna_searcher(space: DefineByRun, name: str, storage_url: str, seed: int, metric: str) -> OptunaSearcher:
    """The search's searcher: the study file's sampler (TPE or NSGA-II, seeded, with its options) on the resolved
    study's define-by-run space (each trial constrained by its limits), its objectives (the validation metric,
    then its costs), its warm-start points first, its Optuna study `name` in `storage_url`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB": the summary says where
    study = space.resolved.study
    chosen = study.space.sampler
    kind = optuna.samplers.NSGAIISampler if chosen.name == "nsga2" else optuna.samplers.TPESampler
    return OptunaSearcher(space, name, storage_url, kind(seed=seed, **chosen.options()), metric, study.mode,
                          study.warm_start_points() or [], study.costs, space.resolved.limits)


def close_orphans(storage_url: str, name: str) -> int:
    """After a search that ran to its end, an Optuna trial still RUNNING belongs to no Tune trial (asked just
    before the driver was killed; the restored searcher drew a new one): told FAIL, so the study holds no trial
    running forever. Returns how many were closed."""
    storage = optuna_storage(storage_url)
    study = optuna.load_study(study_name=name, storage=storage)
    orphans = study.get_trials(deepcopy=False, states=(State.RUNNING,))
    for trial in orphans:
        storage.set_trial_user_attr(storage_trial_id(storage, name, trial.number), "status",
                                    "orphaned by an interruption")
        study.tell(trial.number, state=State.FAIL)
    return len(orphans)


class link_run:
    """`on_run` for tracking.TrialRuns: the trial's Optuna record carries its MLflow run id (one storage for the
    driver's life; pickled with the experiment without it, and with the URL masked)."""

    def __init__(self, storage_url: str, name: str):
        self.storage_url, self.name, self._storage = remember(storage_url), name, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_storage": None}

    def __call__(self, config: dict, run_id: str) -> None:
        if self._storage is None:
            self._storage = optuna_storage(reveal(self.storage_url))
        self._storage.set_trial_user_attr(storage_trial_id(self._storage, self.name, config[TRIAL_NUMBER]),
                                          "mlflow_run_id", run_id)
