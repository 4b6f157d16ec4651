"""Matplotlib figures drawn from numbers alone (no file is read): inline PNGs for the report, and the ensemble's
selection curve that its MLflow run shows."""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path

COLUMN = 11.0  # inches: the report's 1,100-px column at DPI
DPI = 100
READABLE = {"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "xtick.labelsize": 10,
            "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 12}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(READABLE)
    return plt


def inline_png(fig, draw=None, alt: str = "") -> str:
    """`fig` (after `draw(fig)`, if given) as an inline PNG <img> with its `alt` text; the figure is closed either
    way."""
    buffer = io.BytesIO()
    try:
        if draw is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # equal axis limits of a one-point panel
                draw(fig)
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">')


def figure(draw, width: float = COLUMN, height: float = 3.6, alt: str = "") -> str:
    """An inline PNG of what `draw(fig)` puts on a new matplotlib figure, `alt` its text for who cannot see it."""
    return inline_png(pyplot().figure(figsize=(width, height), layout="constrained"), draw, alt)


def wrap(label, width: int = 14) -> str:
    """A tick label broken into lines of at most `width` characters, after `_`, `.`, `-` or a space where it can."""
    import re

    lines = [""]
    for piece in re.findall(r"[^_.\- ]*[_.\- ]?", str(label)):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(line.strip() for line in lines if line.strip())


def integer_ticks(ax, axis: str = "x") -> None:
    """Whole-number ticks (epochs, trials, sizes): no 0.5, 1.5."""
    import matplotlib.ticker

    getattr(ax, f"{axis}axis").set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def selection_curve(selection: dict, metric: str, path: Path) -> None:
    """The registered weights' making (ensemble.select's `curve`, `axis`, `chosen`) on validation, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x, score = zip(*selection["curve"])
    ax.plot(x, score, marker="o")
    ax.plot([selection["chosen"]], [score[x.index(selection["chosen"])]], marker="*", markersize=14, color="C3",
            label="registered")
    ax.set_xlabel({"selections": "ensemble size (selections, with replacement)",
                   "bags": "bags averaged"}.get(selection["axis"], selection["axis"]))
    integer_ticks(ax)
    ax.set_ylabel(metric)
    ax.set_title("the registered weights' selection, on validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
