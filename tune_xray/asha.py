"""ASHA (Li et al. 2020, "A system for massively parallel hyperparameter tuning") as the search runs it: Ray
Tune's ASHAScheduler on the fine-tune epochs (`epochs_done`), with the study budget's grace period and reduction
factor, and one rule of our own about a trial's last report."""

from __future__ import annotations

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
