"""tracking.py's room on its own: the search's parent run and its trial runs in a real MLflow store (sqlite, no Ray
started), and how a trial's reports become MLflow metrics, from hand-made reports."""

import math

from mlflow.tracking import MlflowClient

from tune_xray import tracking
from tune_xray.record.names import PARENT_ID_FILE, SSL_TIME_ATTR, TIME_ATTR


def _store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _child(client: MlflowClient, parent: str, trial_id: str, **tags) -> str:
    experiment_id = client.get_run(parent).info.experiment_id
    run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, tracking.TRIAL_TAG: trial_id, **tags})
    return run.info.run_id


def test_a_parent_run_is_made_once_reopened_on_resume_and_finished_with_the_best(tmp_path):
    """start_parent makes the search's run (a password in a param is masked), whose id the Experiment keeps; a
    resume reopens that run; finish_parent logs the best trial's record as `search_best_…`, once."""
    from tune_xray.experiment import Experiment

    uri, client = _store(tmp_path), MlflowClient(_store(tmp_path))
    parent = tracking.start_parent(uri, "byol", tmp_path, {"optuna_storage": "postgresql://u:secret@db/optuna"},
                                   {tracking.DESCRIPTION_TAG: "the search"})
    assert not (tmp_path / PARENT_ID_FILE).exists()  # the Experiment writes the directory's files, not tracking
    Experiment(tmp_path, str(tmp_path.parent), tmp_path.name).write_text(PARENT_ID_FILE, parent)
    assert tracking.find_parent(tmp_path) == parent
    assert client.get_run(parent).data.params["optuna_storage"] == "postgresql://u:***@db/optuna"
    best = _child(client, parent, "a1")
    client.update_run(best, name="t000 lr=0.01")
    for _ in range(2):  # a resumed search finishes its parent a second time
        assert tracking.start_parent(uri, "byol", tmp_path, {}, {}) == parent
        assert client.get_run(parent).info.status == "RUNNING"
        tracking.finish_parent(uri, parent, "complete", best, {"best_val_mean_auroc": 0.7})
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS_TAG] == "complete"
    assert len(client.get_metric_history(parent, "search_best_val_mean_auroc")) == 1
    description = run.data.tags[tracking.DESCRIPTION_TAG]
    assert description.startswith("the search") and description.count("**Status: complete**") == 1
    assert "t000 lr=0.01" in description


def test_trial_runs_are_told_apart_by_stage_and_marked_by_status(tmp_path):
    """The search's own trial runs, its repeats' and its folds' are three sets by their tags; a run marked
    `interrupted` is KILLED (what --resume continues) and counts as ended."""
    uri, client = _store(tmp_path), MlflowClient(_store(tmp_path))
    parent = tracking.start_parent(uri, "byol", tmp_path, {}, {})
    own = _child(client, parent, "a1")
    repeat = _child(client, parent, "r1", **{tracking.REPEAT_TAG: "t000"})
    fold = _child(client, parent, "f1", **{tracking.CV_TAG: "t000"})
    assert tracking.child_runs(uri, parent) == {"a1": own}
    assert tracking.child_runs(uri, parent, "repeats") == {"r1": repeat}
    assert tracking.child_runs(uri, parent, "cv") == {"f1": fold}
    assert tracking.ended_trials(uri, parent) == set()
    tracking.mark_runs(uri, {"a1": own}, "interrupted", "the search was interrupted")
    assert client.get_run(own).info.status == "KILLED" and tracking.ended_trials(uri, parent) == {"a1"}
    tracking.delete_runs(uri, [own])
    assert tracking.child_runs(uri, parent) == {}


def test_reports_become_metrics_at_their_phases_epochs():
    """A BYOL report's metrics land at BYOL's epoch under `byol/`, a fine-tune's at its epoch; the final record and
    the measured cost are single values; Tune's bookkeeping and ASHA's clocks are left out; epochs already logged
    are skipped."""
    byol = {"byol/epoch": 3, "byol/byol_loss": 0.5, SSL_TIME_ATTR: 3, "training_iteration": 3, "done": False}
    fine = {"epoch": 2, "val_loss": 0.4, TIME_ATTR: 2, "latency_ms": 1.5, "selected_val_mean_auroc": 0.7,
            "selected_val_mean_auroc_selection_ci_low": 0.6, "selected_val_auroc/Mass": 0.8}
    assert [(m.key, m.step) for m in tracking.epoch_metrics(byol, 0)] == [("byol/byol_loss", 3)]
    assert sorted((m.key, m.step) for m in tracking.epoch_metrics(fine, 0)) == [
        ("latency_ms", 0), ("selected_val_mean_auroc", 0), ("selected_val_mean_auroc_selection_ci_low", 0),
        ("val_loss", 2)]
    assert [m.key for m in tracking.epoch_metrics(fine, 0, {"": {2}, "record": {0}, "cost": {0}})] == []
    assert sorted(tracking.report_epochs(fine)) == [("", 2), ("cost", 0), ("record", 0)]


def test_a_trials_record_is_one_table_with_each_interval_beside_its_value():
    table = tracking.record_table({"selected_val_mean_auroc": 0.7, "selected_val_mean_auroc_selection_ci_low": 0.6,
                                   "selected_val_mean_auroc_selection_ci_high": 0.8, "record_test_mean_auroc": 0.65,
                                   "record_test_mean_auroc_ci_low": 0.55, "val_loss": 0.3})
    rows = table.to_dict("records")
    assert rows[0] == {"metric": "selected_val_mean_auroc", "value": 0.7, "ci_low": 0.6, "ci_high": 0.8}
    assert rows[1]["metric"] == "record_test_mean_auroc" and rows[1]["ci_low"] == 0.55
    assert math.isnan(rows[1]["ci_high"]) and len(rows) == 2  # a bound not given is blank; val_loss is no record
    assert tracking.record_table({"val_loss": 0.3}) is None
