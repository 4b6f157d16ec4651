"""A real search at tiny scale: Ray Tune + Ray Train + Optuna (sqlite) + MLflow (sqlite), 2 CPUs."""

import json
import os
import signal

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from tune_xray.search import main, run_search

SPACE = {
    "metric": "val_mean_auroc",
    "budget": {"trials": 3, "epochs": 2, "grace_period": 1, "reduction_factor": 2},
    "base": {"data": {"synthetic_images": 300, "synthetic_size": 64, "cache_size": 64},
             "augment": {"image_size": 56}, "model": {"backbone": "test_resnet"},
             "supervised": {"batch_size": 32}},
    "params": {"supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]},
               "supervised.scheduler.name": {"choice": ["none", "cosine"]},
               "supervised.scheduler.t_max": {"choice": [2, 4], "when": {"supervised.scheduler.name": "cosine"}}},
    "warm_start": [{"supervised.optimizer.lr": 3.0e-3, "supervised.scheduler.name": "none"}],
}


@pytest.fixture(scope="module")
def ray_session():
    import ray
    yield
    ray.shutdown()


def _args(tmp_path, *extra):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return main.__globals__["argparse"].Namespace(
        study=str(space), data=None, trials=None, smoke=False, storage=str(tmp_path / "store"), local_dir="",
        name="tiny", resume="--resume" in extra, workers_per_trial=1, cpus_per_trial=1.0, gpus_per_trial=0.0,
        address=None, tracking_uri=None, overrides=[], seed=0, max_failures=1, no_asha=False, verbose=False)


def test_search_records_trials_in_optuna_and_mlflow(tmp_path, ray_session):
    summary = run_search(_args(tmp_path))
    exp = tmp_path / "store" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 3 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.COMPLETE in states
    assert study.trials[0].params == {"supervised.optimizer.lr": 3.0e-3, "supervised.scheduler.name": "none"}
    for t in study.trials:  # conditional parameter only with its parent choice
        assert ("supervised.scheduler.t_max" in t.params) == (t.params["supervised.scheduler.name"] == "cosine")

    on_disk = json.loads((exp / "summary.json").read_text())
    assert on_disk["best"]["trial_id"] == summary["best"]["trial_id"] and on_disk["trials"] == 3
    assert on_disk["complete"] + on_disk["pruned"] == 3

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.artifact_location == (exp / "mlartifacts").as_uri()  # beside the store, not in ./mlruns
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tune_xray.role") == "search")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    for child in children:
        assert child.data.params["model.backbone"] == "test_resnet"  # the full resolved config
        assert "best_val_mean_auroc" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "epochs_done")  # every report, one step each
        assert [m.step for m in history] == list(range(1, int(child.data.metrics["training_iteration"]) + 1))
    assert parent.data.tags["best_trial_run_id"] == summary["best_mlflow_run_id"]
    best = client.get_run(summary["best_mlflow_run_id"])
    assert best.data.metrics["best_val_mean_auroc"] == pytest.approx(summary["best"]["best_val_mean_auroc"])
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id)}
    if best.data.metrics.get("trial_finished"):
        assert {"best.pt", "config.yaml", "predictions_val.csv", "predictions_test.csv"} <= artifacts


class InterruptAfterFirstTrial(tune.Callback):
    """SIGINT to the driver once a trial has finished: Tune saves the experiment and returns. Once only:
    Tuner.restore brings the experiment's callbacks back, this one included."""

    def __init__(self, marker):
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_search_resumes_and_keeps_finished_trials(tmp_path, ray_session):
    run_search(_args(tmp_path), extra_callbacks=[InterruptAfterFirstTrial(tmp_path / "interrupted")])
    exp = tmp_path / "store" / "tiny"
    storage = f"sqlite:///{exp / 'optuna.db'}"
    before = {t.number: t for t in optuna.load_study(study_name="tiny", storage=storage).trials if t.state.is_finished()}
    assert 1 <= len(before) < 3
    summary = run_search(_args(tmp_path, "--resume"))
    after = optuna.load_study(study_name="tiny", storage=storage).trials
    assert summary["trials"] == 3 and len([t for t in after if t.state.is_finished()]) == 3
    for number, trial in before.items():
        assert after[number].state == trial.state and after[number].value == trial.value


def test_bad_search_space_errors_before_ray(tmp_path, capsys):
    import ray
    ray.shutdown()
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "params": {"augment.erasing": {"int": [0, 9]}}}))
    assert main([str(space), "--storage", str(tmp_path / "s")]) == 2
    assert "params.augment.erasing: value 9 is not allowed" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_a_trial_runs_as_two_ddp_ranks(tmp_path, ray_session):
    args = _args(tmp_path)
    args.trials, args.workers_per_trial, args.cpus_per_trial, args.no_asha = 1, 2, 2.0, True
    args.overrides = ["supervised.epochs=1", "byol.enabled=true", "byol.epochs=1", "byol.batch_size=32",
                      "byol.hidden_dim=32", "byol.out_dim=16"]
    summary = run_search(args)
    assert summary["complete"] == 1 and summary["error"] == 0


@pytest.mark.parametrize("params, message", [
    ({"model.backbone": {"choice": ["test_resnet", "resnet_18"]}}, "model.backbone 'resnet_18' is not a timm model"),
    ({"model.pretrained_path": {"choice": {"scratch": None, "imagenet": "weights/nope.safetensors"}}},
     "model.pretrained_path weights/nope.safetensors: no such file"),
])
def test_backbones_and_weight_files_are_checked_before_ray(tmp_path, capsys, params, message):
    import ray
    ray.shutdown()
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "params": {**SPACE["params"], **params}}))
    assert main([str(space), "--storage", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err and not ray.is_initialized()


def test_shipped_smoke_searches_pass_the_candidate_check():
    from tune_xray.search import check_candidates
    from tune_xray.space import SEARCH_SPACES, load_study
    for path in sorted(SEARCH_SPACES.glob("*.yaml")):
        check_candidates(load_study(str(path)), {}, smoke=True)  # transfer's ImageNet files: smoke is scratch
