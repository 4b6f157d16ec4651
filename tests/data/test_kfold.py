"""K-fold cross-validation splits (tune_xray.cv): a partition of train + val by patient, stratified, test kept."""

import numpy as np
import pandas as pd
import pytest

from tune_xray.config import ConfigError, DataConfig, build_config
from tune_xray.data.splits import DataError, kfold_split


def _frame(n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        split = rng.choice(["train", "val", "test"], p=[0.7, 0.1, 0.2])
        for _ in range(rng.integers(1, 4)):
            rows.append({"patient_id": p, "split": split, "a": rng.random() < 0.3, "rare": rng.random() < 0.08})
    return pd.DataFrame(rows)


def test_folds_partition_train_and_val_by_patient_and_keep_test():
    frame = _frame()
    splits = [kfold_split(frame, ["a", "rare"], "multilabel", 4, k, seed=1, origin="f") for k in range(4)]
    pooled = frame["split"].isin(["train", "val"]).to_numpy()
    held = np.stack([s == "val" for s in splits])
    assert (held.sum(0)[pooled] == 1).all() and not held[:, ~pooled].any()  # each image validated once
    assert all((s[~pooled] == frame["split"].to_numpy()[~pooled]).all() for s in splits)  # test as it was
    for s in splits:
        assert frame.assign(split=s).groupby("patient_id")["split"].nunique().max() == 1  # patient-grouped
    rare = [frame.loc[s == "val", "rare"].sum() for s in splits]
    assert min(rare) > 0  # stratified: every fold validates some of the rare label's positives
    assert (splits[0] == kfold_split(frame, ["a", "rare"], "multilabel", 4, 0, seed=1, origin="f")).all()


def test_too_few_patients_and_bad_fold_numbers_are_errors():
    with pytest.raises(DataError, match="f: 5 folds need at least 5 patients"):
        kfold_split(_frame(n_patients=4), ["a", "rare"], "multilabel", 5, 0, seed=0, origin="f")
    for folds, fold in ((1, 0), (3, 3), (0, 2)):
        with pytest.raises(ConfigError, match="K-fold needs folds >= 2"):
            build_config({"data": {"folds": folds, "fold": fold}}, "x")
    assert DataConfig(folds=3, fold=2).fold == 2
