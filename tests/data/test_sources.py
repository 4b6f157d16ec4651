import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tune_xray.config import DataConfig
from tune_xray.data.labels import NIH_LABELS
from tune_xray.data.loader import prepare
from tune_xray.data.sources import read_folder, read_nih, read_source
from tune_xray.data.splits import DataError, check_patient_disjoint


def test_nih_official_split(synth_root):
    index = read_nih(synth_root)
    f = index.frame
    test_names = set((synth_root / "test_list.txt").read_text().split())
    assert set(f.loc[f.split == "test", "path"].map(lambda p: p.rsplit("/", 1)[1])) == test_names
    assert index.task == "multilabel" and index.classes == NIH_LABELS
    assert set(f.split) == {"train", "val", "test"}
    assert f.groupby("patient_id").split.nunique().max() == 1
    # "No Finding" is all zeros
    table = pd.read_csv(synth_root / "Data_Entry_2017.csv").set_index("Image Index")
    names = f.path.map(lambda p: p.rsplit("/", 1)[1])
    healthy = (table.loc[names, "Finding Labels"] == "No Finding").to_numpy()
    assert healthy.any() and (index.targets()[healthy] == 0).all()


def test_nih_random_patient_split(synth_root):
    f = read_nih(synth_root, split="random", val_fraction=0.1, test_fraction=0.2, seed=42).frame
    patients = f.groupby("split").patient_id.nunique() / f.patient_id.nunique()
    assert abs(patients["test"] - 0.2) < 0.03 and abs(patients["val"] - 0.1) < 0.03
    assert f.groupby("patient_id").split.nunique().max() == 1
    again = read_nih(synth_root, split="random", seed=42).frame
    assert (again.split == f.split).all()


def test_patient_leak_is_an_error(nih_copy):
    table = pd.read_csv(nih_copy / "Data_Entry_2017.csv")
    patient = table["Patient ID"].value_counts().index[0]
    images = table.loc[table["Patient ID"] == patient, "Image Index"].tolist()
    tv = [n for n in (nih_copy / "train_val_list.txt").read_text().split() if n not in images]
    te = [n for n in (nih_copy / "test_list.txt").read_text().split() if n not in images]
    (nih_copy / "train_val_list.txt").write_text("\n".join(tv + images[:1]))
    (nih_copy / "test_list.txt").write_text("\n".join(te + images[1:]))
    with pytest.raises(DataError, match=f"patient_id {patient}"):
        read_nih(nih_copy)


def test_leak_check_on_a_frame():
    frame = pd.DataFrame({"patient_id": ["1", "1", "2"], "split": ["train", "test", "val"]})
    with pytest.raises(DataError, match="more than one split"):
        check_patient_disjoint(frame, "x")


def test_missing_csv_column(nih_copy):
    csv = nih_copy / "Data_Entry_2017.csv"
    pd.read_csv(csv).drop(columns="Patient ID").to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing column\(s\) \['Patient ID'\]"):
        read_nih(nih_copy)


def test_unknown_label(nih_copy):
    csv = nih_copy / "Data_Entry_2017.csv"
    table = pd.read_csv(csv)
    table.loc[3, "Finding Labels"] = "Effusion|Pneumonitis"
    table.to_csv(csv, index=False)
    with pytest.raises(DataError, match="row 5 .*unknown label 'Pneumonitis'"):
        read_nih(nih_copy)


def test_list_names_an_image_not_in_the_csv(nih_copy):
    with open(nih_copy / "test_list.txt", "a") as fh:
        fh.write("\n99999999_000.png\n")
    with pytest.raises(DataError, match="test_list.txt: 1 image.*99999999_000.png"):
        read_nih(nih_copy)


def test_listed_image_missing_on_disk(nih_copy):
    victim = sorted((nih_copy / "images").iterdir())[5]
    victim.unlink()
    with pytest.raises(DataError, match=f"not found under images/.*{victim.name}"):
        read_nih(nih_copy)


def test_empty_split(nih_copy):
    (nih_copy / "test_list.txt").write_text("")
    with pytest.raises(DataError, match="'test' split is empty"):
        read_nih(nih_copy)


def test_corrupt_image_fails_before_training_and_leaves_no_cache(nih_copy, tmp_path):
    victim = sorted((nih_copy / "images").iterdir())[7]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=f"{victim.name}: cannot read image"):
        prepare(DataConfig(source=f"nih:{nih_copy}", cache_size=32, cache_dir=str(cache)))
    assert not [p for p in (cache / "images").iterdir() if p.suffix in (".u8", ".json", ".tmp")]


def test_unknown_source_kind():
    with pytest.raises(DataError, match="unknown kind 'xls'"):
        read_source("xls:/x")


def _folder_dataset(root, classes=("covid", "normal", "pneumonia"), per_class=12, splits=None):
    rng = np.random.default_rng(0)
    for split in splits or [None]:
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(d / f"{c}{i}.png")


def test_folder_per_class_stratified(tmp_path):
    _folder_dataset(tmp_path)
    index = read_folder(tmp_path, val_fraction=0.2, test_fraction=0.25)
    assert index.task == "multiclass" and index.classes == ("covid", "normal", "pneumonia")
    counts = pd.crosstab(index.frame.split, index.targets())
    assert counts.loc["val"].max() - counts.loc["val"].min() <= 1  # stratified: ≈ same per class
    assert (counts.loc["test"] == 3).all()
    assert (index.frame[list(index.classes)].sum(axis=1) == 1).all()


def test_folder_with_split_dirs_and_unknown_label(tmp_path):
    _folder_dataset(tmp_path, splits=["train", "test"])
    index = read_folder(tmp_path, val_fraction=0.25)
    assert set(index.frame.split) == {"train", "val", "test"}
    assert (index.frame.split == "test").sum() == 36
    _folder_dataset(tmp_path, classes=("tuberculosis",), splits=["test"])
    with pytest.raises(DataError, match="unknown label 'tuberculosis'"):
        read_folder(tmp_path)


def test_data_a_classifier_cannot_learn_from_is_an_error(tmp_path, nih_copy):
    _folder_dataset(tmp_path / "one", classes=("normal",))
    with pytest.raises(DataError, match=r"'train' split holds images of 1 class\(es\) \['normal'\]"):
        read_folder(tmp_path / "one")
    csv = nih_copy / "Data_Entry_2017.csv"
    frame = pd.read_csv(csv)
    frame["Finding Labels"] = "No Finding"  # every label all negative
    frame.to_csv(csv, index=False)
    with pytest.raises(DataError, match="no label has both positive and negative images in the 'train' split"):
        read_nih(nih_copy)


def test_folder_datasets_accept_dicom(tmp_path):
    from tests.test_ensemble import _dicom
    from tune_xray.data.cache import build_cache

    for cls, level in (("normal", 500), ("pneumonia", 3500)):
        (tmp_path / cls).mkdir()
        for i in range(10):
            _dicom(tmp_path / cls / f"{i}.dcm", np.full((32, 32), level + 10 * i) + np.eye(32) * 400)
    index = read_folder(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert len(index.frame) == 20 and index.classes == ("normal", "pneumonia")
    cache = build_cache(index.frame["path"].tolist(), 16, 1, tmp_path / "cache")
    assert cache.open().shape == (20, 1, 16, 16)


def test_split_keys_a_source_would_ignore_are_errors(tmp_path, synth_root):
    """Each source reads some of data.split / val_fraction / test_fraction / split_seed; setting one it does not
    read is an error naming it, not a value silently ignored."""
    from tests.data.test_medmnist import write_npz
    from tune_xray.config import ConfigError

    npz = write_npz(tmp_path / "pneumoniamnist.npz", lambda rng, n: rng.integers(0, 2, (n, 1)))
    _folder_dataset(tmp_path / "split", splits=["train", "val", "test"])
    _folder_dataset(tmp_path / "flat")
    cases = [({"source": f"medmnist:{npz}", "val_fraction": 0.3}, "data.val_fraction=0.3: medmnist:"),
             ({"source": f"folder:{tmp_path / 'split'}", "test_fraction": 0.3}, "has train/, val/ and test/"),
             ({"source": f"folder:{tmp_path / 'flat'}", "split": "random"}, "data.split=random: folder:"),
             ({"source": f"nih:{synth_root}", "test_fraction": 0.3}, "split: official takes test from test_list")]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            prepare(DataConfig(cache_dir=str(tmp_path / "cache"), **settings))
    prepare(DataConfig(source=f"folder:{tmp_path / 'flat'}", val_fraction=0.3, cache_dir=str(tmp_path / "cache")))


def test_each_source_names_the_split_it_made(tmp_path, synth_root):
    """What a reader of any number needs first: the official list or S0's random split (saying the list is not
    used), a folder's own folders or stratified slices, and whether patients exist."""
    official, random = read_nih(synth_root), read_nih(synth_root, split="random")
    n_test = len((synth_root / "test_list.txt").read_text().split())
    assert official.split == f"NIH official test list ({n_test:,} images); val: 10 % of train_val patients, seed 42"
    assert random.split == "random patient split 70 % / 10 % / 20 %, seed 42 (S0's; the official test list is not used)"
    assert official.patients == "patient-disjoint (checked); intervals resample patients"
    _folder_dataset(tmp_path / "flat")
    flat = read_folder(tmp_path / "flat")
    assert flat.split == "stratified by class, not by patient: val 10 %, test 20 %, seed 42"
    assert flat.patients.startswith("no patient ids: intervals resample images; images of one patient may fall")
    _folder_dataset(tmp_path / "split", splits=["train", "test"])
    told = read_folder(tmp_path / "split").split
    assert told == "its train/, test/ folders; val a stratified 10 % of train/ (seed 42)"
    facts = flat.facts()
    assert facts["task"] == "multiclass" and facts["images"] == {"train": 24, "val": 4, "test": 8}


def test_two_classes_are_one_binary_task_with_its_positive_class_second(tmp_path):
    _folder_dataset(tmp_path / "a", classes=("infiltration", "normal"))
    index = read_source(f"folder:{tmp_path / 'a'}")
    assert index.binary and index.classes == ("normal", "infiltration")  # the class not named normal
    assert index.positive == "infiltration (the class not named 'normal')"
    assert (index.targets() == index.frame["infiltration"].to_numpy()).all()
    _folder_dataset(tmp_path / "b", classes=("covid", "pneumonia"))
    assert read_source(f"folder:{tmp_path / 'b'}").classes == ("covid", "pneumonia")  # no normal: name order
    chosen = read_source(f"folder:{tmp_path / 'b'}", positive_class="covid")
    assert chosen.classes == ("pneumonia", "covid") and chosen.positive == "covid (data.positive_class)"
    with pytest.raises(DataError, match=r"data.positive_class=flu: not a class of folder:.*\['covid', 'pneumonia'\]"):
        read_source(f"folder:{tmp_path / 'b'}", positive_class="flu")
    _folder_dataset(tmp_path / "c")
    with pytest.raises(DataError, match="not a two-class task"):
        read_source(f"folder:{tmp_path / 'c'}", positive_class="covid")


def test_labels_no_training_image_has_are_named(nih_copy):
    table = pd.read_csv(nih_copy / "Data_Entry_2017.csv")
    table["Finding Labels"] = np.where(table["Finding Labels"].str.contains("Effusion"), "Effusion", "No Finding")
    table.to_csv(nih_copy / "Data_Entry_2017.csv", index=False)
    index = read_nih(nih_copy)
    assert index.untrained() == [c for c in NIH_LABELS if c != "Effusion"]
    assert index.facts()["untrained"] == index.untrained()


def test_the_shipped_studies_run_on_any_source_and_a_chosen_split_key_says_where_it_came_from(tmp_path, synth_root):
    """Folder and MedMNIST data use their own splits: no shipped study sets a split key they would refuse. A value
    the user chose that the source cannot honour is refused, naming --set or their own file."""
    from tests.data.test_medmnist import write_npz
    from tune_xray.config import ConfigError, parse_overrides
    from tune_xray.data.loader import check_split_keys
    from tune_xray.space import SEARCH_SPACES, load_study

    _folder_dataset(tmp_path / "flat")
    npz = write_npz(tmp_path / "pneumoniamnist.npz", lambda rng, n: rng.integers(0, 2, (n, 1)))
    for path in sorted(SEARCH_SPACES.glob("*.yaml")):
        study = load_study(path.stem)
        for source in (f"folder:{tmp_path / 'flat'}", f"medmnist:{npz}"):
            for smoke in (False, True):
                cfg = study.resolve({"data": {"source": source}}, smoke).trial_config({})
                check_split_keys(cfg.data, lambda key: study.origin_of(f"data.{key}"))
    study = load_study("supervised")
    chosen = parse_overrides(["data.split=random"])
    source = {"data": {"source": f"folder:{tmp_path / 'flat'}", "split": "random"}}
    cfg = study.resolve({**chosen, **source}).trial_config({})
    with pytest.raises(ConfigError, match=r"data.split=random \(from --set\): folder:"):
        check_split_keys(cfg.data, lambda key: study.origin_of(f"data.{key}", chosen))
    own = tmp_path / "own.yaml"
    own.write_text((SEARCH_SPACES / "supervised.yaml").read_text().replace("data: {cache_size: 288}",
                                                                            "data: {cache_size: 288, split: random}"))
    mine = load_study(str(own))
    cfg = mine.resolve({"data": {"source": f"medmnist:{npz}"}}).trial_config({})
    with pytest.raises(ConfigError, match=r"data.split=random \(from .*own.yaml: base\): medmnist:"):
        check_split_keys(cfg.data, lambda key: mine.origin_of(f"data.{key}"))


def _pneumonia_folder(root, splits=None, per_patient=3, patients=8):
    """The pediatric pneumonia set's naming: NORMAL/IM-0001-0001.jpeg style ids, PNEUMONIA/person<N>_virus_<k>.jpeg;
    several images per patient."""
    rng = np.random.default_rng(1)
    for split in splits or [None]:
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for p in range(patients):
                person = f"{split or 'all'}{cls[0]}{p}"
                for k in range(per_patient):
                    image = Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8))
                    image.save(folder / f"person{person}_virus_{k}.jpeg")


def test_folder_patients_from_file_names_give_patient_disjoint_stratified_splits(tmp_path):
    _pneumonia_folder(tmp_path, patients=20)
    pattern = r"person(\w+?)_virus"
    index = read_folder(tmp_path, val_fraction=0.2, test_fraction=0.2, patient_pattern=pattern)
    frame = index.frame
    assert frame.patient_id.nunique() == 40 and frame.groupby("patient_id").size().eq(3).all()
    assert frame.groupby("patient_id").split.nunique().max() == 1  # a patient's three images in one split
    patients = frame.groupby("split").patient_id.nunique()
    assert patients["test"] == 8 and patients["val"] == 8  # 0.2 of 40 patients each, by patient
    classes = pd.crosstab(frame.split, index.targets())
    assert (classes.loc["test"] == 12).all()  # stratified: 4 patients of each class
    assert index.has_patients and "intervals resample patients" in index.patients
    assert "by patient (data.patient_pattern), stratified by class" in index.split
    without = read_folder(tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert not without.has_patients and "not by patient" in without.split


def test_folder_patient_pattern_with_split_folders_and_its_errors(tmp_path):
    _pneumonia_folder(tmp_path, splits=["train", "test"], patients=10)
    index = read_folder(tmp_path, val_fraction=0.2, patient_pattern=r"person(\w+?)_virus")
    frame = index.frame
    assert frame.groupby("patient_id").split.nunique().max() == 1 and (frame.split == "val").any()
    assert "val a patient-wise, stratified 20 % of train/" in index.split
    with pytest.raises(DataError, match=r"patient_pattern 'IM-\(\\d\+\)' finds no patient in 120 image path\(s\), "
                                        r"e.g. train/NORMAL/persontrainN0_virus_0.jpeg"):
        read_folder(tmp_path, patient_pattern=r"IM-(\d+)")
    with pytest.raises(DataError, match=r"its split folders.*patient\(s\) appear in more than one split"):
        read_folder(tmp_path, patient_pattern=r"person\w+?([NP]\d+)_virus")  # train's and test's N0 made one
    with pytest.raises(ValueError, match="has 2 groups; expected exactly one"):
        DataConfig(patient_pattern=r"(a)(b)")
    with pytest.raises(ValueError, match="is not a regular expression"):
        DataConfig(patient_pattern=r"person(")


def test_patient_pattern_is_refused_where_the_source_has_its_own_patients(synth_root):
    from tune_xray.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.patient_pattern=x\(\\d\): nih:.*patients come from its own table"):
        prepare(DataConfig(source=f"nih:{synth_root}", patient_pattern=r"x(\d)"))


CHEXPERT_LABELS = ["Atelectasis", "Effusion", "Cardiomegaly"]


def _chexpert_table(synth_root, path, rows=None):
    """A CheXpert-style table over the synthetic images: Path, Patient, Frontal/Lateral-like view, a train/valid
    split by patient, and 1 / 0 / -1 / blank label cells (uncertain and blank entries on purpose)."""
    entries = pd.read_csv(synth_root / "Data_Entry_2017.csv", dtype={"Patient ID": str})
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"Path": "images/" + entries["Image Index"], "Patient": "patient" + entries["Patient ID"],
                          "AP/PA": entries["View Position"]})
    for label in CHEXPERT_LABELS:
        cells = np.where(entries["Finding Labels"].str.contains(label), "1.0", "0.0").astype(object)
        cells[rng.random(len(cells)) < 0.1] = "-1.0"
        cells[rng.random(len(cells)) < 0.1] = ""
        table[label] = cells
    valid = entries["Patient ID"].astype(int) % 5 == 0
    table["Split"] = np.where(valid, "valid", "train")
    if rows is not None:
        table = rows(table)
    table.to_csv(path, index=False)
    return table


def _table_cfg(root, **changes):
    from tune_xray.config import TableConfig

    return TableConfig(**{"image_column": "Path", "image_root": str(root), "label_columns": CHEXPERT_LABELS,
                          "patient_column": "Patient",
                          "split_column": "Split", "split_values": {"train": "train", "val": "valid"}, **changes})


def test_a_label_table_with_patients_splits_views_and_uncertain_labels(synth_root, tmp_path):
    table_path = tmp_path / "chexpert.csv"
    table = _chexpert_table(synth_root, table_path)
    index = read_source(f"csv:{table_path}", table=_table_cfg(synth_root), uncertain="zeros")
    frame = index.frame
    assert index.task == "multilabel" and index.classes == tuple(CHEXPERT_LABELS)
    assert len(frame) == len(table) and set(frame.split) == {"train", "val", "test"}  # test sliced from train
    assert frame.groupby("patient_id").split.nunique().max() == 1 and index.has_patients
    val_patients = set(table.loc[table.Split == "valid", "Patient"])
    assert set(frame.loc[frame.split == "val", "patient_id"]) == val_patients  # the table's own split kept
    uncertain = (table["Effusion"] == "-1.0").sum()
    zeros = frame["Effusion"].to_numpy()
    ones = read_source(f"csv:{table_path}", table=_table_cfg(synth_root), uncertain="ones").frame["Effusion"].to_numpy()
    assert ones.sum() - zeros.sum() == uncertain  # U-Ones counts each -1 as a positive, U-Zeros as a negative
    assert index.policy == "uncertain (-1) U-Zeros: as negatives; blank as negatives"
    entries = index.label_entries()
    assert sum(entries[s]["Effusion"]["uncertain"] for s in entries) == uncertain
    assert sum(entries[s][c]["missing"] for s in entries for c in CHEXPERT_LABELS) == \
        (table[CHEXPERT_LABELS] == "").to_numpy().sum()
    ignored = read_source(f"csv:{table_path}", table=_table_cfg(synth_root), uncertain="ignore", missing="ignore")
    masked = np.isnan(ignored.targets())
    assert masked.sum() == (table[CHEXPERT_LABELS].isin(["-1.0", ""])).to_numpy().sum() == ignored.facts()["masked"]
    assert not np.isnan(zeros).any()
    frontal = read_source(f"csv:{table_path}", table=_table_cfg(synth_root, view_column="AP/PA"), views=["PA"])
    assert len(frontal.frame) == (table["AP/PA"] == "PA").sum() and "views PA" in frontal.split


def test_a_label_table_with_one_class_column_and_no_split_column(synth_root, tmp_path):
    table_path = tmp_path / "covid.tsv"
    entries = pd.read_csv(synth_root / "Data_Entry_2017.csv", dtype={"Patient ID": str})
    classes = np.where(entries["Finding Labels"] == "No Finding", "Normal", "COVID")
    pd.DataFrame({"file": entries["Image Index"], "finding": classes, "pid": entries["Patient ID"]}).to_csv(
        table_path, sep="\t", index=False)
    cfg = _table_cfg(synth_root, image_column="file", image_root=str(synth_root / "images"), label_columns=None,
                     label_column="finding", patient_column="pid", split_column=None)
    index = read_source(f"csv:{table_path}", table=cfg)
    assert index.binary and index.classes == ("Normal", "COVID")  # the class not named normal is positive
    assert index.frame.groupby("patient_id").split.nunique().max() == 1 and "random split by patients" in index.split


@pytest.mark.parametrize("change, cfg, message", [
    (lambda t: t.drop(columns="Patient"), {}, r"no column 'Patient' \(data.table.patient_column\)"),
    (lambda t: t.assign(Effusion=t.Effusion.where(t.index != 4, "2")), {},
     r"row 6, column 'Effusion': label value '2'; expected 1, 0, -1 \(uncertain\) or blank"),
    (lambda t: t.assign(Split=t.Split.where(t.index != 0, "holdout")), {},
     r"row 2, column 'Split': split value 'holdout'; expected one of \['train', 'valid'\]"),
    (lambda t: t.assign(Path=t.Path.where(t.index != 2, "images/nope.png")), {},
     r"row 4, column 'Path': image .*nope.png not found"),
    (lambda t: t.assign(Split=t.Split.where(t.index != 1, "valid")), {},
     r"patient patient1 \(rows 2, 3.*is in more than one split of column 'Split'"),
    (lambda t: t, {"label_columns": None}, "set one of data.table.label_column"),
])
def test_every_bad_label_table_is_one_line_naming_row_and_column(synth_root, tmp_path, change, cfg, message):
    table_path = tmp_path / "bad.csv"
    _chexpert_table(synth_root, table_path, rows=change)
    with pytest.raises(DataError, match=message):
        read_source(f"csv:{table_path}", table=_table_cfg(synth_root, **cfg))


def test_table_keys_are_refused_for_sources_that_are_not_tables(synth_root):
    from tune_xray.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.uncertain=ones: nih:.* is not a label table"):
        prepare(DataConfig(source=f"nih:{synth_root}", uncertain="ones"))
