"""Label fractions (S1's 1 % / 10 % cells): stratified, seeded, patient-aware; SSL still sees every image."""

import numpy as np
import pandas as pd

from tune_xray.data.loader import prepare
from tune_xray.data.splits import UNLABELLED, labelled_subset


def _frame(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 4)):  # 1–3 images per patient
            rows.append({"patient_id": p, "a": rng.random() < 0.3, "b": rng.random() < 0.05, "rare": p == 17})
    return pd.DataFrame(rows)


def test_multilabel_fraction_keeps_every_label_and_whole_patients():
    frame = _frame()
    keep = labelled_subset(frame, ["a", "b", "rare"], "multilabel", 0.01, seed=3)
    kept = frame[keep]
    assert kept[["a", "b", "rare"]].any().all()  # even at 1 %, every positive label keeps an example
    assert set(kept.patient_id).isdisjoint(frame[~keep].patient_id)  # a patient is kept or hidden whole
    assert len(kept) <= 0.05 * len(frame)


def test_fraction_is_seeded_and_sized():
    frame = _frame()
    a = labelled_subset(frame, ["a", "b", "rare"], "multilabel", 0.1, seed=0)
    assert np.array_equal(a, labelled_subset(frame, ["a", "b", "rare"], "multilabel", 0.1, seed=0))
    assert not np.array_equal(a, labelled_subset(frame, ["a", "b", "rare"], "multilabel", 0.1, seed=1))
    assert 0.1 * len(frame) <= a.sum() <= 0.1 * len(frame) + 3  # up to one patient's images over


def test_multiclass_fraction_is_stratified_per_class():
    frame = pd.DataFrame({"patient_id": np.arange(1000), "x": [1] * 900 + [0] * 100, "y": [0] * 900 + [1] * 100})
    keep = labelled_subset(frame, ["x", "y"], "multiclass", 0.1, seed=0)
    assert frame[keep][["x", "y"]].sum().tolist() == [90, 10]


def test_prepare_hides_labels_from_supervised_but_not_from_ssl(make_config):
    cfg = make_config(data={"label_fraction": 0.1})
    full = make_config()
    data, all_data = prepare(cfg.data), prepare(full.data)
    train, ssl = data.dataset("train"), data.dataset("train", with_unlabelled=True)
    n_train = len(all_data.dataset("train"))
    assert 0.1 * n_train <= len(train) < 0.2 * n_train  # above 10 %: one patient per label comes first
    assert len(ssl) == len(all_data.dataset("train")) and (data.index.frame.split == UNLABELLED).any()
    assert len(data.dataset("val")) == len(all_data.dataset("val"))  # val and test untouched
