"""ASHA (Li et al. 2020, "A system for massively parallel hyperparameter tuning") as the search runs it: Ray
Tune's ASHAScheduler on the fine-tune epochs (`epochs_done`), with the study budget's grace period and reduction
factor, and one rule of our own about a trial's last report; for a Pareto search (cost objectives), its
multi-objective form, which promotes by non-dominated sorting."""

from __future__ import annotations

import numpy as np
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .trial import STATUS, TIME_ATTR


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


def priority_keys(points: np.ndarray) -> list[tuple]:
    """Each row's place in multi-objective ASHA's order as a sort key, smaller first (`points`: n × objectives,
    every column minimised): its non-dominated front (Deb et al. 2002, NSGA-II's fast non-dominated sort), then its
    crowding distance within the front, the widest first, then its objectives in order — the study's metric first,
    so a front's two ends (both infinitely crowded) go the more accurate first. A rule of the points alone: the order
    never depends on when a trial arrived, and equal points share a key."""
    n = len(points)
    dominates = (points[:, None, :] <= points[None, :, :]).all(-1) & (points[:, None, :] < points[None, :, :]).any(-1)
    remaining, keys = np.ones(n, dtype=bool), [()] * n
    level = 0
    while remaining.any():
        front = np.flatnonzero(remaining & ~(dominates & remaining[:, None]).any(0))
        crowding = np.zeros(len(front))
        for column in points[front].T:
            ranked = np.argsort(column, kind="stable")
            spread = column[ranked[-1]] - column[ranked[0]]
            crowding[ranked[[0, -1]]] = np.inf
            if len(front) > 2 and np.isfinite(spread) and spread > 0:
                crowding[ranked[1:-1]] += (column[ranked[2:]] - column[ranked[:-2]]) / spread
        for i, distance in zip(front, crowding):
            keys[i] = (level, -distance, *points[i].tolist())
        remaining[front] = False
        level += 1
    return keys


def pareto_order(points: np.ndarray) -> np.ndarray:
    """Row indices of `points` (n, objectives; every column minimised) best first, by `priority_keys`."""
    keys = priority_keys(points)
    return np.array(sorted(range(len(points)), key=keys.__getitem__), dtype=int)


def moasha_continues(points: np.ndarray, me: int, eta: float) -> bool:
    """Multi-objective ASHA's decision for trial `me` among the `points` recorded at its rung (itself included):
    it goes on when it ranks in the top 1/η of them by `priority_keys` — fewer than n/η ahead of it, the trials
    sharing its key not counted ahead (Schmucker et al. 2021; Syne Tune's MOASHA ranks so too)."""
    keys = priority_keys(points)
    ahead = sum(key < keys[me] for key in keys)
    return ahead < len(points) / eta


class ParetoASHA(FinishAwareASHA):
    """Multi-objective ASHA (Schmucker et al. 2021, "Multi-objective multi-fidelity hyperparameter optimization
    with application to fairness"; Syne Tune's MOASHA): ASHA's rungs and promotion fraction, but a trial reaching a
    rung goes on when it ranks in the top 1/η of the trials recorded there (itself included) by non-dominated
    sorting on every objective — its validation metric and its measured costs, known from epoch 1 — with crowding
    distance within a front and the objectives themselves breaking ties (`priority_keys`), so a cheap model is not
    stopped for its accuracy alone, as accuracy-only ASHA stops the front's cheap end of a Pareto search. A rung
    stops 1 − 1/η of the trials reaching it, as ASHA does, however its front is shaped (tests/test_asha.py
    simulates it)."""

    def __init__(self, budget, metric: str, mode: str, costs: list[tuple[str, str]]):
        super().__init__(budget, metric, mode)
        self.objectives = [(metric, mode), *costs]
        grace, eta = min(budget.grace_period, budget.epochs), budget.reduction_factor
        self.rungs = [grace * eta ** k for k in range(64) if grace * eta ** k < budget.epochs][::-1]  # top first
        self.eta = eta
        self.recorded: dict[int, dict[str, np.ndarray]] = {rung: {} for rung in self.rungs}

    def _point(self, result: dict) -> np.ndarray:
        """The objectives, each as a value to minimise; a missing or non-finite one counts as the worst."""
        values = [result.get(name) for name, _ in self.objectives]
        return np.array([(-1.0 if mode == "max" else 1.0) * float(v) if isinstance(v, (int, float)) and np.isfinite(v)
                         else np.inf for v, (_, mode) in zip(values, self.objectives)])

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(STATUS):  # its last report: it trained its whole budget
            return TrialScheduler.CONTINUE
        epoch = result.get(TIME_ATTR, 0)
        for rung in self.rungs:  # the highest rung the trial has reached, once
            if epoch >= rung:
                if trial.trial_id in self.recorded[rung]:
                    break
                self.recorded[rung][trial.trial_id] = self._point(result)
                ids, points = list(self.recorded[rung]), np.stack(list(self.recorded[rung].values()))
                if not moasha_continues(points, ids.index(trial.trial_id), self.eta):
                    return TrialScheduler.STOP
                break
        return TrialScheduler.CONTINUE
