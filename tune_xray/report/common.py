"""What the report's rooms share: a trial's stored predictions, an HTML table and list, a log axis, and the
threshold below which a label's count is too few."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..experiment import (
    predicted_classes,
    read_predictions,
)

FEW = 10  # a label with fewer positives or negatives in a split: its selection and intervals there are noise


def stored_predictions(directory: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(paths, targets, probabilities, classes) of a trial's stored predictions."""
    classes = predicted_classes(directory, split)
    paths, y, _, prob = read_predictions(directory, split, classes)
    return paths, y, prob, classes


def html_table(frame: pd.DataFrame, escape: bool = True) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}", na_rep="", escape=escape)


def bullets(items) -> str:
    return ", ".join(map(str, items))


def log_axis(ax, values) -> None:
    """A log x axis labelled at its decades only (minor labels ran together); within one decade, at its two ends."""
    import matplotlib.ticker

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if max(values) / min(values) < 10:
        ends = sorted({min(values), max(values)})
        ax.set_xticks(ends, [f"{v:.2g}" for v in ends])
