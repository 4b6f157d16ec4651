"""The typed shape of what a search leaves in summary.json: pydantic models of the summary and its trial rows, the
schema Experiment checks every summary against when it writes one and when it reads one back, so that a malformed
or hand-edited file is one error naming the file and the field, and a reader can take the summary typed
(`Experiment.record()`).

Every summary.json written since search.json's format 2 (2026-12-02) loads: the keys added since — `resources_runs`,
a row's `ran_with` and `started_from`, the SSL phase's `ssl_epochs_done` and `ssl_phase`, the `collapsed` count —
are optional. What a summary must hold is its rows, each with its trial and a known status (the ensemble and the
report read nothing else from a hand-made one); what else it holds must have its type. The steps after the search
(the ensemble, repeats, CV, external, the re-measured costs) keep their own dicts, typed here as dicts; a row's
objective value is keyed by the study's metric (`best_val_mean_auroc`, …), so rows allow extra keys.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

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
    ensemble: Optional[dict] = None
    repeats: Optional[dict] = None
    cv: Optional[dict] = None
    external: Optional[list[dict]] = None
    cost_remeasured: Optional[dict] = None
    search_model: Optional[dict] = None

    def counts(self) -> dict[str, int]:
        """Trials by status, every status named (0 where none)."""
        return {status: getattr(self, status) for status in STATUSES}
