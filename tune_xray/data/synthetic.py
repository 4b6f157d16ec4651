"""A synthetic ChestX-ray14 look-alike in the NIH release's file layout: the embedded default dataset.

`generate(out, n_images, size, seed)` writes what the NIH release has (`images/*.png`,
`Data_Entry_2017.csv` with the real column names, `train_val_list.txt`, `test_list.txt`), so every
reader, split and cache path is exercised exactly as with the real data, on a fresh machine.

Each patient has their own anatomy (thorax, lungs, heart, ribs) and several follow-up images; chronic
findings tend to persist across follow-ups, so a patient leak between splits would inflate scores, as it
does on the real data. Labels follow NIH prevalence (≈54 % "No Finding") with clinically plausible
co-occurrence. Every finding draws its own pattern, kept subtle under noise and anatomy variation.
Deterministic per seed: image i is drawn from SeedSequence([seed, i]) whatever the worker count.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .labels import NIH_LABELS, NIH_PREVALENCE, NO_FINDING

# Findings that tend to appear together (NIH co-occurrence): drawing one makes the other 3× likelier.
_AFFINITY = [
    ("Effusion", "Atelectasis"), ("Effusion", "Infiltration"), ("Effusion", "Cardiomegaly"),
    ("Effusion", "Edema"), ("Atelectasis", "Infiltration"), ("Consolidation", "Pneumonia"),
    ("Consolidation", "Infiltration"), ("Pneumonia", "Infiltration"), ("Mass", "Nodule"),
    ("Emphysema", "Pneumothorax"), ("Fibrosis", "Pleural_Thickening"), ("Edema", "Cardiomegaly"),
]
_CHRONIC = {"Cardiomegaly", "Emphysema", "Fibrosis", "Hernia", "Pleural_Thickening", "Mass", "Nodule"}
_P_SICK = 0.40  # fresh abnormal draws; with chronic carry-over ≈54 % of images are "No Finding" (NIH 53.8 %)
_N_FINDINGS_P = (0.62, 0.25, 0.09, 0.04)  # 1, 2, 3, 4 findings in an abnormal image
_TEST_PATIENT_FRACTION = 0.2

CSV_COLUMNS = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
]


def _affinity_matrix() -> np.ndarray:
    idx = {name: i for i, name in enumerate(NIH_LABELS)}
    m = np.ones((len(NIH_LABELS), len(NIH_LABELS)))
    for a, b in _AFFINITY:
        m[idx[a], idx[b]] = m[idx[b], idx[a]] = 3.0
    return m


def sample_findings(rng: np.random.Generator, carried: frozenset[str] = frozenset()) -> list[str]:
    """One image's findings: NIH prevalence, 1–4 findings when abnormal, co-occurrence by affinity."""
    prevalence = np.array([NIH_PREVALENCE[name] for name in NIH_LABELS])
    chosen = {NIH_LABELS.index(name) for name in carried if rng.random() < 0.7}
    if rng.random() < _P_SICK:
        n = 1 + rng.choice(len(_N_FINDINGS_P), p=_N_FINDINGS_P)
        affinity = _affinity_matrix()
        weights = prevalence.copy()
        for i in chosen:
            weights = weights * affinity[i]
        while len(chosen) < n:
            w = weights.copy()
            w[list(chosen)] = 0.0
            i = int(rng.choice(len(w), p=w / w.sum()))
            chosen.add(i)
            weights = weights * affinity[i]
    return [NIH_LABELS[i] for i in sorted(chosen)]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a cells×cells grid of values upsampled bilinearly to size×size."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _blob(x, y, cx, cy, r, sharpness=2.0):
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (r * r)
    return np.exp(-(d2**sharpness))


def _ellipse(x, y, cx, cy, a, b):
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def side_sign(side_index: int) -> int:
    """Lung 0 is on the image's left (x < 0), lung 1 on its right."""
    return -1 if side_index == 0 else 1


def render(anatomy: dict, findings: list[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one frontal chest radiograph (uint8, size×size) of a patient with the given findings."""
    f = set(findings)
    lin = np.linspace(-1, 1, size, dtype=np.float32)
    shift = rng.normal(0, 0.02, 2)
    scale = 1 + rng.normal(0, 0.02)
    x = (lin[None, :] - shift[0]) * scale
    y = (lin[:, None] - shift[1]) * scale

    body = _ellipse(x, y, 0.0, 0.05, anatomy["body_a"], 0.95) < 1
    img = np.where(body, 0.55, 0.06).astype(np.float32)
    img += 0.08 * np.exp(-((x / 0.09) ** 2)) * body  # spine

    lung_b = anatomy["lung_b"] * (1.1 if "Emphysema" in f else 1.0)
    lung_level = -0.04 + (0.05 if "Emphysema" in f else 0.0)
    lung_masks, lung_geo = [], []
    for side in (-1, 1):
        cx = side * anatomy["lung_x"]
        a, b = anatomy["lung_a"], lung_b
        if "Atelectasis" in f and side == anatomy["atel_side"]:
            b *= 0.88  # volume loss: raised hemidiaphragm
        e = _ellipse(x, y, cx, lung_level, a, b)
        lung_masks.append(np.clip((1 - e) * 6, 0, 1))  # soft edge
        lung_geo.append((cx, lung_level, a, b, e))
    lungs = np.maximum(*lung_masks)

    texture = _smooth_noise(rng, size, 24) * (0.35 if "Emphysema" in f else 1.0)
    ribs = np.clip(np.cos(2 * np.pi * anatomy["rib_freq"] * (y + 0.35 * x * x)), 0, 1) ** 6
    lung_density = 0.2 + anatomy["lung_tone"] - (0.05 if "Emphysema" in f else 0.0)
    lung_img = lung_density + 0.05 * texture + 0.07 * ribs
    opacity = np.zeros_like(img)

    def in_lung(side_index: int):
        cx, cy, a, b, _ = lung_geo[side_index]
        for _ in range(20):
            px, py = rng.uniform(-0.8, 0.8) * a + cx, rng.uniform(-0.75, 0.75) * b + cy
            if _ellipse(px, py, cx, cy, a, b) < 0.7:
                return px, py
        return cx, cy

    def side_of() -> int:
        return int(rng.integers(2))

    if "Effusion" in f:  # fluid blunts a lung base, meniscus rising laterally
        for s in {side_of(), side_of()}:
            cx, cy, a, b, _ = lung_geo[s]
            level = cy + b * rng.uniform(0.5, 0.75)
            meniscus = level - 0.15 * np.abs(x - cx) / a
            opacity += 0.2 * np.clip((y - meniscus) * 25, 0, 1) * lung_masks[s]
    if "Atelectasis" in f:  # plate-like band in the lower zone
        s = anatomy["atel_side"]
        cx, cy, a, b, _ = lung_geo[s]
        yy = cy + b * rng.uniform(0.15, 0.45)
        band = np.exp(-(((y - yy - 0.15 * (x - cx)) / 0.035) ** 2)) * (np.abs(x - cx) < 0.8 * a)
        opacity += 0.17 * band * lung_masks[s]
    if "Consolidation" in f:
        px, py = in_lung(side_of())
        opacity += 0.24 * _blob(x, y, px, py, rng.uniform(0.13, 0.19)) * lungs
    if "Pneumonia" in f:  # patchy airspace opacity, lower zones
        px, py = in_lung(side_of())
        patch = 0.6 + 0.4 * _smooth_noise(rng, size, 16)
        opacity += 0.2 * _blob(x, y, px, py + 0.1, rng.uniform(0.11, 0.16), 1.0) * patch * lungs
    if "Infiltration" in f:  # several faint ill-defined patches
        for _ in range(int(rng.integers(3, 7))):
            px, py = in_lung(side_of())
            opacity += 0.09 * _blob(x, y, px, py, rng.uniform(0.05, 0.09), 1.0) * lungs
    if "Edema" in f:  # bilateral perihilar ("bat-wing") haze
        for s in (0, 1):
            cx, cy, a, b, _ = lung_geo[s]
            opacity += 0.15 * _blob(x, y, cx * 0.55, cy, 0.22, 1.0) * lung_masks[s]
    if "Fibrosis" in f:  # reticular lines, peripheral and basal
        reticular = np.abs(_smooth_noise(rng, size, 48)) < 0.12
        basal = np.clip((y - 0.0) * 3, 0, 1)
        opacity += 0.13 * reticular * basal * lungs
    if "Nodule" in f:
        for _ in range(int(rng.integers(1, 3))):
            px, py = in_lung(side_of())
            opacity += 0.24 * _blob(x, y, px, py, rng.uniform(0.025, 0.04), 3.0) * lungs
    if "Mass" in f:
        px, py = in_lung(side_of())
        opacity += 0.28 * _blob(x, y, px, py, rng.uniform(0.07, 0.11), 3.0) * lungs
    if "Pleural_Thickening" in f:  # bright band along the lateral pleura, apical bias
        s = side_of()
        cx, cy, a, b, e = lung_geo[s]
        lateral = np.clip(side_sign(s) * (x - cx) / a * 3, 0, 1) * np.clip((cy + 0.2 - y) * 4, 0, 1)
        opacity += 0.26 * ((e > 0.6) & (e < 1.0)) * lateral * lung_masks[s]

    lung_img = lung_img + opacity
    if "Pneumothorax" in f:  # lateral rim with no lung markings, thin visceral pleural line
        s = side_of()
        cx, cy, a, b, e = lung_geo[s]
        lateral_upper = (side_sign(s) * (x - cx) > 0) & (y < cy + 0.3 * b)
        lung_img = np.where((e > 0.55) & lateral_upper, lung_density - 0.06, lung_img)
        lung_img = np.where((np.abs(e - 0.55) < 0.025) & lateral_upper, lung_img + 0.12, lung_img)
    img = img * (1 - lungs) + lung_img * lungs

    heart_a = anatomy["heart_a"] * (rng.uniform(1.3, 1.45) if "Cardiomegaly" in f else 1.0)
    heart = np.clip((1 - _ellipse(x, y, anatomy["heart_x"], 0.33, heart_a, 0.24)) * 5, 0, 1)
    img = img * (1 - heart) + 0.66 * heart
    if "Hernia" in f:  # retrocardiac gas-and-fluid bubble above the diaphragm
        bubble = _blob(x, y, -0.05, 0.45, 0.11, 3.0)
        air = bubble * (y < 0.43)
        img += 0.12 * bubble - 0.25 * air

    # acquisition: exposure, gamma, quantum noise
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02)
    img += rng.normal(0, 0.035, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def sample_anatomy(rng: np.random.Generator) -> dict:
    """A patient's fixed anatomy: shared by all of their follow-up images."""
    return {
        "body_a": rng.uniform(0.78, 0.9),
        "lung_x": rng.uniform(0.34, 0.42),
        "lung_a": rng.uniform(0.25, 0.3),
        "lung_b": rng.uniform(0.55, 0.65),
        "lung_tone": rng.uniform(-0.03, 0.05),
        "heart_x": rng.uniform(0.04, 0.12),
        "heart_a": rng.uniform(0.2, 0.25),
        "rib_freq": rng.uniform(3.5, 4.5),
        "atel_side": int(rng.integers(2)),
    }


def _render_one(job):
    path, anatomy, findings, size, seed, index = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    Image.fromarray(render(anatomy, findings, size, rng)).save(path, optimize=False, compress_level=1)


def generate(out: str | os.PathLike, n_images: int = 2000, size: int = 256, seed: int = 0,
             workers: int | None = None) -> Path:
    """Write an NIH-format synthetic dataset of `n_images` size×size PNGs to `out` (atomically)."""
    if n_images < 10:
        raise ValueError(f"synthetic dataset needs at least 10 images, got {n_images}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows, jobs, test_patients = [], [], set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out.parent))  # same filesystem: the rename is atomic
    (tmp / "images").mkdir()
    patient = 0
    while len(rows) < n_images:
        patient += 1
        anatomy = sample_anatomy(rng)
        n_follow = min(int(rng.geometric(0.35)), 15)  # NIH: ≈3.6 images per patient, long tail
        if rng.random() < _TEST_PATIENT_FRACTION:
            test_patients.add(patient)
        carried: frozenset[str] = frozenset()
        for follow in range(n_follow):
            if len(rows) >= n_images:
                break
            findings = sample_findings(rng, carried)
            carried = frozenset(set(findings) & _CHRONIC)
            name = f"{patient:08d}_{follow:03d}.png"
            rows.append([
                name, "|".join(findings) or NO_FINDING, follow, patient, int(rng.integers(18, 90)),
                "MF"[int(rng.integers(2))], "PA" if rng.random() < 0.6 else "AP", size, size,
                round(0.143 * 2500 / size, 4), round(0.143 * 2500 / size, 4),
            ])
            jobs.append((str(tmp / "images" / name), anatomy, findings, size, seed, len(jobs)))
    try:
        workers = workers or min(os.cpu_count() or 1, 8)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_render_one, jobs, chunksize=16))
        else:
            for job in jobs:
                _render_one(job)
        with open(tmp / "Data_Entry_2017.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            w.writerows(rows)
        with open(tmp / "train_val_list.txt", "w") as tv, open(tmp / "test_list.txt", "w") as te:
            for row in rows:
                (te if row[3] in test_patients else tv).write(row[0] + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# CheXpert observations the synthetic findings render (CheXpert calls Effusion "Pleural Effusion")
CHEXPERT_FROM_NIH = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
                     "Edema": "Edema", "Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
                     "Pneumothorax": "Pneumothorax"}


def label_table(nih_root: str | os.PathLike, seed: int = 0, uncertain: float = 0.08, blank: float = 0.15) -> Path:
    """A CheXpert-style label table over a synthetic NIH dataset's images (`labels.csv` beside them): Path,
    Patient (`patientNNNNN`), Sex, Age, AP/PA, a train / valid split by patient, and one column per observation
    holding 1.0 / 0.0 / -1.0 (uncertain, a share `uncertain` of entries) / blank (not mentioned, a share `blank`),
    as CheXpert's labeler writes them. Its label columns: CHEXPERT_FROM_NIH's values."""
    root = Path(nih_root)
    rng = np.random.default_rng(seed)
    with open(root / "Data_Entry_2017.csv", newline="") as fh:
        entries = list(csv.DictReader(fh))
    columns = ["Path", "Patient", "Sex", "Age", "AP/PA", "Split", *CHEXPERT_FROM_NIH.values()]
    out = root / "labels.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for entry in entries:
            patient = int(entry["Patient ID"])
            findings = set(entry["Finding Labels"].split("|"))
            cells = []
            for nih in CHEXPERT_FROM_NIH:
                draw = rng.random()
                cell = "1.0" if nih in findings else "0.0"
                if draw < uncertain + blank:
                    cell = ""
                if draw < uncertain:
                    cell = "-1.0"
                cells.append(cell)
            writer.writerow([f"images/{entry['Image Index']}", f"patient{patient:05d}", entry["Patient Gender"],
                             entry["Patient Age"], entry["View Position"], "valid" if patient % 5 == 0 else "train",
                             *cells])
    return out


# NIH findings → CheXpert observations in the layouts below; the observations none maps to are left blank, as
# CheXpert's labeler leaves most of its entries
_TO_CHEXPERT = {**CHEXPERT_FROM_NIH, "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion"}
_SPLIT_OF_FOLD = {0: "test", 1: "validate"}  # a subject's id mod 10 → its MIMIC split (train otherwise)


def _observations(findings: set[str], rng, uncertain: float, blank: float, certain: bool = False) -> list[str]:
    """One image's 14 CheXpert cells (tables.CHEXPERT_OBSERVATIONS' order): 1.0 / 0.0 from its NIH findings where
    one maps (No Finding: none), −1.0 (a share `uncertain`) or blank (`blank`) drawn over those, blank where none
    maps; `certain` (CheXpert's radiologist-labelled valid.csv): 0 / 1 in every entry."""
    from .tables import CHEXPERT_OBSERVATIONS

    cells = []
    for observation in CHEXPERT_OBSERVATIONS:
        sources = [n for n, o in _TO_CHEXPERT.items() if o == observation]
        known = observation == "No Finding" or bool(sources)
        positive = findings <= {NO_FINDING} if observation == "No Finding" else bool(findings & set(sources))
        draw = rng.random()
        cell = "1.0" if positive else "0.0"
        if not certain and not known:
            cell = ""
        elif not certain and draw < uncertain:
            cell = "-1.0"
        elif not certain and draw < uncertain + blank:
            cell = ""
        cells.append(cell)
    return cells


def _place(source: Path, target: Path) -> None:
    """An image under another layout's name: a hard link where the file system allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def chexpert_layout(nih_root: str | os.PathLike, out: str | os.PathLike, seed: int = 0, uncertain: float = 0.08,
                    blank: float = 0.15) -> Path:
    """The synthetic images in CheXpert-v1.0-small's layout (`out/CheXpert-v1.0-small/`: train.csv, valid.csv,
    `train|valid/patientNNNNN/studyK/view1_frontal.jpg`), for `chexpert:DIR` without a download: one study per
    NIH follow-up, every seventh a lateral view, a fifth of the patients in valid.csv (0 / 1 only, as its
    radiologists labelled it), uncertain and blank entries in train.csv. Files keep their PNG bytes (the reader
    decodes by content). Returns the folder."""
    root = Path(out) / "CheXpert-v1.0-small"
    rng = np.random.default_rng(seed)
    with open(Path(nih_root) / "Data_Entry_2017.csv", newline="") as fh:
        entries = list(csv.DictReader(fh))
    from .tables import CHEXPERT_OBSERVATIONS

    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    rows = {"train": [], "valid": []}
    for i, entry in enumerate(entries):
        patient = int(entry["Patient ID"])
        split = "valid" if patient % 5 == 0 else "train"
        lateral = i % 7 == 6
        name = "view1_lateral.jpg" if lateral else "view1_frontal.jpg"
        relative = f"{split}/patient{patient:05d}/study{int(entry['Follow-up #']) + 1}/{name}"
        _place(Path(nih_root) / "images" / entry["Image Index"], root / relative)
        findings = set(entry["Finding Labels"].split("|"))
        rows[split].append([f"{root.name}/{relative}", "Female" if entry["Patient Gender"] == "F" else "Male",
                            entry["Patient Age"], "Lateral" if lateral else "Frontal",
                            "" if lateral else entry["View Position"],
                            *_observations(findings, rng, uncertain, blank, certain=split == "valid")])
    for split, table in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header, *table])
    return root


def mimic_layout(nih_root: str | os.PathLike, out: str | os.PathLike, seed: int = 0, uncertain: float = 0.08,
                 blank: float = 0.15) -> Path:
    """The synthetic images in MIMIC-CXR-JPG 2.0.0's layout (`out/mimic-cxr-jpg/2.0.0/`: the gzipped metadata,
    chexpert and split tables, `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`), for `mimic:DIR` without a download: one
    study per image, every seventh a LATERAL ViewPosition, every twentieth study absent from the labeler table, a
    tenth of the subjects in test and a tenth in validate. Returns the folder."""
    import gzip

    from .tables import CHEXPERT_OBSERVATIONS

    root = Path(out) / "mimic-cxr-jpg" / "2.0.0"
    rng = np.random.default_rng(seed)
    with open(Path(nih_root) / "Data_Entry_2017.csv", newline="") as fh:
        entries = list(csv.DictReader(fh))
    metadata = [["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                 "Columns"]]
    labels = [["subject_id", "study_id", *CHEXPERT_OBSERVATIONS]]
    splits = [["dicom_id", "study_id", "subject_id", "split"]]
    for i, entry in enumerate(entries):
        subject, study = str(10_000_000 + int(entry["Patient ID"])), str(50_000_000 + i)
        dicom = rng.bytes(16).hex()
        view = "LATERAL" if i % 7 == 6 else entry["View Position"]
        _place(Path(nih_root) / "images" / entry["Image Index"],
               root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
        metadata.append([dicom, subject, study, f"CHEST ({view})", view, entry["OriginalImage[Width"],
                         entry["Height]"]])
        if i % 20 != 19:
            labels.append([subject, study, *_observations(set(entry["Finding Labels"].split("|")), rng, uncertain,
                                                           blank)])
        fold = int(entry["Patient ID"]) % 10
        splits.append([dicom, study, subject, _SPLIT_OF_FOLD.get(fold, "train")])
    for stem, table in zip(("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert", "mimic-cxr-2.0.0-split"),
                           (metadata, labels, splits)):
        with gzip.open(root / f"{stem}.csv.gz", "wt", newline="") as fh:
            csv.writer(fh).writerows(table)
    return root
