"""Readers: every data source becomes one `DatasetIndex` (path, patient_id, split, one 0/1 column per class).

Specs: `synthetic` (the embedded default, generated on first use), `nih:PATH` (ChestX-ray14 layout),
`folder:PATH` (one sub-folder per class, optionally under train/ val/ test/), `medmnist:PATH.npz`, and the label
tables (`tables`): `csv:PATH`, `chexpert:DIR`, `mimic:DIR`.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .cache import NPZ_MEMBER
from .labels import NIH_LABELS, NO_FINDING
from .splits import (
    SPLITS,
    DataError,
    check_learnable,
    check_patient_disjoint,
    check_splits_nonempty,
    patient_holdout,
    patient_split,
    patient_stratified_holdout,
    patient_stratified_split,
    patients_by_pattern,
    stratified_holdout,
    stratified_split,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}  # DICOM via pydicom
NIH_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


@dataclass(frozen=True)
class DatasetIndex:
    """One table for every source: `frame` has path, patient_id, split and a 0/1 column per class. `split` says
    how its splits were made (what a reader of any number needs to know first); a two-class task has its positive
    class second, and `positive` says how that class was chosen."""

    frame: pd.DataFrame
    classes: tuple[str, ...]
    task: Literal["multilabel", "multiclass"]
    origin: str
    split: str = ""
    positive: str = ""
    codes: np.ndarray | None = None  # label tables: what each cell said (tables.POSITIVE … BLANK), row for row
    policy: str = ""  # label tables: what became of uncertain and blank cells (tables.policy_text)

    @property
    def binary(self) -> bool:
        """Two classes: one positive class (the second), one AUROC, one threshold."""
        return self.task == "multiclass" and len(self.classes) == 2

    @property
    def has_patients(self) -> bool:
        return "patient_id" in self.frame and bool(self.frame["patient_id"].notna().any())

    @property
    def patients(self) -> str:
        """What the data say of patients, and so what the intervals resample."""
        if self.has_patients:
            return "patient-disjoint (checked); intervals resample patients"
        return "no patient ids: intervals resample images; images of one patient may fall in two splits"

    def facts(self) -> dict:
        """What a reader of any number needs to know of the data first: source, task, classes, how the splits were
        made, what they say of patients, each split's size, and the labels no training image has."""
        sizes = self.frame["split"].value_counts()
        masked = int(np.isnan(self.frame[list(self.classes)].to_numpy(dtype=np.float64)).sum())
        return {"source": self.origin, "task": "binary" if self.binary else self.task, "classes": list(self.classes),
                "positive": self.positive or None, "split": self.split, "patients": self.patients,
                "images": {s: int(sizes.get(s, 0)) for s in SPLITS}, "untrained": self.untrained(),
                "labels": self.policy or None, "masked": masked}

    def label_entries(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per split and label, what the cells said: positive, negative, uncertain, missing (blank) — and how many
        the policies left out of loss and metrics (masked). Sources without such cells: positives and negatives."""
        from .tables import BLANK, NEGATIVE, POSITIVE, UNCERTAIN

        values = self.frame[list(self.classes)].to_numpy(dtype=np.float64)
        codes = self.codes if self.codes is not None else values.astype(np.int8)
        split = self.frame["split"].to_numpy()
        out = {}
        for s in pd.unique(split):
            rows = split == s
            out[s] = {c: {"positive": int((codes[rows, j] == POSITIVE).sum()),
                          "negative": int((codes[rows, j] == NEGATIVE).sum()),
                          "uncertain": int((codes[rows, j] == UNCERTAIN).sum()),
                          "missing": int((codes[rows, j] == BLANK).sum()),
                          "masked": int(np.isnan(values[rows, j]).sum())} for j, c in enumerate(self.classes)}
        return out

    def untrained(self) -> list[str]:
        """Multi-label: the labels with no positive image in train. The model never saw one: nothing is decided,
        thresholded or averaged for them."""
        if self.task != "multilabel":
            return []
        train = self.frame.loc[self.frame["split"] == "train", list(self.classes)].to_numpy(dtype=np.float64)
        return [c for c, n in zip(self.classes, np.nansum(train, 0)) if n == 0]

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Multi-label: float32 (n, C) of 0/1, NaN where a label is masked (data.uncertain / data.missing:
        ignore). Multi-class: int64 (n,) class indices."""
        onehot = self.frame[list(self.classes)].to_numpy()
        if rows is not None:
            onehot = onehot[rows]
        if self.task == "multiclass":
            return onehot.argmax(1).astype(np.int64)
        return onehot.astype(np.float32)


def describe_data(facts: dict) -> str:
    """`DatasetIndex.facts()` in one sentence, as the console, the report, the model card and the search's MLflow
    run say it."""
    classes = facts["classes"]
    task = (f"binary, positive class {facts['positive']}" if facts["task"] == "binary"
            else f"{facts['task']}, {len(classes)} {'labels' if facts['task'] == 'multilabel' else 'classes'}")
    images = ", ".join(f"{split} {n:,}" for split, n in facts["images"].items())
    labels = f"; labels: {facts['labels']}" if facts.get("labels") else ""
    masked = f" ({facts['masked']:,} entries masked)" if facts.get("masked") else ""
    return f"{facts['source']} ({task}; {images} images): {facts['split']}; {facts['patients']}{labels}{masked}"


def describe_untrained(facts: dict) -> str:
    """The labels no training image has, in one line ('' where there are none)."""
    untrained = facts.get("untrained") or []
    verb = "has" if len(untrained) == 1 else "have"
    return (f"{len(untrained)} of {len(facts['classes'])} labels {verb} no positive in train: never decided, "
            f"thresholded or averaged: {', '.join(untrained)}" if untrained else "")


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNE_XRAY_CACHE", Path.home() / ".cache" / "tune_xray"))


def _finish(frame: pd.DataFrame, classes, task, origin, split: str) -> DatasetIndex:
    check_splits_nonempty(frame, origin)
    check_patient_disjoint(frame, origin)
    check_learnable(frame, classes, task, origin)
    return DatasetIndex(frame.reset_index(drop=True), tuple(classes), task, origin, split)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g} %"


# class names that say "no finding": in two-class data the other class is the positive one
NEGATIVE_NAMES = {"normal", "no finding", "no_finding", "nofinding", "negative", "healthy", "none", "benign"}


def with_positive_class(index: DatasetIndex, positive: str | None) -> DatasetIndex:
    """Two-class data as one binary task: the positive class second, chosen by `data.positive_class` or, by
    default, the class not named like "normal" / "no finding" / "negative" / "healthy" where exactly one is, else
    the second in name order. A `positive` that is not a class, or on data that are not two classes, is a
    DataError naming the classes."""
    if not index.binary:
        if positive is not None:
            raise DataError(f"data.positive_class={positive}: {index.origin} is not a two-class task "
                            f"({index.task}, {len(index.classes)} labels); the setting applies to two classes")
        return index
    classes = list(index.classes)
    if positive is not None:
        if positive not in classes:
            raise DataError(f"data.positive_class={positive}: not a class of {index.origin}; expected one of "
                            f"{classes}")
        how = "data.positive_class"
    else:
        negative = [c for c in classes if c.lower().replace("-", " ") in NEGATIVE_NAMES]
        positive = next(c for c in classes if c not in negative) if len(negative) == 1 else classes[1]
        how = (f"the class not named '{negative[0]}'" if len(negative) == 1 else "the second class in name order; "
               "set data.positive_class to choose")
    order = (next(c for c in classes if c != positive), positive)
    return replace(index, classes=order, positive=f"{positive} ({how})")


def _find_nih_images(root: Path) -> dict[str, Path]:
    """NIH ships images/ (or images_001/images … images_012/images); map file name → path."""
    found: dict[str, Path] = {}
    for folder in [root / "images", *sorted(root.glob("images_*/images"))]:
        if folder.is_dir():
            with os.scandir(folder) as it:
                for entry in it:
                    found[entry.name] = Path(entry.path)
    return found


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: list file not found (expected one image file name per line)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_nih(root: str | Path, split: str = "official", val_fraction: float = 0.1,
             test_fraction: float = 0.2, seed: int = 42) -> DatasetIndex:
    """ChestX-ray14: Data_Entry_2017.csv (pipe-separated Finding Labels, 'No Finding' = all zeros).

    `official`: test = test_list.txt; val = a patient-wise `val_fraction` of train_val_list.txt.
    `random`: S0's random patient split (val_fraction / test_fraction of patients, seed 42 in S0).
    """
    root = Path(root)
    csv_path = root / "Data_Entry_2017.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found (an NIH-layout dataset needs Data_Entry_2017.csv)")
    try:
        table = pd.read_csv(csv_path, dtype={"Patient ID": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{csv_path}: not a readable CSV ({err})") from None
    missing = [c for c in NIH_REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {missing}; expected at least {list(NIH_REQUIRED_COLUMNS)}")
    if table.empty:
        raise DataError(f"{csv_path}: has no rows")

    onehot = np.zeros((len(table), len(NIH_LABELS)), dtype=np.uint8)
    col = {name: i for i, name in enumerate(NIH_LABELS)}
    for r, (image, labels) in enumerate(zip(table["Image Index"], table["Finding Labels"].fillna(""))):
        for label in str(labels).split("|"):
            label = label.strip()
            if label in ("", NO_FINDING):
                continue
            if label not in col:
                raise DataError(f"{csv_path}: row {r + 2} ({image}): unknown label '{label}'; "
                                f"expected '{NO_FINDING}' or one of {list(NIH_LABELS)}")
            onehot[r, col[label]] = 1

    images = _find_nih_images(root)
    frame = pd.DataFrame({"image": table["Image Index"].astype(str),
                          "patient_id": table["Patient ID"].astype(str)})
    frame[list(NIH_LABELS)] = onehot
    if frame["image"].duplicated().any():
        dup = frame.loc[frame["image"].duplicated(), "image"].iloc[0]
        raise DataError(f"{csv_path}: image '{dup}' is listed more than once")

    if split == "official":
        lists = {"test": root / "test_list.txt", "train_val": root / "train_val_list.txt"}
        members = {k: _read_list(p) for k, p in lists.items()}
        known = set(frame["image"])
        for k, names in members.items():
            unknown = [n for n in names if n not in known]
            if unknown:
                raise DataError(f"{lists[k]}: {len(unknown)} image(s) not in {csv_path.name} "
                                f"(e.g. '{unknown[0]}')")
        frame = frame.set_index("image").loc[members["train_val"] + members["test"]].reset_index()
        frame["split"] = ["train"] * len(members["train_val"]) + ["test"] * len(members["test"])
        tv = np.flatnonzero(frame["split"].to_numpy() == "train")
        val = patient_holdout(frame["patient_id"].iloc[tv], val_fraction, seed)
        frame.loc[tv[val], "split"] = "val"
        told = (f"NIH official test list ({len(members['test']):,} images); val: {_percent(val_fraction)} of "
                f"train_val patients, seed {seed}")
    elif split == "random":
        frame["split"] = patient_split(frame["patient_id"], val_fraction, test_fraction, seed)
        told = (f"random patient split {_percent(1 - val_fraction - test_fraction)} / {_percent(val_fraction)} / "
                f"{_percent(test_fraction)}, seed {seed} (S0's; the official test list is not used)")
    else:
        raise DataError(f"nih:{root}: unknown split '{split}'; expected 'official' or 'random'")

    absent = [n for n in frame["image"] if n not in images]
    if absent:
        raise DataError(f"{root}: {len(absent)} listed image(s) not found under images/ "
                        f"(e.g. '{absent[0]}')")
    frame.insert(0, "path", [str(images[n]) for n in frame["image"]])
    return _finish(frame.drop(columns="image"), NIH_LABELS, "multilabel", f"nih:{root}", told)


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _patients_by_pattern(paths: list, root: Path, pattern: str, origin: str) -> np.ndarray:
    """Each image's patient: the one group of `pattern` searched in its path relative to `root`. An image it does
    not match is an error naming it (a patient guessed would be a leak waiting to happen)."""
    relative = [str(Path(p).relative_to(root)) for p in paths]
    patients, missed = patients_by_pattern(relative, pattern)
    if missed:
        raise DataError(f"{origin}: data.patient_pattern '{pattern}' finds no patient in {len(missed)} image path(s), "
                        f"e.g. {', '.join(relative[i] for i in missed[:3])}; expected one group that matches every "
                        "image")
    return patients


def read_folder(root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 42, patient_pattern: str | None = None) -> DatasetIndex:
    """One sub-folder per class (multi-class). With train/ (and optional val/, test/) sub-folders those
    splits are kept; a missing val or test is a stratified slice of train. With `patient_pattern` (a regex with
    one group over each image's path below `root`) every image has a patient: slices are whole patients,
    stratified by class, and the splits are checked patient-disjoint (a patient in two split folders is an
    error)."""
    root = Path(root)
    origin = f"folder:{root}"
    if not root.is_dir():
        raise DataError(f"{origin}: not a directory")
    has_splits = (root / "train").is_dir()
    classes = _class_folders(root / "train" if has_splits else root)
    if not classes:
        raise DataError(f"{origin}: no class sub-folders found")
    rows = []
    for split in (("train", "val", "test") if has_splits else ("all",)):
        base = root / split if has_splits else root
        if not base.is_dir():
            continue
        for cls in _class_folders(base):
            if cls not in classes:
                raise DataError(f"{base / cls}: unknown label '{cls}'; expected one of {classes} (from train/)")
            rows += [(p, split, classes.index(cls)) for p in _images_in(base / cls)]
    if not rows:
        raise DataError(f"{origin}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    frame = pd.DataFrame(rows, columns=["path", "split", "label"])
    patients = None
    if patient_pattern:
        patients = _patients_by_pattern(frame["path"].tolist(), root, patient_pattern, origin)
    frame.insert(1, "patient_id", pd.Series([None] * len(frame) if patients is None else patients, dtype=object))
    labels = frame["label"].to_numpy()
    by = "by patient (data.patient_pattern), stratified by class" if patients is not None else \
        "stratified by class, not by patient"
    if not has_splits and patients is not None:
        frame["split"] = patient_stratified_split(labels, patients, val_fraction, test_fraction, seed, origin)
    elif not has_splits:
        frame["split"] = stratified_split(labels, val_fraction, test_fraction, seed, origin)
    if not has_splits:
        told = f"{by}: val {_percent(val_fraction)}, test {_percent(test_fraction)}, seed {seed}"
    else:
        if patients is not None:  # before slicing: a patient in two split folders is the folders' doing
            check_patient_disjoint(frame, f"{origin} (its split folders, data.patient_pattern '{patient_pattern}')")
        sliced = []
        for missing, fraction in (("test", test_fraction), ("val", val_fraction)):
            if not (frame["split"] == missing).any():
                train = np.flatnonzero(frame["split"].to_numpy() == "train")
                if patients is None:
                    held = stratified_holdout(labels[train], fraction, seed, origin)
                else:
                    held = patient_stratified_holdout(labels[train], patients[train], fraction, seed, origin)
                frame.loc[train[held], "split"] = missing
                kind = "a stratified" if patients is None else "a patient-wise, stratified"
                sliced.append(f"{missing} {kind} {_percent(fraction)} of train/ (seed {seed})")
        folders = [name for name in ("train", "val", "test") if (root / name).is_dir()]
        told = f"its {', '.join(f + '/' for f in folders)} folder{'s' if len(folders) > 1 else ''}" + (
            f"; {', '.join(sliced)}" if sliced else "")
    frame[classes] = np.eye(len(classes), dtype=np.uint8)[labels]
    return _finish(frame.drop(columns="label"), classes, "multiclass", origin, told)


def read_medmnist(path: str | Path) -> DatasetIndex:
    """A MedMNIST npz (train/val/test `_images` and `_labels`, any resolution) with its official splits.

    Labels (n, 1) are a single-label task (PneumoniaMNIST: binary); (n, K > 1) multi-label (ChestMNIST, whose
    14 columns are NIH's findings in NIH order). MedMNIST carries no patient ids; its authors split by patient.
    """
    path = Path(path)
    origin = f"medmnist:{path}"
    try:
        npz = np.load(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{origin}: cannot read npz ({err})") from None
    expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    missing = [k for k in expected if k not in npz.files]
    if missing:
        raise DataError(f"{origin}: missing array(s) {missing}; a MedMNIST file has {expected}")
    labels = {s: np.asarray(npz[f"{s}_labels"]).reshape(len(npz[f"{s}_images"]), -1) for s in SPLITS}
    width = {a.shape[1] for a in labels.values()}
    if len(width) != 1:
        raise DataError(f"{origin}: label arrays differ in width {sorted(width)} across splits")
    multilabel = width.pop() > 1
    if multilabel:
        k = labels["train"].shape[1]
        chest = k == len(NIH_LABELS) and "chest" in path.name.lower()
        classes = list(NIH_LABELS) if chest else [f"label_{j}" for j in range(k)]
    else:
        k = int(labels["train"].max()) + 1 if labels["train"].size else 0  # the classes are train's
        classes = [f"class_{j}" for j in range(k)]
    frames = []
    for split in SPLITS:
        y = labels[split]
        if not np.isin(y, range(k) if not multilabel else (0, 1)).all():
            allowed = "{0, 1}" if multilabel else f"0..{k - 1} (the classes in train_labels)"
            raise DataError(f"{origin}: {split}_labels has values outside {allowed}")
        onehot = y.astype(np.uint8) if multilabel else np.eye(k, dtype=np.uint8)[y[:, 0]]
        frame = pd.DataFrame(onehot, columns=classes)
        frame.insert(0, "path", [f"{path}{NPZ_MEMBER}{split}/{i}" for i in range(len(y))])
        frame.insert(1, "patient_id", pd.Series([None] * len(y), dtype=object))
        frame.insert(2, "split", split)
        frames.append(frame)
    return _finish(pd.concat(frames, ignore_index=True), classes, "multilabel" if multilabel else "multiclass", origin,
                   "MedMNIST's official train / val / test splits (its authors split by patient)")


def synthetic_root(n_images: int, size: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Generate the synthetic NIH-format dataset once (under a lock) and return its folder."""
    from .synthetic import generate

    base = Path(cache_dir) if cache_dir else default_cache_dir()
    root = base / "synthetic" / f"nih_n{n_images}_s{size}_seed{seed}"
    if (root / "Data_Entry_2017.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "Data_Entry_2017.csv").is_file():
            print(f"generating synthetic NIH-format data: {n_images} images at {size}² → {root}", flush=True)
            generate(root, n_images, size, seed)
    return root


TABLE_KINDS = ("csv", "chexpert", "mimic")  # the label tables (data.tables), which data.uncertain etc. apply to


def _read_table_source(kind: str, path: str, table, uncertain: str, missing: str, views, patient_pattern,
                       val_fraction: float, test_fraction: float, seed: int) -> DatasetIndex:
    """A label table (`csv:PATH`, `chexpert:DIR`, `mimic:DIR`: data.tables) as a checked index, which keeps what
    each cell said and says what the policies made of uncertain and blank cells."""
    from ..config import TableConfig
    from .tables import policy_text, read_chexpert, read_mimic, read_table

    if kind == "csv":
        read = read_table(path, table or TableConfig(), uncertain, missing, views, patient_pattern, val_fraction,
                          test_fraction, seed)
    elif kind == "chexpert":
        read = read_chexpert(path, uncertain, missing, views, val_fraction, seed)
    else:
        read = read_mimic(path, uncertain, missing, views)
    told = read.split + (f"; views {', '.join(views)}" if views and kind == "csv" else "")
    index = _finish(read.frame, read.classes, read.task, f"{kind}:{path}", told)
    policy = policy_text(uncertain, missing) if read.codes is not None else ""
    return replace(index, codes=read.codes, policy=policy)


def ignored_split_keys(spec: str, split: str = "official") -> dict[str, str]:
    """The `data.*` split keys a source does not read, each with why: set to anything but its default, such a key
    would be silently ignored, so it is an error instead (loader.prepare)."""
    kind, _, path = spec.partition(":")
    cells = {} if kind in TABLE_KINDS else {key: f"{spec} is not a label table (csv:PATH, chexpert:DIR, mimic:DIR)"
                                            for key in ("uncertain", "missing", "views")}
    table = {} if kind == "csv" else {"table": f"{spec} is not a csv:PATH table (data.table.* reads those)"}
    why = f"{spec}: patients come from its own table (or it has none); patient_pattern reads folder and csv data"
    patients = {} if kind in ("folder", "csv") else {"patient_pattern": why}
    return {**cells, **table, **patients, **_ignored_split_keys(spec, kind, path, split)}


def _ignored_split_keys(spec: str, kind: str, path: str, split: str) -> dict[str, str]:
    if kind == "medmnist":
        why = f"{spec} comes with its official train/val/test splits"
        return {key: why for key in ("split", "val_fraction", "test_fraction", "split_seed")}
    if kind == "folder":
        present = {name for name in ("train", "val", "test") if (Path(path) / name).is_dir()}
        out = {"split": f"{spec} is split by its folders (or by stratified slices), not by 'official'/'random'"}
        if present == {"train", "val", "test"}:
            why = f"{spec} has train/, val/ and test/ folders: nothing is sliced"
            out.update({key: why for key in ("val_fraction", "test_fraction", "split_seed")})
        elif "train" in present:
            for name, key in (("val", "val_fraction"), ("test", "test_fraction")):
                if name in present:
                    out[key] = f"{spec} has a {name}/ folder: it is not sliced from train"
        return out
    if kind == "csv":
        return {"split": f"{spec} is split by data.table.split_column, or by patient when it has none"}
    if kind == "chexpert":
        why = f"{spec}: its valid.csv is the test split"
        return {"split": why, "test_fraction": why}
    if kind == "mimic":
        why = f"{spec} comes with its official train/validate/test split"
        return {key: why for key in ("split", "val_fraction", "test_fraction", "split_seed")}
    if split == "official":  # nih and synthetic
        return {"test_fraction": "split: official takes test from test_list.txt (random uses test_fraction)"}
    return {}


def read_source(spec: str, split: str = "official", val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 42, synthetic: tuple[int, int, int] = (2000, 256, 0),
                cache_dir: str | Path | None = None, positive_class: str | None = None,
                patient_pattern: str | None = None, table=None, uncertain: str = "zeros",
                views: list[str] | None = None, missing: str = "zeros") -> DatasetIndex:
    """Resolve a data spec (`synthetic`, `nih:PATH`, `folder:PATH`, `medmnist:PATH.npz`, `csv:PATH`,
    `chexpert:DIR`, `mimic:DIR`) to a checked index (two classes: the positive one second,
    `with_positive_class`)."""
    kind, _, path = spec.partition(":")
    if kind == "synthetic":
        root = synthetic_root(*synthetic, cache_dir=cache_dir)
        index = read_nih(root, split, val_fraction, test_fraction, seed)
    elif not path:
        raise DataError(f"data source '{spec}': expected synthetic, nih:PATH, folder:PATH, medmnist:PATH.npz, "
                        "csv:PATH, chexpert:DIR or mimic:DIR")
    elif kind == "nih":
        index = read_nih(path, split, val_fraction, test_fraction, seed)
    elif kind == "folder":
        index = read_folder(path, val_fraction, test_fraction, seed, patient_pattern)
    elif kind == "medmnist":
        index = read_medmnist(path)
    elif kind in TABLE_KINDS:
        index = _read_table_source(kind, path, table, uncertain, missing, views, patient_pattern, val_fraction,
                                   test_fraction, seed)
    else:
        raise DataError(f"data source '{spec}': unknown kind '{kind}'; expected synthetic, nih, folder, medmnist, "
                        "csv, chexpert or mimic")
    return with_positive_class(index, positive_class)
