"""The record's room (tune_xray/record/): its names import nothing, a trial's status is read from its last report
alone, and the tools that read a finished search start without Ray or Optuna (issue 40)."""

import ast
import json
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
            "ensemble": {"method": "caruana", "members": []}}


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
