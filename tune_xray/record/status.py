"""A trial's status and where it stopped, from its last report alone (what Tune's `Trial.last_result` holds, or a
stored final.json): the one rule the console line, the summary, the Optuna searcher and MLflow all name a trial by.
Light on purpose: readers of a finished search import it without Ray."""

from __future__ import annotations

from pathlib import Path

from .names import REASON, SSL_PHASE, SSL_TIME_ATTR, STATUS, TIME_ATTR


def trial_status(result: dict | None, error: bool) -> str:
    """complete | diverged | collapsed | infeasible (the trial's own last report; collapsed: its SSL phase's
    representation collapsed, phases.probe.Monitor; infeasible: its measured cost over the
    study's `limits:`, it stopped at its first epoch's end) | error (it raised, retries spent) | pruned (stopped
    by the scheduler before its end). A trial still pending or running when the search stops is `interrupted`
    (see summary.summarize)."""
    if error:
        return "error"
    return (result or {}).get(STATUS) or "pruned"


def status_of(trial, failed: bool) -> tuple[str, str]:
    """A finished Tune trial's status and, where there is one, its reason (one line)."""
    status = trial_status(trial.last_result, failed or trial.status == "ERROR")
    if status == "error":
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
        lines = [line for line in text.splitlines() if line.strip()]
        return status, lines[-1] if lines else "error"
    if status == "pruned":
        return status, f"stopped by ASHA after {stopped_at(trial.last_result)}"
    return status, str(trial.last_result.get(REASON, ""))


def ssl_from_text(entry: dict) -> str:
    """`reused from t003's run (key 1f2e…)` or `from runs/byol:t003 (model.init_from)`: where a fine-tune's SSL
    phase came from."""
    if entry.get("init_from"):
        return f"from {entry['init_from']} (model.init_from; its {entry.get('trial')})"
    return f"reused from {entry.get('trial')}'s run (key {str(entry.get('key'))[:8]}…)"


def stopped_at(result: dict) -> str:
    """Where a trial stopped: `epoch 3` (of its fine-tune), or `BYOL epoch 4` when it never reached the fine-tune."""
    epochs, ssl_epochs = int(result.get(TIME_ATTR) or 0), int(result.get(SSL_TIME_ATTR) or 0)
    if not epochs and ssl_epochs:
        return f"{str(result.get(SSL_PHASE, 'SSL')).upper()} epoch {ssl_epochs}"
    return f"epoch {epochs}"


class StepFailed(RuntimeError):
    """A step after the trials that has a result and then failed (an ensemble chosen but not registered): the
    record keeps `partial`, its part of summary.json, and the failure is said (pipeline's step runner)."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial
