"""Reading a CheXpert-sized label table: `chexpert:DIR` (every column and cell checked, every listed image looked up on
disk, patients from Path, frontal views, the patient-wise val slice, the policies) vs the floor under it — pandas
parsing the same two CSVs and nothing else — in this one process, printing the ratio.

The layout is CheXpert-v1.0-small's at the size of the release (224,316 images of 65,240 patients, Irvin et al.
2019: 234 rows in valid.csv, the rest in train.csv; about one image in seven lateral), its images empty
files (the reader only looks them up), its cells drawn like CheXpert's (mostly blank, some −1).

    python scripts/bench_tables.py [--rows 224316] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tune_xray.data.sources import read_source
from tune_xray.data.tables import CHEXPERT_OBSERVATIONS

VALID_ROWS = 234
PATIENTS = 65_240


def make_layout(out: Path, rows: int, seed: int = 0) -> Path:
    root = out / "CheXpert-v1.0-small"
    rng = np.random.default_rng(seed)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    cells = np.array(["1.0", "0.0", "-1.0", ""])
    draws = rng.choice(4, size=(rows, len(CHEXPERT_OBSERVATIONS)), p=[0.12, 0.08, 0.05, 0.75])
    patients = np.sort(rng.integers(1, PATIENTS - 200, rows))
    tables = {"train": [], "valid": []}
    for i in range(rows):
        split = "valid" if i >= rows - VALID_ROWS else "train"
        patient = PATIENTS + i % 200 if split == "valid" else patients[i]  # valid.csv's 200 patients are its own
        view = "lateral" if i % 7 == 6 else "frontal"
        lateral = view == "lateral"
        relative = f"{split}/patient{patient:05d}/study{i % 5 + 1}/view{i}_{view}.jpg"
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
        row = [f"{root.name}/{relative}", "Female", "60", "Lateral" if lateral else "Frontal", "" if lateral else "AP"]
        tables[split].append(row + list(cells[draws[i]] if split == "train" else cells[draws[i] % 2]))
    for split, table in tables.items():
        with open(root / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header, *table])
    return root


def best_of(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=224_316)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_layout(Path(tmp), args.rows)
        print(f"CheXpert-v1.0-small layout, {args.rows:,} rows, written in {time.perf_counter() - start:.0f} s")

        def floor():
            return [pd.read_csv(root / name, dtype=str, keep_default_na=False) for name in ("train.csv", "valid.csv")]

        def floor_and_files():  # the parse and one is_file per listed image: what no reader can skip
            return [[(root.parent / p).is_file() for p in t["Path"]] for t in floor()]

        def ours(uncertain="zeros", missing="zeros"):
            return read_source(f"chexpert:{root}", uncertain=uncertain, missing=missing)

        index = ours("ignore", "ignore")
        print(f"read: {len(index.frame):,} frontal images of {index.frame['patient_id'].nunique():,} patients; "
              f"{index.facts()['masked']:,} entries masked under U-Ignore + missing: ignore")
        plain, files, checked = (best_of(run, args.repeats) for run in (floor, floor_and_files, ours))
        masked = best_of(lambda: ours("ignore", "ignore"), args.repeats)
        print(f"pandas parse only (the floor)      {plain:6.2f} s")
        print(f"pandas parse + is_file per image   {files:6.2f} s")
        print(f"chexpert:DIR, U-Zeros              {checked:6.2f} s")
        print(f"chexpert:DIR, U-Ignore + ignore    {masked:6.2f} s")
        print(f"ratio chexpert:DIR / pandas parse: {checked / plain:.1f}×; / parse + is_file: {checked / files:.1f}× "
              f"(best of {args.repeats})")


if __name__ == "__main__":
    main()
