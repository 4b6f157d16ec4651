"""The external record: the search's registered model measured once on each data source from elsewhere
(`--external SPEC`, repeatable) — another hospital's images, another labeler's labels. Internal numbers flatter: a
ChestX-ray14 ensemble reported at 0.858 mean AUROC internally drops to 0.650 on external CheXpert (SEEDS.md's
2026 study); this record says how far ours drops.

Each source is read and checked before the search starts (`check_external`: one error, exit 2) and measured after
every choice, on the model the search registered (`record_external`) — nothing that selects reads it. Labels are
matched by name; those absent in one or the other are named. AUROC per matched label with its 95 % bootstrap
interval over patients (images where the source has none), its mean over the labels with both classes there, and
sensitivity / specificity at the model's validation thresholds. Each record goes to summary.json, the report (its
table beside the internal test record), the registered model version (tags) and test_reads.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import DataConfig
from .data.loader import check_split_keys
from .data.sources import TABLE_KINDS, DatasetIndex, describe_data, read_source
from .data.splits import DataError
from .driver import driver_device
from .experiment import Experiment, TrialTask, trial_data
from .metrics import (
    auroc_intervals,
    auroc_per_label,
    ci_text,
    interval,
    patient_bootstrap,
    resampling_units,
    scored_labels,
    weighted_decision_metrics,
)
from .record.names import EXTERNAL_DIR
from .request import SearchRequest


@dataclass(frozen=True)
class ExternalSource:
    """One external source as checked before the search: its index, the rows measured and the labels matched."""

    spec: str
    index: DatasetIndex
    rows: np.ndarray
    matched: list[str]
    absent_in_source: list[str]
    absent_in_model: list[str]  # or never trained (no positive in the model's train split): not scored

    def line(self) -> str:
        """What the search says of it before any trial."""
        frame = self.index.frame.iloc[self.rows]
        patients = frame["patient_id"].dropna().nunique()
        who = f"{patients:,} patients" if patients else "no patient ids"
        out = (f"external {self.spec}: {len(self.rows):,} images ({who}); {len(self.matched)} label(s) matched by "
               f"name: {', '.join(self.matched)}")
        if self.absent_in_source:
            out += f"; not in it: {', '.join(self.absent_in_source)}"
        if self.absent_in_model:
            out += f"; not in the model (or never trained): {', '.join(self.absent_in_model)}"
        return out


def external_data(spec: str, internal: DataConfig) -> DataConfig:
    """How an external source is read: its own layout and splits, the search's label policies where it is a label
    table (U-Ones / U-Zeros / U-Ignore, blank), the search's data.table for a csv table; nothing else of the
    search's data settings (they describe another source)."""
    kind = spec.partition(":")[0]
    cells = {"uncertain": internal.uncertain, "missing": internal.missing} if kind in TABLE_KINDS else {}
    table = {"table": internal.table} if kind == "csv" else {}
    return DataConfig(source=spec, cache_size=internal.cache_size, cache_dir=internal.cache_dir, **cells, **table)


def check_external(specs, split: str, internal: DataConfig, classes, task: str,
                   untrained=()) -> list[ExternalSource]:
    """Read and check every external source before compute: one DataError naming the source where it cannot be
    read, has no image in `split` or shares no label with the model. The model's `untrained` labels (no positive in
    its train split) are not scored here either, as in the internal record."""
    out = []
    for spec in specs:
        cfg = external_data(spec, internal)
        check_split_keys(cfg)
        index = read_source(spec, cfg.split, cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                            (cfg.synthetic_images, cfg.synthetic_size, cfg.synthetic_seed), cfg.cache_dir,
                            None, None, cfg.table, cfg.uncertain, cfg.views, cfg.missing)
        rows = np.arange(len(index.frame)) if split == "all" else index.rows(split)
        if not len(rows):
            raise DataError(f"--external {spec}: no image in its '{split}' split (--external-split)")
        model = [classes[j] for j in scored_labels(task, classes, untrained)]  # binary: the positive class
        matched = [c for c in model if c in index.classes]
        if not matched:
            raise DataError(f"--external {spec}: none of its labels {list(index.classes)} is one the model predicts "
                            f"({list(model)}); labels are matched by name")
        out.append(ExternalSource(spec, index, rows, matched, [c for c in model if c not in index.classes],
                                  [c for c in index.classes if c not in model]))
    return out


def _predict(predictor, paths: list[str], batch: int = 64) -> tuple[np.ndarray, pd.DataFrame]:
    """(members' probabilities (M, n, C), the served frame: probabilities and decisions) of every image."""
    from .serving import read_image

    members = np.concatenate([predictor.member_probabilities([read_image(p) for p in paths[s:s + batch]], batch)
                              for s in range(0, len(paths), batch)], axis=1)
    return members, predictor.frame(np.tensordot(predictor.weights, members, axes=1), members)


def _entry(values: np.ndarray, point: float) -> dict:
    low, high = interval(values)
    return {"value": point, "ci_low": low, "ci_high": high}


def measure(source: ExternalSource, predictor, resamples: int = 1000, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """One source's record and its predictions (path, patient_id, y_<label> as the source says, p_<label>)."""
    frame = source.index.frame.iloc[source.rows].reset_index(drop=True)
    members, served = _predict(predictor, frame["path"].tolist())
    classes = list(predictor.classes)
    columns = [classes.index(c) for c in source.matched]
    prob = np.tensordot(predictor.weights, members, axes=1)[:, columns]
    truth = frame[source.matched].to_numpy(dtype=np.float64)  # NaN where the source's policy masks an entry
    units = resampling_units(frame["patient_id"], frame["path"])
    boot = patient_bootstrap(units, resamples, seed)
    points, skipped = auroc_per_label(truth, prob, source.matched)
    intervals = auroc_intervals(truth, prob, units, source.matched, weights=boot)
    record = {"source": source.spec, "data": describe_data(source.index.facts()), "images": len(frame),
              "patients": int(frame["patient_id"].dropna().nunique()), "matched": source.matched,
              "absent_in_source": source.absent_in_source, "absent_in_model": source.absent_in_model,
              "undefined": skipped, "masked": int(np.isnan(truth).sum()),
              "mean_auroc": {"value": float(np.mean(list(points.values()))) if points else float("nan"),
                             "ci_low": intervals["mean_auroc"][0], "ci_high": intervals["mean_auroc"][1]},
              "mean_auroc_labels": len(points), "per_label": {}}
    decided = _decisions(served, source.matched, predictor)
    at_one = weighted_decision_metrics(truth, decided, np.ones(len(frame)), False)
    resampled = weighted_decision_metrics(truth, decided, boot, False)
    for j, label in enumerate(source.matched):
        known = np.isfinite(truth[:, j])
        entry = {"positives": int((truth[known, j] == 1).sum()), "negatives": int((truth[known, j] == 0).sum())}
        if label in points:
            entry["auroc"] = {"value": points[label], "ci_low": intervals[f"auroc/{label}"][0],
                              "ci_high": intervals[f"auroc/{label}"][1]}
        for name in ("sensitivity", "specificity"):
            if np.isfinite(at_one[name][0, j]):
                entry[name] = _entry(resampled[name][:, j], float(at_one[name][0, j]))
        record["per_label"][label] = entry
    predictions = frame[["path", "patient_id"]].copy()
    for j, label in enumerate(source.matched):
        predictions[f"y_{label}"] = pd.array(np.where(np.isfinite(truth[:, j]), truth[:, j], np.nan), dtype="Int64")
        predictions[f"p_{label}"] = prob[:, j]
    return record, predictions


def _decisions(served: pd.DataFrame, labels: list[str], predictor) -> np.ndarray:
    """(n, labels) 0/1 of the served decisions (NaN where a label has no threshold): multi-label y_<label>; a
    single-label model's `label` column, one-vs-rest."""
    if predictor.task == "multilabel":
        return np.stack([served[f"y_{c}"].to_numpy(dtype=np.float64, na_value=np.nan) if f"y_{c}" in served
                         else np.full(len(served), np.nan) for c in labels], axis=1)
    return np.stack([(served["label"] == c).to_numpy(dtype=np.float64) for c in labels], axis=1)


def record_external(experiment: Experiment, sources: list[ExternalSource], model: dict, device: str = "cpu",
                    resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Measure the search's registered `model` (summary's search_model) on each source; each read counted in
    test_reads.json, each record's numbers set as tags on the model version, its predictions kept in
    EXTERNAL_DIR/."""
    from .serving import load_predictor

    predictor = load_predictor(model["uri"], device, experiment.tracking_uri)
    records = []
    for i, source in enumerate(sources):
        record, predictions = measure(source, predictor, resamples, seed)
        record["predictions"] = experiment.write_table(f"{EXTERNAL_DIR}/predictions_{i}.csv", predictions)["file"]
        record["test_reads"] = experiment.note_test_read(f"the external record on {source.spec}")
        record["model"] = model["uri"]
        records.append(record)
    _tag_version(experiment.tracking_uri, model, records)
    return records


def wanted(request: SearchRequest) -> bool:
    return bool(request.external)


def run(experiment: Experiment, request: SearchRequest) -> dict:
    """The search's step, after every choice (nothing that selects reads it): the search's model recorded on each
    `--external` source, checked again against the model's labels (and read with the label policies its trials
    had: their config.yaml), on the driver's device; said per source.
    Returns its part of the record (`external`)."""
    summary = experiment.summary()
    if not summary.get("search_model"):
        raise RuntimeError("no registered model to record on the external source(s)")
    best = experiment.trial_dir(summary["best"])
    internal = trial_data(best)
    task = TrialTask.of(best)
    sources = check_external(request.external, request.external_split, internal, task.classes, task.task,
                             task.untrained)
    records = record_external(experiment, sources, summary["search_model"], driver_device(), seed=request.seed)
    for line in external_lines(records):
        print(line, flush=True)
    return {"external": records}


def _tag_version(tracking_uri: str, model: dict, records: list[dict]) -> None:
    """Each record on the registered model version: `external.<i>.source`, `.mean_auroc` with its interval, and
    each label's AUROC as tags; the console's lines at the end of its description (the model card)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    card = client.get_model_version(model["name"], model["version"]).description or ""
    client.update_model_version(model["name"], model["version"], description=card.rstrip() + (
        "\n\n## External record (after every choice; labels matched by name)\n\n"
        + "\n".join(f"- {line}" for line in external_lines(records)) + "\n"))
    for i, record in enumerate(records):
        tags = {"source": record["source"], "images": str(record["images"]),
                "mean_auroc": ci_text(record["mean_auroc"]) or "undefined",
                **{f"auroc/{label}": ci_text(entry["auroc"]) for label, entry in record["per_label"].items()
                   if "auroc" in entry}}
        for key, value in tags.items():
            client.set_model_version_tag(model["name"], model["version"], f"external.{i}.{key}", value)


def external_lines(records: list[dict]) -> list[str]:
    """The console's lines of the external record."""
    return [f"external {r['source']}: mean AUROC {ci_text(r['mean_auroc']) or 'undefined'} over "
            f"{r['mean_auroc_labels']} of {len(r['matched'])} matched label(s), {r['images']:,} images "
            f"({r['patients']:,} patients); test reads {r['test_reads']}" for r in records]
