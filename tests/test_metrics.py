import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from tune_xray.metrics import THRESHOLD_RANGE, classification_metrics, f1_thresholds, youden_thresholds


def test_multilabel_auroc_skips_single_class_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    y[:, 2] = 0  # a label with no positive in this split
    p = np.clip(y * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    out = classification_metrics("multilabel", y, p, ["a", "b", "c"])
    assert out["skipped_labels"] == ["c"]
    expected = np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(2)])
    assert out["metrics"]["mean_auroc"] == pytest.approx(expected)
    assert "auroc/c" not in out["metrics"]


def test_thresholds_come_from_validation_and_are_reused():
    rng = np.random.default_rng(1)
    y_val, y_test = rng.integers(0, 2, (300, 2)), rng.integers(0, 2, (300, 2))
    p_val, p_test = np.clip(y_val * 0.4 + rng.random((300, 2)) * 0.6, 0, 1), rng.random((300, 2))
    val = classification_metrics("multilabel", y_val, p_val, ["a", "b"])
    assert val["thresholds"] == pytest.approx(youden_thresholds(y_val, p_val).tolist())
    test = classification_metrics("multilabel", y_test, p_test, ["a", "b"], np.asarray(val["thresholds"]))
    assert test["thresholds"] == val["thresholds"]


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    m = classification_metrics("multiclass", y, p, ["x", "y", "z"])["metrics"]
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert 0 < m["macro_f1"] < 1 and 0.5 < m["mean_auroc"] <= 1


def test_multiclass_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet(np.ones(4), 300) + 0.6 * np.eye(4)[y]
    p /= p.sum(1, keepdims=True)
    out = classification_metrics("multiclass", y, p, ["a", "b", "c", "d"])
    m, pred = out["metrics"], p.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["sensitivity/c"] == pytest.approx(recall_score(y, pred, labels=[2], average=None)[0])
    assert m["specificity/c"] == pytest.approx(recall_score(y != 2, pred != 2))
    assert m["mean_auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert out["confusion_matrix"] == confusion_matrix(y, pred).tolist()


def test_binary_threshold_is_chosen_on_validation_and_reused_on_test():
    rng = np.random.default_rng(2)
    y_val, y_test = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    score = lambda y: np.clip(0.25 * y + 0.6 * rng.random(len(y)), 0, 1)  # noqa: E731  (skewed probabilities)
    p_val, p_test = (np.stack([1 - s, s], 1) for s in (score(y_val), score(y_test)))
    val = classification_metrics("multiclass", y_val, p_val, ["normal", "pneumonia"], rule="f1")
    (t,) = val["thresholds"]
    assert THRESHOLD_RANGE[0] <= t <= THRESHOLD_RANGE[1] and t == f1_thresholds(y_val[:, None], p_val[:, 1:])[0]
    test = classification_metrics("multiclass", y_test, p_test, ["normal", "pneumonia"], np.array([t]))
    assert test["metrics"]["f1"] == pytest.approx(f1_score(y_test, p_test[:, 1] >= t))  # F1, not recall (S2)
    assert test["thresholds"] == [t]


def test_f1_thresholds_stay_inside_the_range():
    y = np.array([[0], [0], [1], [1]])
    assert f1_thresholds(y, np.array([[0.001], [0.002], [0.003], [0.004]]))[0] == pytest.approx(0.05)
    assert f1_thresholds(y, np.array([[0.1], [0.2], [0.7], [0.8]]))[0] == pytest.approx(0.7)


def test_per_label_bootstrap_intervals_match_brute_force_and_keep_patients_together():
    from tune_xray.metrics import auroc_intervals, interval, patient_bootstrap

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 3)  # 30 patients, 3 images each
    y = (rng.random((90, 2)) < 0.4).astype(int)
    prob = np.clip(y * 0.3 + rng.random((90, 2)) * 0.7, 0, 1)
    weights = patient_bootstrap(groups, resamples=50, seed=1)
    for row in weights:  # a drawn patient brings every one of their images
        assert all(len(set(row[groups == g])) == 1 for g in range(30))
    got = auroc_intervals(y, prob, groups, ["a", "b"], resamples=50, seed=1)
    for c, name in enumerate("ab"):
        brute = []
        for row in weights:  # the resample made explicit: each image repeated by its weight
            idx = np.repeat(np.arange(90), row)
            if 0 < y[idx, c].sum() < len(idx):
                brute.append(roc_auc_score(y[idx, c], prob[idx, c]))
        assert got[f"auroc/{name}"] == pytest.approx(interval(np.array(brute)))
    assert set(got) == {"mean_auroc", "auroc/a", "auroc/b"}


def test_the_pareto_front_is_every_point_no_other_dominates():
    from itertools import product

    from tune_xray.metrics import pareto_front

    rng = np.random.default_rng(0)
    points = np.round(rng.random((40, 3)), 1)  # ties included
    modes = ["max", "min", "min"]
    signed = points * [-1, 1, 1]
    brute = [not any((signed[j] <= signed[i]).all() and (signed[j] < signed[i]).any() for j in range(40))
             for i in range(40)]
    assert pareto_front(points, modes).tolist() == brute
    assert pareto_front([[0.9, 10.0], [0.9, 10.0]], ["max", "min"]).tolist() == [True, True]  # equals both stay
    for a, b in product([0.8, 0.9], [5.0, 10.0]):
        assert pareto_front([[0.9, 5.0], [a, b]], ["max", "min"])[0]


def test_labels_never_trained_are_neither_thresholded_decided_nor_averaged():
    from tune_xray.metrics import decisions

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    p = np.clip(y * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    out = classification_metrics("multilabel", y, p, ["a", "b", "c"], untrained=["b"])
    assert out["metrics"]["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in (0, 2)]))
    assert out["metrics"]["mean_auroc_labels"] == 2 and "auroc/b" not in out["metrics"]
    assert out["thresholds"][1] is None and out["skipped_labels"] == ["b"]
    decided = decisions("multilabel", p, out["thresholds"])
    assert np.isnan(decided[:, 1]).all() and set(np.unique(decided[:, [0, 2]])) <= {0.0, 1.0}
    y[:, 2] = 0  # one class in this split: no threshold chosen either (not 0.5)
    assert classification_metrics("multilabel", y, p, ["a", "b", "c"])["thresholds"][2] is None


def test_a_binary_task_has_one_auroc_and_the_positive_class_s_sensitivity():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    m = classification_metrics("multiclass", y, np.stack([1 - s, s], 1), ["normal", "pneumonia"])["metrics"]
    assert m["mean_auroc"] == pytest.approx(roc_auc_score(y, s)) and m["mean_auroc_labels"] == 1
    assert "auroc/normal" not in m and "sensitivity/normal" not in m  # the mirror images are not repeated
    assert m["mean_sensitivity"] == m["sensitivity/pneumonia"] and m["mean_specificity"] == m["specificity/pneumonia"]


def test_the_cross_validation_interval_is_nadeau_and_bengios_corrected_resampled_t():
    """(1/K + n_test/n_train)·s² for the mean's variance: with K = 5 folds (n_test/n_train = 1/4) the interval is
    √(1 + K/4) = 1.5 times the plain t-interval's width, and centred on the mean."""
    from scipy import stats

    from tune_xray.metrics import corrected_t_interval

    values = np.array([0.71, 0.74, 0.69, 0.77, 0.72])
    low, high = corrected_t_interval(values, 1 / 4)
    plain = stats.t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    assert np.isclose(high - low, 2 * plain * 1.5) and np.isclose((low + high) / 2, values.mean())
    assert all(np.isnan(corrected_t_interval(values[:1], 1.0)))


def test_a_label_with_masked_entries_is_scored_over_its_labelled_images_only():
    from sklearn.metrics import roc_auc_score, roc_curve

    from tune_xray.metrics import auroc_intervals, weighted_auroc, youden_thresholds

    rng = np.random.default_rng(3)
    y = (rng.random((200, 3)) < 0.3).astype(float)
    prob = np.clip(0.35 * y + 0.65 * rng.random((200, 3)), 0, 1)
    masked = y.copy()
    masked[rng.random((200, 3)) < 0.3] = np.nan
    known = np.isfinite(masked[:, 1])
    scored = classification_metrics("multilabel", masked, prob, ["a", "b", "c"])
    assert scored["metrics"]["auroc/b"] == pytest.approx(roc_auc_score(y[known, 1], prob[known, 1]))
    fpr, tpr, thr = roc_curve(y[known, 1], prob[known, 1])
    assert youden_thresholds(masked, prob)[1] == pytest.approx(min(thr[np.argmax(tpr - fpr)], 1.0))
    assert weighted_auroc(masked, prob, np.ones(200))[0, 1] == pytest.approx(roc_auc_score(y[known, 1],
                                                                                         prob[known, 1]))
    low, high = auroc_intervals(masked, prob, np.arange(200).astype(str), ["a", "b", "c"], resamples=200)["auroc/b"]
    assert low < scored["metrics"]["auroc/b"] < high
    assert all(np.isfinite(scored["metrics"][k]) for k in ("mean_sensitivity", "macro_f1", "accuracy"))
