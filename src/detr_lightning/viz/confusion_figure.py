"""The detection confusion matrix as a PNG heat map: counts in the cells, each row coloured by
its shares (so that rare classes show as clearly as frequent ones), class names on both axes.
The matrix comes from :mod:`detr_lightning.evaluation.confusion`."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..utils.io import atomic_write

__all__ = ["confusion_figure_size", "plot_confusion_matrix"]

DPI = 100
MAX_ANNOTATED = 30  # rows (classes + background) up to which the cells show their counts
MAX_NAME = 20  # characters of a class name shown on the axes
# Inches. Cells shrink with the number of rows between these sides: 81 rows (COCO) give a
# 16-inch matrix with 6-point names.
LARGEST_CELL, SMALLEST_CELL, MATRIX_SIDE = 0.6, 0.2, 9.0
TOP, RIGHT, AXIS_TITLE = 0.5, 1.1, 0.35


def _layout(labels: Sequence[str]) -> tuple[float, float, float]:
    """(cell side, room for the class names, font size in points) for these row names."""
    cell = min(LARGEST_CELL, max(SMALLEST_CELL, MATRIX_SIDE / len(labels)))
    font = 8.0 if cell >= 0.3 else 6.0
    longest = min(max(len(str(label)) for label in labels), MAX_NAME)
    names = 0.1 + longest * 0.075 * font / 8  # about 0.6 em per character
    return cell, names, font


def confusion_figure_size(labels: Sequence[str]) -> tuple[float, float]:
    """(width, height) in inches of :func:`plot_confusion_matrix`'s figure (saved at 100 dpi)."""
    cell, names, _ = _layout(labels)
    side = cell * len(labels)
    margin = names + AXIS_TITLE
    return margin + side + RIGHT, TOP + side + margin


def plot_confusion_matrix(
    counts: np.ndarray | Sequence[Sequence[int]],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """PNG heat map of a confusion matrix, written atomically to ``path``; returns ``path``.

    ``counts`` int [N, N], rows true classes and columns predicted ones (background last, as
    :class:`~detr_lightning.evaluation.confusion.ConfusionMatrix` lays them out); ``labels``
    the N row/column names. Colours are each row's shares (0 to 1); cells show the counts up to
    :data:`MAX_ANNOTATED` rows and only the colours beyond (e.g. COCO's 81).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=np.int64)
    labels = [str(label) for label in labels]
    if counts.ndim != 2 or counts.shape != (len(labels), len(labels)):
        raise ValueError(
            f"counts must be a square [N, N] matrix with N = {len(labels)} (one row per label), "
            f"got shape {counts.shape}"
        )
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    cell, names, font = _layout(labels)
    width, height = confusion_figure_size(labels)
    side = cell * len(labels)
    margin = names + AXIS_TITLE
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    # fixed margins in inches (not tight_layout): the saved size is known in advance
    axis = figure.add_axes((margin / width, margin / height, side / width, side / height))
    image = axis.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.arange(len(labels))
    shown = [label if len(label) <= MAX_NAME else label[: MAX_NAME - 1] + "…" for label in labels]
    axis.set_xticks(ticks, shown, rotation=90, fontsize=font)
    axis.set_yticks(ticks, shown, fontsize=font)
    axis.set_xlabel("predicted class", fontsize=9)
    axis.set_ylabel("true class", fontsize=9)
    axis.tick_params(length=2, pad=2)
    if len(labels) <= MAX_ANNOTATED:
        text_size = 7.0 if cell >= 0.4 else 5.5
        for (row, column), count in np.ndenumerate(counts):
            color = "white" if shares[row, column] > 0.5 else ("0.6" if count == 0 else "black")
            axis.text(column, row, str(count), ha="center", va="center", fontsize=text_size,
                      color=color)  # fmt: skip
    colorbar_axis = figure.add_axes(
        ((margin + side + 0.15) / width, margin / height, 0.15 / width, side / height)
    )
    colorbar = figure.colorbar(image, cax=colorbar_axis)
    colorbar.set_label("share of the row (true class)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    if title:
        lines = textwrap.wrap(title, max(int(width / 0.075), 16))
        figure.suptitle("\n".join(lines[:2]), fontsize=9, y=1 - 0.08 / height, va="top")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=DPI, format="png"))
