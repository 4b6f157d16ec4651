"""Searches on label tables end to end: the synthetic CheXpert-style table (python -m tune_xray.data synth OUT
--table: its patients, its train/valid split with test sliced by patient, U-Ones, frontal views only), the CheXpert
layout with the uncertain-label policy as a search axis, and the MIMIC-CXR-JPG layout recorded on an external
source."""

import json

import pandas as pd
import yaml

from tests.test_search import SPACE
from tune_xray.data.synthetic import CHEXPERT_FROM_NIH, chexpert_layout, generate, label_table, mimic_layout
from tune_xray.data.tables import CHEXPERT_OBSERVATIONS
from tune_xray.search import main


def _space(tmp_path, name, data=None, params=None, trials=2):
    space = tmp_path / f"{name}.yaml"
    space.write_text(yaml.safe_dump({**{k: v for k, v in SPACE.items() if k != "warm_start"},
                                     "budget": {**SPACE["budget"], "trials": trials},
                                     "params": params or {"supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
                                     "base": {**SPACE["base"], "data": {**SPACE["base"]["data"], **(data or {})}}}))
    return space


def _search(tmp_path, space, spec: str, capsys, *flags) -> str:
    """Run a search on `spec` with its summary in tmp_path/s; its first line (exit 0 asserted)."""
    import ray

    try:
        code = main([str(space), "--data", spec, "--storage", str(tmp_path / "s"), "--no-asha", *flags])
    finally:
        ray.shutdown()
    assert code == 0
    return capsys.readouterr().out.splitlines()[0]


def test_a_search_on_a_chexpert_style_table(tmp_path, capsys):
    root = generate(tmp_path / "cxr", n_images=300, size=64, seed=0, workers=1)
    table = label_table(root)
    data = {"uncertain": "ones", "views": ["PA"],
            "table": {"image_column": "Path", "label_columns": list(CHEXPERT_FROM_NIH.values()),
                      "patient_column": "Patient", "split_column": "Split", "view_column": "AP/PA",
                      "split_values": {"train": "train", "val": "valid"}}}
    first = _search(tmp_path, _space(tmp_path, "table", data), f"csv:{table}", capsys, "--no-report", "--no-ensemble")
    assert f"data csv:{table} (multilabel, 7 labels;" in first
    assert "its column Split; test 20 % of train's patients, seed 42" in first
    assert "labels: uncertain (-1) U-Ones: as positives; blank as negatives" in first and "views PA" in first
    assert "patient-disjoint (checked); intervals resample patients" in first
    summary = json.loads((tmp_path / "s" / "table" / "summary.json").read_text())
    assert summary["complete"] == 2


def test_a_search_on_the_chexpert_layout_with_the_uncertain_policy_as_an_axis(tmp_path, capsys):
    root = chexpert_layout(generate(tmp_path / "cxr", n_images=300, size=64, seed=0, workers=1), tmp_path)
    space = _space(tmp_path, "chexpert", {"missing": "ignore"},
                   {"data.uncertain": {"choice": ["zeros", "ignore"]},
                    "supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}}, trials=3)
    first = _search(tmp_path, space, f"chexpert:{root}", capsys, "--no-report", "--no-ensemble")
    assert f"data chexpert:{root} (multilabel, 14 labels;" in first and "CheXpert's valid.csv as test" in first
    assert "views Frontal (Frontal/Lateral)" in first and "blank left out of loss and metrics" in first
    summary = json.loads((tmp_path / "s" / "chexpert" / "summary.json").read_text())
    assert summary["complete"] == 3
    policies = {r["resolved"].get("data.uncertain") for r in summary["rows"]}
    assert policies <= {"zeros", "ignore"} and summary["data"]["masked"] > 0
    for row in summary["rows"]:  # each trial scored its labels over their labelled images: no NaN AUROC
        assert 0 < row["best_val_mean_auroc"] <= 1


def test_a_search_on_the_mimic_layout_recorded_on_external_sources(tmp_path, capsys):
    import ray

    root = generate(tmp_path / "cxr", n_images=300, size=64, seed=0, workers=1)
    mimic = mimic_layout(root, tmp_path / "m")
    elsewhere = chexpert_layout(generate(tmp_path / "other", n_images=120, size=64, seed=7, workers=1),
                                tmp_path / "e")
    space = _space(tmp_path, "mimic", {"uncertain": "ignore"})
    argv = [str(space), "--data", f"mimic:{mimic}", "--storage", str(tmp_path / "s"), "--no-asha",
            "--external", f"chexpert:{elsewhere}", "--external", f"folder:{tmp_path / 'nope'}"]
    assert main(argv) == 2  # a source that cannot be read: one error before anything runs
    assert "folder:" in capsys.readouterr().err and not (tmp_path / "s" / "mimic" / "summary.json").exists()
    try:
        code = main(argv[:-2])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert f"data mimic:{mimic} (multilabel, 14 labels;" in lines[0] and "MIMIC-CXR-JPG's official split" in lines[0]
    external_line = next(line for line in lines[:4] if line.startswith(f"external chexpert:{elsewhere}: "))
    experiment = tmp_path / "s" / "mimic"
    summary = json.loads((experiment / "summary.json").read_text())
    (record,) = summary["external"]
    untrained = summary["data"]["untrained"]  # never trained: neither matched nor scored, as in the internal record
    assert f"{14 - len(untrained)} label(s) matched by name" in external_line and untrained
    assert set(record["matched"]) == set(CHEXPERT_OBSERVATIONS) - set(untrained)
    assert record["source"] == f"chexpert:{elsewhere}" and record["model"] == summary["search_model"]["uri"]
    assert 0 <= record["mean_auroc"]["ci_low"] <= record["mean_auroc"]["value"] <= record["mean_auroc"]["ci_high"]
    frontal = sum(len(pd.read_csv(elsewhere / f)["Frontal/Lateral"].eq("Frontal").pipe(lambda s: s[s]))
                  for f in ("train.csv", "valid.csv"))
    assert record["images"] == frontal and record["masked"] > 0  # the search's U-Ignore, on the external cells too
    reads = json.loads((experiment / "test_reads.json").read_text())
    assert [r["by"] for r in reads][-1] == f"the external record on chexpert:{elsewhere}"  # after every choice
    assert record["test_reads"] == len(reads)
    from mlflow import MlflowClient

    model = summary["search_model"]
    version = MlflowClient(f"sqlite:///{experiment / 'mlflow.db'}").get_model_version(model["name"], model["version"])
    tags = version.tags
    assert "## External record" in version.description and f"- external chexpert:{elsewhere}: mean AUROC" in \
        version.description
    assert tags["external.0.source"] == f"chexpert:{elsewhere}" and tags["external.0.mean_auroc"].startswith("0.")
    report = (experiment / "report.html").read_text()
    assert "External record: the search's model on data from elsewhere" in report
    assert "What the label table's cells said, per split" in report
