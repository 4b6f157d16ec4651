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
    # on one front a rung still promotes only its top 1/η, though no trial dominates another: the cheap end, second
    # of two, ranks after the accurate end (both infinitely crowded: the more accurate first) and stops, as ASHA
    # stops the worse of two at η 2; a third between them ranks third of three and stops; a new cheapest end ranks
    # second of four, within η 2's two, and goes on
    between = ParetoASHA(BUDGET, METRIC, "max", [("latency_ms", "min")])
    assert [_decide(between, t, a, ms) for t, a, ms in [("accurate", 0.9, 10.0), ("cheap", 0.6, 1.0),
                                                         ("between", 0.8, 5.0), ("cheapest", 0.5, 0.5)]] \
        == ["CONTINUE", "STOP", "STOP", "CONTINUE"]
    assert pareto.on_trial_result(None, SimpleNamespace(trial_id="fast"), {"status": "complete", "epochs_done": 4}) \
        == TrialScheduler.CONTINUE  # a trial's last report never stops it


def _rung_stops(points: np.ndarray, eta: int) -> float:
    """The share of `points` (arriving in order at one rung of a ParetoASHA; metric maximised, latency and the rest
    minimised) that the rung stops."""
    costs = [(f"cost{k}", "min") for k in range(points.shape[1] - 1)]
    scheduler = ParetoASHA(Budget(trials=len(points), epochs=eta + 1, grace_period=1, reduction_factor=eta), METRIC,
                           "max", costs)
    decisions = [scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(i)), {
        METRIC: float(p[0]), **{name: float(v) for (name, _), v in zip(costs, p[1:])}, "epochs_done": 1})
        for i, p in enumerate(points)]
    return float(np.mean([d == TrialScheduler.STOP for d in decisions]))


def test_multi_objective_asha_stops_one_minus_one_over_eta_of_a_rung_whatever_the_front():
    """Simulated: 150 arrivals at a rung, 5 seeds, four shapes — independent objectives, accuracy strictly rising
    with latency (one front: every trial non-dominated, where promoting the non-dominated stopped nothing), accuracy
    falling with latency (a chain: each trial dominates the next), three objectives. The rung stops 1 − 1/η within
    sampling error (a newcomer's rank is uniform, so 1 − E[⌈n/η⌉/n] over the arrivals n = 1…150, about 2 % below
    1 − 1/η; the binomial standard error over 5 × 150 decisions is ≈ 1.7 %), and the order of arrival does not
    change who is ahead of whom."""
    n, eta = 150, 3
    expected = 1 - np.mean([np.ceil(k / eta) / k for k in range(1, n + 1)])
    shapes = {"independent": lambda u, v: np.c_[u, v], "rising": lambda u, v: np.c_[u, u],
              "falling": lambda u, v: np.c_[-u, u], "three objectives": lambda u, v: np.c_[u, v, u * v]}
    for shape, points in shapes.items():
        stopped = [_rung_stops(points(*np.random.default_rng(seed).random((2, n))), eta) for seed in range(5)]
        assert abs(np.mean(stopped) - expected) < 0.05, (shape, stopped)
        assert abs(expected - (1 - 1 / eta)) < 0.03
    points = np.random.default_rng(0).random((30, 2))
    order = np.random.default_rng(1).permutation(30)
    assert pareto_order(points[order]).tolist() == np.argsort(order)[pareto_order(points)].tolist()


def _ssl(scheduler, trial_id: str, probe, ssl_epoch: int) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    result = {"epochs_done": 0, "ssl_epochs_done": ssl_epoch, "ssl_phase": "byol"}
    if probe is not None:
        result["ssl_probe"] = probe
    return scheduler.on_trial_result(None, trial, result)


def test_ssl_rungs_judge_the_probe_only_among_trials_at_the_same_ssl_rung():
    budget = Budget(trials=8, epochs=4, grace_period=1, reduction_factor=2, ssl_grace_period=2)
    for scheduler in (FinishAwareASHA(budget, METRIC, "max"), ParetoASHA(budget, METRIC, "max",
                                                                          [("latency_ms", "min")])):
        assert _ssl(scheduler, "a", 0.80, 1) == TrialScheduler.CONTINUE  # before the first rung (2): no judging
        assert _ssl(scheduler, "a", 0.80, 2) == TrialScheduler.CONTINUE  # first at rung 2
        assert _ssl(scheduler, "b", None, 2) == TrialScheduler.CONTINUE  # no probe this epoch: it waits for one
        assert _ssl(scheduler, "b", 0.60, 3) == TrialScheduler.STOP  # rung 2's cutoff (η 2: the median of a's 0.80)
        assert _ssl(scheduler, "a", 0.55, 4) == TrialScheduler.CONTINUE  # rung 4 is its own: nobody there before
        assert _ssl(scheduler, "c", 0.70, 4) == TrialScheduler.CONTINUE  # rung 4's cutoff: a's 0.55 there
        assert _ssl(scheduler, "d", 0.60, 5) == TrialScheduler.STOP  # rung 4: the median of 0.55 and 0.70
        assert _ssl(scheduler, "e", 0.75, 2) == TrialScheduler.CONTINUE  # rung 2: the median of 0.80 and 0.60


def test_a_study_without_ssl_rungs_schedules_as_before():
    """No `budget.ssl_grace_period`: SSL reports carry no fine-tune metric and ASHA lets them pass, as Ray's own
    ASHAScheduler does; the fine-tune's decisions are ASHA's."""
    from ray.tune.schedulers import ASHAScheduler

    ours = FinishAwareASHA(BUDGET, METRIC, "max")
    ray = ASHAScheduler(time_attr="epochs_done", metric=METRIC, mode="max", max_t=BUDGET.epochs,
                        grace_period=BUDGET.grace_period, reduction_factor=BUDGET.reduction_factor)
    assert ours.ssl_rungs is None
    rng = np.random.default_rng(0)
    for scheduler in (ours, ray):
        for t in "abcdef":
            scheduler.on_trial_add(None, SimpleNamespace(trial_id=t, config={}))
    for t in "abcdef":
        assert _ssl(ours, t, 0.1, 3) == TrialScheduler.CONTINUE  # a bad probe: not judged
        for epoch in (1, 2, 3):
            value = float(rng.random())
            result = {METRIC: value, "epochs_done": epoch}
            trial = SimpleNamespace(trial_id=t)
            assert ours.on_trial_result(None, trial, result) == ray.on_trial_result(None, trial, result)
