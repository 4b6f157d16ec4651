"""What a reader sees: warnings the report puts first, MLflow's record table, the predicted label of a single-label
model, figures with alt text and short tick labels."""

import numpy as np
import pytest

from tune_xray.registry import ensemble_metrics, model_name
from tune_xray.report import short_names, warnings_of
from tune_xray.tracking import RUN_STATUS, record_table


def _entry(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


def test_the_report_warns_first_of_what_a_reader_must_not_miss():
    summary = {"metric": "best_val_mean_auroc", "mode": "max", "best": {"trial": "t005"},
               "rows": [{"trial": "t001", "status": "complete", "best_val_mean_auroc": 0.41},
                        {"trial": "t005", "status": "complete", "best_val_mean_auroc": 0.74}],
               "ensemble": {"members": [{"trial": "t005"}, {"trial": "t001"}],
                            "val": {"ensemble_minus_best_single": _entry(0.01, -0.1, 0.1)},
                            "test": {"ensemble_minus_best_single": _entry(-0.02, -0.1, 0.05),
                                     "ensemble": _entry(0.53, 0.43, 0.62)}},
               "repeats": {"rows": [{"name": "t000 mambavision_t2", "mean": 0.6, "ci_low": -0.444, "ci_high": 1.732,
                                     "seeds": 2}]}}
    said = " | ".join(warnings_of({"summary": summary, "dataset": {"absent": {"val": ["Hernia"]}}}))
    assert "of 2 members is not better than its best member on test" in said and "member on validation" not in said
    assert "t000 ranks first" in said and "t005" in said  # repeats disagree with the single-run winner
    assert "1 completed trial scores at or below chance" in said and "t001" in said
    assert "[-0.444, 1.732], wider than mean_auroc's range" in said
    assert "1 label has no positive in validation (Hernia)" in said
    alone = {**summary, "ensemble": {**summary["ensemble"], "members": [{"trial": "t005"}]}}
    assert "not better than its best" not in " | ".join(warnings_of({"summary": alone}))  # true by construction
    calm = {**summary, "rows": summary["rows"][1:], "ensemble": {}, "repeats": None}
    assert warnings_of({"summary": calm}) == []


def test_the_report_warns_of_a_record_at_chance_rare_labels_and_dropped_resamples():
    """Folder data, two classes: the registered model below the majority class on test, 2 negatives in
    validation, a tenth of the validation resamples dropped; an untrained label said once."""
    dataset = {"task": "binary", "classes": ["normal", "pneumonia"], "images": {"train": 60, "val": 9, "test": 22},
               "positives": {"val": {"normal": 2, "pneumonia": 7}, "test": {"normal": 5, "pneumonia": 17}},
               "few": {"val": ["pneumonia"], "test": ["pneumonia"]}, "absent": {}}
    record = {"ensemble": {**_entry(0.71, 0.40, 0.95), "dropped": 0.103}}
    summary = {"metric": "best_val_mean_auroc", "mode": "max", "best": {"trial": "t000"}, "rows": [],
               "ensemble": {"members": [{"trial": "t000"}], "val": record,
                            "test": {"ensemble": _entry(0.48, 0.3, 0.66)},
                            "single_label": {"test": {"ensemble": {"accuracy": _entry(0.35, 0.2, 0.5)}}}}}
    said = " | ".join(warnings_of({"summary": summary, "dataset": dataset}))
    assert "test mean_auroc (0.4800) is at or below chance" in said
    assert "test accuracy (0.3500) is at or below answering 'pneumonia' for every image (0.7727)" in said
    assert "Validation holds fewer than 10 positives or negatives of 1 label (pneumonia 7 positive / 2 negative)" \
        in said
    assert "10.3 % of the bootstrap resamples of the ensemble's val mean_auroc" in said
    untrained = {"classes": ["A", "B", "C"], "untrained": ["B", "C"]}
    assert "2 of 3 labels have no positive in train" in " | ".join(
        warnings_of({"summary": {**summary, "ensemble": {}}, "dataset": untrained}))


def test_mlflow_gets_one_record_table_and_the_ensemble_the_trials_names():
    result = {"selected_val_mean_auroc": 0.7, "selected_val_mean_auroc_selection_ci_low": 0.6,
              "selected_val_mean_auroc_selection_ci_high": 0.8, "selected_val_auroc/Mass": 0.9,
              "selected_val_auroc/Mass_selection_ci_low": 0.8, "selected_val_auroc/Mass_selection_ci_high": 1.0,
              "selected_epoch": 3, "val_loss": 0.2}
    table = record_table(result).set_index("metric")
    assert table.loc["selected_val_auroc/Mass"].tolist() == [0.9, 0.8, 1.0]
    assert table.loc["selected_epoch"]["ci_low"] is None or np.isnan(table.loc["selected_epoch"]["ci_low"])
    assert "val_loss" not in table.index
    ensemble = {"metric": "val_mean_auroc", "val": {"ensemble": _entry(0.8, 0.7, 0.9)},
                "single_label": {"val": {"ensemble": {"accuracy": _entry(0.6, 0.5, 0.7)}}}}
    assert ensemble_metrics(ensemble) == {
        "selected_val_mean_auroc": 0.8, "selected_val_mean_auroc_selection_ci_low": 0.7,
        "selected_val_mean_auroc_selection_ci_high": 0.9, "selected_val_accuracy": 0.6,
        "selected_val_accuracy_selection_ci_low": 0.5, "selected_val_accuracy_selection_ci_high": 0.7}
    assert RUN_STATUS["pruned"] == "FINISHED" and RUN_STATUS["interrupted"] == "KILLED"  # no red ✗ for ASHA
    assert model_name("t005 vmamba_s sgd lr=0.0996") == "t005-vmamba_s-sgd-lr-0-0996"


def test_a_single_label_prediction_names_its_class():
    from tune_xray.serving import EnsemblePredictor

    predictor = object.__new__(EnsemblePredictor)
    predictor.classes, predictor.task, predictor.thresholds = ["0", "1", "2"], "multiclass", None
    frame = predictor.frame(np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]]))
    assert frame["label"].tolist() == ["1", "0"]
    predictor.classes, predictor.thresholds = ["normal", "pneumonia"], [0.3]
    binary = predictor.frame(np.array([[0.65, 0.35], [0.8, 0.2]]))
    assert binary.columns.tolist() == ["p_pneumonia", "threshold_pneumonia", "label"]  # one probability, its cut
    assert binary["label"].tolist() == ["pneumonia", "normal"]
    predictor.classes, predictor.task, predictor.thresholds = ["A", "B"], "multilabel", [0.4, None]
    multi = predictor.frame(np.array([[0.5, 0.9], [0.3, 0.1]]))
    assert multi.columns.tolist() == ["p_A", "threshold_A", "y_A", "p_B", "threshold_B", "y_B"]
    assert multi["y_A"].tolist() == [1, 0] and multi["y_B"].isna().all() and multi["threshold_B"].isna().all()


@pytest.mark.parametrize("keys,expected", [
    (["byol.optimizer.lr", "model.backbone"], ["optimizer.lr", "model.backbone"]),
    (["byol.optimizer.lr", "supervised.optimizer.lr"], ["byol.optimizer.lr", "supervised.optimizer.lr"])])
def test_short_parameter_names_stay_distinct(keys, expected):
    assert list(short_names(keys).values()) == expected


def test_figures_carry_alt_text_and_wrapped_labels():
    from tune_xray.figures import figure, wrap

    assert wrap("swinv2_cr_small_ns_224", 14) == "swinv2_cr_\nsmall_ns_224"
    assert 'alt="ROC curves"' in figure(lambda fig: fig.add_subplot().plot([0, 1]), 3, 2, "ROC curves")


def _trials_dir(tmp_path, classes, task, untrained=(), n=80, seed=0):
    """A search directory of two completed trials' stored predictions (a binary or a multi-label task)."""
    import json

    import pandas as pd
    import yaml

    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(classes))) < 0.4).astype(int)
    if task == "multiclass":
        y = np.eye(len(classes), dtype=int)[rng.integers(0, len(classes), n)]
    for trained in untrained:  # a label no training image has may still turn up in validation
        y[:, classes.index(trained)] = (rng.random(n) < 0.3).astype(int)
    rows = []
    for i in range(2):
        prob = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1)
        prob = prob / prob.sum(1, keepdims=True) if task == "multiclass" else prob
        directory = tmp_path / f"t00{i}-id{i}"
        directory.mkdir()
        for split in ("val", "test"):
            frame = pd.DataFrame({"path": [f"img{j}.png" for j in range(n)], "patient_id": np.arange(n) // 2})
            frame[[f"y_{c}" for c in classes]] = y
            frame[[f"p_{c}" for c in classes]] = prob
            frame.to_csv(directory / f"predictions_{split}.csv", index=False)
        (directory / "summary.json").write_text(json.dumps({"classes": classes, "task": task,
                                                            "untrained_labels": list(untrained)}))
        (directory / "config.yaml").write_text(yaml.safe_dump(
            {"supervised": {"selection_metric": "val_mean_auroc", "threshold": "youden"}}))
        rows.append({"trial": f"t00{i}", "trial_id": f"id{i}", "status": "complete", "name": f"t00{i}"})
    summary = {"rows": rows, "metric": "best_val_mean_auroc", "mode": "max", "top": rows}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path, summary


def test_a_binary_task_draws_one_roc_and_one_calibration_curve_of_its_positive_class(tmp_path):
    from tune_xray.experiment import Experiment
    from tune_xray.report import model_data

    directory, summary = _trials_dir(tmp_path, ["normal", "infiltration"], "multiclass")
    model = model_data(Experiment.at(directory), summary, summary["top"])
    assert [list(curves) for curves in model["roc"].values()] == [["infiltration"]]
    assert list(model["calibration"]) == ["infiltration"]  # never the pooled, mirrored columns


def test_labels_never_trained_are_left_out_of_the_ensemble_s_thresholds_means_and_model_card(tmp_path):
    from tune_xray.ensemble import run_ensemble
    from tune_xray.experiment import Experiment
    from tune_xray.report import model_data

    directory, summary = _trials_dir(tmp_path, ["A", "B", "C"], "multilabel", untrained=["C"])
    result = run_ensemble(Experiment.at(directory), size=2, read_test=True)
    assert result["thresholds"][2] is None and None not in result["thresholds"][:2]
    assert result["labels_averaged"] == {"val": 2, "test": 2}
    assert set(result["test_per_label"]["ensemble"]) >= {"auroc/A", "auroc/B"}
    assert not any(key.endswith("/C") for key in result["test_per_label"]["ensemble"])
    card = (directory / "ensemble" / "model_card.md").read_text()
    assert "A 0." in card and "C 0." not in card and "mean_auroc: val over 2 of 3 labels" in card
    model = model_data(Experiment.at(directory), summary, summary["top"])
    assert set(model["calibration"]) == {"A", "B"} and all(set(r) == {"A", "B"} for r in model["roc"].values())


def test_cpu_and_gpu_hours_are_given_only_on_the_resources_every_run_held():
    """A resume may change a trial's resources and Tune then shows every trial with the last: the report multiplies
    the trials' hours by resources only where the search's runs all gave the same."""
    from tune_xray.report.study import trial_hours

    one, two = {"cpus_per_trial": 1.0, "gpus_per_trial": 0.5}, {"cpus_per_trial": 2.0, "gpus_per_trial": 0.5}
    assert trial_hours(2.0, one, [one, one]) == "; CPU-hours 2, GPU-hours 1"
    assert trial_hours(2.0, one, []) == "; CPU-hours 2, GPU-hours 1"  # a summary from before each run's were kept
    assert trial_hours(2.0, two, [one, two, two]) == (
        " (CPU- and GPU-hours not given: the search's runs gave each trial 1 CPU + 0.5 GPU, then 2 CPU + 0.5 GPU)")
