"""Label tables, as most public chest X-ray sets ship (CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA, SIIM, the
COVID collections): one row per image with its path, its patient, often its split and view, and either one column of
class names or one column per label holding 1 / 0 / −1 (uncertain) / blank (not mentioned).

`csv:PATH` (CSV, TSV or parquet) reads one such table through `data.table.*`; `chexpert:DIR` and `mimic:DIR` read
those releases' own files. Every key and every cell is checked before compute, and an error names the file, the row
(as a spreadsheet numbers it: the header is row 1) and the column.

Each label cell is kept as what it said (`codes`: positive, negative, uncertain, blank) and becomes a target by the
policies of Irvin et al. 2019 (CheXpert): `data.uncertain` U-Zeros / U-Ones / U-Ignore for −1, `data.missing` zeros /
ignore for blank (blank is "not mentioned": a negative in CheXpert's and NIH's own labelers). An ignored entry is NaN
in the target: the loss and every metric leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .splits import DataError, check_patient_disjoint, patient_holdout, patient_split, patients_by_pattern

SPLIT_NAMES = ("train", "val", "test")
# what a label cell said, as kept in DatasetIndex.codes
POSITIVE, NEGATIVE, UNCERTAIN, BLANK = 1, 0, -1, -2
CELL_VALUES = {"1": POSITIVE, "1.0": POSITIVE, "0": NEGATIVE, "0.0": NEGATIVE, "-1": UNCERTAIN, "-1.0": UNCERTAIN,
               "": BLANK}
UNCERTAIN_POLICIES = {"zeros": "U-Zeros: as negatives", "ones": "U-Ones: as positives",
                      "ignore": "U-Ignore: left out of loss and metrics"}
MISSING_POLICIES = {"zeros": "as negatives", "ignore": "left out of loss and metrics"}

# CheXpert's 14 observations (Irvin et al. 2019), in its tables' column order; MIMIC-CXR-JPG's chexpert.csv has them
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
CHEXPERT_VIEWS = ("Frontal",)  # CheXpert's Frontal/Lateral column; AP / PA / LL / RL name its AP/PA column
MIMIC_VIEWS = ("PA", "AP")  # MIMIC-CXR's frontal ViewPositions
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}  # -split.csv's values
MIMIC_FILES = ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert", "mimic-cxr-2.0.0-split")


@dataclass(frozen=True)
class LabelTable:
    """A table read: `frame` (path, patient_id, split, one target column per class: 0/1, NaN where ignored), what
    each label cell said (`codes`, (n, C) int8, None for a class-name column), the classes, the task and how the
    splits were made."""

    frame: pd.DataFrame
    codes: np.ndarray | None
    classes: list[str]
    task: str
    split: str


def policy_text(uncertain: str, missing: str) -> str:
    """The label policies in words, as the split line and the report say them."""
    return f"uncertain (-1) {UNCERTAIN_POLICIES[uncertain]}; blank {MISSING_POLICIES[missing]}"


def targets_of(codes: np.ndarray, uncertain: str, missing: str) -> np.ndarray:
    """float (n, C) targets from the cells' codes by the policies: 1 / 0, NaN where an entry is ignored."""
    out = np.where(codes == POSITIVE, 1.0, 0.0)
    out[codes == UNCERTAIN] = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[uncertain]
    out[codes == BLANK] = {"zeros": 0.0, "ignore": np.nan}[missing]
    return out


def read_table_file(path: Path) -> pd.DataFrame:
    """The table as strings (blank cells as ''), rows numbered as a spreadsheet numbers them (the header is row 1),
    or one DataError naming the file. `.gz` CSVs (MIMIC's) are read as they are."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path).astype(str).replace({"nan": "", "None": "", "<NA>": ""})
        else:
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
            table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable table ({err})") from None
    if table.empty:
        raise DataError(f"{path}: has no rows")
    table.index = np.arange(2, len(table) + 2)
    return table


def require_columns(table: pd.DataFrame, path: Path, columns, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))} ({what}); its columns: "
                        f"{list(table.columns)}")


def label_codes(table: pd.DataFrame, path: Path, columns: list[str]) -> np.ndarray:
    """(n, C) int8 of what each label cell says (POSITIVE, NEGATIVE, UNCERTAIN, BLANK); a cell that is none of
    1 / 0 / −1 / blank is one DataError naming its row and column."""
    codes = np.empty((len(table), len(columns)), dtype=np.int8)
    for j, column in enumerate(columns):
        cells = table[column].str.strip()
        unknown = ~cells.isin(list(CELL_VALUES))
        if unknown.any():
            row = cells.index[unknown][0]
            raise DataError(f"{path}: row {row}, column '{column}': label value {cells[row]!r}; expected "
                            "1, 0, -1 (uncertain) or blank (not mentioned)")
        codes[:, j] = cells.map(CELL_VALUES).to_numpy()
    return codes


def image_paths(table: pd.DataFrame, path: Path, column: str, root: Path, named: str) -> list[str]:
    """Each row's image below `root`: one that is not there, or a second listing of one, is a DataError naming the
    row (`named`: where root came from, for the message)."""
    images = [str(root / p.strip()) for p in table[column]]
    absent = [(row, image) for row, image in zip(table.index, images) if not Path(image).is_file()]
    if absent:
        raise DataError(f"{path}: row {absent[0][0]}, column '{column}': image {absent[0][1]} not found "
                        f"({len(absent)} listed image(s) missing; images are relative to {named} {root})")
    repeated = pd.Series(images, index=table.index).duplicated()
    if repeated.any():
        raise DataError(f"{path}: row {repeated.index[repeated][0]}, column '{column}': image listed a second time")
    return images


def keep_views(table: pd.DataFrame, path: Path, column: str, views) -> pd.DataFrame:
    kept = table[table[column].str.strip().isin(list(views))]
    if kept.empty:
        raise DataError(f"{path}: no row's {column} is one of data.views {list(views)}")
    return kept


def read_table(path: str | Path, table_cfg, uncertain: str = "zeros", missing: str = "zeros",
               views: list[str] | None = None, patient_pattern: str | None = None, val_fraction: float = 0.1,
               test_fraction: float = 0.2, seed: int = 42) -> LabelTable:
    """One label table (`csv:PATH`) through `data.table.*`. See the module's text."""
    path = Path(path)
    table = read_table_file(path)
    t = table_cfg
    if t.image_column is None:
        raise DataError(f"csv:{path}: data.table.image_column is not set; expected the column of image paths "
                        f"(its columns: {list(table.columns)})")
    if (t.label_column is None) == (t.label_columns is None):
        raise DataError(f"csv:{path}: set one of data.table.label_column (class names, '|' for several) or "
                        "data.table.label_columns (one 1/0/-1/blank column per label)")
    for key in ("image_column", "label_column", "patient_column", "split_column", "view_column"):
        if getattr(t, key) is not None:
            require_columns(table, path, [getattr(t, key)], f"data.table.{key}")
    require_columns(table, path, t.label_columns or [], "data.table.label_columns")
    if views is not None and t.view_column is None:
        raise DataError(f"csv:{path}: data.views {views} needs data.table.view_column")
    if views is not None:
        table = keep_views(table, path, t.view_column, views)

    root = Path(t.image_root) if t.image_root else path.parent
    named = "data.table.image_root" if t.image_root else "the table folder"
    frame = pd.DataFrame({"path": image_paths(table, path, t.image_column, root, named)}, index=table.index)
    codes = None
    if t.label_columns is not None:
        classes, task = list(t.label_columns), "multilabel"
        codes = label_codes(table, path, classes)
        values = targets_of(codes, uncertain, missing)
    else:
        classes, task, values = _class_names(table, path, t.label_column)
    frame[classes] = values
    frame.insert(1, "patient_id", _patients(table, path, t, patient_pattern))
    told = _split(frame, table, path, t, val_fraction, test_fraction, seed)
    return LabelTable(frame.reset_index(drop=True), codes, classes, task, told)


def _class_names(table: pd.DataFrame, path: Path, column: str) -> tuple[list[str], str, np.ndarray]:
    """A column of class names: one per row (multi-class), or several between '|' (multi-label)."""
    names = table[column].str.strip()
    if (names == "").any():
        raise DataError(f"{path}: row {names.index[names == ''][0]}, column '{column}': no label")
    multi = names.str.contains("|", regex=False).any()
    parts = names.str.split("|") if multi else names.map(lambda n: [n])
    classes = sorted({p.strip() for labels in parts for p in labels})
    position = {c: i for i, c in enumerate(classes)}
    values = np.zeros((len(table), len(classes)), dtype=np.uint8)
    for r, labels in enumerate(parts):
        values[r, [position[p.strip()] for p in labels]] = 1
    return classes, "multilabel" if multi else "multiclass", values


def _patients(table: pd.DataFrame, path: Path, t, patient_pattern: str | None) -> pd.Series:
    """Each row's patient: its patient column, else data.patient_pattern over its image path, else None."""
    if t.patient_column is not None:
        patients = table[t.patient_column].str.strip()
        if (patients == "").any():
            raise DataError(f"{path}: row {patients.index[patients == ''][0]}, column '{t.patient_column}': no "
                            "patient id")
        return patients.astype(object)
    if patient_pattern is not None:
        patients, missed = patients_by_pattern([p.strip() for p in table[t.image_column]], patient_pattern)
        if missed:
            raise DataError(f"{path}: row {table.index[missed[0]]}, column '{t.image_column}': data.patient_pattern "
                            f"'{patient_pattern}' finds no patient in it ({len(missed)} row(s) like it)")
        return pd.Series(patients, index=table.index, dtype=object)
    return pd.Series([None] * len(table), index=table.index, dtype=object)


def _split(frame: pd.DataFrame, table: pd.DataFrame, path: Path, t, val_fraction: float, test_fraction: float,
           seed: int) -> str:
    """The table's own splits (split_column, named by data.table.split_values) with the missing ones sliced from
    train by patient, or a patient-wise (image-wise without patients) train/val/test of the whole table."""
    groups = frame["patient_id"].fillna(pd.Series(frame.index.astype(str), index=frame.index))
    by = "patients" if frame["patient_id"].notna().any() else "images (no patient ids)"
    if t.split_column is None:
        frame["split"] = patient_split(groups.reset_index(drop=True), val_fraction, test_fraction, seed)
        return (f"random split by {by}: val {100 * val_fraction:.3g} %, test {100 * test_fraction:.3g} %, "
                f"seed {seed}")
    names = {value: split for split, value in t.split_values.items()}
    cells = table[t.split_column].str.strip()
    unknown = ~cells.isin(list(names))
    if unknown.any():
        row = cells.index[unknown][0]
        raise DataError(f"{path}: row {row}, column '{t.split_column}': split value {cells[row]!r}; expected one "
                        f"of {list(names)} (data.table.split_values)")
    frame["split"] = cells.map(names).to_numpy()
    if frame["patient_id"].notna().any():
        owners = frame.groupby("patient_id")["split"].nunique()
        leaked = owners[owners > 1].index.tolist()
        if leaked:
            rows = frame.index[frame["patient_id"] == leaked[0]].tolist()
            raise DataError(f"{path}: patient {leaked[0]} (rows {', '.join(map(str, rows[:4]))}) is in more than one "
                            f"split of column '{t.split_column}' ({len(leaked)} patient(s) so); splits must be "
                            "patient-disjoint")
    sliced = []
    for missing, fraction in (("test", test_fraction), ("val", val_fraction)):
        if not (frame["split"] == missing).any():
            train = np.flatnonzero(frame["split"].to_numpy() == "train")
            held = patient_holdout(groups.iloc[train].reset_index(drop=True), fraction, seed)
            frame.iloc[train[held], frame.columns.get_loc("split")] = missing
            sliced.append(f"{missing} {100 * fraction:.3g} % of train's {by.split(' ')[0]}, seed {seed}")
    return f"its column {t.split_column}" + (f"; {'; '.join(sliced)}" if sliced else "")


def read_chexpert(root: str | Path, uncertain: str = "zeros", missing: str = "zeros", views=None,
                  val_fraction: float = 0.1, seed: int = 42) -> LabelTable:
    """CheXpert (Irvin et al. 2019) as released, v1.0 or -small: `train.csv` and `valid.csv` in `root`, each with
    Path (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`, relative to `root`'s parent when it
    starts with `root`'s name), Frontal/Lateral, AP/PA and the 14 observations. The patient is Path's
    `patientNNNNN`. Its public splits: `valid.csv` (234 images of 200 patients, labelled by radiologists) is the
    **test** split here — the competition's test labels are published apart — and validation is a patient-wise
    `val_fraction` of train.csv (seeded). Views: `Frontal` by default; AP / PA / LL / RL select on AP/PA."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"chexpert:{root}: not a directory")
    views = list(views or CHEXPERT_VIEWS)
    view_column = "Frontal/Lateral" if set(views) <= {"Frontal", "Lateral"} else "AP/PA"
    parts = []
    for name, split in (("train.csv", "train"), ("valid.csv", "test")):
        path = root / name
        table = read_table_file(path)
        require_columns(table, path, ["Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS],
                        "a CheXpert table")
        table = keep_views(table, path, view_column, views)
        prefix = table["Path"].str.strip().str.split("/").str[0]
        base = root.parent if (prefix == root.name).all() else root
        frame = pd.DataFrame({"path": image_paths(table, path, "Path", base, "the CheXpert folder's parent"
                                                  if base != root else "the CheXpert folder")}, index=table.index)
        patients, missed = patients_by_pattern(table["Path"].tolist(), r"(patient\d+)")
        if missed:
            raise DataError(f"{path}: row {table.index[missed[0]]}, column 'Path': no patientNNNNN in it")
        frame.insert(1, "patient_id", pd.Series(patients, index=table.index, dtype=object))
        frame["split"] = split
        codes = label_codes(table, path, list(CHEXPERT_OBSERVATIONS))
        frame[list(CHEXPERT_OBSERVATIONS)] = targets_of(codes, uncertain, missing)
        parts.append((frame, codes))
    frame = pd.concat([f for f, _ in parts], ignore_index=True)
    codes = np.concatenate([c for _, c in parts])
    check_patient_disjoint(frame, f"chexpert:{root} (train.csv and valid.csv)")
    train = np.flatnonzero(frame["split"].to_numpy() == "train")
    held = patient_holdout(frame["patient_id"].iloc[train], val_fraction, seed)
    frame.iloc[train[held], frame.columns.get_loc("split")] = "val"
    told = (f"CheXpert's valid.csv as test; val {100 * val_fraction:.3g} % of train.csv's patients, seed {seed}; "
            f"views {', '.join(views)} ({view_column})")
    return LabelTable(frame, codes, list(CHEXPERT_OBSERVATIONS), "multilabel", told)


def _mimic_file(root: Path, stem: str) -> Path:
    """MIMIC-CXR-JPG ships its tables gzipped; an unpacked copy reads too."""
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"mimic:{root}: no {stem}.csv.gz (or .csv); expected MIMIC-CXR-JPG 2.x's metadata, chexpert "
                    "and split tables in it")


def read_mimic(root: str | Path, uncertain: str = "zeros", missing: str = "zeros", views=None) -> LabelTable:
    """MIMIC-CXR-JPG 2.x (Johnson et al. 2019) as released: `mimic-cxr-2.0.0-metadata.csv.gz` (dicom_id,
    subject_id, study_id, ViewPosition), `-chexpert.csv.gz` (the 14 CheXpert-labeler observations per study) and
    `-split.csv.gz` (train / validate / test per image), images under `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`. The
    patient is subject_id; the official splits are kept (validate → val); a study the labeler table lacks has every
    entry blank. Views: PA and AP (frontal) by default, on ViewPosition."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"mimic:{root}: not a directory")
    views = list(views or MIMIC_VIEWS)
    paths = dict(zip(("metadata", "chexpert", "split"), (_mimic_file(root, stem) for stem in MIMIC_FILES)))
    metadata, labels, splits = (read_table_file(paths[k]) for k in ("metadata", "chexpert", "split"))
    require_columns(metadata, paths["metadata"], ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                    "MIMIC-CXR-JPG metadata")
    require_columns(labels, paths["chexpert"], ["subject_id", "study_id", *CHEXPERT_OBSERVATIONS],
                    "MIMIC-CXR-JPG chexpert labels")
    require_columns(splits, paths["split"], ["dicom_id", "split"], "MIMIC-CXR-JPG split")
    unknown = ~splits["split"].str.strip().isin(list(MIMIC_SPLITS))
    if unknown.any():
        row = splits.index[unknown][0]
        raise DataError(f"{paths['split']}: row {row}, column 'split': split value {splits.at[row, 'split']!r}; "
                        f"expected one of {list(MIMIC_SPLITS)}")
    study_codes = label_codes(labels, paths["chexpert"], list(CHEXPERT_OBSERVATIONS))
    metadata = keep_views(metadata, paths["metadata"], "ViewPosition", views)
    split_of = dict(zip(splits["dicom_id"].str.strip(), splits["split"].str.strip().map(MIMIC_SPLITS)))
    unsplit = ~metadata["dicom_id"].str.strip().isin(list(split_of))
    if unsplit.any():
        row = metadata.index[unsplit][0]
        raise DataError(f"{paths['metadata']}: row {row}, column 'dicom_id': image {metadata.at[row, 'dicom_id']} "
                        f"is in no split of {paths['split'].name}")
    subject, study = metadata["subject_id"].str.strip(), metadata["study_id"].str.strip()
    relative = "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + metadata["dicom_id"].str.strip() \
        + ".jpg"
    frame = pd.DataFrame({"path": image_paths(metadata.assign(image=relative), paths["metadata"], "image", root,
                                              "the MIMIC-CXR-JPG folder")}, index=metadata.index)
    frame.insert(1, "patient_id", subject.astype(object))
    frame["split"] = metadata["dicom_id"].str.strip().map(split_of).to_numpy()
    row_of = {key: r for r, key in enumerate(zip(labels["subject_id"].str.strip(), labels["study_id"].str.strip()))}
    found = np.array([row_of.get(key, -1) for key in zip(subject, study)])
    codes = np.where(found[:, None] >= 0, study_codes[np.maximum(found, 0)], np.int8(BLANK)).astype(np.int8)
    frame[list(CHEXPERT_OBSERVATIONS)] = targets_of(codes, uncertain, missing)
    check_patient_disjoint(frame, f"mimic:{root} ({paths['split'].name})")
    unlabelled = int((found < 0).sum())
    told = f"MIMIC-CXR-JPG's official split (validate as val); views {', '.join(views)}"
    if unlabelled:
        told += f"; {unlabelled:,} image(s) of studies the labeler table lacks (every entry blank)"
    return LabelTable(frame.reset_index(drop=True), codes, list(CHEXPERT_OBSERVATIONS), "multilabel", told)
