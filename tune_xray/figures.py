"""Matplotlib figures drawn from numbers alone (no file is read): inline PNGs for the report, and the ensemble's
selection curve that its MLflow run shows."""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def inline_png(fig, draw=None) -> str:
    """`fig` (after `draw(fig)`, if given) as an inline PNG <img>; the figure is closed either way."""
    buffer = io.BytesIO()
    try:
        if draw is not None:
            draw(fig)
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def figure(draw, width: float = 7.0, height: float = 3.6) -> str:
    """An inline PNG of what `draw(fig)` puts on a new matplotlib figure."""
    return inline_png(pyplot().figure(figsize=(width, height)), draw)


def optuna_figure(plot, width: float = 7.5, height: float = 3.8) -> str:
    """An optuna.visualization.matplotlib plot as an inline PNG (or why it cannot be drawn)."""
    pyplot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's "experimental" notice, matplotlib's equal axis limits
            axes = plot()
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return f"<p class=note>not drawn: {html.escape(str(err))}</p>"
    fig = np.ravel(axes)[0].figure if isinstance(axes, np.ndarray) else axes.figure
    fig.set_size_inches(width, height)
    return inline_png(fig)


def selection_curve(selection: dict, metric: str, path: Path) -> None:
    """The registered weights' making (ensemble.select's `curve`, `axis`, `chosen`) on validation, as a PNG."""
    import matplotlib.ticker

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x, score = zip(*selection["curve"])
    ax.plot(x, score, marker="o")
    ax.plot([selection["chosen"]], [score[x.index(selection["chosen"])]], marker="*", markersize=14, color="C3",
            label="registered")
    ax.set_xlabel({"selections": "ensemble size (selections, with replacement)",
                   "bags": "bags averaged"}.get(selection["axis"], selection["axis"]))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title("the registered weights' selection, on validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
