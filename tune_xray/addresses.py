"""Where a person looks at a search: the MLflow UI's runs table and run pages, as addresses with any password in the
tracking URI masked (credentials.mask parses the URL). No MLflow import: the summary and the report print these."""

from __future__ import annotations

from .credentials import mask


def ui_base(tracking_uri: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where the MLflow UI of this store is: the tracking server itself, or `mlflow ui`'s default address."""
    return mask(tracking_uri if tracking_uri.startswith("http") else ui).rstrip("/")


def runs_table_url(tracking_uri: str, experiment_id: str, order_by: str | None = None, mode: str = "max") -> str:
    """The experiment's runs table (MLflow 3's UI otherwise opens a GenAI overview), best first by the metric
    `order_by` (the trials' and the ensemble's `selected_val_…`)."""
    url = f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return url + (f"&orderByKey=metrics.%60{order_by}%60&orderByAsc={str(mode == 'min').lower()}" if order_by else "")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run that works in the UI whatever its address (descriptions render markdown)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)"
