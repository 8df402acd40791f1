"""The confusion matrix heat map: its size, counts in the cells up to 30 rows, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detr_lightning.viz.confusion_figure import confusion_figure_size, plot_confusion_matrix

COUNTS = [[2, 1, 0], [0, 0, 1], [2, 0, 0]]
LABELS = ["cat", "dog", "background"]


def pixels(path) -> np.ndarray:
    assert path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB")).astype(int)


def cell_colours(image: np.ndarray, margin: float, cell: float, row: int, column: int) -> int:
    """Distinct colours in the middle of a cell (inches -> 100 dpi pixels; rows from the top
    margin of 0.5 inch)."""
    x = round((margin + (column + 0.5) * cell) * 100)
    y = round((0.5 + (row + 0.5) * cell) * 100)
    patch = image[y - 5 : y + 6, x - 5 : x + 6].reshape(-1, 3)
    return len({tuple(colour) for colour in patch.tolist()})


def test_a_small_matrix_is_written_with_its_counts(tmp_path):
    path = plot_confusion_matrix(COUNTS, LABELS, tmp_path / "cm.png", title="a title")
    assert path == tmp_path / "cm.png"
    image = pixels(path)
    # 0.6-inch cells; names of up to 10 characters take 0.1 + 10 * 0.075 inches, the axis
    # title 0.35: a margin of 1.2 inches left and below, 1.1 right (colour bar), 0.5 on top
    assert confusion_figure_size(LABELS) == pytest.approx((4.1, 3.5))
    assert image.shape == (350, 410, 3)
    # dog -> background: all of the row's share, dark blue with a white "1" on it
    dark = image[round((0.5 + 1.5 * 0.6) * 100), round((1.2 + 2.2 * 0.6) * 100)]
    assert dark[2] > dark[0] + 60  # blue
    assert cell_colours(image, 1.2, 0.6, 1, 2) > 2  # the digit's pixels and the cell's
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left


def test_coco_sized_matrices_drop_the_cell_text(tmp_path):
    labels = [f"class {i:02d}" for i in range(80)] + ["background"]
    counts = np.full((81, 81), 7)
    path = plot_confusion_matrix(counts, labels, tmp_path / "coco.png")
    # 0.2-inch cells (16.2 inches), 6-point names of up to 10 characters:
    # 0.1 + 10 * 0.075 * 6 / 8 + 0.35 = 1.0125 inches of margin
    width, height = confusion_figure_size(labels)
    assert (width, height) == pytest.approx((1.0125 + 16.2 + 1.1, 0.5 + 16.2 + 1.0125))
    image = pixels(path)
    assert image.shape == (1771, 1831, 3)
    assert cell_colours(image, 1.0125, 0.2, 40, 40) == 1  # colour only, no count
    # the small matrix, for contrast: its cells carry their counts even where they are 0
    small = pixels(plot_confusion_matrix(COUNTS, LABELS, tmp_path / "small.png"))
    assert cell_colours(small, 1.2, 0.6, 1, 0) > 1


def test_counts_must_match_the_labels(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, N\] matrix with N = 3.*got shape \(2, 3\)"):
        plot_confusion_matrix([[1, 2, 3], [4, 5, 6]], LABELS, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
