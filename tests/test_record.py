"""The record's room (tune_xray/record/): its names import nothing, a trial's status is read from its last report
alone, and the tools that read a finished search start without Ray or Optuna (issue 40)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_xray.record import names
from tune_xray.record.status import ssl_from_text, status_of, stopped_at, trial_status

READERS = ("tune_xray.record.names", "tune_xray.record.status", "tune_xray.experiment", "tune_xray.summary",
           "tune_xray.ensemble", "tune_xray.report", "tune_xray.predict")


def test_the_names_module_is_a_leaf():
    """record/names.py imports nothing (Ray's ray.tune.result is the model): any room may take its names from it
    without pulling in another."""
    tree = ast.parse(Path(names.__file__).read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert set(names.COSTS) <= set(names.COST_METRICS)  # the costs a study may name are among those measured
    assert set(names.JUDGED_IN_TRIAL) <= set(names.COSTS)
    assert len(set(names.STATUSES)) == len(names.STATUSES)


@pytest.mark.parametrize("module", READERS)
def test_reading_a_search_loads_neither_ray_nor_optuna(module):
    """In a fresh interpreter, importing a reader (the report, the ensemble, predict, the record) leaves `ray` and
    `optuna` out of sys.modules: only what starts trials imports them."""
    code = f"import sys, {module}; print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} imports {out.strip()}"


def test_a_trials_status_comes_from_its_last_report():
    """complete / diverged / collapsed / infeasible are the trial's own word; no word is a scheduler's stop
    (pruned); a raise is an error whatever the report says."""
    assert trial_status({names.STATUS: "complete"}, error=False) == "complete"
    assert trial_status({names.STATUS: "collapsed"}, error=False) == "collapsed"
    assert trial_status({names.TIME_ATTR: 2}, error=False) == "pruned"
    assert trial_status(None, error=False) == "pruned"
    assert trial_status({names.STATUS: "complete"}, error=True) == "error"


def test_where_a_trial_stopped_names_its_phase():
    """A trial stopped during BYOL says its BYOL epoch; one that reached the fine-tune says the fine-tune's."""
    assert stopped_at({names.SSL_TIME_ATTR: 4, names.SSL_PHASE: "byol"}) == "BYOL epoch 4"
    assert stopped_at({names.SSL_TIME_ATTR: 9, names.TIME_ATTR: 2, names.SSL_PHASE: "byol"}) == "epoch 2"
    pruned = SimpleNamespace(last_result={names.SSL_TIME_ATTR: 3, names.SSL_PHASE: "cass"}, status="TERMINATED",
                             error_file=None)
    assert status_of(pruned, failed=False) == ("pruned", "stopped by ASHA after CASS epoch 3")


def test_a_failed_trials_reason_is_its_errors_last_line(tmp_path):
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n\n")
    failed = SimpleNamespace(last_result={}, status="ERROR", error_file=str(error))
    assert status_of(failed, failed=False) == ("error", "RuntimeError: CUDA out of memory")
    assert ssl_from_text({"trial": "t003", "key": "1f2e3d4c5b"}) == "reused from t003's run (key 1f2e3d4c…)"
    assert ssl_from_text({"trial": "t003", "init_from": "runs/byol"}) == "from runs/byol (model.init_from; its t003)"


def _row(trial: int, status: str, value: float | None, **more) -> dict:
    """A trial row as summary.summarize writes it (the layout of today's summary.json)."""
    return {"trial": f"t{trial:03d}", "name": f"t{trial:03d} lr=0.01", "trial_id": f"id{trial}", "status": status,
            "reason": "", "best_val_mean_auroc": value, "epochs_done": 3, "selected_epoch": 2 if value else None,
            "labels_averaged": 14, "selection_ci": [None, None], "mlflow_run_id": None,
            "cost": {"latency_ms": 1.5, "params_m": 0.1, "gflops": 0.01}, "node_id": None, "scan_backend": "none",
            "resolved": {"optuna_trial": trial}, "sampled": {}, **more}


def today_summary() -> dict:
    rows = [_row(0, "complete", 0.61, ssl_epochs_done=9, ssl_phase="byol", ran_with={"device": "cpu"},
                 started_from={"test_resnet": {"file": None, "scratch": "model.pretrained: false"}}),
            _row(1, "collapsed", None, ssl_epochs_done=3, ssl_phase="byol", ran_with={"device": "cpu"},
                 started_from={}),
            _row(2, "interrupted", None, epochs_done=None, ran_with=None, started_from=None)]  # never reported
    return {"study": "byol", "file": "byol.yaml", "metric": "best_val_mean_auroc", "mode": "max", "requested": 3,
            "objectives": [{"name": "best_val_mean_auroc", "mode": "max"}], "status": "complete", "trials": 3,
            "complete": 1, "pruned": 0, "infeasible": 0, "diverged": 0, "collapsed": 1, "error": 0,
            "interrupted": 1, "best": rows[0], "top": rows[:1], "rows": rows, "pareto_front": None,
            "search_runs_s": [10.0], "wall_time_s": 10.0, "resources": {"workers_per_trial": 1},
            "resources_runs": [{"workers_per_trial": 1}], "failed": {},
            "ensemble": {"method": "caruana", "members": [{"trial": "t000", "weight": 1.0}],
                         "test_predictions": {"file": "ensemble/predictions_test.csv", "sha256": "ab12"}},
            "repeats": {"rows": [{"config": "t000", "values": [0.6, 0.62]}], "comparisons": [],
                        "trials": [{"trial": "t000/seed1000", "repeat_of": "t000", "status": "complete"}]},
            "cv": {"rows": [], "trials": [{"trial": "t000/fold0", "cv_of": "t000", "fold": 0, "status": "error"}],
                   "metric": "val_mean_auroc", "folds": 5, "top": 1, "kendall_tau": None},
            "external": [{"source": "nih:/data/other", "images": 40,
                          "mean_auroc": {"value": 0.7, "ci_low": 0.6, "ci_high": 0.8}}],
            "cost_remeasured": {"device": "cpu", "trials": ["t000"], "batch_sizes": [1, 32], "repeats": 10,
                                "why": "the trials on the Pareto front"}}


def format_two_summary() -> dict:
    """summary.json as written at search.json's format 2 (f3249e2, 2026-12-02): before resources_runs, a row's
    ran_with and started_from, the SSL phase's fields and the collapsed count."""
    summary = today_summary()
    for key in ("resources_runs", "collapsed"):
        summary.pop(key)
    summary["rows"] = [{k: v for k, v in row.items() if k not in ("ran_with", "started_from", "ssl_epochs_done",
                                                                  "ssl_phase")} for row in summary["rows"]]
    summary["rows"][1]["status"] = "pruned"
    summary["complete"], summary["pruned"] = 1, 1
    summary["best"], summary["top"] = summary["rows"][0], summary["rows"][:1]
    return summary


@pytest.mark.parametrize("written", [today_summary, format_two_summary], ids=["today", "format 2"])
def test_every_summary_since_format_two_loads_typed(tmp_path, written):
    """Experiment reads back what it wrote, and a summary of each layout since format 2 (hand-made here, shaped as
    each was written), as the typed record: statuses, rows, the objective by the study's metric name."""
    from tune_xray.experiment import Experiment

    experiment = Experiment(tmp_path / "runs" / "byol", str(tmp_path / "runs"), "byol")
    experiment.directory.mkdir(parents=True)
    experiment.write_summary(written())
    record = experiment.record()
    assert record.best.trial == "t000" and record.best.value(record.metric) == 0.61
    assert [row.status for row in record.rows][0] == "complete"
    assert sum(record.counts().values()) == record.trials
    assert experiment.summary() == json.loads(json.dumps(written()))  # the dict readers still take, unchanged


def test_a_malformed_summary_is_one_error_naming_the_file_and_the_field(tmp_path):
    from tune_xray.experiment import Experiment, ExperimentError
    from tune_xray.record.names import SUMMARY_FILE

    experiment = Experiment(tmp_path / "runs" / "byol", str(tmp_path / "runs"), "byol")
    experiment.directory.mkdir(parents=True)
    summary = today_summary()
    summary["rows"][1]["status"] = "finished"  # no such status
    (experiment.directory / SUMMARY_FILE).write_text(json.dumps(summary))
    with pytest.raises(ExperimentError, match=r"summary.json: rows\.1\.status: .*'complete'"):
        experiment.summary()
    with pytest.raises(ExperimentError, match=r"rows\.1\.status"):  # a writer's slip never reaches the disk
        experiment.write_summary(summary)
    assert json.loads((experiment.directory / SUMMARY_FILE).read_text())["rows"][1]["status"] == "finished"


def _experiment(tmp_path):
    from tune_xray.experiment import Experiment

    experiment = Experiment(tmp_path / "runs" / "byol", str(tmp_path / "runs"), "byol")
    experiment.directory.mkdir(parents=True)
    return experiment


def test_the_steps_results_load_typed_and_a_search_without_an_ensemble_says_why(tmp_path):
    """What the steps after the search leave has its model (record.models): members with weights, repeat and fold
    trials as rows with a status, an external record's interval, the re-measured trials; and a budget no trial fits
    is an ensemble record that says so instead of naming a method."""
    experiment = _experiment(tmp_path)
    summary = today_summary()
    experiment.write_summary(summary)
    record = experiment.record()
    assert record.ensemble.members[0].weight == 1.0 and record.ensemble.test_predictions.sha256 == "ab12"
    assert record.repeats.trials[0].status == "complete" and record.cv.trials[0].status == "error"
    assert record.external[0].mean_auroc.ci_low == 0.6 and record.cost_remeasured.trials == ["t000"]
    summary["ensemble"] = {"fits": False, "why": "no trial fits latency_ms ≤ 1", "budget": {"latency_ms": 1.0},
                           "nearest": None, "best_single": None, "registered": None}  # NoFit.outcome
    experiment.write_summary(summary)
    assert experiment.record().ensemble.fits is False


@pytest.mark.parametrize("field, value, where", [
    ("ensemble", {"members": []}, r"summary.json: ensemble: .*names its method"),
    ("cv", {"rows": [], "trials": [{"trial": "t000/fold0"}]}, r"summary.json: cv\.trials\.0\.status"),
    ("cost_remeasured", {"device": "cpu", "trials": "t000"}, r"summary.json: cost_remeasured\.trials"),
])
def test_a_steps_malformed_result_never_reaches_the_disk(tmp_path, field, value, where):
    from tune_xray.experiment import ExperimentError

    experiment = _experiment(tmp_path)
    experiment.write_summary(today_summary())
    before = (experiment.directory / names.SUMMARY_FILE).read_text()
    with pytest.raises(ExperimentError, match=where):
        experiment.write_summary({**today_summary(), field: value})
    assert (experiment.directory / names.SUMMARY_FILE).read_text() == before
    assert [p.name for p in experiment.directory.iterdir()] == [names.SUMMARY_FILE]  # no temporary left


def test_the_experiment_writes_inside_its_directory_whole_and_masked(tmp_path):
    """The one writer: a file in the experiment directory (its folder made), a password in a URL masked, a CSV with
    its content hash; a name that leads out of the directory is refused."""
    import hashlib

    import pandas as pd

    experiment = _experiment(tmp_path)
    card = experiment.write_text("ensemble/model_card.md", "trained from s3://key:secret@bucket/data")
    assert card.read_text() == "trained from s3://key:***@bucket/data"
    umask = os.umask(0)
    os.umask(umask)
    assert card.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any file the user writes, not 0600
    table = experiment.write_table("cv/oof_t000.csv", pd.DataFrame({"path": ["a.png"], "p_x": [0.5]}))
    written = experiment.directory / table["file"]
    assert table["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    assert pd.read_csv(written)["p_x"].tolist() == [0.5]
    for outside in ("../byol2/summary.json", "/tmp/elsewhere.json", "."):
        with pytest.raises(ValueError, match="not a file in"):
            experiment.write_text(outside, "{}")
    experiment.remove("cv/oof_t000.csv")
    assert not written.exists()


def test_predict_finds_the_searchs_model_in_a_hand_made_record(tmp_path):
    """`predict EXPERIMENT` reads the record through the Experiment: the search's model where it names one, the
    budget that none fitted where none was chosen, and a malformed summary as one error naming its field."""
    from tune_xray.data.splits import DataError
    from tune_xray.predict import resolve_model

    experiment = _experiment(tmp_path)
    summary = today_summary()
    summary["search_model"] = {"uri": "models:/byol/3", "latest": "models:/byol/latest", "name": "byol",
                               "version": "3", "tracking_uri": "sqlite:///m.db", "chosen": "", "by": ""}
    experiment.write_summary(summary)
    assert resolve_model(str(experiment.directory)) == ("models:/byol/latest", "sqlite:///m.db")
    summary.pop("search_model")
    summary["ensemble"] = {"fits": False, "why": "no trial fits latency_ms ≤ 1"}
    experiment.write_summary(summary)
    with pytest.raises(DataError, match="no model registered: no trial fits latency_ms ≤ 1"):
        resolve_model(str(experiment.directory))
    summary["rows"][0]["status"] = "done"
    (experiment.directory / names.SUMMARY_FILE).write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"summary.json: rows\.0\.status"):
        resolve_model(str(experiment.directory))


def test_the_steps_after_the_trials_run_in_turn_each_keeping_its_part_of_the_record(tmp_path, monkeypatch, capsys):
    """pipeline.after_trials over sibling stages (here, doubles of the stage interface: `wanted(request)`,
    `run(experiment, request)` → its part of the record): each part kept in summary.json; a stage not wanted
    never runs; a failure is one line and `failed`, and the stages after it still run; a StepFailed keeps the
    result it had."""
    from tune_xray import pipeline
    from tune_xray.record.status import StepFailed
    from tune_xray.request import SearchRequest

    ran = []

    def stage(name, part=None, error=None, wanted=True):
        def run(experiment, request):
            ran.append(name)
            assert experiment.summary()["rows"]  # it reads the record the step before left
            if error is not None:
                raise error
            return part

        return SimpleNamespace(wanted=lambda request: wanted, run=run)

    steps = (("repeats", stage("repeats", wanted=False)),
             ("ensemble", stage("ensemble", error=StepFailed("chosen but not registered", {"ensemble": {"fits": False,
                                                                                                        "why": "x"}}))),
             ("cv", stage("cv", error=OSError("disk full"))),
             ("report", stage("report", {"report": "report.html"})))
    monkeypatch.setattr(pipeline, "STEPS", steps)
    experiment = _experiment(tmp_path)
    summary = {**today_summary(), "failed": {}}
    experiment.write_summary(summary)
    pipeline.after_trials(experiment, summary, SearchRequest("byol"))
    assert ran == ["ensemble", "cv", "report"]
    assert summary["failed"] == {"ensemble": "StepFailed: chosen but not registered", "cv": "OSError: disk full"}
    record = experiment.record()
    assert record.ensemble.fits is False and record.report == "report.html" and record.failed == summary["failed"]
    assert "cv failed: OSError: disk full" in capsys.readouterr().err
