"""The search's models in MLflow's registry: the chosen ensemble (and the cross-validation's out-of-fold one) logged
as one pyfunc model (serving.EnsembleModel) in an `ensemble` run under the search's parent, with its record as a
table and its description, and registered under the experiment's name. Apart from tracking.py (a trial's runs,
which the search's Tune callbacks write) so that logging a trial never loads the serving model's code."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from .addresses import run_link
from .credentials import mask
from .metrics import ci_text
from .record.names import bare
from .record.text import plural
from .serving import EnsembleModel
from .tracking import CV_TAG, DESCRIPTION_TAG, STATUS_TAG, experiment_id_of, find_parent, log_table


def model_name(run_name: str) -> str:
    """A logged model's name after its run (`t005 vmamba_s sgd …` → `t005-vmamba_s-sgd…`): MLflow 3 lists logged
    models by name, and "model" for each told nothing."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:100] or "model"


ENSEMBLE_LABELS = ("ensemble", "best_single", "top_k", "ensemble_minus_best_single")
SPLIT_PREFIX = {"val": ("selected_val", "selection_ci"), "test": ("record_test", "ci")}


def ensemble_record(result: dict) -> pd.DataFrame:
    """Every number of the ensemble's record — the ensemble, the best single trial, the top-K mean and the paired
    difference, on val (the selection set) and test (the record) — as one table with its intervals."""
    rows = []
    for split in ("val", "test"):
        for label, entry in (result.get(split) or {}).items():
            rows.append({"split": split, "who": label, "metric": bare(result["metric"]), **entry})
        for label, extra in ((result.get("single_label") or {}).get(split) or {}).items():
            rows += [{"split": split, "who": label, "metric": name, **entry} for name, entry in extra.items()]
    return pd.DataFrame(rows)


def ensemble_metrics(result: dict) -> dict[str, float]:
    """The ensemble's own numbers under the names trials use (`selected_val_mean_auroc` and its interval,
    `record_test_…`), so that it sorts beside them in the runs table."""
    out = {}
    for split, (prefix, ci) in SPLIT_PREFIX.items():
        entries = {bare(result["metric"]): (result.get(split) or {}).get("ensemble")}
        entries.update(((result.get("single_label") or {}).get(split) or {}).get("ensemble") or {})
        for name, entry in entries.items():
            if entry:
                out.update({f"{prefix}_{name}": entry["value"], f"{prefix}_{name}_{ci}_low": entry["ci_low"],
                            f"{prefix}_{name}_{ci}_high": entry["ci_high"]})
    return out


def ensemble_description(result: dict, members: pd.DataFrame, experiment_id: str) -> str:
    metric, val, test = bare(result["metric"]), result["val"], result.get("test")
    links = ", ".join(run_link(experiment_id, m.mlflow_run_id, f"{m.name.split()[0]} ×{m.weight:.2f}")
                      if m.mlflow_run_id else m.name for m in members.itertuples())
    lines = [f"**Ensemble** of {plural(len(members), 'trial')} of {result['pool']} ({result['method']}), chosen on "
             f"validation {metric} only: {links}.",
             f"Validation (the selection set, optimistic): ensemble {ci_text(val['ensemble'])}, best single "
             f"{ci_text(val['best_single'])}."]
    if test:
        lines.append(f"Test (the record, read after every choice): ensemble {ci_text(test['ensemble'])}, best "
                     f"single {ci_text(test['best_single'])}.")
    return "\n\n".join(lines)


def _log_pyfunc(checkpoints: list[str], weights: list[float], thresholds, example: pd.DataFrame,
                name: str, registered_name: Optional[str] = None, member_thresholds=None):
    """Log an EnsembleModel into the active run (and register it); returns the ModelInfo. `member_thresholds`:
    one row per member, for an ensemble that decides by the members' vote (serving.EnsemblePredictor)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "ensemble_spec.json"
        spec.write_text(json.dumps({"weights": weights, "thresholds": thresholds,
                                    "member_thresholds": member_thresholds}))
        artifacts = {"ensemble": str(spec), **{f"member_{i}": c for i, c in enumerate(checkpoints)}}
        model = EnsembleModel()
        model.load_context(type("Context", (), {"artifacts": artifacts, "model_config": {"device": "cpu"}})())
        output = model.predict(None, example)
        # the package's code travels with the model (code_paths) and every requirement is a published package:
        # it loads where tune_xray is not installed; `device` is a model_config key, so loading can set it
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # MLflow's own chatter: the
            warnings.simplefilter("ignore")  # 0/1 decisions as int (none is ever missing), "registered", progress
            return mlflow.pyfunc.log_model(name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                                           artifacts=artifacts,
                                           code_paths=[str(Path(__file__).parent)], model_config={"device": "cpu"},
                                           signature=infer_signature(example, output), input_example=example,
                                           registered_model_name=registered_name,
                                           pip_requirements=_requirements())


def _requirements() -> list[str]:
    """The published packages the pyfunc imports, pinned to this environment (tune_xray itself travels as code;
    MLflow's own inference loads the model in a subprocess: seconds per model)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "torchvision", "timm", "kornia", "pydicom", "pandas", "numpy",
                                           "pillow", "pydantic", "pyyaml", "scikit-learn", "safetensors", "mlflow")]


def _registered(name: str, version, run_id: str, tracking_uri: str) -> dict:
    """What a registration returns (and ensemble.json keeps, and predict resolves): the model's URI and store."""
    return {"name": name, "version": str(version), "uri": f"models:/{name}/{version}", "run_id": run_id,
            "tracking_uri": mask(tracking_uri)}  # (predict reveals it; another process gets the secret again)


def log_ensemble(tracking_uri: str, experiment_dir: Path, result: dict, members: pd.DataFrame,
                 out_dir: Path) -> dict:
    """The selection as an `ensemble` child run of the search's parent: params, members (table and params),
    val and record-test metrics with CI bounds, the selection curve, the model card, and the ensemble as one
    pyfunc registered under the experiment's name (a new version per selection, its metrics as version tags).
    Each member's trial run gets its own model and a tag with its weight. Returns the registered model."""
    parent = find_parent(experiment_dir)
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    name, experiment_id = experiment_dir.name, experiment_id_of(tracking_uri, parent)
    metrics = ensemble_metrics(result)
    run_name = f"ensemble {result['method']} {len(members)} of {result['pool']}"
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"mlflow.parentRunId": parent, "tune_xray.role": "ensemble",
                                  STATUS_TAG: "complete",
                                  DESCRIPTION_TAG: ensemble_description(result, members, experiment_id)})
    params = {"method": result["method"], "size": result["size"], "bags": result["bags"], "seed": result["seed"],
              "resamples": result["resamples"], "pool": result["pool"], "selection_metric": result["metric"],
              **{f"{split}_hash": value for split, value in result["hashes"].items()},
              **{f"member.{m['trial']}": round(m["weight"], 4) for m in result["members"]},
              **{f"budget.{k}": v for k, v in result["cost"]["budget"].items()}}
    metrics.update({k: v for k, v in result["cost"].items() if isinstance(v, float)})  # served latency, sums
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in metrics.items()])
    log_table(client, run.info.run_id, ensemble_record(result), "ensemble_record.json")
    for file in ("members.csv", "model_card.md", "ensemble.json", "predictions_test.csv", "selection_curve.png"):
        if (out_dir / file).is_file():
            client.log_artifact(run.info.run_id, str(out_dir / file))
    example = pd.DataFrame({"path": [result["example_path"]]})  # a validation image: test stays unread
    checkpoints = [str(Path(d) / "best.pt") for d in members["dir"]]
    with mlflow.start_run(run_id=run.info.run_id):
        info = _log_pyfunc(checkpoints, members["weight"].tolist(), result.get("thresholds"), example,
                           model_name(run_name), name)
    version = info.registered_model_version
    for key, value in metrics.items():
        if "ci_" not in key:
            client.set_model_version_tag(name, version, key, f"{value:.4f}")
    client.update_model_version(name, version, description=(out_dir / "model_card.md").read_text())
    for member in members.itertuples():  # each member's own run: its model and its weight
        if member.mlflow_run_id:
            client.set_tag(member.mlflow_run_id, "tune_xray.ensemble_weight", f"{member.weight:.4f}")
            ended = client.get_run(member.mlflow_run_id).info  # reopened to log into: its own end stays its end
            with mlflow.start_run(run_id=member.mlflow_run_id):
                _log_pyfunc([str(Path(member.dir) / "best.pt")], [1.0], None, example, model_name(member.name))
            client.set_terminated(member.mlflow_run_id, status=ended.status, end_time=ended.end_time)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return _registered(name, version, run.info.run_id, tracking_uri)


def log_oof_ensemble(tracking_uri: str, experiment_dir: Path, result: dict, checkpoints: list[str],
                     weights: list[float], example_path: str, select: bool = False) -> dict:
    """The cross-validation's out-of-fold ensemble (tune_xray.cv) as a `cv-ensemble` child run of the search's
    parent: its out-of-fold and test record beside the search's ensemble, and its fold models as one pyfunc that
    decides by their vote, registered as `<experiment>-cv` — and with `select` as `<experiment>` too, the search's
    model. Returns the registered model (the search's name when `select`)."""
    parent = find_parent(experiment_dir)
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    name, experiment_id = f"{experiment_dir.name}-cv", experiment_id_of(tracking_uri, parent)
    configs = "+".join(c["config"] for c in result["configs"])
    run_name = f"cv oof ensemble {configs} ×{result['members']}"
    description = result["card"]  # the model card, as the search's ensemble's version has its own
    run = client.create_run(experiment_id, run_name=run_name, tags={
        "mlflow.parentRunId": parent, "tune_xray.role": "cv-ensemble", STATUS_TAG: "complete",
        CV_TAG: configs, DESCRIPTION_TAG: description})
    metric, now = bare(result["metric"]), int(time.time() * 1000)
    metrics = {f"oof_val_{metric}": result["oof"]["value"], f"oof_val_{metric}_ci_low": result["oof"]["ci_low"],
               f"oof_val_{metric}_ci_high": result["oof"]["ci_high"], f"record_test_{metric}": result["test"]["value"],
               f"record_test_{metric}_ci_low": result["test"]["ci_low"],
               f"record_test_{metric}_ci_high": result["test"]["ci_high"],
               **{f"record_test_vote_{k}": v["value"] for k, v in result["decisions_test"]["vote"].items()}}
    params = [Param("configs", configs), Param("members", str(result["members"])),
              Param("decision", "vote of the fold models at their own thresholds")]
    client.log_batch(run.info.run_id, params=params,
                     metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(v)])
    with mlflow.start_run(run_id=run.info.run_id):
        info = _log_pyfunc(checkpoints, weights, None, pd.DataFrame({"path": [example_path]}), model_name(run_name),
                           name, result["member_thresholds"])
    client.update_model_version(name, info.registered_model_version, description=description)
    registered = _registered(name, info.registered_model_version, run.info.run_id, tracking_uri)
    if select:  # the search's model: a version of the experiment's name, the same logged model
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            version = mlflow.register_model(info.model_uri, experiment_dir.name)
        client.update_model_version(experiment_dir.name, version.version, description=description)
        client.set_model_version_tag(experiment_dir.name, version.version, "tune_xray.selected_on", "out of fold")
        registered = {**_registered(experiment_dir.name, version.version, run.info.run_id, tracking_uri),
                      "also": registered["uri"]}
    client.set_terminated(run.info.run_id, status="FINISHED")
    return registered
