"""A search on a label table end to end: the synthetic CheXpert-style table (python -m tune_xray.data synth OUT
--table), its patients, its train/valid split with test sliced by patient, U-Ones, frontal views only."""

import json

import yaml

from tests.test_search import SPACE
from tune_xray.data.synthetic import CHEXPERT_FROM_NIH, generate, label_table
from tune_xray.search import main


def test_a_search_on_a_chexpert_style_table(tmp_path, capsys):
    import ray

    root = generate(tmp_path / "cxr", n_images=300, size=64, seed=0, workers=1)
    table = label_table(root)
    data = {**SPACE["base"]["data"], "uncertain": "ones", "views": ["PA"],
            "table": {"image_column": "Path", "label_columns": list(CHEXPERT_FROM_NIH.values()),
                      "patient_column": "Patient", "split_column": "Split", "view_column": "AP/PA",
                      "split_values": {"train": "train", "val": "valid"}}}
    space = tmp_path / "table.yaml"
    space.write_text(yaml.safe_dump({**{k: v for k, v in SPACE.items() if k != "warm_start"},
                                     "budget": {**SPACE["budget"], "trials": 2},
                                     "params": {"supervised.optimizer.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
                                     "base": {**SPACE["base"], "data": data}}))
    try:
        code = main([str(space), "--data", f"csv:{table}", "--storage", str(tmp_path / "s"), "--no-asha",
                     "--no-report", "--no-ensemble"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0
    first = out.splitlines()[0]
    assert f"data csv:{table} (multilabel, 7 labels;" in first
    assert "its column Split; test 20 % of train's patients, seed 42" in first
    assert "uncertain (-1) entries as positives (U-Ones)" in first and "views PA" in first
    assert "patient-disjoint (checked); intervals resample patients" in first
    summary = json.loads((tmp_path / "s" / "table" / "summary.json").read_text())
    assert summary["complete"] == 2
