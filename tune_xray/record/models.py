"""The typed shape of what a search leaves in summary.json: pydantic models of the summary and its trial rows, the
schema Experiment checks every summary against when it writes one and when it reads one back, so that a malformed
or hand-edited file is one error naming the file and the field, and a reader can take the summary typed
(`Experiment.record()`).

Every summary.json written since search.json's format 2 (2026-12-02) loads: the keys added since — `resources_runs`,
a row's `ran_with` and `started_from`, the SSL phase's `ssl_epochs_done` and `ssl_phase`, the `collapsed` count —
are optional. What a summary must hold is its rows, each with its trial and a known status (the ensemble and the
report read nothing else from a hand-made one); what else it holds must have its type. What the steps after the
search leave — the ensemble, repeats, CV, external records, the re-measured costs — has a model each, with the
fields their readers rely on required and the rest allowed; a row's objective value is keyed by the study's metric
(`best_val_mean_auroc`, …), so rows allow extra keys.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .names import STATUSES

Status = Literal[STATUSES]  # type: ignore[valid-type]


class Objective(BaseModel):
    """One objective of the study: the validation metric first, then any costs (multi-objective)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    mode: Literal["max", "min"]


class TrialRow(BaseModel):
    """One trial as the summary lists it: its status and where it stopped, its objective value (under the
    study's metric name), its costs, and what it trained."""

    model_config = ConfigDict(extra="allow")
    trial: str  # t007
    status: Status
    name: Optional[str] = None  # its run name
    trial_id: Optional[str] = None  # Tune's
    reason: str = ""
    epochs_done: Optional[int] = None  # None: it never reported (interrupted before its first epoch)
    ssl_epochs_done: Optional[int] = None
    ssl_phase: Optional[str] = None
    selected_epoch: Optional[int] = None
    selection_ci: list[Optional[float]] = Field(default_factory=list)
    mlflow_run_id: Optional[str] = None
    cost: dict = Field(default_factory=dict)
    resolved: dict = Field(default_factory=dict)
    sampled: dict = Field(default_factory=dict)

    def value(self, metric: str) -> Optional[float]:
        """Its value of the study's objective (`best_val_mean_auroc`), None where it has none."""
        return getattr(self, metric, None)


class Interval(BaseModel):
    """A value with its 95 % interval (patient bootstrap, or a t-interval over seeds or folds)."""

    model_config = ConfigDict(extra="allow")
    value: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None


class StoredFile(BaseModel):
    """A file a step left in the experiment directory, by its name there and its content hash."""

    model_config = ConfigDict(extra="allow")
    file: str
    sha256: str
    run_id: Optional[str] = None  # the MLflow run that holds it as an artifact


class Member(BaseModel):
    """One trial of a chosen ensemble, with its weight."""

    model_config = ConfigDict(extra="allow")
    trial: str
    weight: float
    name: Optional[str] = None
    mlflow_run_id: Optional[str] = None


class EnsembleRecord(BaseModel):
    """The ensemble chosen on validation (summary.json's `ensemble` and ensemble/ensemble.json, which holds more:
    the pool, the seed, the selection curve): its members, their validation and test record, its costs and
    where it is registered; or, where no member fits the budget (`fits`: False), why none was chosen."""

    model_config = ConfigDict(extra="allow")
    fits: bool = True
    method: Optional[str] = None  # caruana | top
    members: list[Member] = Field(default_factory=list)
    why: Optional[str] = None  # (no fit) which budget no trial meets
    selection: Optional[dict] = None
    cost: dict = Field(default_factory=dict)
    val: Optional[dict] = None
    test: Optional[dict] = None
    classes: list[str] = Field(default_factory=list)
    test_reads: Optional[int] = None
    registered: Optional[dict] = None
    test_predictions: Optional[StoredFile] = None
    wall_time_s: Optional[float] = None

    @model_validator(mode="after")
    def _chosen_or_why(self):
        if self.fits and not self.method:
            raise ValueError("an ensemble names its method (caruana, top) or says it does not fit (fits: false)")
        return self


class RepeatsRecord(BaseModel):
    """summary.json's `repeats` (tune_xray.repeat): each finalist's seeds, its mean with a t-interval, the
    comparison with the best, and every repeat trial."""

    model_config = ConfigDict(extra="allow")
    rows: list[dict]
    trials: list[TrialRow]
    comparisons: Optional[list[dict]] = None


class CvRecord(BaseModel):
    """summary.json's `cv` (tune_xray.cv): each finalist's folds with the corrected resampled t-interval and its
    pooled out-of-fold metric, ranked, with Kendall's τ against the search's ranks; every fold trial; the
    out-of-fold ensemble."""

    model_config = ConfigDict(extra="allow")
    rows: list[dict]
    trials: list[TrialRow]
    metric: Optional[str] = None
    folds: Optional[int] = None
    top: Optional[int] = None
    kendall_tau: Optional[float] = None
    grouped: Optional[str] = None
    oof_ensemble: Optional[dict] = None
    notes: list[str] = Field(default_factory=list)
    wall_time_s: Optional[float] = None


class ExternalRecord(BaseModel):
    """One external source's record of the search's model (tune_xray.external): its mean AUROC with an interval,
    per label, and its predictions' file."""

    model_config = ConfigDict(extra="allow")
    source: str
    images: int
    mean_auroc: Interval
    per_label: dict = Field(default_factory=dict)
    predictions: Optional[str] = None
    model: Optional[str] = None
    test_reads: Optional[int] = None


class CostsRecord(BaseModel):
    """summary.json's `cost_remeasured` (tune_xray.costs): which trials' latency was measured again, where, how."""

    model_config = ConfigDict(extra="allow")
    device: str
    trials: list[str]
    batch_sizes: list[int] = Field(default_factory=list)
    repeats: Optional[int] = None
    why: str = ""


class Asked(BaseModel):
    """What the study asks of the steps after the trials, as the search resolved it (space.ResolvedStudy): the hard
    limits (those no trial judges itself are judged after it, tune_xray.costs) and the ensemble's budget. The steps
    read it here, in the record, and resolve nothing again."""

    model_config = ConfigDict(extra="allow")
    limits: dict[str, float] = Field(default_factory=dict)
    ensemble: dict[str, Optional[float]] = Field(default_factory=dict)


class SearchSummary(BaseModel):
    """summary.json: the search's trials by status, the best and the top, every row, and what the steps after the
    trials left (`ensemble`, `repeats`, `cv`, `external`, `cost_remeasured`, `failed`)."""

    model_config = ConfigDict(extra="allow")
    rows: list[TrialRow]
    study: Optional[str] = None
    metric: Optional[str] = None  # the objective as Tune reports it: best_val_mean_auroc
    mode: Optional[Literal["max", "min"]] = None
    status: Optional[str] = None  # complete | interrupted | no trial completed
    trials: Optional[int] = None
    requested: Optional[int] = None
    objectives: list[Objective] = Field(default_factory=list)
    complete: int = 0
    pruned: int = 0
    infeasible: int = 0
    diverged: int = 0
    collapsed: int = 0
    error: int = 0
    interrupted: int = 0
    best: Optional[TrialRow] = None
    top: list[TrialRow] = Field(default_factory=list)
    pareto_front: Optional[list[dict]] = None
    experiment_dir: Optional[str] = None
    wall_time_s: Optional[float] = None
    search_runs_s: list[float] = Field(default_factory=list)
    resources: Optional[dict] = None
    resources_runs: list[dict] = Field(default_factory=list)
    data: Optional[dict] = None
    failed: dict[str, str] = Field(default_factory=dict)
    asked: Optional[Asked] = None  # (written since issue 40; the steps after the trials read it)
    ensemble: Optional[EnsembleRecord] = None
    repeats: Optional[RepeatsRecord] = None
    cv: Optional[CvRecord] = None
    external: Optional[list[ExternalRecord]] = None
    cost_remeasured: Optional[CostsRecord] = None
    search_model: Optional[dict] = None

    def counts(self) -> dict[str, int]:
        """Trials by status, every status named (0 where none)."""
        return {status: getattr(self, status) for status in STATUSES}
