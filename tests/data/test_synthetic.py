import hashlib

import pandas as pd

from tune_xray.data.labels import NIH_LABELS, NO_FINDING
from tune_xray.data.synthetic import CSV_COLUMNS, generate


def _digest(root):
    h = hashlib.sha1()
    for p in sorted((root / "images").iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    h.update((root / "Data_Entry_2017.csv").read_bytes())
    return h.hexdigest()


def test_nih_layout_and_columns(synth_root):
    table = pd.read_csv(synth_root / "Data_Entry_2017.csv")
    assert list(table.columns) == CSV_COLUMNS
    assert len(table) == 300 == len(list((synth_root / "images").glob("*.png")))
    listed = [name for file in ("train_val_list.txt", "test_list.txt")
              for name in (synth_root / file).read_text().split()]
    assert sorted(listed) == sorted(table["Image Index"])


def test_labels_prevalence_and_patients(synth_root):
    table = pd.read_csv(synth_root / "Data_Entry_2017.csv")
    labels = table["Finding Labels"].str.split("|")
    assert set(labels.explode()) <= set(NIH_LABELS) | {NO_FINDING}
    no_finding = (table["Finding Labels"] == NO_FINDING).mean()
    assert 0.4 < no_finding < 0.7  # NIH: 53.8 %
    assert (labels.str.len() > 1).any()  # co-occurring findings
    per_patient = table.groupby("Patient ID").size()
    assert per_patient.max() > 1 and per_patient.mean() > 1.5  # follow-up images


def test_deterministic_per_seed(tmp_path):
    a = generate(tmp_path / "a", 24, 32, seed=3, workers=1)
    b = generate(tmp_path / "b", 24, 32, seed=3, workers=2)
    c = generate(tmp_path / "c", 24, 32, seed=4, workers=1)
    assert _digest(a) == _digest(b) != _digest(c)
