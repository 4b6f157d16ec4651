"""The representation probe during SSL (phases.probe): a weighted kNN on frozen features, scored with the study's
metric on validation; the collapse rules that end a phase at once."""

import numpy as np
import pytest
import torch

from tune_xray.metrics import classification_metrics
from tune_xray.phases import run_phases
from tune_xray.phases.common import Collapsed
from tune_xray.phases.probe import Monitor, knn_scores, probe_rows


def _planted(n: int, seed: int):
    """Multi-label targets and features that carry them (each label a direction, plus noise)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(np.float32)
    features = torch.from_numpy(np.concatenate([y * 3.0, np.zeros((n, 12))], 1) + rng.normal(size=(n, 16)))
    return features.float(), y


def test_the_probe_scores_features_that_separate_the_labels_high_and_shuffled_ones_at_chance():
    train_x, train_y = _planted(400, 0)
    val_x, val_y = _planted(300, 1)
    classes = ["a", "b", "c", "d"]
    good = knn_scores(train_x, train_y, val_x, "multilabel", 4)
    planted = classification_metrics("multilabel", val_y, good, classes)["metrics"]["mean_auroc"]
    shuffled = knn_scores(train_x, train_y[np.random.default_rng(2).permutation(400)], val_x, "multilabel", 4)
    chance = classification_metrics("multilabel", val_y, shuffled, classes)["metrics"]["mean_auroc"]
    assert planted > 0.9 and abs(chance - 0.5) < 0.08
    masked = train_y.copy()
    masked[:200, 0] = np.nan  # a masked neighbour label counts in no vote
    assert np.isfinite(knn_scores(train_x, masked, val_x, "multilabel", 4)).all()
    single = knn_scores(train_x, train_y.argmax(1), val_x, "multiclass", 4)
    assert np.allclose(single.sum(1), 1.0)


def test_probe_rows_are_stratified_fixed_and_at_most_the_budget():
    y = np.zeros((1000, 3), dtype=np.float32)
    y[:10, 2] = 1  # a rare label
    y[10:400, 0] = 1
    rows = probe_rows(y, "multilabel", 100, seed=42)
    assert len(rows) <= 100 and (y[rows, 2] == 1).any() and np.array_equal(rows, probe_rows(y, "multilabel", 100, 42))
    assert len(probe_rows(y, "multilabel", 5000, 42)) == 1000


def test_a_byol_phase_reports_its_probe_on_the_epochs_it_is_due(make_config, tmp_path):
    cfg = make_config(byol={"enabled": True, "epochs": 2}, supervised={"epochs": 1}, ssl={"probe_images": 64})
    seen = []
    run_phases(cfg, tmp_path / "run", report=lambda m, checkpoint_dir=None: seen.append(m))
    byol = [m for m in seen if m["phase"] == "byol"]
    assert all(0 <= m["probe_val_mean_auroc"] <= 1 for m in byol)  # every epoch (probe_every 1)
    every_other = make_config(byol={"enabled": True, "epochs": 3}, supervised={"epochs": 1},
                              ssl={"probe_every": 2})
    seen.clear()
    run_phases(every_other, tmp_path / "run2", report=lambda m, checkpoint_dir=None: seen.append(m))
    assert ["probe_val_mean_auroc" in m for m in seen if m["phase"] == "byol"] == [False, True, True]  # 2 and last


def _monitor(make_config, **ssl):
    cfg = make_config(ssl={"probe_every": 0, **ssl})
    return Monitor(cfg, None, "byol", 10)


def test_collapse_is_a_projection_std_near_zero_or_a_probe_at_chance_several_times(make_config):
    monitor = _monitor(make_config, collapse_std=0.05, collapse_probes=3)
    monitor.check({"epoch": 1, "z_std": 0.9 / 32 ** 0.5}, out_dim=32)  # healthy: ≈ 1/√d
    with pytest.raises(Collapsed, match=r"byol collapsed at epoch 2: z_std·√out_dim 0.0100 below ssl.collapse_std"):
        monitor.check({"epoch": 2, "z_std": 0.01 / 32 ** 0.5}, out_dim=32)
    monitor = _monitor(make_config, collapse_probes=3)
    for epoch, auroc in enumerate((0.51, 0.50, 0.70, 0.49, 0.52), 1):  # at chance twice, recovered, twice again
        monitor.check({"epoch": epoch, "probe_val_mean_auroc": auroc})
    with pytest.raises(Collapsed, match="the probe at chance 3 times in a row"):
        monitor.check({"epoch": 6, "probe_val_mean_auroc": 0.505})
    resumed = Monitor(make_config(ssl={"probe_every": 0}), None, "byol", 10,
                      [{"probe_val_mean_auroc": a} for a in (0.7, 0.5, 0.5)])
    with pytest.raises(Collapsed):  # a resume counts the probes at chance its history ends with
        resumed.check({"epoch": 4, "probe_val_mean_auroc": 0.5})
