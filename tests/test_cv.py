"""The cross-validation's pieces on made-up fold outputs (the whole path runs in test_search's Pareto test): the
vote that applies each fold model's threshold to its own probabilities, what it avoids, how a served vote reads,
and the out-of-fold coverage check."""

import json

import numpy as np
import pandas as pd
import pytest

from tune_xray.cv import decision_record, out_of_fold
from tune_xray.experiment import ExperimentError
from tune_xray.metrics import classification_metrics, decisions, vote
from tune_xray.serving import EnsemblePredictor


def test_one_member_votes_as_it_decides_and_a_label_without_threshold_is_undecided():
    rng = np.random.default_rng(0)
    p = rng.random((50, 3))
    shares, decided = vote("multilabel", p[None], [[0.3, None, 0.7]], [1.0])
    expected = decisions("multilabel", p, [0.3, None, 0.7])
    assert np.array_equal(np.isnan(decided), np.isnan(expected))
    assert np.array_equal(decided[:, [0, 2]], expected[:, [0, 2]]) and set(np.unique(shares[:, 0])) <= {0.0, 1.0}
    binary = np.stack([1 - p[:, 0], p[:, 0]], 1)
    assert np.array_equal(vote("multiclass", binary[None], [[0.3]], [1.0])[1], decisions("multiclass", binary, [0.3]))
    # two members of weight 3:1 — the heavier decides alone, the lighter cannot
    members = np.stack([binary, 1 - binary[:, ::-1]])
    shares, decided = vote("multiclass", members, [[0.5], [0.5]], [3.0, 1.0])
    assert np.array_equal(decided, decisions("multiclass", binary, [0.5]))
    assert set(np.round(np.unique(shares), 6)) <= {0.0, 0.25, 0.75, 1.0}


def test_a_vote_tied_at_half_goes_to_the_surer_side_whatever_the_members_order():
    """Four fold models of equal weight, two deciding each way: the weighted mean margin (probability − own
    threshold) decides — not the share's `≥ 0.5`, which made every tie positive — and reordering the members
    changes nothing."""
    thresholds = np.array([[0.5, 0.5], [0.4, 0.4], [0.6, 0.6], [0.5, 0.5]])
    # label 0: positives by +0.3 and +0.2, negatives by -0.05 and -0.1 → positive; label 1: negatives by -0.3 and
    # -0.2, positives by +0.05 and +0.1 → negative
    members = np.array([[[0.8, 0.2]], [[0.6, 0.2]], [[0.55, 0.65]], [[0.4, 0.6]]])
    shares, decided = vote("multilabel", members, thresholds.tolist(), np.ones(4))
    assert shares.tolist() == [[0.5, 0.5]] and decided.tolist() == [[1.0, 0.0]]
    for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert vote("multilabel", members[order], thresholds[order].tolist(), np.ones(4))[1].tolist() == [[1.0, 0.0]]
    binary = np.concatenate([1 - members[:, :, :1], members[:, :, :1]], axis=2)  # label 0 as a binary task
    assert vote("multiclass", binary, thresholds[:, :1].tolist(), np.ones(4))[1].tolist() == [[0, 1]]
    # a share above half decides whatever the margins
    assert vote("multilabel", members[:3], thresholds[:3].tolist(), np.ones(3))[1].tolist() == [[1.0, 0.0]]


def _folds(rng, n, k, prevalence=0.1, noise=1.5):
    """K fold models of one configuration on n images: the same signal, each with noise of its own (so their
    average is narrower than any one of them), a rare positive class."""
    y = (rng.random(n) < prevalence).astype(int)
    signal = 1.5 * y + rng.normal(size=n)
    p = 1 / (1 + np.exp(-np.stack([1.5 * (signal + noise * rng.normal(size=n)) - 3 for _ in range(k)])))
    return y, np.stack([1 - p, p], -1)  # (n,), (k, n, 2)


def test_the_vote_keeps_the_operating_point_that_the_averaged_probability_loses():
    """Thresholds chosen out of fold (Youden) on single fold models, applied to the average of the K models — a
    narrower distribution — decide far more images positive than the folds did; each fold model at its own
    threshold, then their vote, keeps sensitivity and specificity in balance and a better Youden index."""
    rng, k = np.random.default_rng(1), 5
    y, p = _folds(rng, 6000, k)
    fold = rng.integers(0, k, size=len(y))
    oof = p[fold, np.arange(len(y))]

    def youden(mask):
        return classification_metrics("multiclass", y[mask], oof[mask], ["normal", "effusion"])["thresholds"][0]

    own = [[youden(fold == j)] for j in range(k)]
    pooled = youden(np.ones(len(y), dtype=bool))
    y_test, members = _folds(rng, 6000, k)
    truth, boot = np.eye(2)[y_test], np.ones((20, len(y_test)))
    _, voted = vote("multiclass", members, own, np.ones(k))
    matched = decision_record(truth, voted.astype(float), True, boot)
    mismatched = decision_record(truth, decisions("multiclass", members.mean(0), [pooled]).astype(float), True, boot)
    j = {name: r["sensitivity"]["value"] + r["specificity"]["value"] - 1
         for name, r in (("matched", matched), ("mismatched", mismatched))}
    # seen over seeds 0-5: the mismatched point at sensitivity 0.85-0.93, specificity 0.39-0.56
    assert mismatched["sensitivity"]["value"] - mismatched["specificity"]["value"] > 0.3
    assert abs(matched["sensitivity"]["value"] - matched["specificity"]["value"]) < 0.2
    assert j["matched"] > j["mismatched"] + 0.05


def test_a_served_vote_reads_as_shares_and_decisions():
    predictor = EnsemblePredictor.__new__(EnsemblePredictor)
    predictor.classes, predictor.task, predictor.weights = ["normal", "pneumonia"], "multiclass", np.array([0.5, 0.5])
    predictor.thresholds, predictor.member_thresholds = None, [[0.2], [0.6]]
    members = np.array([[[0.7, 0.3], [0.9, 0.1]], [[0.7, 0.3], [0.2, 0.8]]])  # (2 members, 2 images, 2 classes)
    frame = predictor.frame(members.mean(0), members)
    assert list(frame.columns) == ["p_pneumonia", "vote_pneumonia", "label"]
    # both images a tie at half: the first's margins +0.1 and -0.3 decide normal, the second's -0.1 and +0.2
    # pneumonia
    assert frame["vote_pneumonia"].tolist() == [0.5, 0.5] and frame["label"].tolist() == ["normal", "pneumonia"]
    predictor.task, predictor.classes = "multilabel", ["effusion", "mass"]
    predictor.member_thresholds = [[0.5, None], [0.5, None]]
    frame = predictor.frame(members.mean(0), members)
    assert frame["vote_effusion"].tolist() == [1.0, 0.5] and frame["y_effusion"].tolist() == [1, 1]
    assert frame["y_mass"].isna().all() and frame["vote_mass"].isna().all()  # no threshold: no decision


def test_out_of_fold_predictions_must_cover_train_and_val_once(tmp_path):
    dirs = []
    for fold, paths in enumerate((["a.png", "b.png"], ["c.png"])):
        d = tmp_path / f"fold{fold}"
        d.mkdir()
        pd.DataFrame({"path": paths, "patient_id": paths, "y_x": 0, "p_x": 0.5}).to_csv(d / "predictions_val.csv",
                                                                                      index=False)
        (d / "summary.json").write_text(json.dumps({"split_sizes": {"train": 2, "val": 2, "test": 5}}))
        dirs.append(d)
    with pytest.raises(ExperimentError, match="cover 3 images, not the 4 of train \\+ val once each"):
        out_of_fold(dirs, [0, 1], ["x"], every_fold=True)
    assert len(out_of_fold(dirs, [0, 1], ["x"])) == 3  # a fold missing: nothing to check the count against
    pd.DataFrame({"path": ["a.png"], "patient_id": ["a"], "y_x": 0, "p_x": 0.5}).to_csv(
        dirs[1] / "predictions_val.csv", index=False)
    with pytest.raises(ExperimentError, match="overlap"):
        out_of_fold(dirs, [0, 1], ["x"])


@pytest.mark.parametrize("metric", ["val_accuracy", "val_macro_f1"])
@pytest.mark.parametrize("task, classes", [("multilabel", ["a", "b", "c", "d"]), ("multiclass", ["no", "yes"]),
                                           ("multiclass", ["x", "y", "z"])])
def test_the_votes_decided_scorer_computes_the_metric_it_is_compared_with(metric, task, classes):
    """The out-of-fold ensemble's accuracy or macro F1 of its vote's decisions against the search's ensemble's, which
    `split_scorer` (metrics.classification_metrics) computes at its thresholds: for decisions made at thresholds,
    both give the same number on the split and under every patient resample — a label with no threshold (undecided)
    and one with no positive in test left out alike, where the old scorer counted the first as wrong and the second
    as F1 0."""
    from tune_xray.cv import _decided_scorer
    from tune_xray.experiment import TrialTask
    from tune_xray.metrics import patient_bootstrap, split_scorer

    rng = np.random.default_rng(3)
    n = 60
    prob = rng.random((n, len(classes)))
    if task == "multilabel":
        y = (rng.random((n, 4)) < prob * 0.8).astype(int)
        y[:, 1] = 0  # no positive in test
        thresholds = [0.4, 0.5, None, 0.6]  # label c undecided
        untrained = ("d",)
    else:
        prob = prob / prob.sum(1, keepdims=True)
        y = np.eye(len(classes))[rng.integers(0, len(classes), n)]
        thresholds = [0.45] if len(classes) == 2 else None
        untrained = ()
    decided = decisions(task, prob, thresholds).astype(float)
    trial = TrialTask(task, classes, metric, "youden", untrained)
    boot = patient_bootstrap(np.arange(n) // 2, 50, 0)
    compared = split_scorer(y, task, metric, classes, "youden",
                            None if thresholds is None else np.array(thresholds, dtype=float), untrained)
    ours = _decided_scorer(y, decided, trial)
    assert np.allclose(ours(prob), compared(prob), equal_nan=True)
    assert np.allclose(ours(prob, boot), compared(prob, boot), equal_nan=True)
