"""ASHA's decisions, single- and multi-objective, on made-up results (no Ray run needed)."""

from types import SimpleNamespace

import numpy as np
from ray.tune.schedulers import TrialScheduler

from tune_xray.asha import FinishAwareASHA, ParetoASHA, pareto_order
from tune_xray.metrics import pareto_ranks
from tune_xray.space import Budget

BUDGET = Budget(trials=8, epochs=4, grace_period=1, reduction_factor=2)
METRIC = "best_val_mean_auroc"


def _decide(scheduler, trial_id: str, auroc: float, latency: float, epoch: int = 1) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    return scheduler.on_trial_result(None, trial, {METRIC: auroc, "latency_ms": latency, "epochs_done": epoch})


def test_pareto_order_sorts_fronts_then_crowding():
    points = np.array([[1.0, 5.0], [2.0, 2.0], [5.0, 1.0], [3.0, 3.0], [4.0, 4.0]])  # minimise both
    order = pareto_order(points)
    assert set(order[:3]) == {0, 1, 2} and list(order[3:]) == [3, 4]  # front, then the next fronts
    assert list(order[:2]) in ([0, 2], [2, 0])  # the front's ends first: they widen it most
    assert pareto_ranks(points, ["min", "min"]).tolist() == [0, 0, 0, 1, 2]
    assert pareto_ranks(-points, ["max", "max"]).tolist() == [0, 0, 0, 1, 2]


def test_multi_objective_asha_keeps_the_cheap_end_of_the_front_that_accuracy_alone_stops():
    """Three trials at the first rung (η 2: two go on): a fast, less accurate one is on the front with the most
    accurate; a slower, less accurate one is dominated. ASHA on the metric stops the fast one; MO-ASHA keeps it and
    stops the dominated one."""
    pareto = ParetoASHA(BUDGET, METRIC, "max", [("latency_ms", "min")])
    assert [_decide(pareto, t, a, ms) for t, a, ms in [("best", 0.90, 10.0), ("slow", 0.85, 12.0),
                                                       ("fast", 0.60, 1.0)]][2] == TrialScheduler.CONTINUE
    assert _decide(pareto, "worse", 0.70, 20.0) == TrialScheduler.STOP  # dominated by "best": the next front
    accuracy = FinishAwareASHA(BUDGET, METRIC, "max")
    for t, a, ms in [("best", 0.90, 10.0), ("slow", 0.85, 12.0)]:
        accuracy.on_trial_add(None, SimpleNamespace(trial_id=t, config={}))
        _decide(accuracy, t, a, ms)
    accuracy.on_trial_add(None, SimpleNamespace(trial_id="fast", config={}))
    assert _decide(accuracy, "fast", 0.60, 1.0) == TrialScheduler.STOP
    assert _decide(pareto, "best", 0.91, 10.0, epoch=1) == TrialScheduler.CONTINUE  # a rung is decided once
    # the front's two ends recorded, a third trial on the front between them ranks third by crowding distance,
    # beyond η 2's two of three: no trial dominates it, so it goes on
    between = ParetoASHA(BUDGET, METRIC, "max", [("latency_ms", "min")])
    assert [_decide(between, t, a, ms) for t, a, ms in [("accurate", 0.9, 10.0), ("cheap", 0.6, 1.0),
                                                         ("between", 0.8, 5.0)]] == [TrialScheduler.CONTINUE] * 3
    assert _decide(between, "dominated", 0.7, 6.0) == TrialScheduler.STOP
    assert pareto.on_trial_result(None, SimpleNamespace(trial_id="fast"), {"status": "complete", "epochs_done": 4}) \
        == TrialScheduler.CONTINUE  # a trial's last report never stops it
