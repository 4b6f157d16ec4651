"""Classification metrics from probabilities (never logits), via scikit-learn.

Thresholds for sensitivity / specificity / F1 are chosen on validation (Youden's J per label) and
then applied unchanged to test: nothing is ever tuned on the test split (S0 flaw 1, S4's 0.5-on-logits).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve


def auroc_per_label(y_true: np.ndarray, prob: np.ndarray, classes) -> tuple[dict[str, float], list[str]]:
    """AUROC of each label with both classes present in `y_true`; the others are returned as skipped."""
    scores, skipped = {}, []
    for j, name in enumerate(classes):
        if np.unique(y_true[:, j]).size < 2:
            skipped.append(name)
        else:
            scores[name] = float(roc_auc_score(y_true[:, j], prob[:, j]))
    return scores, skipped


def youden_thresholds(y_true: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Per-label threshold maximising sensitivity + specificity − 1 (0.5 for labels with one class)."""
    out = np.full(y_true.shape[1], 0.5)
    for j in range(y_true.shape[1]):
        if np.unique(y_true[:, j]).size == 2:
            fpr, tpr, thr = roc_curve(y_true[:, j], prob[:, j])
            out[j] = float(np.clip(thr[np.argmax(tpr - fpr)], 0.0, 1.0))
    return out


def _sens_spec(y_true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    tp = np.sum((pred == 1) & (y_true == 1))
    tn = np.sum((pred == 0) & (y_true == 0))
    pos, neg = np.sum(y_true == 1), np.sum(y_true == 0)
    return (tp / pos if pos else np.nan), (tn / neg if neg else np.nan)


def multilabel_metrics(y_true: np.ndarray, prob: np.ndarray, classes,
                       thresholds: np.ndarray | None = None) -> dict:
    """mean_auroc (+ per label), and at `thresholds` (Youden on these data when None — pass the
    validation thresholds when scoring test): macro F1, accuracy, mean sensitivity and specificity."""
    per_label, skipped = auroc_per_label(y_true, prob, classes)
    if thresholds is None:
        thresholds = youden_thresholds(y_true, prob)
    pred = (prob >= thresholds).astype(int)
    present = [j for j, c in enumerate(classes) if c not in skipped]
    sens, spec = zip(*[_sens_spec(y_true[:, j], pred[:, j]) for j in present]) if present else ((), ())
    out = {
        "mean_auroc": float(np.mean(list(per_label.values()))) if per_label else float("nan"),
        "macro_f1": float(f1_score(y_true[:, present], pred[:, present], average="macro", zero_division=0))
        if present else float("nan"),
        "accuracy": float((pred == y_true).mean()),
        "mean_sensitivity": float(np.nanmean(sens)) if present else float("nan"),
        "mean_specificity": float(np.nanmean(spec)) if present else float("nan"),
    }
    out.update({f"auroc/{name}": v for name, v in per_label.items()})
    return {"metrics": out, "skipped_labels": skipped, "thresholds": thresholds.tolist()}


def multiclass_metrics(y_true: np.ndarray, prob: np.ndarray, classes) -> dict:
    """Accuracy, macro-F1 and one-vs-rest AUROC (per class and mean) for single-label tasks."""
    pred = prob.argmax(1)
    onehot = np.eye(len(classes))[y_true]
    per_class, skipped = auroc_per_label(onehot, prob, classes)
    out = {
        "mean_auroc": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, average="macro", labels=range(len(classes)), zero_division=0)),
    }
    sens, spec = zip(*[_sens_spec(onehot[:, j], (pred == j).astype(int)) for j in range(len(classes))])
    out["mean_sensitivity"], out["mean_specificity"] = float(np.nanmean(sens)), float(np.nanmean(spec))
    out.update({f"auroc/{name}": v for name, v in per_class.items()})
    return {"metrics": out, "skipped_labels": skipped, "thresholds": None}


def classification_metrics(task: str, y_true: np.ndarray, prob: np.ndarray, classes,
                           thresholds: np.ndarray | None = None) -> dict:
    if task == "multilabel":
        return multilabel_metrics(y_true, prob, classes, thresholds)
    return multiclass_metrics(y_true, prob, classes)
