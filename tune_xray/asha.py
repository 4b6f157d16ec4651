"""ASHA (Li et al. 2020, "A system for massively parallel hyperparameter tuning") as the search runs it: Ray
Tune's ASHAScheduler on the fine-tune epochs (`epochs_done`), with the study budget's grace period and reduction
factor, and one rule of our own about a trial's last report; for a Pareto search (cost objectives), its
multi-objective form, which promotes by non-dominated sorting. With `budget.ssl_grace_period`, both forms also
judge the SSL phase (`SslRungs`): rungs in SSL epochs, on the representation probe, before any fine-tune epoch."""

from __future__ import annotations

import numpy as np
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from .record.names import PROBE, SSL_TIME_ATTR, STATUS, TIME_ATTR


class SslRungs:
    """ASHA's rule on the SSL phase's epochs: rungs at grace·η^k SSL epochs; a trial reaching a rung (its first
    report at or past it that carries a probe) is recorded there and stopped when its probe is below the
    (1 − 1/η) quantile of the probes recorded at that rung before it — Ray's ASHA bracket rule, on another clock.
    Trials are only compared at the same SSL rung; the probe is a validation metric (higher is better). A report
    without a probe waits for one."""

    def __init__(self, grace: int, eta: int):
        self.eta = eta
        self.rungs = [grace * eta ** k for k in range(40)][::-1]  # highest first; far past any SSL budget
        self.recorded: dict[int, dict[str, float]] = {}

    def on_result(self, trial_id: str, result: dict) -> str:
        probe, epoch = result.get(PROBE), result.get(SSL_TIME_ATTR, 0)
        if not isinstance(probe, (int, float)) or not np.isfinite(probe):
            return TrialScheduler.CONTINUE
        for rung in self.rungs:
            if epoch >= rung:
                recorded = self.recorded.setdefault(rung, {})
                if trial_id in recorded:
                    return TrialScheduler.CONTINUE
                cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self.eta) * 100) if recorded else None
                recorded[trial_id] = float(probe)
                return TrialScheduler.STOP if cutoff is not None and probe < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    @staticmethod
    def of(budget) -> "SslRungs | None":
        if budget.ssl_grace_period is None:
            return None
        return SslRungs(budget.ssl_grace_period, budget.ssl_reduction_factor or budget.reduction_factor)


def in_ssl_phase(result: dict) -> bool:
    """A report of a trial's SSL phase: no fine-tune epoch yet, an SSL clock, and not the trial's last report."""
    return SSL_TIME_ATTR in result and not result.get(TIME_ATTR) and not result.get(STATUS)


class FinishAwareASHA(ASHAScheduler):
    """ASHA (max_t = the budget's epochs) that never stops a trial on the report that ends it (it carries a
    status): a trial that trained its whole budget is complete even when ASHA's last rung is its last epoch. SSL
    reports go to `ssl_rungs` (`SslRungs`) where the budget sets them, and to nobody otherwise, as before."""

    def __init__(self, budget, metric: str, mode: str):
        super().__init__(time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=budget.epochs,
                         grace_period=min(budget.grace_period, budget.epochs),
                         reduction_factor=budget.reduction_factor)
        self.ssl_rungs = SslRungs.of(budget)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if getattr(self, "ssl_rungs", None) is not None and in_ssl_phase(result):
            return self.ssl_rungs.on_result(trial.trial_id, result)
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
        if getattr(self, "ssl_rungs", None) is not None and in_ssl_phase(result):  # the probe alone: no cost yet
            return self.ssl_rungs.on_result(trial.trial_id, result)
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
