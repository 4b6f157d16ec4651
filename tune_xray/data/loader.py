"""Batches of uint8 images straight from the cache: no decoding and no augmentation on the CPU side
(augmentation runs on the batch's device, see `tune_xray.augment`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from ..config import ConfigError, DataConfig
from .cache import ImageCache, build_cache
from .sources import DatasetIndex, default_cache_dir, ignored_split_keys, read_source
from .splits import (
    UNLABELLED,
    check_learnable,
    check_patient_disjoint,
    check_splits_nonempty,
    kfold_split,
    labelled_subset,
)


class CachedBatches(Dataset):
    """Indexed by a list of rows; returns a whole batch (uint8 B×C×S×S, targets) in one memmap gather."""

    def __init__(self, cache: ImageCache, rows: np.ndarray, targets: np.ndarray):
        self.cache, self.rows, self.targets = cache, np.asarray(rows), targets
        self._images = None  # opened lazily, once per process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: list[int]):
        if self._images is None:
            self._images = self.cache.open()
        batch = np.asarray(batch)
        order = np.argsort(self.rows[batch])  # sorted reads are sequential on disk
        images = np.empty((len(batch), *self.cache.shape[1:]), dtype=np.uint8)
        images[order] = self._images[self.rows[batch][order]]
        return torch.from_numpy(images), torch.from_numpy(self.targets[batch])

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


@dataclass(frozen=True)
class PreparedData:
    """The checked index and its image cache: everything a phase needs to build loaders."""

    index: DatasetIndex
    cache: ImageCache

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    def dataset(self, split: str, with_unlabelled: bool = False) -> CachedBatches:
        """A split's images and targets; `with_unlabelled` adds the training images a label fraction hid
        (for self-supervised phases, which use no labels)."""
        rows = self.index.rows(split)
        if with_unlabelled:
            rows = np.sort(np.concatenate([rows, self.index.rows(UNLABELLED)]))
        return CachedBatches(self.cache, rows, self.index.targets(rows))

    def pixel_stats(self, split: str = "train", max_images: int = 512) -> tuple[list[float], list[float]]:
        """Per-channel mean/std in [0, 1] over (up to) `max_images` evenly spaced images of a split."""
        rows = self.index.rows(split)
        rows = rows[np.linspace(0, len(rows) - 1, min(max_images, len(rows))).astype(int)]
        pixels = self.cache.open()[np.unique(rows)].astype(np.float32) / 255.0
        return pixels.mean(axis=(0, 2, 3)).tolist(), pixels.std(axis=(0, 2, 3)).tolist()


def check_split_keys(cfg: DataConfig, where=lambda key: None) -> None:
    """A split key the source does not read, set to anything but its default, would be silently ignored: a
    ConfigError instead, naming where the value came from where that is known (`where(key)`: the search says
    --set or the study file)."""
    for key, why in ignored_split_keys(cfg.source, cfg.split).items():
        value, default = getattr(cfg, key), DataConfig.model_fields[key].get_default(call_default_factory=True)
        if value != default:
            origin = where(key)
            raise ConfigError(f"data.{key}={value}{f' (from {origin})' if origin else ''}: {why}; it would be "
                              f"ignored (leave it at {default})")


def prepare(cfg: DataConfig) -> PreparedData:
    """Read and check the source, then build (or reuse) its cache — all before any training starts."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    check_split_keys(cfg)
    index = read_source(cfg.source, cfg.split, cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                        (cfg.synthetic_images, cfg.synthetic_size, cfg.synthetic_seed), cache_dir,
                        cfg.positive_class, cfg.patient_pattern, cfg.table, cfg.uncertain, cfg.views, cfg.missing)
    if cfg.folds:  # K-fold cross-validation: train + val re-split, fold `fold` the validation set
        frame = index.frame.copy()
        frame["split"] = kfold_split(frame, index.classes, index.task, cfg.folds, cfg.fold, cfg.split_seed,
                                     index.origin)
        check_patient_disjoint(frame, index.origin)
        check_splits_nonempty(frame, index.origin)
        check_learnable(frame, index.classes, index.task, index.origin)
        index = replace(index, frame=frame, split=f"fold {cfg.fold} of {cfg.folds} of train + val as validation "
                        f"(grouped by patient, seed {cfg.split_seed}); test as in {index.split}")
    if cfg.label_fraction < 1:
        frame = index.frame.copy()
        train = (frame["split"] == "train").to_numpy()
        keep = labelled_subset(frame[train], index.classes, index.task, cfg.label_fraction, cfg.label_seed)
        frame.loc[np.flatnonzero(train)[~keep], "split"] = UNLABELLED
        check_patient_disjoint(frame, index.origin)
        index = replace(index, frame=frame, split=f"{index.split}; {cfg.label_fraction:g} of train's labels kept "
                        f"(seed {cfg.label_seed})")
    cache = build_cache(index.frame["path"].tolist(), cfg.cache_size, cfg.channels, cache_dir)
    return PreparedData(index, cache)


def make_loader(dataset: CachedBatches, batch_size: int, shuffle: bool, drop_last: bool = False,
                seed: int = 0, rank: int = 0, world_size: int = 1, key: str = "batch_size",
                device: torch.device | None = None, data: DataConfig | None = None):
    """Whole batches of a split, sharded by rank for DDP (call `set_epoch`): gathered on `device` from the
    device-resident cache when `data.device_cache` puts it there (`DeviceBatches`), else a DataLoader of memmap
    slices (on CUDA: pinned memory, worker processes that prefetch).

    A shard smaller than one batch with `drop_last` would train epochs of zero steps (and report loss 0):
    that is a `ConfigError` naming `key`, the batch size and the shard."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last and world_size > 1)
    batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
    if len(batches) == 0:
        shard = f"each of the {world_size} ranks' {len(sampler)}" if world_size > 1 else f"the {len(sampler)}"
        raise ConfigError(f"{key}={batch_size} is larger than {shard} images: every epoch would have no "
                          f"optimizer step; use {key} <= {len(sampler)}"
                          + (" or fewer workers" if world_size > 1 else ""))
    device, data = device or torch.device("cpu"), data or DataConfig()
    if use_device_cache(dataset.cache, device, data.device_cache, data.device_share):
        return DeviceBatches(device_images(dataset.cache, device), dataset.rows, dataset.targets, batches)
    workers = data.num_workers if data.num_workers is not None else 2 if device.type == "cuda" else 0
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


class DeviceBatches:
    """The batches of a DataLoader over `CachedBatches`, gathered by index from the cache held on the device:
    no loader process, no host copy in the training loop. Same sampler, same batches, same order."""

    def __init__(self, images: torch.Tensor, rows: np.ndarray, targets: np.ndarray, sampler: BatchSampler):
        self.images, self.sampler = images, sampler
        self.rows = torch.as_tensor(np.asarray(rows), device=images.device)
        self.targets = torch.as_tensor(targets, device=images.device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        batches = list(self.sampler)  # the epoch's order onto the device in one copy, not one per batch
        order = torch.as_tensor([i for batch in batches for i in batch], device=self.images.device)
        for index in order.split([len(batch) for batch in batches]):
            yield self.images.index_select(0, self.rows[index]), self.targets[index]


_DEVICE_IMAGES: dict[tuple[str, str], torch.Tensor] = {}


def device_images(cache: ImageCache, device: torch.device) -> torch.Tensor:
    """The whole uint8 cache as one tensor on `device`, loaded once per process (every phase and split of a
    trial shares it; ChestX-ray14 at 256² is 7.3 GB)."""
    key = (str(cache.path), str(device))
    if key not in _DEVICE_IMAGES:
        _DEVICE_IMAGES.clear()  # one cache resident at a time
        images, source = torch.empty(cache.shape, dtype=torch.uint8, device=device), cache.open()
        for start in range(0, len(source), 2048):  # in slices: no second full copy in host memory
            images[start:start + 2048] = torch.from_numpy(np.array(source[start:start + 2048]))
        _DEVICE_IMAGES[key] = images
    return _DEVICE_IMAGES[key]


def use_device_cache(cache: ImageCache, device: torch.device, setting: bool | str, share: float = 1.0) -> bool:
    """`data.device_cache`: true, false, or auto — on CUDA when the cache takes under half of this trial's `share`
    of the GPU's memory (`data.device_share`). Not the memory free at that moment: trials packed onto one GPU
    would each keep a full copy while there was room (NIH at 384 px ≈ 16.5 GB each)."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    if (str(cache.path), str(device)) in _DEVICE_IMAGES:
        return True
    return int(np.prod(cache.shape)) < share * torch.cuda.get_device_properties(device).total_memory / 2


def set_epoch(loader: DataLoader, epoch: int) -> None:
    loader.sampler.sampler.set_epoch(epoch)
