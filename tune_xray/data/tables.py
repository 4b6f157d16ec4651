"""Label tables, as most public chest X-ray sets ship (CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA, SIIM, the
COVID collections): one row per image with its path, its patient, often its split and view, and either one column of
class names or one column per label holding 1 / 0 / −1 (uncertain) / blank (not mentioned).

`csv:PATH` (CSV, TSV or parquet) reads one such table through `data.table.*`; every key and every cell is checked
before compute, and an error names the file, the row (as a spreadsheet numbers it: the header is row 1) and the
column. Uncertain entries follow `data.uncertain` (U-Ones / U-Zeros, Irvin et al. 2019, CheXpert); blank ones are
negatives (what "not mentioned" has meant in CheXpert's and NIH's own labelers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .splits import DataError, patient_holdout, patient_split, patients_by_pattern

SPLIT_NAMES = ("train", "val", "test")
# a label cell: positive, negative, uncertain (CheXpert's −1) or blank (not mentioned)
CELL_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}
UNCERTAIN = -1


def read_table_file(path: Path) -> pd.DataFrame:
    """The table as strings (blank cells as ''), or one DataError naming the file."""
    if not path.is_file():
        raise DataError(f"csv:{path}: no such file")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path).astype(str).replace({"nan": "", "None": "", "<NA>": ""})
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as err:
        raise DataError(f"csv:{path}: not a readable table ({err})") from None


def _column(table: pd.DataFrame, path: Path, key: str, name: str | None) -> None:
    if name is not None and name not in table.columns:
        raise DataError(f"{path}: no column '{name}' (data.table.{key}); its columns: {list(table.columns)}")


def _cells(table: pd.DataFrame, path: Path, columns: list[str], uncertain: str) -> tuple:
    """label_columns → (0/1 matrix, uncertain entries as `uncertain` says and blank ones as 0; the counts of
    uncertain and blank entries per label)."""
    values = np.zeros((len(table), len(columns)), dtype=np.uint8)
    counts = {"uncertain": {}, "missing": {}}
    for j, column in enumerate(columns):
        cells = table[column].str.strip()
        unknown = ~cells.isin(list(CELL_VALUES))
        if unknown.any():
            row = cells.index[unknown][0]
            raise DataError(f"{path}: row {row}, column '{column}': label value {cells[row]!r}; expected "
                            "1, 0, -1 (uncertain) or blank (not mentioned)")
        coded = cells.map(CELL_VALUES)
        is_uncertain = (coded == UNCERTAIN).to_numpy()
        is_missing = coded.isna().to_numpy()
        counts["uncertain"][column] = int(is_uncertain.sum())
        counts["missing"][column] = int(is_missing.sum())
        positive = (coded == 1).to_numpy()
        if uncertain == "ones":
            positive = positive | is_uncertain
        values[:, j] = positive
    return values, counts


def read_table(path: str | Path, table_cfg, uncertain: str = "zeros", views: list[str] | None = None,
               patient_pattern: str | None = None, val_fraction: float = 0.1,
               test_fraction: float = 0.2, seed: int = 42) -> tuple[pd.DataFrame, list[str], str, str, dict]:
    """(frame with path, patient_id, split and a 0/1 column per class; classes; task; how it was split; the label
    counts the policies changed) of one label table. See the module's text."""
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
        _column(table, path, key, getattr(t, key))
    for name in t.label_columns or []:
        _column(table, path, "label_columns", name)
    if views is not None and t.view_column is None:
        raise DataError(f"csv:{path}: data.views {views} needs data.table.view_column")
    if table.empty:
        raise DataError(f"csv:{path}: has no rows")
    table = table.reset_index(drop=True)
    table.index = table.index + 2  # a row as a spreadsheet numbers it
    if views is not None:
        table = table[table[t.view_column].str.strip().isin(views)]
        if table.empty:
            raise DataError(f"csv:{path}: no row's {t.view_column} is one of data.views {views}")

    root = Path(t.image_root) if t.image_root else path.parent
    images = [root / p.strip() for p in table[t.image_column]]
    absent = [(row, image) for row, image in zip(table.index, images) if not image.is_file()]
    if absent:
        raise DataError(f"{path}: row {absent[0][0]}, column '{t.image_column}': image {absent[0][1]} not found "
                        f"({len(absent)} listed image(s) missing; images are relative to "
                        f"{'data.table.image_root' if t.image_root else 'the table folder'} {root})")
    frame = pd.DataFrame({"path": [str(i) for i in images]}, index=table.index)
    if frame["path"].duplicated().any():
        row = frame.index[frame["path"].duplicated()][0]
        raise DataError(f"{path}: row {row}, column '{t.image_column}': image listed a second time")

    counts: dict = {}
    if t.label_columns is not None:
        values, counts = _cells(table, path, list(t.label_columns), uncertain)
        classes, task = list(t.label_columns), "multilabel"
    else:
        names = table[t.label_column].str.strip()
        if (names == "").any():
            row = names.index[names == ""][0]
            raise DataError(f"{path}: row {row}, column '{t.label_column}': no label")
        multi = names.str.contains("|", regex=False).any()
        parts = names.str.split("|") if multi else names.map(lambda n: [n])
        classes = sorted({p.strip() for labels in parts for p in labels})
        task = "multilabel" if multi else "multiclass"
        position = {c: i for i, c in enumerate(classes)}
        values = np.zeros((len(table), len(classes)), dtype=np.uint8)
        for r, labels in enumerate(parts):
            values[r, [position[p.strip()] for p in labels]] = 1
    frame[classes] = values

    if t.patient_column is not None:
        frame.insert(1, "patient_id", table[t.patient_column].str.strip().to_numpy())
        blank = frame["patient_id"] == ""
        if blank.any():
            raise DataError(f"{path}: row {frame.index[blank][0]}, column '{t.patient_column}': no patient id")
    elif patient_pattern is not None:
        patients, missed = patients_by_pattern([p.strip() for p in table[t.image_column]], patient_pattern)
        if missed:
            raise DataError(f"{path}: row {table.index[missed[0]]}, column '{t.image_column}': data.patient_pattern "
                            f"'{patient_pattern}' finds no patient in it ({len(missed)} row(s) like it)")
        frame.insert(1, "patient_id", patients)
    else:
        frame.insert(1, "patient_id", pd.Series([None] * len(frame), index=frame.index, dtype=object))
    told = _split(frame, table, path, t, val_fraction, test_fraction, seed)
    return frame.reset_index(drop=True), classes, task, told, counts


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
