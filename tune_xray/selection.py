"""Ensemble selection as a library (Caruana et al. 2004): the selector over validation predictions, the budget it
is held to, and what it says when nothing fits. The search's ensemble (tune_xray.ensemble) and the out-of-fold
ensemble of the cross-validation (tune_xray.cv) both choose with it; neither stage imports the other."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .experiment import ExperimentError


class EnsembleError(ExperimentError):
    """A pool that cannot be ensembled (no completed trial, trials that predicted different images)."""


class NoFit(EnsembleError):
    """A budget no completed trial fits alone: an outcome a search states (the nearest fit beside the best single
    trial), not a failure; from `python -m tune_xray.ensemble` one error naming the flag. `nearest`: the trial
    whose costs exceed the budget least (the largest cost over bound, relative), with its costs."""

    def __init__(self, message: str, budget: dict, nearest: dict):
        super().__init__(message)
        self.budget, self.nearest = budget, nearest

    def outcome(self, pool_best: dict | None) -> dict:
        """What a search records in place of an ensemble: no member fits, so none is chosen or registered."""
        return {"fits": False, "why": str(self), "budget": self.budget, "nearest": self.nearest,
                "best_single": pool_best, "registered": None}


class CaruanaSelector:
    """Ensemble selection from a library of models (Caruana et al. 2004, "Ensemble selection from libraries of
    models"; with Caruana et al. 2006, "Getting the most out of ensemble selection"), as a pure estimator on the
    hill-climb set: `fit(probs, y, scorer)` → `weights_`, no I/O.

    1. Sorted initialisation: the N best models by their own score, N ≤ `max_init` chosen on the hill-climb set
       (N = 1 allowed: the best single model).
    2. Greedy forward selection with replacement, one model at a time, up to `size` selections; the best prefix
       is returned (the greedy curve is not monotone, and its last step is not its best).
    3. Bagging: the same selection on `bags` random subsets of `bag_fraction` of the models, their weights
       averaged; the bag average is scored on the whole hill-climb set and kept only if it is not worse than the
       unbagged selection. Bagging is skipped when a bag would hold fewer than MIN_BAG models: a bag of one or
       two is that model or pair, so the average over bags is the random draw of which models the bags kept
       (with two trials, each bag held one: weights 0.7/0.3 from the draw, not from the data).

    Under a budget (`fit(..., costs, budget)`: each model's costs, e.g. latency and parameters, and the most the
    ensemble may sum over its distinct members) a model is added — in the initialisation and the greedy steps —
    only while the members' summed costs stay within it; a model chosen again costs nothing more.
    Bagging is off under a budget: the average over bags holds the union of their members, which need not fit.

    Since the initialisation with N = 1 is the best single model (the best affordable one, under a budget) and
    every later choice is kept only if it scores at least as well, the fitted weights score at least the best
    single model's on the hill-climb set.
    Ties go to the model with the better own score, then the lower index: give the models in a canonical order.

    `scorer(y, prob) → float`, higher is better. Fitted: `weights_` (M,) summing to 1, `score_` (theirs),
    `single_scores_` (M,), `curve_` (x, score) pairs of the returned weights' making — ensemble size in
    selections for an unbagged result, bags averaged for a bagged one (`curve_axis_`) — `chosen_` (the x
    returned), `init_size_`, `bagged_`; `selection_score_`, the unbagged selection's own score, and `fallback_`,
    whether rounding put it below the best single model so that model was returned instead (a guard, not the rule:
    the selection itself holds the property, and the tests require it to).
    """

    MIN_BAG = 3

    def __init__(self, size: int = 5, max_init: int | None = None, bags: int = 20, bag_fraction: float = 0.5,
                 seed: int = 0):
        if size < 1 or bags < 0 or not 0 < bag_fraction <= 1:
            raise ValueError(f"CaruanaSelector(size={size}, bags={bags}, bag_fraction={bag_fraction}): size >= 1, "
                             "bags >= 0 and 0 < bag_fraction <= 1")
        self.size, self.max_init, self.bags, self.bag_fraction, self.seed = size, max_init, bags, bag_fraction, seed

    def _fits(self, chosen, j: int) -> bool:
        """Whether the distinct models `chosen` and `j` together stay within the budget (always, without one)."""
        if self.costs_ is None:
            return True
        return bool((self.costs_[sorted(set(chosen) | {j})].sum(0) <= self.budget_).all())

    def _select(self, probs: np.ndarray, members, y, scorer) -> tuple[np.ndarray, list[tuple[int, float]], int]:
        """One selection over `members` (each affordable alone): (counts of the best prefix, the curve, the
        initial size)."""
        ranked = sorted(members, key=lambda j: (-self.single_scores_[j], j))
        longest = min(self.size, self.max_init or self.size, len(ranked))
        longest = next((n for n in range(1, longest) if not self._fits(ranked[:n], ranked[n])), longest)
        inits = [scorer(y, probs[ranked[:n]].mean(0)) for n in range(1, longest + 1)]
        n0 = int(np.argmax(inits)) + 1  # the first of the best: the smallest N
        order, total = list(ranked[:n0]), probs[ranked[:n0]].sum(0)
        curve = [(n0, inits[n0 - 1])]
        while len(order) < self.size:
            k = len(order) + 1
            gains = [(scorer(y, (total + probs[j]) / k), self.single_scores_[j], -j) for j in ranked
                     if self._fits(order, j)]
            if not gains:  # nothing more fits the budget
                break
            j = -max(gains)[2]
            order.append(j)
            total = total + probs[j]
            curve.append((k, max(gains)[0]))
        best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))  # the best prefix, the shortest if tied
        counts = np.bincount(order[:curve[best][0]], minlength=len(probs)).astype(float)
        return counts, curve, n0

    def fit(self, probs: np.ndarray, y: np.ndarray, scorer: Callable[[np.ndarray, np.ndarray], float],
            costs: np.ndarray | None = None, budget: np.ndarray | None = None):
        """`probs` (M, n, C): each model's probabilities on the hill-climb set; `y` its targets; `costs` (M, K)
        and `budget` (K,): what each model costs and the most the ensemble's distinct members may sum to."""
        probs = np.asarray(probs, dtype=np.float64)
        m = len(probs)
        self.costs_ = None if budget is None else np.asarray(costs, dtype=np.float64).reshape(m, -1)
        self.budget_ = None if budget is None else np.asarray(budget, dtype=np.float64)
        affordable = [j for j in range(m) if self._fits([], j)]
        if not affordable:
            raise ValueError("no model fits the budget alone")
        self.single_scores_ = np.array([scorer(y, p) for p in probs])
        counts, curve, self.init_size_ = self._select(probs, affordable, y, scorer)
        self.weights_, self.curve_, self.curve_axis_ = counts / counts.sum(), curve, "selections"
        self.score_ = scorer(y, np.tensordot(self.weights_, probs, axes=1))
        self.chosen_, self.bagged_ = int(counts.sum()), False
        self.selection_score_, self.fallback_ = self.score_, False
        best = max(affordable, key=lambda j: (self.single_scores_[j], -j))
        if self.score_ < self.single_scores_[best]:  # the weighted sum rounded apart from the running mean and
            self.weights_ = np.eye(m)[best]  # reordered near-equal probabilities: the best single model, exactly
            self.score_, self.curve_, self.chosen_ = self.single_scores_[best], [(1, self.single_scores_[best])], 1
            self.fallback_ = True
        bag = math.ceil(self.bag_fraction * len(affordable))
        if self.bags > 1 and bag >= self.MIN_BAG and self.costs_ is None:
            rng, running, bag_curve = np.random.default_rng(self.seed), np.zeros(m), []
            for b in range(1, self.bags + 1):
                bag_counts, _, _ = self._select(probs, sorted(rng.choice(affordable, size=bag, replace=False)), y,
                                                scorer)
                running += bag_counts / bag_counts.sum()
                bag_curve.append((b, scorer(y, np.tensordot(running / b, probs, axes=1))))
            if bag_curve[-1][1] >= self.score_:
                self.weights_, self.score_, self.curve_ = running / self.bags, bag_curve[-1][1], bag_curve
                self.curve_axis_, self.chosen_, self.bagged_ = "bags", self.bags, True
        return self


def absolute_budget(budget: dict | None, rows: list[dict]) -> tuple[dict, str]:
    """The ensemble's budget in ms and M, and how it was reached: a `latency_x_cheapest` factor times the cheapest
    completed trial's latency (`rows`: a summary's, their costs as `remeasure_costs` measured them again alone) —
    a budget that holds the same models on any machine."""
    budget = {k: v for k, v in (budget or {}).items() if v is not None}
    factor = budget.pop("latency_x_cheapest", None)
    if factor is None:
        return budget, ""
    measured = [(r["cost"]["latency_ms"], r["trial"]) for r in rows if r["status"] == "complete"
                and isinstance((r.get("cost") or {}).get("latency_ms"), (int, float))]
    if not measured:
        raise EnsembleError("ensemble.latency_x_cheapest: no completed trial has a measured latency")
    cheapest, trial = min(measured)
    budget["latency_ms"] = factor * cheapest
    where = "measured again alone" if any("cost_in_trial" in r for r in rows) else "as its trial measured it"
    return budget, f"{factor:g} × the cheapest completed trial's latency ({trial}, {cheapest:.3g} ms, {where})"
