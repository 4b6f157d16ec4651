import os

import numpy as np
import pytest
import torch

from tune_xray.config import DataConfig
from tune_xray.data import cache as cache_mod
from tune_xray.data.loader import make_loader, prepare


def _cfg(root, tmp_path, size=32):
    return DataConfig(source=f"nih:{root}", cache_size=size, cache_dir=str(tmp_path / "cache"))


def test_cache_is_reused_and_rebuilt_on_change(nih_copy, tmp_path, monkeypatch):
    calls = []
    real = cache_mod.decode
    monkeypatch.setattr(cache_mod, "decode", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(cache_mod.os, "cpu_count", lambda: 1)  # decode in-process so calls are counted
    first = prepare(_cfg(nih_copy, tmp_path))
    assert len(calls) == 300
    assert prepare(_cfg(nih_copy, tmp_path)).cache == first.cache and len(calls) == 300  # reused
    prepare(_cfg(nih_copy, tmp_path, size=48))
    assert len(calls) == 600  # new size → new cache
    victim = sorted((nih_copy / "images").iterdir())[0]
    os.utime(victim, ns=(1, 1))
    prepare(_cfg(nih_copy, tmp_path))
    assert len(calls) == 900  # changed source → rebuilt


def test_cache_holds_the_decoded_images(nih_copy, tmp_path):
    data = prepare(_cfg(nih_copy, tmp_path, size=64))
    images = data.cache.open()
    assert images.shape == (300, 1, 64, 64) and images.dtype == np.uint8
    row = 11
    expected = cache_mod.decode(data.index.frame.path[row], 64, 1)
    assert np.array_equal(images[row], expected)


def test_loader_yields_uint8_batches_with_targets(nih_copy, tmp_path):
    data = prepare(_cfg(nih_copy, tmp_path))
    ds = data.dataset("train")
    loader = make_loader(ds, batch_size=16, shuffle=True, drop_last=True, seed=0)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (16, 1, 32, 32)
    assert y.dtype == torch.float32 and y.shape == (16, 14)
    assert len(loader) == len(ds) // 16
    seen = torch.cat([yb for _, yb in make_loader(ds, 16, shuffle=False)])
    assert torch.equal(seen, torch.from_numpy(ds.targets))


def test_pixel_statistics_of_the_training_split(nih_copy, tmp_path):
    data = prepare(_cfg(nih_copy, tmp_path))
    (mean,), (std,) = data.pixel_stats()
    rows = data.index.rows("train")
    pixels = data.cache.open()[rows].astype(np.float64) / 255
    assert mean == pytest.approx(pixels.mean(), abs=1e-4) and std == pytest.approx(pixels.std(), abs=1e-4)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_device_cache_gathers_the_loaders_batches(nih_copy, tmp_path, rank, world_size):
    from tune_xray.config import DataConfig
    from tune_xray.data.loader import DeviceBatches, set_epoch

    ds = prepare(_cfg(nih_copy, tmp_path)).dataset("train")
    kwargs = dict(batch_size=16, shuffle=True, drop_last=True, seed=3, rank=rank, world_size=world_size)
    on_device = make_loader(ds, data=DataConfig(device_cache=True), **kwargs)
    loader = make_loader(ds, data=DataConfig(device_cache=False), **kwargs)
    assert isinstance(on_device, DeviceBatches) and len(on_device) == len(loader)
    for epoch in (0, 1):  # the same sampler: the same shuffles every epoch
        set_epoch(on_device, epoch)
        set_epoch(loader, epoch)
        for (xd, yd), (x, y) in zip(on_device, loader, strict=True):
            assert xd.dtype == torch.uint8 and torch.equal(xd, x) and torch.equal(yd, y)


def test_device_cache_auto_stays_off_on_cpu(nih_copy, tmp_path):
    from tune_xray.config import DataConfig
    from tune_xray.data.loader import DeviceBatches

    ds = prepare(_cfg(nih_copy, tmp_path)).dataset("val")
    assert DataConfig().device_cache == "auto"
    assert not isinstance(make_loader(ds, 16, shuffle=False, device=torch.device("cpu"), data=DataConfig()),
                          DeviceBatches)
