"""What a search is started with: one typed, frozen request from the command line (or a script, or a resume's
stored one) to the end of the search. Its defaults are written here once; the command line's flags take theirs from
it; what is resolved later (the GPUs per trial, once Ray tells the cluster's) makes a new request, never a change to
this one.

    request = SearchRequest("byol", smoke=True, trials=4)
    run_search(request)                                      # tune_xray.pipeline
    run_search(dataclasses.replace(request, cpus_per_trial=2.0))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from .credentials import mask

EXTERNAL_SPLITS = ("all", "train", "val", "test")  # which of an external source's images --external records
FORMAT = 2  # search.json's layout: 2 {"format", "request", "resources"}; 1 (before) the KEPT keys at its top level

# what the search's record depends on: a --resume keeps them, and refuses another value given again
KEPT = ("study", "data", "trials", "smoke", "overrides", "seed", "no_asha", "asha_on", "name", "tracking_uri",
        "optuna_storage", "ensemble_size", "no_ensemble", "no_report", "repeats", "repeat_top",
        "record_test_per_trial", "latency_budget", "params_budget", "cv_folds", "cv_top", "external", "external_split")
# what a --resume may change (each change said in one line); not given again, the search's own hold
RESUMABLE = ("workers_per_trial", "cpus_per_trial", "gpus_per_trial", "one_worker_trials", "max_concurrent",
             "max_pending", "max_failures")
# stored with the resources but kept in Tune's pickled state (tuner.pkl: its FailureConfig), which Tuner.restore
# brings back as it was: a resume refuses another value, as it does the KEPT ones
TUNE_STATE = ("max_failures",)


@dataclass(frozen=True)
class SearchRequest:
    """Every choice a search is started with (`python -m tune_xray.search --help` says what each means)."""

    study: str
    data: Optional[str] = None
    trials: Optional[int] = None
    smoke: bool = False
    storage: str = "tune_xray_runs"
    local_dir: str = "tune_xray_runs"
    name: Optional[str] = None
    resume: Union[bool, str] = False  # True, or the name of the search to continue
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    one_worker_trials: str = "tune"
    gpus_per_trial: Optional[float] = None  # None: 1 when the cluster has a GPU when the search starts, else 0
    max_concurrent: Optional[int] = None
    max_pending: Optional[int] = None
    address: Optional[str] = None
    tracking_uri: Optional[str] = None
    optuna_storage: Optional[str] = None
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, in order
    seed: int = 0
    max_failures: int = 1
    no_asha: bool = False
    asha_on: str = "objectives"
    ensemble_size: int = 5
    no_ensemble: bool = False
    latency_budget: Optional[float] = None
    params_budget: Optional[float] = None
    repeats: int = 0
    repeat_top: int = 3
    cv_folds: int = 0
    cv_top: int = 3
    no_report: bool = False
    record_test_per_trial: bool = False
    external: tuple[str, ...] = ()  # --external SPEC, in order: data sources the registered model is recorded on
    external_split: str = "all"
    verbose: bool = False
    command: Optional[str] = field(default=None, compare=False)  # the command line, as typed (masked when stored)
    given: frozenset[str] = field(default=frozenset(), compare=False)  # the keys its command line set itself

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(self.overrides))  # a list from argparse or JSON
        object.__setattr__(self, "external", tuple(self.external))
        object.__setattr__(self, "given", frozenset(self.given))

    @classmethod
    def from_values(cls, values: dict, **more) -> SearchRequest:
        """From a dict holding (at least) the request's keys — an argparse Namespace's `vars`, a stored request —
        other keys left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**values, **more}.items() if k in names})

    def stored(self) -> dict:
        """search.json: the KEPT values and the RESUMABLE ones, passwords in URLs masked."""
        return mask({"format": FORMAT, "request": {k: getattr(self, k) for k in KEPT},
                     "resources": {k: getattr(self, k) for k in RESUMABLE}})


def default(name: str):
    """A request field's default (the command line's)."""
    return next(f.default for f in dataclasses.fields(SearchRequest) if f.name == name)


def read_stored(stored: dict) -> tuple[dict, dict]:
    """(KEPT values, RESUMABLE values) of a search.json, in either format (format 1 kept no resources)."""
    if stored.get("format", 1) >= 2:
        return dict(stored["request"]), dict(stored.get("resources") or {})
    return {k: v for k, v in stored.items() if k in KEPT}, dict(stored.get("resources") or {})
