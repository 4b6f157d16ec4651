"""The experiment directory as one typed reader: where it lives, its trials, and one error for what cannot be read."""

import json

import pytest

from tests.test_ensemble import _pool_dir
from tune_xray.config import objective
from tune_xray.experiment import Experiment, ExperimentError, trial_name
from tune_xray.record.names import bare


def test_an_experiment_lives_under_its_storage_or_beside_a_remote_one(tmp_path):
    local = Experiment.locate("byol", str(tmp_path / "runs"))
    assert (local.directory, local.path, local.remote) == (tmp_path / "runs/byol", str(tmp_path / "runs/byol"), False)
    remote = Experiment.locate("byol", "s3://bucket/runs/", tmp_path / "here")
    assert (remote.directory, remote.path, remote.remote) == (tmp_path / "here" / "byol", "s3://bucket/runs/byol", True)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "summary.json").write_text(json.dumps({"rows": [], "storage": "s3://bucket/runs/byol"}))
    copied = Experiment.at(tmp_path / "copy")  # a copy of a remote search's local files still finds its storage
    assert (copied.path, copied.name) == ("s3://bucket/runs/copy", "copy")
    assert copied.tracking_uri == f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}"


def test_trials_are_read_by_status_in_one_order_with_their_directories(tmp_path):
    experiment = Experiment.at(_pool_dir(tmp_path))
    summary = experiment.summary()
    summary["rows"] = summary["rows"][::-1]  # as a resume may leave them
    summary["repeats"] = {"trials": [{"trial": "t000/seed1000", "trial_id": "r0", "status": "complete",
                                      "dir": str(tmp_path / "t000-id0")}]}
    done = experiment.completed(summary)
    assert [row["trial"] for row in done] == ["t000", "t000/seed1000", "t001", "t002", "t003"]  # the pruned is not
    assert experiment.trial_dir(summary["rows"][-1]) == tmp_path / "t000-id0"


def test_names_live_in_one_place():
    class Trial:
        config, trial_id = {"optuna_trial": 7}, "ab12"

    assert trial_name(Trial()) == "t007-ab12"
    assert objective("val_mean_auroc") == "best_val_mean_auroc"
    assert bare("best_val_mean_auroc") == bare("val_mean_auroc") == "mean_auroc"


def test_what_cannot_be_read_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(ExperimentError, match="no such experiment directory"):
        Experiment.at(tmp_path / "missing")
    with pytest.raises(ExperimentError, match="no summary.json"):
        Experiment.at(tmp_path).summary()
    (tmp_path / "summary.json").write_text('{"status": "complete"}')
    with pytest.raises(ExperimentError, match="summary.json: not a search summary"):
        Experiment.at(tmp_path).summary()
    (tmp_path / "search.json").write_text("{")
    with pytest.raises(ExperimentError, match="search.json: not a search's invocation"):
        Experiment.at(tmp_path).invocation()
