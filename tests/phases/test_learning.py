"""End-to-end learning checks on the synthetic data (CPU, tiny timm models, seconds)."""

import json

import numpy as np
import pytest

from tune_xray.phases import run_phases
from tune_xray.train import main as train_main


def test_supervised_learns_the_synthetic_findings(make_config, tmp_path):
    # seeds 0–3 gave val 0.73–0.76, test 0.69–0.75 mean AUROC (8 s each); chance is 0.5
    cfg = make_config(data={"synthetic_images": 1500, "val_fraction": 0.25},
                      supervised={"epochs": 6, "early_stopping_patience": None, "optimizer": {"lr": 3e-3},
                                  "record_test": True})
    summary = run_phases(cfg, tmp_path / "run")
    assert summary["val"]["mean_auroc"] > 0.65 and summary["test"]["mean_auroc"] > 0.65
    assert 1 <= summary["supervised"]["best_epoch"] <= 6
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "summary.json", "best.pt", "predictions_val.csv", "predictions_test.csv"} <= files


def test_byol_then_fine_tune_reports_val_auroc(make_config, tmp_path):
    cfg = make_config(byol={"enabled": True, "epochs": 2}, supervised={"epochs": 1})
    seen = []
    summary = run_phases(cfg, tmp_path / "run", report=lambda m, checkpoint_dir=None: seen.append(m))
    byol = [m for m in seen if m["phase"] == "byol"]
    assert len(byol) == 2 and all(m["byol_loss"] == m["byol_loss"] for m in byol)  # finite
    assert summary["byol"]["final_tau"] == 1.0 and summary["byol"]["steps"] == summary["byol"]["total_steps"]
    assert 0 < byol[-1]["z_std"] < 1
    assert [m for m in seen if m["phase"] == "supervised"][-1]["val_mean_auroc"] > 0


def test_train_cli_writes_a_run_dir(make_config, tmp_path, capsys):
    cfg = make_config(supervised={"epochs": 1})
    cfg_path = tmp_path / "c.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert train_main(["--config", str(cfg_path), "--set", "seed=1", "--run-dir", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "phase=supervised  epoch=1" in out and "selected epoch 1 of 1 (on validation)" in out
    assert "test: predictions stored, not scored" in out  # sealed unless asked for
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["test"] == {} and (tmp_path / "cli" / "predictions_test.csv").is_file()
    assert train_main(["--config", str(cfg_path), "--set", "supervised.record_test=true", "--run-dir",
                       str(tmp_path / "recorded")]) == 0
    summary = json.loads((tmp_path / "recorded" / "summary.json").read_text())
    assert set(summary["test"]) >= {"mean_auroc", "macro_f1", "mean_sensitivity", "mean_specificity"}
    assert train_main(["--set", "supervised.epoch=3"]) == 2
    assert "--set supervised.epoch: unknown key; did you mean supervised.epochs?" in capsys.readouterr().err


def test_bad_input_stops_before_compute_and_writes_nothing(make_config, tmp_path):
    from tune_xray.config import ConfigError
    from tune_xray.data.splits import DataError

    with pytest.raises(DataError, match="Data_Entry_2017.csv: not found"):
        run_phases(make_config(data={"source": f"nih:{tmp_path / 'nowhere'}"}), tmp_path / "a")
    with pytest.raises(ConfigError, match="supervised.loss=ce does not fit this multilabel data"):
        run_phases(make_config(byol={"enabled": True}, supervised={"loss": "ce"}), tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown timm model 'resnet19'"):
        run_phases(make_config(model={"backbone": "resnet19"}), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_best_checkpoint_is_the_selected_epoch(make_config, tmp_path):
    import torch

    from tune_xray.data.loader import make_loader, prepare
    from tune_xray.metrics import classification_metrics
    from tune_xray.models import create_backbone
    from tune_xray.models.heads import Classifier
    from tune_xray.phases.common import Precision, build_views
    from tune_xray.phases.supervised import predict

    cfg = make_config(supervised={"epochs": 3, "early_stopping_patience": None})
    summary = run_phases(cfg, tmp_path / "r")
    sup = summary["supervised"]
    selected = sup["history"][sup["best_epoch"] - 1]
    assert selected["val_mean_auroc"] == max(h["val_mean_auroc"] for h in sup["history"])
    # reload best.pt into a fresh model: it scores exactly the selected epoch's val AUROC
    data = prepare(cfg.data)
    backbone, width = create_backbone(cfg.model.backbone)
    model = Classifier(backbone, width, data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "r" / "best.pt")["model"])
    _, views = build_views(cfg, data, torch.device("cpu"))
    logits, targets = predict(model, make_loader(data.dataset("val"), 32, False), views,
                              Precision(cfg, torch.device("cpu")), multilabel=True)
    rescored = classification_metrics("multilabel", targets.numpy(), torch.sigmoid(logits).numpy(),
                                      data.index.classes)["metrics"]["mean_auroc"]
    assert rescored == pytest.approx(selected["val_mean_auroc"], abs=1e-6) == summary["val"]["mean_auroc"]


def test_checkpoints_resume_where_they_left_off(make_config, tmp_path):
    from tune_xray.phases.common import load_state

    cfg = make_config(byol={"enabled": True, "epochs": 2}, supervised={"epochs": 3, "early_stopping_patience": None})
    seen = []
    run_phases(cfg, tmp_path / "full", report=lambda m, c=None: seen.append((m, c)), checkpoints=True)
    assert all(c is not None for _, c in seen) and len(seen) == 5
    byol_state = load_state(seen[0][1])
    assert byol_state["phase"] == "byol" and byol_state["epoch"] == 1
    resumed = []
    summary = run_phases(cfg, tmp_path / "from_byol", report=lambda m, c=None: resumed.append(m), resume=byol_state)
    assert [(m["phase"], m["epoch"]) for m in resumed] == [("byol", 2), ("supervised", 1), ("supervised", 2),
                                                            ("supervised", 3)]
    assert summary["byol"]["final_tau"] == 1.0  # the tau schedule continued, not restarted
    sup_state = load_state(seen[3][1])
    assert (sup_state["phase"], sup_state["epoch"]) == ("supervised", 2)
    resumed.clear()
    summary = run_phases(cfg, tmp_path / "from_sup", report=lambda m, c=None: resumed.append(m), resume=sup_state)
    assert [(m["phase"], m["epoch"]) for m in resumed] == [("supervised", 3)]
    assert len(summary["supervised"]["history"]) == 3 and summary["byol"]["steps"] == 2 * byol_state["step"]


def _pattern_folders(root, per_class=60, size=64):
    """Three classes a small CNN can tell apart: a bright disc, horizontal stripes, speckle — with noise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for name in ("disc", "stripes", "speckle"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.normal(90, 25, (size, size))
            if name == "disc":
                cy, cx = rng.integers(20, 44, 2)
                img += 120 * ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(80, 200))
            elif name == "stripes":
                img += 60 * (((yy + rng.integers(0, 8)) // 4) % 2)
            else:
                img += 120 * (rng.random((size, size)) < 0.1)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")


def test_supervised_learns_a_multiclass_folder_dataset(make_config, tmp_path):
    _pattern_folders(tmp_path / "data")
    cfg = make_config(data={"source": f"folder:{tmp_path / 'data'}", "val_fraction": 0.2, "test_fraction": 0.2},
                      supervised={"epochs": 5, "early_stopping_patience": None, "optimizer": {"lr": 3e-3},
                                  "selection_metric": "val_accuracy", "record_test": True})
    summary = run_phases(cfg, tmp_path / "run")
    assert summary["task"] == "multiclass" and summary["classes"] == ["disc", "speckle", "stripes"]
    assert summary["val"]["accuracy"] > 0.6 and summary["test"]["accuracy"] > 0.6  # chance is 1/3
    assert np.array(summary["supervised"]["test_confusion_matrix"]).sum() == summary["split_sizes"]["test"]


def test_a_folder_dataset_gets_intervals_that_are_not_zero_wide(make_config, tmp_path):
    """No patient ids in a folder dataset: the intervals resample images, never one unit of everything (an
    imperfect model: one short epoch)."""
    _pattern_folders(tmp_path / "data")
    cfg = make_config(data={"source": f"folder:{tmp_path / 'data'}", "val_fraction": 0.2, "test_fraction": 0.2},
                      supervised={"epochs": 1, "optimizer": {"lr": 1e-4}, "record_test": True})
    summary = run_phases(cfg, tmp_path / "run")
    val, test = summary["val"], summary["test"]
    assert val["mean_auroc_selection_ci_low"] < val["mean_auroc"] < val["mean_auroc_selection_ci_high"]
    assert test["mean_auroc_ci_low"] < test["mean_auroc"] < test["mean_auroc_ci_high"]


def test_a_diverging_run_stops_at_once_with_one_line(make_config, tmp_path, capsys):
    from tune_xray.phases.common import Diverged

    cfg = make_config(supervised={"epochs": 3, "optimizer": {"name": "sgd", "lr": 1e6}})
    seen = []
    with pytest.raises(Diverged, match="supervised diverged at epoch 1: non-finite training loss"):
        run_phases(cfg, tmp_path / "run", report=lambda m, checkpoint_dir=None: seen.append(m))
    assert seen == []  # no epoch was reported as if it had trained
    assert train_main(["--set", "supervised.optimizer.name=sgd", "--set", "supervised.optimizer.lr=1e6",
                       "--set", "augment.image_size=56", "--set", "data.cache_size=64",
                       "--set", "data.synthetic_images=300", "--set", "data.synthetic_size=64",
                       "--set", "model.backbone=test_resnet", "--run-dir", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err  # (and the cache's progress bar)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("diverged: supervised diverged at epoch 1")


def test_a_rank_shard_smaller_than_the_batch_is_an_error(make_config, tmp_path):
    from tune_xray.config import ConfigError
    from tune_xray.data.loader import make_loader, prepare

    data = prepare(make_config().data)
    train = data.dataset("train")
    with pytest.raises(ConfigError, match=r"supervised.batch_size=200 is larger than each of the 2 ranks'"):
        make_loader(train, 200, shuffle=True, drop_last=True, rank=1, world_size=2, key="supervised.batch_size")
    assert len(make_loader(train, 32, shuffle=True, drop_last=True, rank=1, world_size=2)) > 0
