"""Classification metrics from probabilities (never logits), via scikit-learn.

Thresholds for sensitivity / specificity / F1 are chosen on validation (Youden's J per label) and
then applied unchanged to test: nothing is ever tuned on the test split (S0 flaw 1, S4's 0.5-on-logits).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .record.names import bare

THRESHOLD_RANGE = (0.05, 0.95)  # thresholds are searched inside this range, never at the extremes


def labelled(column: np.ndarray) -> np.ndarray:
    """The images a label is known for: multi-label targets hold NaN where a label is not (CheXpert's uncertain
    entries under U-Ignore, blank ones under data.missing: ignore); such entries are left out of everything that
    scores, thresholds or resamples that label (Irvin et al. 2019)."""
    return np.isfinite(column)


def both_classes(column: np.ndarray) -> bool:
    """Whether a label's labelled images hold both a positive and a negative."""
    known = column[labelled(column)]
    return bool(0 < known.sum() < len(known))


def auroc_per_label(y_true: np.ndarray, prob: np.ndarray, classes,
                    untrained=()) -> tuple[dict[str, float], list[str]]:
    """AUROC of each label with both classes present in `y_true`; the others, and `untrained` labels (no positive
    in train: the model never learnt them), are returned as skipped."""
    scores, skipped = {}, []
    for j, name in enumerate(classes):
        known = labelled(y_true[:, j])
        if name in untrained or not both_classes(y_true[:, j]):
            skipped.append(name)
        else:
            scores[name] = float(roc_auc_score(y_true[known, j], prob[known, j]))
    return scores, skipped


def youden_thresholds(y_true: np.ndarray, prob: np.ndarray, limits=(0.0, 1.0)) -> np.ndarray:
    """Per-label threshold maximising sensitivity + specificity − 1; NaN — none, so no decision — for a label with
    one class in `y_true`."""
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        known = labelled(y_true[:, j])
        if both_classes(y_true[:, j]):
            fpr, tpr, thr = roc_curve(y_true[known, j], prob[known, j])
            out[j] = float(np.clip(thr[np.argmax(tpr - fpr)], *limits))
    return out


def f1_thresholds(y_true: np.ndarray, prob: np.ndarray, limits=THRESHOLD_RANGE) -> np.ndarray:
    """Per-label probability threshold in `limits` maximising F1; NaN for a label with one class in `y_true`."""
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        known = labelled(y_true[:, j])
        if both_classes(y_true[:, j]):
            truth, p = y_true[known, j], prob[known, j]
            precision, recall, thr = precision_recall_curve(truth, p)
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            inside = (thr >= limits[0]) & (thr <= limits[1])
            candidates = np.concatenate([thr[inside], limits])  # the range's ends count too
            scores = np.concatenate([f1[inside], [f1_score(truth, p >= t, zero_division=0) for t in limits]])
            out[j] = float(candidates[np.argmax(scores)])
    return out


def choose_thresholds(y_true: np.ndarray, prob: np.ndarray, rule: str) -> np.ndarray:
    """Thresholds chosen on validation data by `rule` ('youden' or 'f1'), inside THRESHOLD_RANGE."""
    return (f1_thresholds if rule == "f1" else youden_thresholds)(y_true, prob, THRESHOLD_RANGE)


def _sens_spec(y_true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    tp = np.sum((pred == 1) & (y_true == 1))
    tn = np.sum((pred == 0) & (y_true == 0))
    pos, neg = np.sum(y_true == 1), np.sum(y_true == 0)
    return (tp / pos if pos else np.nan), (tn / neg if neg else np.nan)


def multilabel_metrics(y_true: np.ndarray, prob: np.ndarray, classes,
                       thresholds: np.ndarray | None = None, rule: str = "youden", untrained=()) -> dict:
    """mean_auroc (+ per label, and `mean_auroc_labels`: over how many), and at `thresholds` (chosen on these data
    by `rule` when None — pass the validation thresholds when scoring test): macro F1, accuracy, mean sensitivity
    and specificity, over the labels with a threshold and both classes here. `untrained` labels (no positive in
    train) get no threshold and count in no mean."""
    per_label, skipped = auroc_per_label(y_true, prob, classes, untrained)
    thresholds = (choose_thresholds(y_true, prob, rule) if thresholds is None
                  else np.asarray(thresholds, dtype=np.float64).copy())
    thresholds[[j for j, c in enumerate(classes) if c in untrained]] = np.nan
    pred = decisions("multilabel", prob, thresholds)
    present = [j for j, c in enumerate(classes) if c not in skipped and np.isfinite(thresholds[j])]
    sens, spec = zip(*[_sens_spec(y_true[:, j], pred[:, j]) for j in present]) if present else ((), ())
    known = [labelled(y_true[:, j]) for j in present]  # each label over its labelled images
    f1 = [f1_score(y_true[k, j], pred[k, j].astype(int), zero_division=0) for j, k in zip(present, known)]
    hits = sum(int((pred[k, j] == y_true[k, j]).sum()) for j, k in zip(present, known))
    out = {
        "mean_auroc": float(np.mean(list(per_label.values()))) if per_label else float("nan"),
        "mean_auroc_labels": len(per_label),
        "macro_f1": float(np.mean(f1)) if present else float("nan"),
        "accuracy": hits / sum(int(k.sum()) for k in known) if present else float("nan"),
        "mean_sensitivity": float(np.nanmean(sens)) if present else float("nan"),
        "mean_specificity": float(np.nanmean(spec)) if present else float("nan"),
    }
    out.update({f"auroc/{name}": v for name, v in per_label.items()})
    return {"metrics": out, "skipped_labels": skipped, "thresholds": thresholds_list(thresholds)}


def thresholds_list(thresholds) -> list:
    """Thresholds as JSON has them: None where a label has none."""
    return [float(t) if np.isfinite(t) else None for t in np.asarray(thresholds, dtype=np.float64)]


def multiclass_metrics(y_true: np.ndarray, prob: np.ndarray, classes, threshold: float | None = None,
                       rule: str = "youden") -> dict:
    """Single-label tasks: accuracy, balanced accuracy, macro/micro F1, per-class sensitivity/specificity,
    the confusion matrix (rows true, columns predicted) and one-vs-rest AUROC.

    Two classes are a binary task: the positive class is the second, predicted when its probability reaches
    `threshold` (chosen on these data by `rule` when None — pass validation's when scoring test); its AUROC,
    sensitivity and specificity are the task's (the negative class's are their mirror images). More than two:
    argmax. S2 reported recall as F1; S4 thresholded logits at 0.5."""
    k = len(classes)
    if k == 2:
        if threshold is None:
            threshold = float(choose_thresholds((y_true == 1)[:, None].astype(int), prob[:, 1:], rule)[0])
        pred = (prob[:, 1] >= threshold).astype(int)
    else:
        pred = prob.argmax(1)
    onehot = np.eye(k)[y_true]
    columns = scored_labels("multiclass", classes)  # binary: the positive class alone
    scored = [classes[j] for j in columns]
    per_class, skipped = auroc_per_label(onehot[:, columns], prob[:, columns], scored)
    sens, spec = zip(*[_sens_spec(onehot[:, j], (pred == j).astype(int)) for j in range(k)])
    if k == 2:
        sens, spec = sens[1:], spec[1:]
    out = {
        "mean_auroc": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "mean_auroc_labels": len(per_class),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": (float(balanced_accuracy_score(y_true, pred)) if len(np.unique(y_true)) > 1
                              else float("nan")),
        "macro_f1": float(f1_score(y_true, pred, average="macro", labels=range(k), zero_division=0)),
        "micro_f1": float(f1_score(y_true, pred, average="micro", labels=range(k), zero_division=0)),
        "mean_sensitivity": float(np.nanmean(sens)), "mean_specificity": float(np.nanmean(spec)),
    }
    if k == 2:
        out["f1"] = float(f1_score(y_true, pred, pos_label=1, zero_division=0))
    out.update({f"auroc/{name}": v for name, v in per_class.items()})
    out.update({f"sensitivity/{name}": float(v) for name, v in zip(scored, sens)})
    out.update({f"specificity/{name}": float(v) for name, v in zip(scored, spec)})
    return {"metrics": out, "skipped_labels": skipped, "thresholds": None if k != 2 else [threshold],
            "confusion_matrix": confusion_matrix(y_true, pred, labels=range(k)).tolist()}


def classification_metrics(task: str, y_true: np.ndarray, prob: np.ndarray, classes,
                           thresholds: np.ndarray | None = None, rule: str = "youden", untrained=()) -> dict:
    """Metrics of probabilities (never logits); `thresholds` from validation when scoring test; `untrained`: the
    multi-label labels no training image has (never thresholded, decided or averaged)."""
    if task == "multilabel":
        return multilabel_metrics(y_true, prob, classes, thresholds, rule, untrained)
    return multiclass_metrics(y_true, prob, classes, None if thresholds is None else float(thresholds[0]), rule)


def scored_labels(task: str, classes, untrained=()) -> list[int]:
    """The columns a mean over labels averages: every trained label (multi-label), the positive class (binary),
    every class (more than two)."""
    if task == "multiclass" and len(classes) == 2:
        return [1]
    return [j for j, c in enumerate(classes) if c not in untrained]


def weighted_auroc(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each label's Mann–Whitney AUROC with per-image weights, for many weightings at once.

    `y_true` (n, C) of 0/1 (one-hot for single-label tasks), `prob` (n, C), `weights` (B, n) — e.g. bootstrap
    resample counts — → (B, C) AUROC; NaN where a label lacks a class under a weighting. Ties count one half, as
    in roc_auc_score. One sort per label serves every weighting (float32 sums: exact for resample counts)."""
    weights = np.atleast_2d(weights).astype(np.float32)
    out = np.full((len(weights), y_true.shape[1]), np.nan)
    for c in range(y_true.shape[1]):
        known = np.flatnonzero(labelled(y_true[:, c]))  # a masked entry is in no resample's count
        pos = y_true[known, c] > 0
        if pos.all() or not pos.any():
            continue
        order = known[np.argsort(prob[known, c], kind="stable")]
        scores, pos = prob[order, c], y_true[order, c] > 0
        w = weights[:, order]
        w_neg = w * ~pos
        new_group = np.r_[True, scores[1:] != scores[:-1]]
        if new_group.all():  # no ties: each image its own group
            below = np.cumsum(w_neg, axis=1, dtype=np.float64) - w_neg
            wins = (w[:, pos] * (below[:, pos] + 0.5 * w_neg[:, pos])).sum(1)
        else:
            starts, group = np.flatnonzero(new_group), np.cumsum(new_group) - 1
            neg_in_group = np.add.reduceat(w_neg, starts, axis=1, dtype=np.float64)
            neg_below = np.cumsum(neg_in_group, axis=1) - neg_in_group
            wins = (w[:, pos] * (neg_below + 0.5 * neg_in_group)[:, group[pos]]).sum(1)
        denom = w[:, pos].sum(1, dtype=np.float64) * w_neg.sum(1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = np.where(denom > 0, wins / denom, np.nan)
    return out


def weighted_mean_auroc(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) mean over labels of `weighted_auroc`; a label without both classes under a weighting is left out of
    that mean. 1,000 patient resamples of a 25k-image, 14-label split take seconds (scripts/bench_bootstrap.py)."""
    return nanmean_rows(weighted_auroc(y_true, prob, weights))


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a weighting with no label defined: NaN
        return np.nanmean(values, axis=1)


def decisions(task: str, prob: np.ndarray, thresholds=None) -> np.ndarray:
    """(n, C) 0/1 decisions: multi-label, each label at its threshold (NaN — no decision — where a label has none:
    no positive in train or in validation); binary, the second class at its threshold (one-hot); more classes, the
    argmax (one-hot). `thresholds` from validation (None where none were chosen: 0.5)."""
    k = prob.shape[1]
    if task == "multilabel":
        if thresholds is None:
            return (prob >= 0.5).astype(np.float64)
        cut = np.array([np.nan if t is None else t for t in np.ravel(thresholds)], dtype=np.float64)
        return np.where(np.isfinite(cut), (prob >= cut).astype(np.float64), np.nan)
    if k == 2:
        positive = prob[:, 1] >= (0.5 if thresholds is None else float(np.ravel(thresholds)[0]))
        return np.eye(2, dtype=np.int8)[positive.astype(int)]
    return np.eye(k, dtype=np.int8)[prob.argmax(1)]


VOTE_TIE = 1e-9  # a share this close to one half is a tie (weights 1/K summed in floating point)


def vote(task: str, members: np.ndarray, thresholds, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shares, decisions) of an ensemble whose members decide at thresholds of their own — fold models, each at
    the threshold chosen on its own validation fold, applied to the probabilities it was chosen for rather than to
    their average, which is narrower (an average of K models is less spread out than any one of them, so a
    single model's threshold sits at another quantile of it). A label (multi-label) or the positive class (binary)
    is decided when members holding more than half the weight decide it; at exactly half (common with an even
    number of fold models) the members' weighted mean margin — each one's probability minus its own threshold —
    breaks the tie: positive when it is above 0, so the side that is surer wins, never the order of the members.

    `members` (M, n, C) probabilities; `thresholds` (M, C) multi-label or (M, 1) binary, None where a member has
    none (that label is then undecided: NaN); `weights` (M,). `shares` (n, C) multi-label or (n, 1) binary: the
    weight deciding positive; `decisions` (n, C) as `decisions` gives them (one-hot for binary; a binary member
    without a threshold decides at 0.5). More than two
    classes have no thresholds: the argmax of the weighted mean, and no shares."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    k = members.shape[2]
    if task != "multilabel" and k > 2:
        return np.zeros((members.shape[1], 0)), decisions(task, np.tensordot(weights, members, axes=1))
    cut = np.array([[np.nan if t is None else t for t in np.ravel(row)] for row in thresholds], dtype=np.float64)
    if task != "multilabel":
        cut = np.where(np.isfinite(cut), cut, 0.5)  # binary without a chosen threshold: 0.5, as `decisions`
    columns = members if task == "multilabel" else members[:, :, 1:]
    shares = np.tensordot(weights, (columns >= cut[:, None, :]).astype(np.float64), axes=1)
    shares = np.where(np.isfinite(cut).all(0), shares, np.nan)
    margins = np.tensordot(weights, columns - cut[:, None, :], axes=1)  # the weighted mean margin
    tied = np.abs(shares - 0.5) <= VOTE_TIE
    positive = (shares > 0.5 + VOTE_TIE) | (tied & (margins > 0))
    if task == "multilabel":
        return shares, np.where(np.isfinite(shares), positive.astype(np.float64), np.nan)
    return shares, np.eye(2, dtype=np.int8)[positive[:, 0].astype(int)]


def weighted_decision_metrics(y_true: np.ndarray, decided: np.ndarray, weights: np.ndarray,
                              single_label: bool) -> dict[str, np.ndarray]:
    """Sensitivity and specificity of each label (B, C), and for single-label tasks accuracy and balanced accuracy
    (B,), of fixed 0/1 `decided` against 0/1 `y_true` (n, C), under each row of `weights` (B, n): bootstrap
    resample counts, or ones. NaN where a weighting has no positives (or negatives) of a label."""
    w = np.atleast_2d(weights).astype(np.float64)
    y, d = y_true.astype(np.float64), decided.astype(np.float64)
    positive, negative = (y == 1).astype(np.float64), (y == 0).astype(np.float64)  # masked entries: neither
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"sensitivity": (w @ (positive * d)) / (w @ positive),
               "specificity": (w @ (negative * (1 - d))) / (w @ negative)}
        if single_label:
            out["accuracy"] = (w @ (y * d).sum(1)) / w.sum(1)
            out["balanced_accuracy"] = nanmean_rows(out["sensitivity"])
    return out


def resampling_units(patient_ids, images) -> np.ndarray:
    """What a bootstrap resamples, one rule for trials, ensembles and repeats: the patient where the data name one
    (all their images move together), else the image itself. Folder and MedMNIST data have no patient ids: taken
    as one unit, every resample was the whole set and every interval zero-wide."""
    return np.array([f"image:{image}" if patient is None or patient != patient or str(patient) == ""
                     else f"patient:{patient}" for patient, image in zip(patient_ids, images)])


def patient_bootstrap(groups: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) image weights of a bootstrap that resamples **patients** with replacement (each drawn
    patient brings all their images), so images of one patient never count as independent evidence."""
    _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, index.max() + 1, size=(resamples, index.max() + 1))
    counts = np.stack([np.bincount(d, minlength=index.max() + 1) for d in draws])
    return counts[:, index]


def auroc_intervals(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray, classes, resamples: int = 1000,
                    seed: int = 0, level: float = 0.95,
                    weights: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """95 % patient-level bootstrap intervals of the mean AUROC and of each label's AUROC (`auroc/<label>`), all
    from the same resamples. `y_true` (n, C) 0/1 (one-hot for single-label tasks); a label without both classes
    in the split has no interval. `weights`: the resamples `patient_bootstrap(groups, resamples, seed)` gives,
    where the caller has drawn them already (its other intervals then share them)."""
    weights = patient_bootstrap(groups, resamples, seed) if weights is None else weights
    per_label = weighted_auroc(y_true, prob, weights)
    out = {"mean_auroc": interval(nanmean_rows(per_label), level)}
    for c, name in enumerate(classes):
        if both_classes(y_true[:, c]):
            out[f"auroc/{name}"] = interval(per_label[:, c], level)
    return out


def ci_text(value, low=None, high=None) -> str:
    """`0.7390 [0.5251, 0.9167]`: a value and its interval as every printout and page shows them; the value alone
    where there is no interval, nothing where there is no value. `value` may be a {value, ci_low, ci_high} entry
    or a [value, low, high] list."""
    if isinstance(value, dict):
        value, low, high = value["value"], value["ci_low"], value["ci_high"]
    elif isinstance(value, (list, tuple)):
        value, low, high = value
    if value is None or not np.isfinite(value):
        return ""
    return f"{value:.4f} [{low:.4f}, {high:.4f}]" if low is not None and np.isfinite(low) else f"{value:.4f}"


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaN resamples left out)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    return float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))


CORRECTED_T = "corrected resampled t (Nadeau & Bengio 2003)"  # what a cross-validation's interval is, in words


def corrected_t_interval(values: np.ndarray, test_train_ratio: float, level: float = 0.95) -> tuple[float, float]:
    """The interval of a mean over K resamples whose training sets overlap — K-fold cross-validation's folds — by
    Nadeau & Bengio's corrected resampled t (2003, "Inference for the generalization error"): the variance of the
    mean is (1/K + n_test/n_train)·s² rather than s²/K, since the folds' estimates are correlated through their
    shared training data (Bengio & Grandvalet 2004: no unbiased estimator of that variance exists; the plain
    t-interval is too narrow). For K folds n_test/n_train is about 1/(K − 1). NaN for fewer than two values."""
    from scipy import stats

    k = len(values)
    if k < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, k - 1) * np.sqrt((1 / k + test_train_ratio) * values.var(ddof=1))
    return float(values.mean() - half), float(values.mean() + half)


def pareto_front(points: np.ndarray, modes: list[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `points` (n, objectives), each column maximised or minimised as
    `modes` says: a row is dominated when another is at least as good on every objective and better on one."""
    signed = np.asarray(points, dtype=np.float64) * np.array([1.0 if m == "min" else -1.0 for m in modes])
    no_worse = (signed[:, None, :] <= signed[None, :, :]).all(-1)  # [i, j]: i at least as good as j everywhere
    better = (signed[:, None, :] < signed[None, :, :]).any(-1)
    return ~(no_worse & better).any(0)


def pareto_ranks(points: np.ndarray, modes: list[str]) -> np.ndarray:
    """Each row's non-dominated front (0: the Pareto front, 1: the front once that one is removed, ...)."""
    points = np.asarray(points, dtype=np.float64)
    ranks, remaining, rank = np.full(len(points), -1), np.arange(len(points)), 0
    while remaining.size:
        kept = pareto_front(points[remaining], modes)
        ranks[remaining[kept]] = rank
        remaining, rank = remaining[~kept], rank + 1
    return ranks


def split_scorer(y: np.ndarray, task: str, metric: str, classes, rule: str, thresholds=None, untrained=()):
    """`score(prob, weights)` of the study's metric (higher is better) on targets `y`; a threshold metric
    (accuracy, F1) at `thresholds` — validation's, when scoring test — or chosen on `y` itself when None. Means
    over labels leave `untrained` ones out (binary: the positive class's AUROC)."""
    name = bare(metric)
    columns = scored_labels(task, classes, untrained)

    def score(prob: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        weights = np.ones((1, len(y))) if weights is None else weights
        if name == "mean_auroc":
            return weighted_mean_auroc(y[:, columns], prob[:, columns], weights)
        out = []
        for w in weights:  # other metrics: one resample at a time
            rows = np.repeat(np.arange(len(y)), w.astype(int))
            if name == "loss":
                p = np.clip(prob[rows], 1e-7, 1 - 1e-7)
                value = -(np.nanmean(y[rows] * np.log(p) + (1 - y[rows]) * np.log(1 - p)) if task == "multilabel"
                          else np.mean(np.log((p * y[rows]).sum(1))))  # nanmean: over labelled entries
                out.append(-value)  # higher is better
            else:
                targets = y[rows] if task == "multilabel" else y[rows].argmax(1)
                out.append(classification_metrics(task, targets, prob[rows], classes, thresholds,
                                                  rule, untrained)["metrics"][name])
        return np.asarray(out, dtype=np.float64)

    return score


def front(complete: list[dict], objectives: list[dict]) -> list[dict]:
    """The Pareto front of the completed trials (`complete`, best first by the metric) on the study's objectives:
    those no other trial matches or beats on every objective at once — one entry each, best metric first."""
    def value(row: dict, name: str):
        return row.get(name) if name == objectives[0]["name"] else row["cost"].get(name)

    scored = [r for r in complete if all(isinstance(value(r, o["name"]), (int, float)) for o in objectives)]
    if not scored:
        return []
    mask = pareto_front([[value(r, o["name"]) for o in objectives] for r in scored], [o["mode"] for o in objectives])
    return [{"trial": r["trial"], "name": r["name"], "trial_id": r["trial_id"], "mlflow_run_id": r["mlflow_run_id"],
             objectives[0]["name"]: r[objectives[0]["name"]], **r["cost"]} for r, kept in zip(scored, mask) if kept]
