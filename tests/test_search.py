"""A real search at tiny scale: Ray Tune + Ray Train + Optuna (sqlite) + MLflow (sqlite), 2 CPUs."""

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from tune_xray.config import ConfigError
from tune_xray.experiment import Experiment
from tune_xray.pipeline import run_search
from tune_xray.request import SearchRequest
from tune_xray.search import main
from tune_xray.summary import exit_code

SPACE = {
    "metric": "val_mean_auroc",
    "budget": {"trials": 3, "epochs": 2, "grace_period": 1, "reduction_factor": 2},
    "base": {"data": {"synthetic_images": 300, "synthetic_size": 64, "cache_size": 64},
             "augment": {"image_size": 56}, "model": {"backbone": "test_resnet"},
             "supervised": {"batch_size": 32}},
    "params": {"supervised.optimizer.name": {"choice": ["adamw", "sgd"]},
               "supervised.optimizer.lr": {"by": "supervised.optimizer.name",
                                           "cases": {"adamw": {"loguniform": [1.0e-3, 1.0e-2]},
                                                     "sgd": {"choice": [0.01, 1.0e6]}}},
               "supervised.scheduler.name": {"choice": ["none", "cosine"]},
               "supervised.scheduler.t_max": {"choice": [2, 4], "when": {"supervised.scheduler.name": "cosine"}}},
    # the first trial is S0-like; the second diverges (SGD at lr 1e6: NaN loss in its first epoch)
    "warm_start": [{"supervised.optimizer.name": "adamw", "supervised.optimizer.lr": 3.0e-3,
                    "supervised.scheduler.name": "none"},
                   {"supervised.optimizer.name": "sgd", "supervised.optimizer.lr": 1.0e6,
                    "supervised.scheduler.name": "none"}],
}


def _scratch() -> set[Path]:
    """The trials' scratch directories in the system temp directory."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("tune_xray-*"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every trial end — complete, pruned by ASHA, diverged, failed, interrupted, killed and resumed — leaves no
    scratch directory in the system temp directory once its search has returned."""
    before = _scratch()
    yield
    assert not _scratch() - before


@pytest.fixture(scope="module")
def ray_session():
    import ray
    yield
    ray.shutdown()


def _args(tmp_path, *extra, **changes):
    """The tiny search's request (a script's way: no command line), with `changes`."""
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return SearchRequest(str(space), storage=str(tmp_path / "store"), local_dir="", name="tiny",
                         resume="--resume" in extra, gpus_per_trial=0.0, **changes)


def _mlflow(exp):
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(exp.name).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tune_xray.role") == "search")
    return client, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                            and "tune_xray.trial_id" in r.data.tags]  # the trials' runs (not the ensemble's)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_session):
    """The tiny search run once for the tests below, each of which asserts one behaviour of what it left: a
    SimpleNamespace of its summary, its experiment directory and its MLflow client, parent run and trial runs.
    Like every search here, it leaves no scratch directory behind (checked here: it runs before the per-test
    check)."""
    from types import SimpleNamespace

    before = _scratch()
    tmp_path = tmp_path_factory.mktemp("tiny")
    summary = run_search(_args(tmp_path))
    assert not _scratch() - before
    exp = tmp_path / "store" / "tiny"
    client, parent, children = _mlflow(exp)
    return SimpleNamespace(summary=summary, exp=exp, client=client, parent=parent, children=children,
                           runs={c.info.run_name.split()[0]: c for c in children})


def test_a_diverged_trial_costs_the_others_nothing_and_the_best_is_a_completed_one(tiny):
    summary = tiny.summary
    assert summary["status"] == "complete" and exit_code(summary) == 0
    by_trial = {r["trial"]: r for r in summary["rows"]}
    assert by_trial["t001"]["status"] == "diverged" and "diverged at epoch 1" in by_trial["t001"]["reason"]
    assert by_trial["t000"]["status"] == "complete"  # the other trials go on
    assert summary["best"]["status"] == "complete" and summary["best"] in summary["top"]
    assert all(r["status"] == "complete" for r in summary["top"])
    assert json.loads((tiny.exp / "summary.json").read_text())["best"]["trial_id"] == summary["best"]["trial_id"]
    ci = summary["best"]["selection_ci"]
    assert ci[0] <= summary["best"]["best_val_mean_auroc"] <= ci[1]


def test_the_optuna_study_on_disk_holds_each_trial_as_it_ended_and_what_it_trained(tiny):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tiny.exp / 'optuna.db'}")
    State = optuna.trial.TrialState
    assert [t.state for t in study.trials][:2] == [State.COMPLETE, State.PRUNED]
    assert study.trials[1].user_attrs["status"] == "diverged"
    for t in study.trials:
        trained = t.user_attrs["trained"]  # resolved
        assert trained["model.backbone"] == "test_resnet" and trained["device"] == "cpu" and not trained["smoke"]
        assert t.user_attrs["mlflow_run_id"] in {r["mlflow_run_id"] for r in tiny.summary["rows"]}
        if t.user_attrs["status"] == "pruned":
            assert t.intermediate_values  # kept in Optuna
        assert ("supervised.scheduler.t_max" in t.params) == (t.params["supervised.scheduler.name"] == "cosine")


def test_one_worker_trials_train_in_the_tune_trial_and_keep_one_checkpoint(tiny):
    assert not [p for p in tiny.exp.iterdir() if p.name.startswith("train-")]  # no Train run
    assert all(len(list(d.glob("checkpoint_*"))) <= 1 for d in tiny.exp.glob("t0*-*"))


def test_each_trial_is_an_mlflow_run_named_by_its_values_and_ended_by_its_status(tiny):
    children, runs = tiny.children, tiny.runs
    assert len(children) == 3 and all(c.info.status != "RUNNING" for c in children)
    assert sorted(runs) == ["t000", "t001", "t002"]
    assert runs["t001"].info.run_name == "t001 sgd lr=1e+06 none"
    assert runs["t001"].info.status == "FAILED" and runs["t001"].data.tags["tune_xray.status"] == "diverged"
    assert runs["t000"].info.status == "FINISHED" and runs["t000"].data.tags["tune_xray.status"] == "complete"
    # every run says what it is
    assert all("**Status:" in r.data.tags["mlflow.note.content"] for r in (*children, tiny.client.get_run(
        tiny.parent.info.run_id)))


def test_a_trial_run_holds_its_resolved_config_its_curves_and_no_bookkeeping(tiny):
    for child in tiny.children:
        assert child.data.params["model.backbone"] == "test_resnet"  # the full resolved config
        assert child.data.params["scan_backend"] == "none"  # what its device ran: no SSM layer in a ResNet
        assert not [p for p in child.data.params if ":" in p]  # no conditional-branch params
        assert not [m for m in child.data.metrics
                    if m in ("pid", "timestamp", "done", "training_iteration", "epochs_done")
                    or m.startswith(("time_", "config/"))]
    done, summary = tiny.runs["t000"], tiny.summary
    epochs = int(summary["best"]["epochs_done"]) if summary["best"]["trial"] == "t000" else 2
    history = tiny.client.get_metric_history(done.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert {"selected_val_mean_auroc", "selected_val_mean_auroc_selection_ci_high"} <= set(done.data.metrics)
    for key in ("latency_ms", "latency_ms_b32", "params_m", "gflops"):  # its cost, measured once, logged once
        assert [m.step for m in tiny.client.get_metric_history(done.info.run_id, key)] == [0]
    # per-label values and their intervals are one table, not dozens of metrics
    assert not [m for c in tiny.children for m in c.data.metrics if m.startswith("selected_") and "/" in m]
    assert {"best.pt", "config.yaml", "predictions_val.csv", "predictions_test.csv", "selected_record.json"} <= {
        a.path for a in tiny.client.list_artifacts(done.info.run_id)}


def test_the_test_split_is_sealed_in_the_trials_and_read_once_by_the_record(tiny):
    assert not [m for c in tiny.children for m in c.data.metrics if "test" in m]
    assert tiny.summary["ensemble"]["test_reads"] == 1
    assert json.loads((tiny.exp / "test_reads.json").read_text())[0]["by"]


def test_the_parent_run_holds_the_searchs_own_numbers_under_names_of_its_own(tiny):
    """Sorting by a trial metric ranks the trials alone: the parent's metrics are `search_best_…`."""
    best, parent = tiny.client.get_run(tiny.summary["best_mlflow_run_id"]), tiny.parent
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id and parent.info.status == "FINISHED"
    assert not set(parent.data.metrics) & {m for c in tiny.children for m in c.data.metrics}
    assert parent.data.metrics["search_best_selected_val_mean_auroc"] == best.data.metrics["selected_val_mean_auroc"]
    assert parent.data.metrics["search_best_val_mean_auroc"] == pytest.approx(
        tiny.summary["best"]["best_val_mean_auroc"])


def test_the_ensemble_chosen_on_val_is_registered_beside_the_trials(tiny):
    client, ensemble = tiny.client, tiny.summary["ensemble"]
    registered = ensemble["registered"]
    assert registered["uri"] == "models:/tiny/1"
    assert client.get_model_version("tiny", "1").run_id == registered["run_id"]
    ensemble_run = client.get_run(registered["run_id"])
    assert ensemble_run.data.tags["mlflow.parentRunId"] == tiny.parent.info.run_id
    # the ensemble under the trials' own metric names: it sorts beside them in the runs table
    assert {"selected_val_mean_auroc", "selected_val_mean_auroc_selection_ci_low", "record_test_mean_auroc",
            "record_test_mean_auroc_ci_low"} <= set(ensemble_run.data.metrics)
    assert ensemble_run.data.metrics["selected_val_mean_auroc"] == pytest.approx(ensemble["val"]["ensemble"]["value"])
    assert "ensemble_record.json" in {a.path for a in client.list_artifacts(ensemble_run.info.run_id)}
    member = client.get_run(ensemble["members"][0]["mlflow_run_id"])
    assert float(member.data.tags["tune_xray.ensemble_weight"]) == pytest.approx(ensemble["members"][0]["weight"],
                                                                                  abs=1e-4)
    ended = {c.info.run_id: c.info.end_time for c in tiny.children}
    assert member.info.end_time == ended[member.info.run_id]  # logging its model kept the run's own duration


def test_the_registered_model_reproduces_the_record_in_a_process_without_tune_xray(tiny, tmp_path):
    """In a fresh process where tune_xray cannot be imported (its editable install's finder and the checkout off
    the path), the pyfunc brings its own code (code_paths), needs only published packages, starts no Ray, and
    reproduces the stored ensemble test predictions."""
    import subprocess
    import sys

    exp = tiny.exp
    stored = pd.read_csv(exp / "ensemble" / "predictions_test.csv")
    repo = str(Path(__file__).resolve().parents[1])
    code = ("import sys, importlib.util; "
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__edit')]; "
            "sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__edit')]; "
            f"sys.path[:] = [p for p in sys.path if p and p != {repo!r}]; sys.path_importer_cache.clear(); "
            "assert importlib.util.find_spec('tune_xray') is None; "
            "import mlflow, pandas as pd; m = mlflow.pyfunc.load_model('models:/tiny/latest'); "
            f"out = m.predict(pd.DataFrame({{'path': pd.read_csv({str(exp / 'ensemble' / 'predictions_test.csv')!r})"
            f"['path']}})); out.to_csv({str(tmp_path / 'fresh.csv')!r}, index=False); "
            "assert 'ray' not in sys.modules and '/artifacts/code/' in sys.modules['tune_xray'].__file__")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{exp / 'mlflow.db'}"}
    env.pop("PYTHONPATH", None)
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path).returncode == 0
    fresh = pd.read_csv(tmp_path / "fresh.csv")
    p_cols = [c for c in stored.columns if c.startswith("p_")]
    assert np.abs(fresh[p_cols].to_numpy() - stored[p_cols].to_numpy()).max() < 1e-5


def test_predict_reads_png_and_dicom_and_names_a_bad_file(tiny, tmp_path, capsys):
    from tests.test_ensemble import _dicom
    from tune_xray.predict import main as predict_main

    exp = tiny.exp
    stored = pd.read_csv(exp / "ensemble" / "predictions_test.csv")
    p_cols = [c for c in stored.columns if c.startswith("p_")]
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for path in stored["path"][:2]:
        shutil.copy(path, inputs)
    _dicom(inputs / "scan.dcm", np.tile(np.linspace(0, 4095, 64), (64, 1)))
    (inputs / "readme.txt").write_text("not an image")
    assert predict_main([str(exp), str(inputs), "--out", str(tmp_path / "pred.csv"), "--batch-size", "2"]) == 1
    predicted = pd.read_csv(tmp_path / "pred.csv")  # one bad file named; the rest streamed two at a time
    assert len(predicted) == 3 and predicted[p_cols].notna().all().all()
    (tmp_path / "empty").mkdir()
    assert predict_main([str(exp), str(tmp_path / "empty")]) == 1  # nothing to predict is not success
    store = f"sqlite:///{exp / 'mlflow.db'}"
    assert predict_main(["models:/no-such-model/1", str(inputs), "--tracking-uri", store]) == 2
    if not torch.cuda.is_available():
        assert predict_main([str(exp), str(inputs), "--device", "cuda"]) == 2  # the device is not dropped
    err = capsys.readouterr().err
    assert "no files in" in err and "models:/no-such-model/1: no such model" in err and "Traceback" not in err


def test_the_served_model_answers_per_row(tiny, tmp_path):
    """An unreadable file is its row's error, not the batch's."""
    import mlflow

    stored = pd.read_csv(tiny.exp / "ensemble" / "predictions_test.csv")
    p_cols = [c for c in stored.columns if c.startswith("p_")]
    (tmp_path / "readme.txt").write_text("not an image")
    mlflow.set_tracking_uri(f"sqlite:///{tiny.exp / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/tiny/latest").predict(
        pd.DataFrame({"path": [stored["path"][0], str(tmp_path / "readme.txt")]}))
    assert served["status"].tolist() == ["ok", "error"] and "readme.txt: not a readable image" in served["error"][1]
    assert served[p_cols].iloc[0].notna().all() and served[p_cols].iloc[1].isna().all()


def test_the_report_is_one_offline_page_in_order_with_test_numbers_only_in_the_record(tiny):
    summary, exp = tiny.summary, tiny.exp
    report = exp / "report.html"
    assert summary["report"] == str(report)
    text = report.read_text()
    titles = ["The study", "The data", "The search", "Every trial", "The model", "Explainability",
              "Accuracy against cost", "The record: test split"]
    assert [text.index(f"<h2>{t}</h2>") for t in titles] == sorted(text.index(f"<h2>{t}</h2>") for t in titles)
    for heading in ("Parameter importance (fANOVA)", "Grad-CAM", "t-SNE", "Calibration", "ROC per label",
                    "ASHA: epochs spent per trial", "Learning curves"):
        assert heading in text
    assert 'src="http' not in text and "<link" not in text and "<script" not in text  # opens offline
    assert 'alt=""' not in text and text.count("/#/experiments/") >= len(summary["rows"])  # every trial's run
    assert text.count("data:image/png;base64,") >= 7  # history, ASHA, curves, ROC, calibration, Grad-CAM, t-SNE
    record = text.index("<h2>The record")  # test numbers only in the record, after every choice
    assert text.index(f"{summary['ensemble']['test']['ensemble']['value']:.4f}") > record
    assert f"{summary['ensemble']['test']['best_single']['value']:.4f}" not in text[:record]
    assert "report.html" in {a.path for a in tiny.client.list_artifacts(tiny.parent.info.run_id)}


def test_the_report_is_drawn_from_report_json_alone(tiny):
    """report.json beside the page renders to the same page; its numbers are the search's: one column per
    logical parameter (the LR whatever the optimizer: Optuna keeps one per optimizer), every trial's ASHA row,
    the ROC curves, Grad-CAM and t-SNE, each completed trial's costs as it measured them."""
    from tune_xray.report import render

    summary, exp = tiny.summary, tiny.exp
    data = json.loads((exp / "report.json").read_text())
    assert render(data) == (exp / "report.html").read_text()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert [t["number"] for t in data["search"]["trials"]] == [t.number for t in finished]
    logical = {k.split(":")[0] for t in finished for k in t.params}
    assert set(data["search"]["parameters"]) == logical and set(data["search"]["importance"]) <= logical
    assert all(set(t["params"]) <= logical for t in data["search"]["trials"])
    assert [r["trial"] for r in data["search"]["asha"]] == [r["trial"] for r in summary["rows"]]
    model = data["model"]
    assert set(model["roc"]) == {f"best trial ({summary['best']['trial']})", "ensemble"}
    assert all(len(fpr) == len(tpr) for curves in model["roc"].values() for fpr, tpr in curves.values())
    cams = data["explain"]["gradcam"]
    assert cams and all(np.asarray(c["image"]).shape == np.asarray(c["cam"]).shape == (56, 56) for c in cams)
    assert len(data["explain"]["tsne"]["points"]) == len(data["explain"]["tsne"]["labels"]) > 0
    costs = {r["trial"]: r for r in data["cost"]["rows"]}  # as each trial measured its model
    assert set(costs) == {r["trial"] for r in summary["rows"] if r["status"] == "complete"}
    assert all(r["latency_ms"] > 0 and r["params_m"] > 0 and r["gflops"] > 0 for r in costs.values())
    assert any(r["front"] for r in costs.values()) and not data["cost"]["searched"]


def test_a_copied_or_renamed_experiment_still_finds_its_optuna_study(tiny, tmp_path):
    from tune_xray.report import main as report_main

    shutil.copytree(tiny.exp, tmp_path / "renamed")
    assert report_main([str(tmp_path / "renamed"), "--out", str(tmp_path / "renamed.html")]) == 0


def test_a_step_after_the_trials_that_fails_costs_the_others_nothing(tmp_path, ray_session, monkeypatch, capsys):
    """The ensemble fails: one line, summary.json and a tag say so; the report is still written, the parent run
    still FINISHED; the exit code says something failed."""
    import tune_xray.ensemble

    def broken(*args, **kwargs):
        raise OSError("the registry's disk is full")

    monkeypatch.setattr(tune_xray.ensemble, "run_ensemble", broken)
    args = _args(tmp_path)
    args = replace(args, trials=1, no_asha=True, overrides=["supervised.epochs=1"])
    summary = run_search(args)
    assert summary["status"] == "complete" and exit_code(summary) == 1
    assert summary["failed"] == {"ensemble": "OSError: the registry's disk is full"}
    said = capsys.readouterr()
    assert "ensemble failed: OSError: the registry's disk is full" in said.err
    assert "tiny: 1 trial of " in said.out  # a count and its noun agree
    assert Path(summary["report"]).is_file()  # written without an ensemble
    _, parent, _ = _mlflow(tmp_path / "store" / "tiny")
    assert parent.info.status == "FINISHED" and parent.data.tags["tune_xray.failed"] == "ensemble"


def test_a_budget_no_trial_fits_is_an_outcome_said_with_the_nearest_fit_and_nothing_registered(tmp_path, ray_session,
                                                                                              capsys):
    """--latency-budget far below any model: no ensemble is chosen or registered — the rule the README gives — and
    the search says so, naming the nearest fit and the best single trial; it still did what was asked (exit 0),
    the report says it, and predict on the experiment names the reason instead of serving a model over budget."""
    from tune_xray.predict import main as predict_main

    args = replace(_args(tmp_path), trials=1, no_asha=True, overrides=["supervised.epochs=1"], latency_budget=1e-6)
    summary = run_search(args)
    assert summary["status"] == "complete" and summary["failed"] == {} and exit_code(summary) == 0
    assert summary["ensemble"]["fits"] is False and summary["ensemble"]["registered"] is None
    assert summary["ensemble"]["nearest"]["trial"] == summary["best"]["trial"] == "t000"
    assert "search_model" not in summary
    from tune_xray.summary import print_summary

    print_summary(summary, "")
    said = capsys.readouterr().out
    assert "ensemble: none — no completed trial fits the budget alone (--latency-budget 1e-06: the least is " in said
    assert "; the nearest is t000 (latency_ms " in said and "No model registered: " in said
    assert "No ensemble and no registered model: no completed trial fits" in Path(summary["report"]).read_text()
    exp = tmp_path / "store" / "tiny"
    assert predict_main([str(exp), str(next(exp.rglob("*.png"), exp))]) == 2
    assert "no model registered: no completed trial fits the budget alone" in capsys.readouterr().err


def test_a_trial_over_a_hard_limit_ends_at_epoch_one_as_infeasible(tmp_path, ray_session, capsys, monkeypatch):
    """`limits: {params_m: 0.2, latency_ms: 1000}`: test_resnet (0.37 M) is over the first, test_efficientnet
    (0.10 M) is not. The first
    stops after its first epoch as `infeasible` — not complete, pruned or failed; its MLflow run FINISHED with that
    status — and reaches Optuna COMPLETE with its constraint; the search succeeds. The search resolves its study
    once (the file's own validation aside): the candidate check, the searcher and the trials read that one."""
    from tune_xray.space import Study

    resolved, resolve = [], Study.resolve
    monkeypatch.setattr(Study, "resolve", lambda self, *a, **k: resolved.append(a) or resolve(self, *a, **k))
    backbones = {"model.backbone": {"choice": ["test_resnet", "test_efficientnet"]}}
    space = {**SPACE, "limits": {"params_m": 0.2, "latency_ms": 1000.0}, "params": backbones,
             "warm_start": [{"model.backbone": "test_resnet"}, {"model.backbone": "test_efficientnet"}]}
    args = _args(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    args = replace(args, trials=2, no_asha=True, no_ensemble=True, no_report=True, overrides=["supervised.epochs=2"])
    summary = run_search(args)
    assert [a for a in resolved if a] == [({"supervised": {"epochs": 2}}, False, None, None)]
    assert summary["status"] == "complete" and exit_code(summary) == 0
    assert (summary["complete"], summary["infeasible"]) == (1, 1)
    over = next(r for r in summary["rows"] if r["status"] == "infeasible")
    assert over["resolved"]["model.backbone"] == "test_resnet" and over["epochs_done"] == 1
    assert over["reason"].startswith("params_m 0.37") and "over its limit 0.2" in over["reason"]
    assert summary["best"]["resolved"]["model.backbone"] == "test_efficientnet"
    # the latency limit is judged after the trials, on every completed trial measured again alone
    assert summary["cost_remeasured"]["why"] == "every completed trial, each judged against the study's latency limit"
    assert "cost_in_trial" in summary["best"]
    said = capsys.readouterr().out
    assert "t000 test_resnet: infeasible, 1 fine-tune epoch, " in said and "(params_m 0.374 over its limit 0.2)" in said
    exp = tmp_path / "store" / "tiny"
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}").trials
    assert [(t.state.name, t.user_attrs["status"], t.constraints["params_m"] > 0) for t in trials] == [
        ("COMPLETE", "infeasible", True), ("COMPLETE", "complete", False)]
    _, _, children = _mlflow(exp)
    run = next(c for c in children if c.data.tags["tune_xray.status"] == "infeasible")
    assert run.info.status == "FINISHED"
    # the report: Optuna holds it COMPLETE (with its constraint), the report never among the completed trials
    from tune_xray.report.search import render_search, search_data

    search = search_data(Experiment.at(exp), summary)
    infeasible = next(t for t in search["trials"] if t["status"] == "infeasible")
    assert infeasible["value"] is None and infeasible["infeasible_value"] is not None
    assert [t["status"] for t in search["trials"] if t["value"] is not None] == ["complete"]
    assert "1 completed trial of 2 finished; 1 infeasible (over a study's hard limit), shown apart" in render_search(
        search, summary["metric"])


class InterruptAfterFirstTrial(tune.Callback):
    """SIGINT to the driver once a trial has finished: Tune saves the experiment and returns. Once only:
    Tuner.restore brings the experiment's callbacks back, this one included."""

    def __init__(self, marker):
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGINT)


class RunningTrials(tune.Callback):
    """Appends to `path`, at each trial's start, how many trials run at once: what concurrency a run really had.
    (Pickled with the search, and brought back by a resume, as every callback: it counts afresh there.)"""

    def __init__(self, path):
        self.path, self.running = str(path), set()

    def __getstate__(self):
        return {"path": self.path, "running": set()}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        with open(self.path, "a") as out:
            out.write(f"{trial.trial_id} {len(self.running)}\n")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    on_trial_error = on_trial_complete


def test_ctrl_c_is_an_interruption_and_resume_completes_the_record(tmp_path, ray_session, capfd):
    """Ctrl-C after the first trial: interrupted (130), resumable; the resume completes the record, one run per
    trial, and applies what it says: `--max-concurrent 1` there really runs one trial at a time (the first run ran
    two at once) for every trial it proposes (those the first run had proposed run as the resources allow: Tune
    starts every trial it holds), and every trial records the device and global batch it ran with."""
    args = _args(tmp_path)
    args = replace(args, no_asha=True, trials=4, max_pending=0)  # two proposed at a time: two CPUs, one each
    running = tmp_path / "running.txt"
    summary = run_search(args, extra_callbacks=[InterruptAfterFirstTrial(tmp_path / "interrupted"),
                                                RunningTrials(running)])
    first = dict(line.split() for line in running.read_text().splitlines())
    assert max(map(int, first.values())) == 2
    running.unlink()
    exp = tmp_path / "store" / "tiny"
    assert summary["status"] == "interrupted" and exit_code(summary) == 130 and summary["pruned"] == 0
    assert summary["complete"] + summary["diverged"] >= 1 and summary["complete"] + summary["diverged"] < 3
    client, parent, children = _mlflow(exp)
    assert parent.info.status == "KILLED" and parent.data.tags["tune_xray.status"] == "interrupted"
    assert all(c.info.status != "RUNNING" for c in children)
    storage = f"sqlite:///{exp / 'optuna.db'}"
    before = {t.number: t for t in optuna.load_study(study_name="tiny", storage=storage).trials
              if t.state.is_finished()}

    first_run = summary["wall_time_s"]
    capfd.readouterr()
    summary = run_search(_args(tmp_path, "--resume", max_concurrent=1, given={"max_concurrent"}))
    assert summary["status"] == "complete" and summary["trials"] == 4 and summary["interrupted"] == 0
    proposed_here = [int(n) for trial, n in map(str.split, running.read_text().splitlines()) if trial not in first]
    assert proposed_here and set(proposed_here) == {1}  # each started alone
    assert {r["ran_with"]["device"] for r in summary["rows"]} == {"cpu"}
    assert {r["ran_with"]["supervised.global_batch_size"] for r in summary["rows"]} == {32}
    said = capfd.readouterr().out
    assert "--resume: --max-concurrent 1 (the search started with None); for the trials the search has yet to " \
           "propose" in said
    assert "Configuration for experiment" not in said and "tensorboard" not in said.lower()  # a quiet resume
    assert summary["search_runs_s"][0] == first_run and len(summary["search_runs_s"]) == 2  # both runs' time
    assert summary["wall_time_s"] == pytest.approx(sum(summary["search_runs_s"]))
    assert summary["resources_runs"] == [summary["resources"]] * 2  # each run's, so CPU-hours stand only if the same
    after = optuna.load_study(study_name="tiny", storage=storage).trials
    assert len(after) == 4 and all(t.state.is_finished() for t in after)
    for number, trial in before.items():
        assert after[number].state == trial.state and after[number].value == trial.value
    client, parent, children = _mlflow(exp)
    assert len(children) == 4 and all(c.info.status != "RUNNING" for c in children)  # no duplicate child runs
    assert parent.info.status == "FINISHED"
    for key in parent.data.metrics:  # finished twice, yet each value once at each step
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, key)]
        assert len(steps) == len(set(steps)), key
    for child in children:
        if child.data.tags["tune_xray.status"] == "complete":  # one unbroken per-epoch history
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 1


def test_resume_of_a_search_that_never_ran_leaves_nothing(tmp_path, capsys):
    import ray
    ray.shutdown()
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main([str(space), "--resume", "nothing", "--storage", str(tmp_path / "s")]) == 2
    assert "--resume: no search named 'nothing'" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_a_resume_says_what_it_changes_and_refuses_what_it_cannot(tmp_path, capsys, monkeypatch):
    """What the search was started with holds; given again with another value, a flag the search's record depends
    on (--ensemble-size, --set, the study file) is one error naming its stored value; resources may change, each
    change said in one line, and resources not given again stay the search's own. search.json's first format (the
    kept values at its top level, no resources) still loads."""
    from tune_xray.command import build_parser, given_keys
    from tune_xray.experiment import Experiment
    from tune_xray.pipeline import restore_request
    from tune_xray.record.names import INVOCATION_FILE
    from tune_xray.request import KEPT

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    started = [str(space), "--name", "r", "--storage", str(tmp_path / "s"), "--cpus-per-trial", "0.5",
               "--max-concurrent", "2", "--ensemble-size", "3", "--set", "supervised.epochs=1"]
    experiment = Experiment.locate("r", str(tmp_path / "s"), str(tmp_path / "s"))
    experiment.directory.mkdir(parents=True)
    (experiment.directory / "tuner.pkl").write_bytes(b"")  # what Tune checks before a restore
    first = SearchRequest.from_values(vars(build_parser().parse_args(started)))
    experiment.write_request(first)

    def resume(*flags):
        argv = [str(space), "--resume", "r", "--storage", str(tmp_path / "s"), *flags]
        parsed = vars(build_parser().parse_args(argv))
        return restore_request(SearchRequest.from_values(parsed, given=given_keys(argv, parsed)))

    request = resume("--cpus-per-trial", "2")
    assert "--resume: --cpus-per-trial 2.0 (the search started with 0.5)" in capsys.readouterr().out
    assert (request.cpus_per_trial, request.max_concurrent, request.ensemble_size) == (2.0, 2, 3)  # the others kept
    assert request.overrides == ("supervised.epochs=1",) and request.resume == "r"
    resume("--ensemble-size", "3", "--set", "supervised.epochs=1")  # the same values: nothing to say
    assert capsys.readouterr().out == ""
    with pytest.raises(ConfigError) as err:
        resume("--ensemble-size", "5", "--set", "supervised.epochs=2")
    assert str(err.value) == (
        "--resume r: --set supervised.epochs=2 (the search's: supervised.epochs=1); --ensemble-size 5 (the search's: "
        "3): a resume continues the search as it was started; start a new --name to change it")
    with pytest.raises(ConfigError, match=r"--max-failures 3 \(the search's: 1, kept in Tune's own state\)"):
        resume("--max-failures", "3")  # Tuner.restore brings back the FailureConfig it was pickled with
    resume("--workers-per-trial", "2")
    assert "; the trials started from here train with it, each recording its global batch" in capsys.readouterr().out
    # --data and the study compare by meaning: the stored --data was made absolute, the study named by its path
    from tune_xray.pipeline import absolute_data

    monkeypatch.chdir(tmp_path)
    experiment.write_request(replace(first, data=absolute_data("folder:scans")))
    argv = ["tiny.yaml", "--resume", "r", "--storage", str(tmp_path / "s"), "--data", "folder:scans"]
    parsed = vars(build_parser().parse_args(argv))
    assert restore_request(SearchRequest.from_values(parsed, given=given_keys(argv, parsed))).data.endswith("/scans")
    with pytest.raises(ConfigError, match="--data folder:other"):
        resume("--data", "folder:other")
    experiment.write_request(first)
    (experiment.directory / INVOCATION_FILE).write_text(json.dumps({k: getattr(first, k) for k in KEPT}))  # format 1
    request = resume()
    assert (request.ensemble_size, request.overrides, request.cpus_per_trial) == (3, ("supervised.epochs=1",), 1.0)


def test_set_that_contradicts_the_study_is_an_error_or_carries_through(tmp_path, capsys):
    import ray
    ray.shutdown()
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main([str(space), "--set", "supervised.selection_metric=val_loss", "--storage", str(tmp_path / "s")]) == 2
    assert "contradicts" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main([str(space), "--set", "device=cuda:1", "--storage", str(tmp_path / "s")]) == 2
    assert "--set device=cuda:1: a trial runs on the device its resources give it" in capsys.readouterr().err
    assert main([str(space), "--ensemble-size", "0", "--storage", str(tmp_path / "s")]) == 2
    assert "--ensemble-size 0: at least 1" in capsys.readouterr().err and not (tmp_path / "s").exists()
    from tune_xray.space import load_study
    study = load_study(str(space))
    overrides = {"supervised": {"epochs": 5}}
    resolved = study.resolve(overrides)
    assert resolved.budget.epochs == 5  # ASHA's max_t follows the --set budget
    assert resolved.trial_config({}).supervised.epochs == 5


def test_a_dataset_with_one_class_is_an_error_before_ray(tmp_path, capsys):
    import ray
    from PIL import Image
    ray.shutdown()
    for i in range(12):
        (tmp_path / "data" / "normal").mkdir(parents=True, exist_ok=True)
        Image.new("L", (32, 32), i * 10).save(tmp_path / "data" / "normal" / f"{i}.png")
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main([str(space), "--data", f"folder:{tmp_path / 'data'}", "--storage", str(tmp_path / "s")]) == 2
    assert "a classifier needs at least two" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


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
    args = replace(args, trials=1, workers_per_trial=2, cpus_per_trial=2.0, no_asha=True,
                   overrides=["supervised.epochs=1", "byol.enabled=true", "byol.epochs=1", "byol.batch_size=32",
                              "byol.hidden_dim=32", "byol.out_dim=16"])
    summary = run_search(args)
    assert summary["complete"] == 1 and summary["error"] == 0
    trial = summary["rows"][0]
    exp = tmp_path / "store" / "tiny"
    assert (exp / f"train-{trial['trial_id']}").is_dir()  # a Ray Train run, inside the experiment
    assert (exp / f"{trial['trial']}-{trial['trial_id']}" / "best.pt").is_file()  # its results with the trial
    run = _mlflow(exp)[2][0]  # what one optimizer step sees: each rank's batch × the two ranks
    assert run.data.params["supervised.global_batch_size"] == "64" and run.data.params["byol.global_batch_size"] == "64"


@pytest.mark.parametrize("params, message", [
    ({"model.backbone": {"choice": ["test_resnet", "resnet_18"]}}, "model.backbone 'resnet_18' is not a timm model"),
    ({"model.pretrained_path": {"choice": {"scratch": None, "imagenet": "weights/nope.safetensors"}}},
     "model.pretrained weights/nope.safetensors: no such file"),
])
def test_backbones_and_weight_files_are_checked_before_ray(tmp_path, capsys, params, message):
    import ray
    ray.shutdown()
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "params": {**SPACE["params"], **params}}))
    assert main([str(space), "--storage", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err and not ray.is_initialized()


def test_shipped_smoke_searches_pass_the_candidate_check():
    from tune_xray.pipeline import check_candidates
    from tune_xray.space import SEARCH_SPACES, load_study
    for path in sorted(SEARCH_SPACES.glob("*.yaml")):
        check_candidates(load_study(str(path)).resolve(smoke=True))  # transfer's ImageNet files: smoke is scratch


def test_best_is_the_best_completed_trial_and_none_completed_is_not_success(tmp_path):
    """An errored trial with a last value, or a pruned one, never ranks as best; with nothing complete the
    summary says so and the exit code is not 0."""
    from types import SimpleNamespace

    from tune_xray.experiment import Experiment
    from tune_xray.space import load_study
    from tune_xray.summary import summarize

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    study = load_study(str(space))

    def trial(number, tune_status, **result):
        return SimpleNamespace(trial_id=f"id{number}", status=tune_status, config={"optuna_trial": number},
                               last_result={"epochs_done": 1, **result}, error_file=None)

    args = dict(requested=3, study=study, metric="best_val_mean_auroc", experiment=Experiment.at(tmp_path),
                tracking_uri="sqlite:///x.db", runs={}, experiment_id="1")
    trials = [trial(0, "ERROR", best_val_mean_auroc=0.99), trial(1, "TERMINATED", best_val_mean_auroc=0.9),
              trial(2, "TERMINATED", best_val_mean_auroc=0.7, status="complete")]
    summary = summarize(trials, **args)
    assert summary["best"]["trial"] == "t002" and (summary["error"], summary["pruned"]) == (1, 1)
    assert exit_code(summary) == 0
    summary = summarize(trials[:2] + [trial(2, "TERMINATED", status="diverged", reason="nan")], **args)
    assert summary["best"] is None and summary["status"] == "no trial completed" and exit_code(summary) == 1
    summary = summarize(trials[1:2] + [trial(2, "RUNNING")], **args)
    assert summary["status"] == "interrupted" and summary["interrupted"] == 1 and exit_code(summary) == 130


class KillTrainingAfterFirstEpoch(tune.Callback):
    """SIGKILL the process that trains (the Ray Train worker, or the Tune trial's own process in a one-worker
    trial) once its first fine-tune epoch has been reported."""

    def __init__(self):
        self.killed = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        import psutil
        if self.killed is None and result.get("epoch") == 1:
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            for proc in workers or [psutil.Process(result["pid"])]:
                self.killed = " ".join(proc.cmdline())
                proc.kill()


@pytest.mark.parametrize("one_worker", ["tune", "trainer"])
def test_a_killed_trial_resumes_from_its_last_epoch(tmp_path, ray_session, one_worker):
    """--set supervised.epochs beyond the file's budget carries through (ASHA's max_t follows it), and the
    training process killed after epoch 1 restarts from that epoch's checkpoint (a Train worker: Ray Train's
    retry; the trial itself: Tune's): one run, epochs 1..3 once each."""
    args = _args(tmp_path)
    args = replace(args, trials=1, cpus_per_trial=2.0, overrides=["supervised.epochs=3"], one_worker_trials=one_worker)
    killer = KillTrainingAfterFirstEpoch()
    summary = run_search(args, extra_callbacks=[killer])
    assert ("RayTrainWorker" in killer.killed) == (one_worker == "trainer")
    assert summary["complete"] == 1 and summary["best"]["epochs_done"] == 3
    client, parent, children = _mlflow(tmp_path / "store" / "tiny")
    assert len(children) == 1 and children[0].data.params["supervised.epochs"] == "3"
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_loss")] == [1, 2, 3]


def test_a_killed_driver_resumes_with_one_run_per_trial_and_none_running(tmp_path, ray_session):
    import subprocess
    import sys

    # the driver is SIGKILLed (no chance to save or clean up) at the first result after a trial has ended;
    # the callback is defined in __main__ so that the experiment's pickle carries it by value
    code = f"""
import os, pathlib, signal, sys
from ray import tune
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_search import _args
from tune_xray.config import ConfigError
from tune_xray.pipeline import run_search

class KillDriverMidTrial(tune.Callback):
    ended = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.ended and not os.path.exists({str(tmp_path / "killed")!r}):
            open({str(tmp_path / "killed")!r}, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

run_search(_args(pathlib.Path({str(tmp_path)!r}), no_asha=True), extra_callbacks=[KillDriverMidTrial()])
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    exp = tmp_path / "store" / "tiny"
    summary = run_search(_args(tmp_path, "--resume"))
    assert summary["status"] == "complete" and summary["trials"] == 3
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert all(t.state.is_finished() for t in study.trials)
    assert sum(t.state != optuna.trial.TrialState.FAIL for t in study.trials) == 3  # orphans only are FAIL
    client, parent, children = _mlflow(exp)
    assert len(children) == summary["trials"] and parent.info.status == "FINISHED"
    assert all(c.info.status != "RUNNING" for c in children)
    for child in children:
        if child.data.tags["tune_xray.status"] == "complete":
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
            assert steps == [1, 2]


def test_one_search_owns_its_name(tmp_path, capsys):
    """An exclusive lock taken before anything is written: a second start (or a --resume) while the first runs is
    one error naming the holder; released on every exit; a crashed run's lock is said and taken over; a search
    that fails before writing its invocation leaves nothing behind."""
    from tune_xray.config import ConfigError
    from tune_xray.experiment import Experiment
    from tune_xray.record.names import INVOCATION_FILE, LOCK_FILE

    def search_lock(directory, name):
        return Experiment(directory, str(directory.parent), name).lock()

    experiment = tmp_path / "runs" / "tiny"
    with search_lock(experiment, "tiny"):
        (experiment / INVOCATION_FILE).write_text("{}")
        holder = (experiment / LOCK_FILE).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ConfigError, match=f"search 'tiny' is running \\(pid {os.getpid()} on "):
            with search_lock(experiment, "tiny"):
                pass
        assert (experiment / LOCK_FILE).read_text() == holder  # the refused one changed nothing
    assert (experiment / LOCK_FILE).read_text() == ""  # released
    (experiment / LOCK_FILE).write_text("pid 4242 on elsewhere since 2026-11-26 10:00:00")  # as a crash leaves it
    with search_lock(experiment, "tiny"):
        pass
    assert "earlier run of 'tiny' (pid 4242 on elsewhere since 2026-11-26 10:00:00) ended without releasing" in \
        capsys.readouterr().err
    fresh = tmp_path / "new" / "store" / "other"
    with pytest.raises(RuntimeError), search_lock(fresh, "other"):
        raise RuntimeError("Ray did not start")
    assert not (tmp_path / "new").exists()  # nothing written, nothing left
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="--storage: cannot create"), search_lock(tmp_path / "a_file" / "x", "x"):
        pass


@pytest.mark.parametrize("flags, message", [
    (["--trials", "0"], "--trials 0: at least 1"), (["--trials", "-1"], "--trials -1: at least 1"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial 0: more than 0"), (["--gpus-per-trial", "-1"], "0 or more"),
    (["--workers-per-trial", "0"], "--workers-per-trial 0: at least 1"), (["--max-concurrent", "0"], "at least 1"),
])
def test_bad_counts_and_resources_are_one_line_before_anything(tmp_path, capsys, flags, message):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert main([str(space), "--storage", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {err.strip().removeprefix('error: ')}" and message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_trials_get_the_device_and_gpu_share_their_resources_give():
    from tune_xray.pipeline import default_gpus_per_trial
    from tune_xray.space import load_study, trial_overrides

    study = load_study("supervised")
    resolved = study.resolve(trial_overrides(study, [], None))
    assert resolved.overrides == {} and resolved.trial_config({}).device == "auto"  # before Ray tells the GPUs
    assert resolved.placed(0.0).overrides == {"device": "cpu"}
    assert resolved.placed(1.0).overrides == {"device": "cuda"}
    assert resolved.placed(0.25).overrides == {"device": "cuda", "data": {"device_share": 0.25}}
    assert resolved.placed(2.0, workers_per_trial=2).overrides == {"device": "cuda"}  # a GPU per rank
    given = study.resolve(trial_overrides(study, ["data.device_share=0.5"], None)).placed(0.25)
    assert given.overrides == {"device": "cuda", "data": {"device_share": 0.5}}  # --set's share stands
    assert given.trial_config({}).data.device_share == 0.5 and resolved.overrides == {}  # a new value, not a change
    assert default_gpus_per_trial({"CPU": 4}) == 0.0 and default_gpus_per_trial({"CPU": 4, "GPU": 8}) == 1.0


def test_optuna_storage_urls(tmp_path):
    from tune_xray.credentials import mask
    from tune_xray.searcher import optuna_storage

    journal = tmp_path / "shared" / "optuna.log"
    for url in (f"journal:{journal}", f"sqlite:///{tmp_path / 'optuna.db'}"):
        study = optuna.create_study(study_name="s", storage=optuna_storage(url))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), 2)
        assert len(optuna.load_study(study_name="s", storage=optuna_storage(url)).trials) == 2
    assert journal.is_file()
    assert mask("postgresql://optuna:secret@db:5432/optuna") == "postgresql://optuna:***@db:5432/optuna"


def test_repeats_rerun_the_best_configs_with_new_seeds(tmp_path, ray_session):
    from tune_xray.repeat import main as repeat_main

    args = _args(tmp_path)
    args = replace(args, trials=2, no_asha=True, no_ensemble=True, no_report=True)
    space = {k: v for k, v in SPACE.items() if k != "warm_start"}  # two trials that complete
    space["params"] = {"supervised.optimizer.lr": {"choice": [1.0e-3, 5.0e-3]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    run_search(args)
    exp = tmp_path / "store" / "tiny"
    assert repeat_main([str(exp), "--top", "2", "--seeds", "1"]) == 0
    assert repeat_main([str(exp), "--top", "2", "--seeds", "1"]) == 0  # a second set adds to the first
    summary = json.loads((exp / "summary.json").read_text())
    repeats = summary["repeats"]
    complete = [r for r in summary["rows"] if r["status"] == "complete"]
    assert len(complete) == 2 and len(repeats["trials"]) == 4 and repeats["sets"] == 2
    assert sorted(t["seed"] for t in repeats["trials"]) == [1000, 1000, 2000, 2000] == sorted(repeats["seeds"] * 2)
    assert all(t["status"] == "complete" for t in repeats["trials"])
    by_trial = {r["trial"]: r for r in complete}
    for row in repeats["rows"]:  # two fresh seeds; the search's own run apart, not in the mean
        assert row["seeds"] == 2 and row["mean"] == pytest.approx(np.mean(row["values"]))
        assert row["selection_run"] == by_trial[row["config"]]["best_val_mean_auroc"]
    client, parent, runs = _mlflow(exp)
    repeat_runs = [r for r in runs if "tune_xray.repeat_of" in r.data.tags]
    assert len(runs) - len(repeat_runs) == summary["trials"]
    assert sorted(r.data.tags["tune_xray.repeat_of"] for r in repeat_runs) == sorted(
        t["repeat_of"] for t in repeats["trials"])
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
               and r.data.params["seed"] in ("1000", "2000") for r in repeat_runs)
    assert len(repeats["rows"]) == 2
    (comparison,) = repeats["comparisons"]  # the best against the other, resampling 2 seeds and patients
    assert comparison["seeds"] == 2 and comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
    from tune_xray.ensemble import load_pool
    from tune_xray.experiment import Experiment
    pool = load_pool(Experiment.at(exp))
    assert len(pool.trials) == len(complete) + len(repeats["trials"])  # the pool holds the repeats


def test_a_pareto_search_a_budgeted_ensemble_and_cross_validated_finalists(tmp_path, ray_session, capsys):
    """Objectives val AUROC (max) and latency (min), multi-objective ASHA stopping trials: each trial measures its
    cost, the Optuna study has both directions, the summary its front (non-dominated complete trials, tagged in
    MLflow); the ensemble keeps its
    members' summed latency within the budget; the two best configurations are trained on 2 patient-grouped
    folds of train + val (test untouched), their out-of-fold predictions cover train + val once, and the best's
    fold models, averaged, are registered and compared once on test with the search's ensemble."""
    from tune_xray.ensemble import run_ensemble
    from tune_xray.experiment import Experiment
    from tune_xray.searcher import optuna_storage
    from tune_xray.selection import EnsembleError

    space = {k: v for k, v in SPACE.items() if k != "warm_start"}
    space["objectives"] = {"val_mean_auroc": "max", "latency_ms": "min"}
    space["params"] = {"model.backbone": {"choice": ["test_resnet", "test_efficientnet"]},
                       "augment.tta": {"choice": ["none", "hflip"]}}
    space["sampler"] = {"n_startup_trials": 2}
    args = _args(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    args = replace(args, trials=4, no_asha=False, no_report=True, overrides=["supervised.epochs=2"],
                   latency_budget=1e6, cv_folds=2, cv_top=2)
    summary = run_search(args)
    assert summary["status"] == "complete" and not summary["failed"], summary["failed"]
    assert summary["asha"].startswith("multi-objective ASHA")  # with ASHA: promotion on both objectives
    exp = tmp_path / "store" / "tiny"
    complete = [r for r in summary["rows"] if r["status"] == "complete"]
    assert all(r["cost"]["latency_ms"] > 0 and r["cost"]["params_m"] > 0 for r in complete)
    # under a budget every completed trial is a candidate: each measured again, alone, on the driver's device
    assert set(summary["cost_remeasured"]["trials"]) == {r["trial"] for r in complete}
    assert all(r["cost_in_trial"]["latency_ms"] > 0 for r in complete)
    front = {r["trial"] for r in summary["pareto_front"]}
    point = {r["trial"]: (r[summary["metric"]], r["cost"]["latency_ms"]) for r in complete}
    for trial, (auroc, ms) in point.items():  # on the front exactly when no other complete trial dominates it
        dominated = any(a >= auroc and m <= ms and (a, m) != (auroc, ms) for a, m in point.values())
        assert (trial in front) == (not dominated)
    study = optuna.load_study(study_name="tiny", storage=optuna_storage(f"sqlite:///{exp / 'optuna.db'}"))
    # Optuna was told each trial's own latency (measured while training); the front uses the latency measured
    # again alone after the trials: each is the non-dominated set on its own figures
    told = {r["trial"]: (r[summary["metric"]], r["cost_in_trial"]["latency_ms"]) for r in complete}
    optuna_front = {t for t, (a, ms) in told.items()
                    if not any(b >= a and n <= ms and (b, n) != (a, ms) for b, n in told.values())}
    assert len(study.directions) == 2 and {t.number for t in study.best_trials} == {int(t[1:]) for t in optuna_front}
    client, parent, runs = _mlflow(exp)
    tagged = {r.info.run_name.split()[0] for r in runs if r.data.tags.get("tune_xray.pareto_front") == "true"}
    assert tagged == front
    cost = summary["ensemble"]["cost"]
    assert cost["budget"] == {"latency_ms": 1e6} and cost["served_latency_ms"] > 0
    # a budget that holds the fastest trial alone: that trial is the whole ensemble
    fastest = min(complete, key=lambda r: r["cost"]["latency_ms"])
    result = run_ensemble(Experiment.at(exp), budget={"latency_ms": fastest["cost"]["latency_ms"] * 1.0001})
    assert [m["trial"] for m in result["members"]] == [fastest["trial"]]
    assert result["cost"]["latency_ms_sum"] <= fastest["cost"]["latency_ms"] * 1.0001
    assert "Budget: latency ≤" in (exp / "ensemble" / "model_card.md").read_text()
    with pytest.raises(EnsembleError, match="--latency-budget 1e-06: the least is"):
        run_ensemble(Experiment.at(exp), budget={"latency_ms": 1e-6})

    cv = summary["cv"]
    top = [r["trial"] for r in summary["top"][:2]]  # one or two: MO-ASHA may stop all but one (noisy latencies)
    assert sorted(r["config"] for r in cv["rows"]) == sorted(top) and cv["folds"] == 2
    assert all(t["status"] == "complete" for t in cv["trials"]) and len(cv["trials"]) == 2 * len(top)
    base = pd.read_csv(next(exp.glob(f"{top[0]}-*")) / "predictions_val.csv")
    test = pd.read_csv(next(exp.glob(f"{top[0]}-*")) / "predictions_test.csv")
    for row in cv["rows"]:
        assert row["mean"] == pytest.approx(np.mean(row["values"])) and row["ci_low"] <= row["mean"] <= row["ci_high"]
        oof = pd.read_csv(row["oof_file"])
        assert not oof["path"].duplicated().any() and set(oof["fold"]) == {0, 1}
        assert set(oof["path"]).isdisjoint(test["path"])  # test is never part of a fold
        folds_of = oof.groupby("patient_id")["fold"].nunique()
        assert (folds_of == 1).all()  # patient-grouped
        assert len(oof) > len(base)  # train + val, not val alone
    fold_runs = [r for r in runs if "tune_xray.cv_of" in r.data.tags]
    assert sorted((r.data.tags["tune_xray.cv_of"], r.data.tags["tune_xray.cv_fold"]) for r in fold_runs) == sorted(
        (t, str(k)) for t in top for k in range(2))
    assert all(r.data.params["data.folds"] == "2" for r in fold_runs)
    folded = cv["oof_ensemble"]  # chosen on the cross-validated configurations' out-of-fold predictions
    assert {c["config"] for c in folded["configs"]} <= set(top) and folded["members"] == 2 * len(folded["configs"])
    assert sum(c["weight"] for c in folded["configs"]) == pytest.approx(1.0)
    assert folded["oof_images"] == len(pd.read_csv(cv["rows"][0]["oof_file"])) and not folded["selected"]
    assert len(folded["member_thresholds"]) == folded["members"]  # each fold model at its own fold's threshold
    assert set(folded["decisions_test"]) == {"vote", "averaged_oof_thresholds"}
    assert folded["registered"]["uri"] == "models:/tiny-cv/1"
    assert folded["minus_search_ensemble"]["value"] == pytest.approx(
        folded["test"]["value"] - summary["ensemble"]["test"]["ensemble"]["value"])
    assert json.loads((exp / "test_reads.json").read_text())[-1]["by"].startswith("the cross-validation")
    # held to the search's budget, each configuration costed as its fold models served together; its cost said
    assert folded["cost"]["budget"] == {"latency_ms": 1e6} and folded["cost"]["served_latency_ms"] > 0
    assert folded["cost"]["latency_ms_sum"] > 0
    # compared with the search's ensemble by name: its run and the hash of the test predictions it kept
    told = summary["ensemble"]["test_predictions"]
    assert folded["search_ensemble"] == told and told["run_id"] == summary["ensemble"]["registered"]["run_id"]
    from tune_xray.cv import search_ensemble_test

    (exp / told["file"]).unlink(missing_ok=True)  # (the re-selections above wrote none: --record reads test)
    assert search_ensemble_test(Experiment.at(exp), summary["ensemble"])[1].endswith("test predictions, is gone")
    (exp / told["file"]).write_text("path,p_x\n")  # another selection's
    assert "is not the search's ensemble's (sha256 " in search_ensemble_test(Experiment.at(exp), summary["ensemble"])[1]
    # the search's model: the validation ensemble (select_on: val), which predict <experiment> means too
    from tune_xray.predict import resolve_model

    assert summary["search_model"]["uri"] == summary["ensemble"]["registered"]["uri"]
    assert resolve_model(str(exp))[0] == "models:/tiny/latest"
    version = client.get_model_version("tiny-cv", "1")
    assert "each fold model decides at the threshold chosen on its own validation fold" in version.description
    from tune_xray.summary import print_summary
    print_summary(summary, "")
    out = capsys.readouterr().out
    assert "Pareto front on best_val_mean_auroc (max), latency_ms (min)" in out and "cross-validation:" in out
    assert "out-of-fold ensemble" in out and "early-stopped on the same fold" in out
    assert "budget 1e+06 ms" in out
    # a budget no configuration's fold models fit together: an outcome, nothing read or registered, and the
    # record says so
    from tune_xray.cv import oof_ensemble
    from tune_xray.report.record import render_record

    reads = len(json.loads((exp / "test_reads.json").read_text()))
    none = oof_ensemble(Experiment.at(exp), summary, cv, None, budget={"latency_ms": 1e-6})
    assert none["fits"] is False and none["registered"] is None and none["nearest"]["latency_ms"] > 1e-6
    assert len(json.loads((exp / "test_reads.json").read_text())) == reads
    record = render_record({**summary, "cv": {**cv, "oof_ensemble": none}})
    assert "The ensemble chosen out of fold</h3><p>None: no cross-validated configuration fits the budget" in record


def test_the_driver_bench_swaps_in_a_trainable_of_the_trial_drivers_signature():
    """scripts/bench_driver.py times the real search path with `trial_driver` replaced by made-up reports: a
    replacement whose keywords drifted from trial_driver's would only fail when someone benchmarks."""
    import importlib.util
    import inspect

    from tune_xray.trial import trial_driver

    spec = importlib.util.spec_from_file_location("bench_driver", Path(__file__).parents[1] / "scripts/bench_driver.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert list(inspect.signature(bench.made_up_trial).parameters) == list(inspect.signature(trial_driver).parameters)


def test_a_latency_limit_is_judged_on_the_figure_measured_alone_after_the_trials():
    """No trial judges its own latency (taken while other trials may share its device); after the trials, the
    completed ones measured again alone are judged: one over the limit becomes infeasible with the figure and where
    it was taken, leaves the ranking, and the search's best is the next; one pruned or already infeasible is left
    as it was."""
    from tune_xray.summary import judge_limits, ranked

    objectives = [{"name": "m", "mode": "max"}, {"name": "latency_ms", "mode": "min"}]
    rows = [{"trial": f"t00{i}", "name": f"t00{i}", "trial_id": str(i), "mlflow_run_id": None, "status": status,
             "reason": "", "m": m,
             "cost": {"latency_ms": ms, "params_m": 1.0}} for i, (status, m, ms) in enumerate(
        [("complete", 0.9, 30.0), ("complete", 0.8, 10.0), ("pruned", None, 50.0), ("infeasible", None, 1.0)])]
    summary = {"metric": "m", "requested": 4, "objectives": objectives, **ranked(rows, 4, objectives)}
    assert summary["best"]["trial"] == "t000" and summary["complete"] == 2
    over = judge_limits(summary, {"latency_ms": 25.0, "params_m": 0.5}, "alone on the driver's cpu")
    assert [r["trial"] for r in over] == ["t000"]  # params_m is the trial's own verdict: not judged again here
    assert over[0]["reason"] == "latency_ms 30 over its limit 25 (measured again alone on the driver's cpu)"
    assert (summary["best"]["trial"], summary["complete"], summary["infeasible"]) == ("t001", 1, 2)
    assert [r["trial"] for r in summary["pareto_front"]] == ["t001"] and summary["rows"][2]["status"] == "pruned"


def test_a_resumed_searchs_pickled_sync_follows_this_driver():
    """Tune pickles the search's callbacks and a resume restores them as they were: the resume sync then syncs the
    experiment this driver runs (another machine's local directory), not the first run's."""
    import pickle
    from types import SimpleNamespace

    from tune_xray.driver import this_driver
    from tune_xray.pipeline import ResumeSync

    synced = []
    first = SimpleNamespace(remote=True, sync_resume=lambda: synced.append("first machine"))
    restored = pickle.loads(pickle.dumps(ResumeSync(SimpleNamespace(remote=True, sync_resume=None), every=0.0)))
    restored.experiment = first  # as it was pickled (a namespace's lambda does not pickle)
    here = SimpleNamespace(remote=True, sync_resume=lambda: synced.append("this machine"))
    with this_driver(experiment=here):
        restored.on_trial_complete(0, [], None)
    restored.on_trial_complete(0, [], None)
    assert synced == ["this machine", "first machine"]
