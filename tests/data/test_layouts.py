"""chexpert:DIR and mimic:DIR on their synthetic layouts: patients, views, official splits, label policies, and each
bad input as one line naming the file, the row and the column."""

import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

from tune_xray.data.sources import read_source
from tune_xray.data.splits import DataError
from tune_xray.data.synthetic import chexpert_layout, mimic_layout
from tune_xray.data.tables import CHEXPERT_OBSERVATIONS


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("layouts")
    return chexpert_layout(synth_root, out), mimic_layout(synth_root, out)


def _copy(root, tmp_path):
    """A writable copy of a layout (files hard-linked images: copied here, so corrupting one is local)."""
    dst = tmp_path / root.name
    shutil.copytree(root, dst)
    return dst


def _cells(table: pd.DataFrame) -> np.ndarray:
    return table[list(CHEXPERT_OBSERVATIONS)].to_numpy(dtype=str)


def test_chexpert_reads_patients_frontal_views_its_splits_and_the_policies(layouts):
    root, _ = layouts
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    valid = pd.read_csv(root / "valid.csv", dtype=str, keep_default_na=False)
    index = read_source(f"chexpert:{root}")
    frame = index.frame
    assert index.classes == CHEXPERT_OBSERVATIONS and index.task == "multilabel" and index.has_patients
    frontal = (train["Frontal/Lateral"] == "Frontal").sum() + (valid["Frontal/Lateral"] == "Frontal").sum()
    assert len(frame) == frontal  # frontal by default
    assert set(frame["patient_id"]) == set(pd.concat([train, valid]).query("`Frontal/Lateral` == 'Frontal'")
                                           ["Path"].str.extract(r"(patient\d+)")[0])
    assert (frame["split"] == "test").sum() == (valid["Frontal/Lateral"] == "Frontal").sum()  # valid.csv is test
    assert frame.groupby("patient_id")["split"].nunique().max() == 1 and (frame["split"] == "val").any()
    assert len(read_source(f"chexpert:{root}", views=["Frontal", "Lateral"]).frame) == len(train) + len(valid)
    assert set(read_source(f"chexpert:{root}", views=["PA"]).frame["path"]) < set(frame["path"])

    ignored = read_source(f"chexpert:{root}", uncertain="ignore", missing="ignore")
    kept = pd.concat([train, valid]).query("`Frontal/Lateral` == 'Frontal'")
    assert np.isnan(ignored.targets()).sum() == np.isin(_cells(kept), ["-1.0", ""]).sum() == ignored.facts()["masked"]
    ones = read_source(f"chexpert:{root}", uncertain="ones").targets()
    assert ones.sum() - index.targets().sum() == (_cells(kept) == "-1.0").sum()  # U-Ones: each -1 a positive
    entries = ignored.label_entries()
    assert sum(e["uncertain"] for s in entries.values() for e in s.values()) == (_cells(kept) == "-1.0").sum()
    assert all(e["uncertain"] == e["missing"] == 0 for e in entries["test"].values())  # radiologists' 0 / 1
    assert "U-Ignore" in ignored.policy and "valid.csv as test" in ignored.split


def test_mimic_reads_subjects_frontal_views_its_official_split_and_unlabelled_studies(layouts):
    _, root = layouts
    metadata = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    split = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str).set_index("dicom_id")["split"]
    index = read_source(f"mimic:{root}")
    frame = index.frame
    frontal = metadata[metadata["ViewPosition"].isin(["PA", "AP"])]
    assert len(frame) == len(frontal) and set(frame["patient_id"]) == set(frontal["subject_id"])
    expected = frontal["dicom_id"].map(split).map({"train": "train", "validate": "val", "test": "test"})
    assert frame["split"].value_counts().to_dict() == expected.value_counts().to_dict()
    unlabelled = ~frontal.set_index(["subject_id", "study_id"]).index.isin(
        labels.set_index(["subject_id", "study_id"]).index)
    assert unlabelled.any() and f"{unlabelled.sum()} image(s) of studies the labeler table lacks" in index.split
    ignored = read_source(f"mimic:{root}", missing="ignore")
    assert np.isnan(ignored.targets()[unlabelled]).all()  # a study without labels: every entry blank, masked
    assert len(read_source(f"mimic:{root}", views=["LATERAL"]).frame) == (metadata["ViewPosition"] == "LATERAL").sum()


def _rewrite_csv(path, change):
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(table).to_csv(path, index=False)


def _rewrite_gz(path, change):
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    with gzip.open(path, "wt") as fh:
        change(table).to_csv(fh, index=False)


@pytest.mark.parametrize("file, change, message", [
    ("train.csv", lambda t: t.drop(columns="Edema"), r"train.csv: no column 'Edema' \(a CheXpert table\)"),
    ("train.csv", lambda t: t.assign(Edema=t.Edema.where(t.index != 3, "maybe")),
     r"train.csv: row 5, column 'Edema': label value 'maybe'; expected 1, 0, -1"),
    ("valid.csv", lambda t: t.assign(Path=t.Path.where(t.index != 0, "CheXpert-v1.0-small/valid/patient00005/x.jpg")),
     r"valid.csv: row 2, column 'Path': image .*x.jpg not found"),
    ("train.csv", lambda t: t.assign(Path=t.Path.where(t.index != 0, t.Path[0].replace("patient", "person"))),
     r"train.csv: row 2, column 'Path': "),
])
def test_every_bad_chexpert_input_is_one_line(layouts, tmp_path, file, change, message):
    root = _copy(layouts[0], tmp_path)
    _rewrite_csv(root / file, change)
    with pytest.raises(DataError, match=message):
        read_source(f"chexpert:{root}")


@pytest.mark.parametrize("file, change, message", [
    ("mimic-cxr-2.0.0-metadata.csv.gz", lambda t: t.drop(columns="ViewPosition"),
     r"metadata.csv.gz: no column 'ViewPosition'"),
    ("mimic-cxr-2.0.0-split.csv.gz", lambda t: t.assign(split=t.split.where(t.index != 1, "dev")),
     r"split.csv.gz: row 3, column 'split': split value 'dev'; expected one of \['train', 'validate', 'test'\]"),
    ("mimic-cxr-2.0.0-chexpert.csv.gz", lambda t: t.assign(Edema=t.Edema.where(t.index != 0, "2")),
     r"chexpert.csv.gz: row 2, column 'Edema': label value '2'"),
    ("mimic-cxr-2.0.0-split.csv.gz", lambda t: t.iloc[1:], r"metadata.csv.gz: row 2, column 'dicom_id': image .* is "
     r"in no split"),
])
def test_every_bad_mimic_input_is_one_line(layouts, tmp_path, file, change, message):
    root = _copy(layouts[1], tmp_path)
    _rewrite_gz(root / file, change)
    with pytest.raises(DataError, match=message):
        read_source(f"mimic:{root}", views=["PA", "AP", "LATERAL"])


def test_a_mimic_image_not_on_disk_names_its_row(layouts, tmp_path):
    root = _copy(layouts[1], tmp_path)
    first = next((root / "files").rglob("*.jpg"))
    first.unlink()
    with pytest.raises(DataError, match=rf"metadata.csv.gz: row \d+, column 'image': image .*{first.name} not found"):
        read_source(f"mimic:{root}", views=["PA", "AP", "LATERAL"])


def test_the_synth_command_writes_every_layout_and_says_its_spec(tmp_path, capsys):
    from tune_xray.data.__main__ import main

    assert main(["synth", str(tmp_path / "out"), "--images", "40", "--size", "32", "--table", "--chexpert",
                 "--mimic"]) == 0
    out = capsys.readouterr().out
    chexpert, mimic = tmp_path / "out" / "CheXpert-v1.0-small", tmp_path / "out" / "mimic-cxr-jpg" / "2.0.0"
    assert f"chexpert:{chexpert}" in out and f"mimic:{mimic}" in out and (tmp_path / "out" / "labels.csv").is_file()
    assert (chexpert / "train.csv").is_file() and (mimic / "mimic-cxr-2.0.0-split.csv.gz").is_file()
