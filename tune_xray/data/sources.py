"""Readers: every data source becomes one `DatasetIndex` (path, patient_id, split, one 0/1 column per class).

Specs: `synthetic` (the embedded default, generated on first use), `nih:PATH` (ChestX-ray14 layout),
`folder:PATH` (one sub-folder per class, optionally under train/ val/ test/).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
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
    stratified_holdout,
    stratified_split,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}  # DICOM via pydicom
NIH_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")


@dataclass(frozen=True)
class DatasetIndex:
    """One table for every source: `frame` has path, patient_id, split and a 0/1 column per class."""

    frame: pd.DataFrame
    classes: tuple[str, ...]
    task: Literal["multilabel", "multiclass"]
    origin: str

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Multi-label: float32 (n, C) of 0/1. Multi-class: int64 (n,) class indices."""
        onehot = self.frame[list(self.classes)].to_numpy()
        if rows is not None:
            onehot = onehot[rows]
        if self.task == "multiclass":
            return onehot.argmax(1).astype(np.int64)
        return onehot.astype(np.float32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TUNE_XRAY_CACHE", Path.home() / ".cache" / "tune_xray"))


def _finish(frame: pd.DataFrame, classes, task, origin) -> DatasetIndex:
    check_splits_nonempty(frame, origin)
    check_patient_disjoint(frame, origin)
    check_learnable(frame, classes, task, origin)
    return DatasetIndex(frame.reset_index(drop=True), tuple(classes), task, origin)


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
    elif split == "random":
        frame["split"] = patient_split(frame["patient_id"], val_fraction, test_fraction, seed)
    else:
        raise DataError(f"nih:{root}: unknown split '{split}'; expected 'official' or 'random'")

    absent = [n for n in frame["image"] if n not in images]
    if absent:
        raise DataError(f"{root}: {len(absent)} listed image(s) not found under images/ "
                        f"(e.g. '{absent[0]}')")
    frame.insert(0, "path", [str(images[n]) for n in frame["image"]])
    return _finish(frame.drop(columns="image"), NIH_LABELS, "multilabel", f"nih:{root}")


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(root: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 42) -> DatasetIndex:
    """One sub-folder per class (multi-class). With train/ (and optional val/, test/) sub-folders those
    splits are kept; a missing val or test is a stratified slice of train."""
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
    frame.insert(1, "patient_id", pd.Series([None] * len(frame), dtype=object))
    labels = frame["label"].to_numpy()
    if not has_splits:
        frame["split"] = stratified_split(labels, val_fraction, test_fraction, seed, origin)
    else:
        for missing, fraction in (("test", test_fraction), ("val", val_fraction)):
            if not (frame["split"] == missing).any():
                train = np.flatnonzero(frame["split"].to_numpy() == "train")
                frame.loc[train[stratified_holdout(labels[train], fraction, seed, origin)], "split"] = missing
    frame[classes] = np.eye(len(classes), dtype=np.uint8)[labels]
    return _finish(frame.drop(columns="label"), classes, "multiclass", origin)


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
    return _finish(pd.concat(frames, ignore_index=True), classes, "multilabel" if multilabel else "multiclass", origin)


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


def ignored_split_keys(spec: str, split: str = "official") -> dict[str, str]:
    """The `data.*` split keys a source does not read, each with why: set to anything but its default, such a key
    would be silently ignored, so it is an error instead (loader.prepare)."""
    kind, _, path = spec.partition(":")
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
    if split == "official":  # nih and synthetic
        return {"test_fraction": "split: official takes test from test_list.txt (random uses test_fraction)"}
    return {}


def read_source(spec: str, split: str = "official", val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 42, synthetic: tuple[int, int, int] = (2000, 256, 0),
                cache_dir: str | Path | None = None) -> DatasetIndex:
    """Resolve a data spec (`synthetic`, `nih:PATH`, `folder:PATH`, `medmnist:PATH.npz`) to a checked index."""
    kind, _, path = spec.partition(":")
    if kind == "synthetic":
        root = synthetic_root(*synthetic, cache_dir=cache_dir)
        return read_nih(root, split, val_fraction, test_fraction, seed)
    if not path:
        raise DataError(f"data source '{spec}': expected synthetic, nih:PATH, folder:PATH or medmnist:PATH.npz")
    if kind == "nih":
        return read_nih(path, split, val_fraction, test_fraction, seed)
    if kind == "folder":
        return read_folder(path, val_fraction, test_fraction, seed)
    if kind == "medmnist":
        return read_medmnist(path)
    raise DataError(f"data source '{spec}': unknown kind '{kind}'; expected synthetic, nih, folder or medmnist")
