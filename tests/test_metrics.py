import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tune_xray.metrics import classification_metrics, youden_thresholds


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
