"""Shared fixtures: a small synthetic NIH-format dataset and a tiny CPU trial config."""

import os
import shutil

import pytest
import torch

from tune_xray.config import TrialConfig, build_config, merge

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in its interpreter: the scan's Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")  # backend is tested without a GPU (before triton is imported)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped without one (scripts/gpu_check.sh runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep every cache and generated dataset of the test session out of the user's home; pretrained weights
    only from caches the tests fill (HF_HUB_OFFLINE=1: no test reaches the internet, a miss is an error)."""
    os.environ["TUNE_XRAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """300 synthetic NIH-format images at 64² (generated once per session, read-only for tests)."""
    from tune_xray.data.synthetic import generate
    return generate(tmp_path_factory.mktemp("synth") / "nih", n_images=300, size=64, seed=0)


@pytest.fixture
def nih_copy(synth_root, tmp_path):
    """A writable copy of the synthetic dataset, for tests that corrupt it."""
    dst = tmp_path / "nih"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture
def make_config(tmp_path):
    """Factory of trial configs that run in seconds on CPU: timm's test_resnet, 64² cache, 56² crops."""
    return lambda **sections: _tiny_config(tmp_path, **sections)


def _tiny_config(tmp_path, **sections) -> TrialConfig:
    base = {
        "output_dir": str(tmp_path / "runs"),
        "data": {"source": "synthetic", "synthetic_images": 300, "synthetic_size": 64, "cache_size": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "augment": {"image_size": 56},
        "model": {"backbone": "test_resnet"},
        "supervised": {"epochs": 2, "batch_size": 32},
        "byol": {"epochs": 1, "batch_size": 32, "hidden_dim": 64, "out_dim": 32},
    }
    return build_config(merge(base, sections), "tiny test config")
