"""The `medmnist:PATH.npz` reader on small generated files in MedMNIST's layout."""

import numpy as np
import pytest
from PIL import Image

from tune_xray.config import DataConfig
from tune_xray.data.loader import prepare
from tune_xray.data.sources import read_source
from tune_xray.data.splits import DataError

SIZES = {"train": 40, "val": 10, "test": 12}


def write_npz(path, labels_of, size=28, rgb=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SIZES.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = labels_of(rng, n)
    np.savez(path, **arrays)
    return path


def test_binary_pneumonia_layout(tmp_path):
    path = write_npz(tmp_path / "pneumoniamnist.npz", lambda rng, n: rng.integers(0, 2, (n, 1)))
    index = read_source(f"medmnist:{path}")
    assert index.task == "multiclass" and index.classes == ("class_0", "class_1")
    assert index.frame.split.value_counts().to_dict() == SIZES


def test_chest_multilabel_with_nih_names_and_cached_images(tmp_path):
    path = write_npz(tmp_path / "chestmnist_64.npz", lambda rng, n: (rng.random((n, 14)) < 0.2).astype(np.uint8),
                     size=64)
    data = prepare(DataConfig(source=f"medmnist:{path}", cache_size=32, cache_dir=str(tmp_path / "cache")))
    assert data.index.task == "multilabel" and data.index.classes[0] == "Atelectasis"
    images, targets = data.dataset("val")[list(range(4))]
    assert images.shape == (4, 1, 32, 32) and targets.shape == (4, 14)
    npz = np.load(path)
    first = np.asarray(Image.fromarray(npz["val_images"][0]).resize((32, 32), Image.BILINEAR))
    assert np.abs(images[0, 0].numpy().astype(int) - first.astype(int)).max() <= 1


def test_rgb_medmnist_keeps_three_channels(tmp_path):
    path = write_npz(tmp_path / "bloodmnist.npz", lambda rng, n: rng.integers(0, 8, (n, 1)), rgb=True)
    data = prepare(DataConfig(source=f"medmnist:{path}", cache_size=28, channels=3, cache_dir=str(tmp_path / "c")))
    assert data.dataset("train")[[0, 1]][0].shape == (2, 3, 28, 28)


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.pop("val_labels"), "missing array\\(s\\) \\['val_labels'\\]"),
    (lambda a: a.__setitem__("test_labels", np.full((12, 1), 7)), "test_labels has values outside 0..1"),
])
def test_bad_files_are_one_clear_error(tmp_path, bad, message):
    write_npz(tmp_path / "ok.npz", lambda rng, n: rng.integers(0, 2, (n, 1)))
    arrays = dict(np.load(tmp_path / "ok.npz"))
    arrays["test_labels"] = arrays["test_labels"] % 2
    arrays["train_labels"][0] = 1
    bad(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=f"medmnist:{tmp_path / 'bad.npz'}: {message}"):
        read_source(f"medmnist:{tmp_path / 'bad.npz'}")
