"""`python -m tune_xray.predict MODEL [INPUT ...]`: a selected ensemble (or one trial) on image files.

MODEL is a registered model (`models:/NAME/latest`), a run's model URI (`runs:/ID/model`) or a search directory
(its latest ensemble). INPUT: PNG / JPEG / DICOM files or folders (recursive). Each member applies its own
preprocessing: decoded like the training cache (grayscale, bilinear to its cache size), its eval view and TTA;
probabilities are averaged with the members' weights. A file that is not an image is one line naming it; the
others are still predicted, and the exit code (1) says that some failed.

    python -m tune_xray.predict models:/byol-smoke/latest scans/ --out predictions.csv
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .credentials import mask, reveal
from .data.splits import DataError
from .experiment import Experiment, ExperimentError
from .record.names import SUMMARY_FILE
from .record.text import plural
from .serving import EnsembleModel, load_predictor, read_image  # noqa: F401  (models registered before serving.py)


def resolve_model(model: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(model URI, tracking URI): a search directory → the search's model, `models:/<experiment>/latest` in its own
    store (what summary.json's `search_model` names: the ensemble chosen on validation, or the out-of-fold one where
    it was selected); URIs pass through."""
    path = Path(model)
    if "://" not in model and path.is_dir():
        try:  # the record, read as the Experiment reads it (no Ray, no Optuna)
            experiment = Experiment.at(path)
            summary = experiment.summary() if (path / SUMMARY_FILE).is_file() else {}
        except ExperimentError as err:
            raise DataError(str(err)) from None
        chosen = summary.get("search_model")
        if chosen:
            return chosen["latest"], tracking_uri or reveal(chosen["tracking_uri"])
        if (summary.get("ensemble") or {}).get("fits") is False:
            raise DataError(f"{path}: no model registered: {summary['ensemble']['why']}")
        try:  # a search recorded before `search_model`: its ensemble's registration
            registered = (experiment.ensemble() or {}).get("registered")
        except ExperimentError as err:
            raise DataError(str(err)) from None
        if not registered:
            raise DataError(f"{path}: no registered ensemble (run python -m tune_xray.ensemble {path})")
        return registered["uri"], tracking_uri or reveal(registered["tracking_uri"])
    if model.startswith(("models:/", "runs:/")) and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise DataError(f"{model}: in which MLflow store? pass --tracking-uri (or set MLFLOW_TRACKING_URI); "
                        "MLflow's default would create ./mlflow.db here")
    return model, tracking_uri


def set_threads(threads: int | None = None) -> int:
    """torch's intra-op threads: `threads`, or the cores this process may use that are not already busy (the
    1-minute load average), at least one; one inter-op thread. torch's default counts every core whatever else
    runs, and on a busy machine its spinning threads wait on each other (a 2-core machine busy with a search
    predicted 20× slower)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(max(1, threads))
    with contextlib.suppress(RuntimeError):  # already set, or work already ran in this process
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def find_inputs(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="models:/NAME/VERSION|latest, runs:/ID/model, or a search directory")
    parser.add_argument("inputs", nargs="+", help="image files (PNG, JPEG, DICOM) or folders")
    parser.add_argument("--out", help="CSV to write (default: print)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and runs:/ URIs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores this process may use, "
                        "less those busy with other work; one per core at most, never more)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        uri, tracking_uri = resolve_model(args.model, args.tracking_uri)
        predictor = load_predictor(uri, args.device, tracking_uri)
    except DataError as err:
        print(f"error: {mask(str(err))}", file=sys.stderr)
        return 2
    files = find_inputs(args.inputs)
    if not files:
        print(f"error: no files in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    predicted = failed = 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.out:
            stack.callback(out.close)
        for first in range(0, len(files), args.batch_size):  # decoded a batch at a time: bounded memory
            readable, images = [], []
            for path in files[first:first + args.batch_size]:
                try:
                    images.append(read_image(path))
                    readable.append(str(path))
                except DataError as err:
                    print(f"skipped: {err}", file=sys.stderr)
                    failed += 1
            if not images:
                continue
            frame = predictor.decide(images, args.batch_size)
            frame.insert(0, "path", readable)
            frame.to_csv(out, index=False, header=predicted == 0)
            predicted += len(readable)
    seconds = time.perf_counter() - start
    if not predicted:
        print(f"error: none of the {len(files)} files is a readable image", file=sys.stderr)
        return 1
    print(f"{plural(predicted, 'image')} in {seconds:.1f} s ({predicted / max(seconds, 1e-9):.1f} img/s)"
          + (f"; {failed} not readable" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
