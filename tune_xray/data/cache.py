"""Decode every image once into a uint8 memmap at the cache size, shared by every later run and process.

S0's GPUs were starved by a PIL pipeline decoding 1024² PNGs per sample (≈150 img/s per core);
gathering a batch from this memmap runs at thousands of images/s. The cache is keyed by the image paths,
their sizes and mtimes, the cache size and channel count, so a changed source or size builds a new one.
It is written to a temporary file under a lock and renamed into place: a corrupt image stops the build
with an error naming the file, and nothing half-written is left behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from .splits import DataError


@dataclass(frozen=True)
class ImageCache:
    """Where a cache lives and its shape; opens the memmap lazily (safe to pickle into workers)."""

    path: str
    shape: tuple[int, int, int, int]  # (n, channels, size, size)

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)


DICOM_SUFFIXES = (".dcm", ".dicom")


class NotAnImage(ValueError):
    """A readable file that holds no image to classify (a DICOM segmentation, report, or no pixel data)."""


# DICOM objects that are not images, though they come in .dcm files beside them (PS3.3 C.7.3.1.1.1)
NON_IMAGE_MODALITIES = {"SEG": "a segmentation", "SR": "a structured report", "PR": "a presentation state",
                        "KO": "a key-object selection", "RTSTRUCT": "an RT structure set", "RTPLAN": "an RT plan",
                        "REG": "a registration", "DOC": "an encapsulated document"}


def read_dicom(path: str | Path) -> Image.Image:
    """A DICOM image as 8-bit grayscale: rescale slope/intercept and the VOI LUT or window (pydicom), any bit
    depth stretched to 0–255, MONOCHROME1 inverted so that bone is bright as in every other X-ray here."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    modality = str(getattr(ds, "Modality", ""))
    if modality in NON_IMAGE_MODALITIES:
        raise NotAnImage(f"a DICOM {modality} object ({NON_IMAGE_MODALITIES[modality]}), not an image to classify")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotAnImage(f"a DICOM file without pixel data (Modality {modality or 'unset'}, SOP class "
                         f"{getattr(ds, 'SOPClassUID', 'unset')})")
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM (rare for X-rays)
        arr = arr[..., :3].mean(-1)
    low, high = float(arr.min()), float(arr.max())
    arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = 1.0 - arr
    return Image.fromarray(np.round(255 * arr).astype(np.uint8))


IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, AttributeError, InvalidDicomError)


def open_image(path: str | Path, draft: tuple[str, int] | None = None) -> Image.Image:
    """An image file as a PIL image: DICOM through `read_dicom`, 16-bit grayscale rescaled (not clipped), the
    rest through PIL; `draft` (mode, size) lets JPEG decode at reduced scale. Raises one of IMAGE_ERRORS."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return read_dicom(path)
    img = Image.open(path)
    if draft:
        img.draft(draft[0], (draft[1], draft[1]))
    img.load()  # reads the pixels and closes the file PIL opened
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray((255 * arr / max(arr.max(), 1)).astype(np.uint8))
    return img


def decode(path: str, size: int, channels: int) -> np.ndarray:
    """One image → uint8 (channels, size, size), as the cache stores it."""
    try:
        return to_cache_layout(open_image(path, ("L" if channels == 1 else "RGB", size)), size, channels)
    except IMAGE_ERRORS as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def to_cache_layout(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """A PIL image → uint8 (channels, size, size), bilinear."""
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _decode_job(args):
    return decode(*args)


NPZ_MEMBER = "#"  # "FILE.npz#train/12": image 12 of train_images in a MedMNIST-style npz


def _decode_npz_members(paths: list[str], size: int, channels: int):
    """Yield each npz member image as uint8 (channels, size, size); every file is read once."""
    arrays: dict[str, np.lib.npyio.NpzFile] = {}
    for p in paths:
        file, _, member = p.partition(NPZ_MEMBER)
        split, _, i = member.partition("/")
        if file not in arrays:
            arrays[file] = np.load(file)
        yield to_cache_layout(Image.fromarray(arrays[file][f"{split}_images"][int(i)]), size, channels)


def cache_key(paths: list[str], size: int, channels: int) -> str:
    h = hashlib.sha1(f"v1|{size}|{channels}".encode())
    for p in paths:
        try:
            st = os.stat(p.partition(NPZ_MEMBER)[0])
        except FileNotFoundError:
            raise DataError(f"{p}: image file not found") from None
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def build_cache(paths: list[str], size: int, channels: int, cache_dir: str | Path,
                workers: int | None = None) -> ImageCache:
    """Return the cache for these images, building it (once, under a file lock) when missing."""
    key = cache_key(paths, size, channels)
    root = Path(cache_dir) / "images"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{key}.u8"
    meta_path = root / f"{key}.json"
    shape = (len(paths), channels, size, size)
    if meta_path.is_file():
        return ImageCache(str(target), shape)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.is_file():  # built by another process while we waited
            return ImageCache(str(target), shape)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        try:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            jobs = [(p, size, channels) for p in paths]
            workers = workers or min(os.cpu_count() or 1, 8)
            bar = tqdm(total=len(paths), desc=f"caching {len(paths)} images at {size}²", unit="img",
                       mininterval=1.0, disable=len(paths) < 200)
            if paths and NPZ_MEMBER in paths[0]:
                for i, arr in enumerate(_decode_npz_members(paths, size, channels)):
                    out[i] = arr
                    bar.update()
            elif workers > 1 and len(paths) >= 64:
                with ProcessPoolExecutor(workers) as pool:
                    for i, arr in enumerate(pool.map(_decode_job, jobs, chunksize=32)):
                        out[i] = arr
                        bar.update()
            else:
                for i, job in enumerate(jobs):
                    out[i] = decode(*job)
                    bar.update()
            bar.close()
            out.flush()
            del out
            os.replace(tmp, target)
            meta_path.write_text(json.dumps({"n": len(paths), "size": size, "channels": channels,
                                             "first": paths[0] if paths else None}))
        finally:
            if tmp.exists():
                tmp.unlink()
    return ImageCache(str(target), shape)
