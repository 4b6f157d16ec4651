"""The record's room (tune_xray/record/): its names import nothing, a trial's status is read from its last report
alone, and the tools that read a finished search start without Ray or Optuna (issue 40)."""

import ast
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
