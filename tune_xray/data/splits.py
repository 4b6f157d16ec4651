"""Patient-wise and stratified splits, and the patient-disjointness check every index passes."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from ..metrics import both_classes

SPLITS = ("train", "val", "test")
UNLABELLED = "train_unlabelled"  # training images whose labels a label-fraction run hides (SSL still sees them)


class DataError(ValueError):
    """Bad input data: the message names the file, column, label or split and what was expected."""


def patient_holdout(patient_ids: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out `fraction` of patients (all of a patient's images together)."""
    from sklearn.model_selection import GroupShuffleSplit  # here: predict needs DataError, not sklearn

    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(patient_ids)), groups=patient_ids.to_numpy()))
    mask = np.zeros(len(patient_ids), dtype=bool)
    mask[held] = True
    return mask


def _train_val_test(n: int, holdout, val_fraction: float, test_fraction: float) -> np.ndarray:
    """'train'/'val'/'test' for `n` rows: `holdout(rows, fraction)` (a mask over `rows`) takes test from every row,
    then val from the rest at val_fraction / (1 − test_fraction), so both are shares of the whole."""
    split = np.full(n, "train", dtype=object)
    test = holdout(np.arange(n), test_fraction)
    split[test] = "test"
    rest = np.flatnonzero(~test)
    split[rest[holdout(rest, val_fraction / (1 - test_fraction))]] = "val"
    return split


def patient_split(patient_ids: pd.Series, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """S0's random split by patient (70/10/20 with seed 42 there): an array of 'train'/'val'/'test'."""
    return _train_val_test(len(patient_ids), lambda rows, f: patient_holdout(patient_ids.iloc[rows], f, seed),
                           val_fraction, test_fraction)


def patients_by_pattern(texts: list[str], pattern: str) -> tuple[np.ndarray, list[int]]:
    """Each text's patient — the one group of `pattern` searched in it — and the positions where it finds none
    (no match, or an empty group): the caller names them (a patient guessed would be a leak waiting to happen)."""
    compiled = re.compile(pattern)
    found = [compiled.search(text) for text in texts]
    missed = [i for i, m in enumerate(found) if m is None or not m.group(1)]
    return np.array([m.group(1) if m else None for m in found], dtype=object), missed


def patient_stratified_holdout(labels: np.ndarray, patients: np.ndarray, fraction: float, seed: int,
                               origin: str) -> np.ndarray:
    """Boolean mask of about a `fraction` of the patients (all of a patient's images together), stratified by
    class: the first fold of scikit-learn's StratifiedGroupKFold with round(1 / fraction) folds, seeded (0.1 and
    0.2 exactly; 0.15 → 1/7)."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, round(1 / fraction))
    if len(np.unique(patients)) < folds:
        raise DataError(f"{origin}: {len(np.unique(patients))} patients cannot give a {fraction:g} share of them")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels, groups=patients))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int, origin: str) -> np.ndarray:
    """Boolean mask of a held-out `fraction`, stratified by class (data without patient ids)."""
    idx = np.arange(len(labels))
    try:
        from sklearn.model_selection import train_test_split

        _, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:
        raise DataError(f"{origin}: cannot split stratified by class: {err}") from None
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     origin: str) -> np.ndarray:
    """Stratified train/val/test for data without patient ids (e.g. a folder-per-class dataset)."""
    return _train_val_test(len(labels), lambda rows, f: stratified_holdout(labels[rows], f, seed, origin),
                           val_fraction, test_fraction)


def patient_stratified_split(labels: np.ndarray, patients: np.ndarray, val_fraction: float, test_fraction: float,
                             seed: int, origin: str) -> np.ndarray:
    """Train/val/test by patient, stratified by class (folder data whose file names carry the patient)."""
    return _train_val_test(
        len(labels), lambda rows, f: patient_stratified_holdout(labels[rows], patients[rows], f, seed, origin),
        val_fraction, test_fraction)


def kfold_split(frame: pd.DataFrame, classes, task: str, folds: int, fold: int, seed: int, origin: str) -> np.ndarray:
    """Train + val re-split for K-fold cross-validation: fold `fold` of `folds` becomes 'val', the others 'train';
    'test' (and anything else) stays as it was. Folds are patient-grouped (a patient's images in one fold) and
    label-stratified (scikit-learn's StratifiedGroupKFold, seeded), on each image's class, or for multi-label
    data its rarest positive label ('no finding' a stratum of its own)."""
    from sklearn.model_selection import StratifiedGroupKFold

    split = frame["split"].to_numpy(dtype=object).copy()
    pooled = np.flatnonzero(np.isin(split, ("train", "val")))
    labels = frame[list(classes)].to_numpy()[pooled] > 0
    if task == "multiclass":
        strata = labels.argmax(1)
    else:
        rarest = np.argsort(labels.sum(0))  # each image's rarest positive label
        strata = np.where(labels.any(1), rarest[np.argmax(labels[:, rarest], axis=1)], len(classes))
    patients = frame["patient_id"] if "patient_id" in frame else pd.Series(np.nan, index=frame.index)
    groups = patients.iloc[pooled].fillna(pd.Series(frame.index[pooled].astype(str), index=frame.index[pooled]))
    if groups.nunique() < folds:
        raise DataError(f"{origin}: {folds} folds need at least {folds} patients in train + val; there are "
                        f"{groups.nunique()}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only n members"
        held = list(splitter.split(np.zeros(len(pooled)), strata, groups.astype(str).to_numpy()))[fold][1]
    split[pooled] = "train"
    split[pooled[held]] = "val"
    return split


def check_patient_disjoint(frame: pd.DataFrame, origin: str) -> None:
    """A patient in two splits leaks their anatomy across them: an error, never a warning."""
    if "patient_id" not in frame or frame["patient_id"].isna().all():
        return
    owners = frame.dropna(subset=["patient_id"]).groupby("patient_id")["split"].nunique()
    leaked = owners[owners > 1].index.tolist()
    if leaked:
        raise DataError(
            f"{origin}: {len(leaked)} patient(s) appear in more than one split "
            f"(e.g. patient_id {', '.join(map(str, leaked[:5]))}); splits must be patient-disjoint")


def check_splits_nonempty(frame: pd.DataFrame, origin: str) -> None:
    counts = frame["split"].value_counts()
    for name in SPLITS:
        if counts.get(name, 0) == 0:
            raise DataError(f"{origin}: the '{name}' split is empty; every split needs at least one image")


def check_learnable(frame: pd.DataFrame, classes, task: str, origin: str) -> None:
    """A classifier needs something to tell apart, both where it learns (train) and where it is selected (val):
    at least two classes present (single-label), or a label with positive and negative images (multi-label;
    otherwise AUROC is undefined for every label)."""
    for split in ("train", "val"):
        y = frame.loc[frame["split"] == split, list(classes)].to_numpy(dtype=np.float64)
        counts = np.nansum(y, 0)
        if task == "multiclass":
            present = [c for c, n in zip(classes, counts) if n > 0]
            if len(present) < 2:
                raise DataError(f"{origin}: the '{split}' split holds images of {len(present)} class(es) {present}; "
                                "a classifier needs at least two (e.g. one sub-folder per class)")
        elif not any(both_classes(y[:, j]) for j in range(y.shape[1])):
            raise DataError(f"{origin}: no label has both positive and negative images in the '{split}' split "
                            "(among its labelled entries); "
                            "AUROC is undefined for every label and nothing could be learnt or selected")


def labelled_subset(frame: pd.DataFrame, classes, task: str, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the training images that keep their labels at `fraction` (S1's 1 % / 10 % cells).

    Patient-aware (a patient's images are kept or hidden together), seeded, and stratified: every class
    with a positive in `frame` keeps at least one labelled patient (rarest class first); then each class
    (multi-class) or the whole set (multi-label) is filled with randomly drawn patients up to `fraction`
    of its images. S1 drew its subsets without stratification, so rare classes could vanish.
    """
    rng = np.random.default_rng(seed)
    patients = frame["patient_id"].fillna(pd.Series(frame.index.astype(str), index=frame.index)).to_numpy()
    labels = frame[list(classes)].to_numpy() > 0
    ids, inverse = np.unique(patients, return_inverse=True)
    has = np.zeros((len(ids), len(classes)), dtype=bool)  # which classes each patient contributes
    np.logical_or.at(has, inverse, labels)
    images = np.bincount(inverse, minlength=len(ids))
    order = rng.permutation(len(ids))
    chosen = np.zeros(len(ids), dtype=bool)
    for c in np.argsort(has.sum(0)):
        if has[:, c].any() and not (chosen & has[:, c]).any():
            chosen[order[has[order, c]][0]] = True

    def fill(members: np.ndarray, quota: float) -> None:
        for patient in order[members[order]]:
            if images[chosen & members].sum() >= quota:
                return
            chosen[patient] = True

    if task == "multiclass":
        for c in range(len(classes)):
            fill(has[:, c], fraction * labels[:, c].sum())
    else:
        fill(np.ones(len(ids), dtype=bool), fraction * len(frame))
    return chosen[inverse]
