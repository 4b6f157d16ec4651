"""What this driver process runs its search with, while it runs (`this_driver`). Tune pickles the search — its
searcher and limiter, its callbacks — and a resume restores them as they were; those objects read this driver's
values from here (the resume's own resources, concurrency, trial records and local directory), not the first run's.
A leaf: the limiter (trial.py), the MLflow callback (tracking.py) and the resume sync (pipeline.py) all read it."""

from __future__ import annotations

import contextlib

DRIVER: dict = {}


def driver_device() -> str:
    """The driver's own device (cuda where it has a GPU, else cpu): where the steps after the trials measure latency
    as served, record external sources and draw the report, whatever device the trials had."""
    import torch  # here, not at import: the readers that name this module stay light

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def this_driver(**values):
    """While the block runs: what this driver's search runs with — `concurrency` (resources, pending, cap),
    `describe` (a trial's MLflow record), `experiment` (where it syncs) — for the pickled objects that read it."""
    DRIVER.update(values)
    try:
        yield
    finally:
        DRIVER.clear()
