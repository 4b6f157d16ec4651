"""What a reader sees: warnings the report puts first, MLflow's record table, the predicted label of a single-label
model, figures with alt text and short tick labels."""

import numpy as np
import pytest

from tune_xray.report import short_names, warnings_of
from tune_xray.tracking import RUN_STATUS, ensemble_metrics, model_name, record_table


def _entry(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


def test_the_report_warns_first_of_what_a_reader_must_not_miss():
    summary = {"metric": "best_val_mean_auroc", "mode": "max", "best": {"trial": "t005"},
               "rows": [{"trial": "t001", "status": "complete", "best_val_mean_auroc": 0.41},
                        {"trial": "t005", "status": "complete", "best_val_mean_auroc": 0.74}],
               "ensemble": {"val": {"ensemble_minus_best_single": _entry(0.01, -0.1, 0.1)},
                            "test": {"ensemble_minus_best_single": _entry(-0.02, -0.1, 0.05),
                                     "ensemble": _entry(0.53, 0.43, 0.62)}},
               "repeats": {"rows": [{"name": "t000 mambavision_t2", "mean": 0.6, "ci_low": -0.444, "ci_high": 1.732,
                                     "seeds": 2}]}}
    said = " | ".join(warnings_of({"summary": summary, "dataset": {"absent": {"val": ["Hernia"]}}}))
    assert "not better than its best member on test" in said and "member on validation" not in said
    assert "t000 ranks first" in said and "t005" in said  # repeats disagree with the single-run winner
    assert "1 completed trial(s) score at or below chance" in said and "t001" in said
    assert "[-0.444, 1.732], wider than mean_auroc's range" in said
    assert "no positive in validation (Hernia)" in said
    calm = {**summary, "rows": summary["rows"][1:], "ensemble": {}, "repeats": None}
    assert warnings_of({"summary": calm}) == []


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
    assert predictor.frame(np.array([[0.65, 0.35], [0.8, 0.2]]))["label"].tolist() == ["pneumonia", "normal"]


@pytest.mark.parametrize("keys,expected", [
    (["byol.optimizer.lr", "model.backbone"], ["optimizer.lr", "model.backbone"]),
    (["byol.optimizer.lr", "supervised.optimizer.lr"], ["byol.optimizer.lr", "supervised.optimizer.lr"])])
def test_short_parameter_names_stay_distinct(keys, expected):
    assert list(short_names(keys).values()) == expected


def test_figures_carry_alt_text_and_wrapped_labels():
    from tune_xray.figures import figure, wrap

    assert wrap("swinv2_cr_small_ns_224", 14) == "swinv2_cr_\nsmall_ns_224"
    assert 'alt="ROC curves"' in figure(lambda fig: fig.add_subplot().plot([0, 1]), 3, 2, "ROC curves")
