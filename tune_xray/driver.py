"""What this driver process runs its search with, while it runs (`this_driver`). Tune pickles the search — its
searcher and limiter, its callbacks — and a resume restores them as they were; those objects read this driver's
values from here (the resume's own resources, concurrency, trial records and local directory), not the first run's.
A leaf: the limiter (trial.py), the MLflow callback (tracking.py) and the resume sync (pipeline.py) all read it."""

from __future__ import annotations

import contextlib

DRIVER: dict = {}


@contextlib.contextmanager
def this_driver(**values):
    """While the block runs: what this driver's search runs with — `concurrency` (resources, pending, cap),
    `describe` (a trial's MLflow record), `experiment` (where it syncs) — for the pickled objects that read it."""
    DRIVER.update(values)
    try:
        yield
    finally:
        DRIVER.clear()
