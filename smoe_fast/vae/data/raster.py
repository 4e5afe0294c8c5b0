"""Rasterisation of stroke-3 sketches (PAPER.md), shared by every source: the synthetic sketches and
QuickDraw's sketch-rnn files go through the same pipeline."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Bump whenever rasterize_strokes changes what it draws: on-disk caches are keyed by it.
PIPELINE_VERSION = 1
CANVAS_SIZE = 56
IMAGE_SIZE = 28
FILL_FRACTION = 0.8
LINE_WIDTH = 3

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow >= 9.1 moved the filters to Resampling


def _split_strokes(strokes3: np.ndarray) -> list[np.ndarray]:
    """Stroke-3 rows (dx, dy, pen_lifted) -> absolute polylines with at least 2 points each."""
    points = np.cumsum(strokes3[:, :2], axis=0, dtype=np.float64)
    # A row whose pen flag is set is the last point of its stroke.
    stroke_ends = np.flatnonzero(strokes3[:, 2] != 0) + 1
    return [stroke for stroke in np.split(points, stroke_ends) if stroke.shape[0] >= 2]


def _render_uint8(strokes3: np.ndarray) -> np.ndarray:
    """The pipeline on one valid stroke-3 array -> uint8 [28,28], 255 = background."""
    strokes = _split_strokes(strokes3)
    canvas = Image.new("L", (CANVAS_SIZE, CANVAS_SIZE), 255)
    if strokes:
        draw = ImageDraw.Draw(canvas)
        all_points = np.concatenate(strokes)
        low, high = all_points.min(axis=0), all_points.max(axis=0)
        extent = float((high - low).max())
        centre = CANVAS_SIZE / 2
        if extent == 0.0:
            # Every kept point coincides: a 3x3 dot at the centre (what a pen of width 3 leaves).
            draw.rectangle([centre - 1, centre - 1, centre + 1, centre + 1], fill=0)
        else:
            scale = FILL_FRACTION * CANVAS_SIZE / extent
            middle = (low + high) / 2
            for stroke in strokes:
                draw.line(((stroke - middle) * scale + centre).ravel().tolist(), fill=0, width=LINE_WIDTH)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), _LANCZOS))


def _check_strokes3(strokes3, where: str) -> np.ndarray:
    array = np.asarray(strokes3)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{where}: expected a stroke-3 array of shape [n, 3] (dx, dy, pen_lifted), "
                         f"found shape {tuple(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected an integer or float stroke-3 array (QuickDraw uses int16), "
                         f"found dtype {array.dtype}")
    return array


def rasterize_strokes(strokes3: np.ndarray) -> np.ndarray:
    """Render one stroke-3 sketch the way the paper's authors did.

    strokes3: [n, 3] rows (dx, dy, pen_lifted), integer or float. Returns float32 [28, 28] in [0, 1],
    white background 1.0 and dark strokes.

    Pipeline: absolute points by cumulative sum; a stroke ends at a row whose pen flag is set (1);
    strokes with fewer than 2 points are dropped; the points are scaled so the larger side of their
    bounding box is 0.8·56 and centred on a 56×56 white (255) canvas; each stroke is drawn as a black
    polyline 3 px wide (PIL ``ImageDraw.line``); the canvas is resized to 28×28 with Lanczos and
    divided by 255.

    Degenerate sketches do not fail: no stroke with 2 or more points (including an empty array)
    gives a blank white image; strokes of zero extent (all points equal) give a 3×3 px dot at the
    canvas centre before resizing.

    >>> square = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [-10, 0, 0], [0, -10, 1]], np.int16)
    >>> rasterize_strokes(square).shape
    (28, 28)
    """
    return _render_uint8(_check_strokes3(strokes3, "rasterize_strokes")).astype(np.float32) / 255.0


def rasterize_batch(sketches: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`rasterize_strokes` over a sequence of sketches -> float32 [N, 28, 28]."""
    return _rasterize_uint8(sketches, "rasterize_batch").astype(np.float32) / 255.0


def _rasterize_uint8(sketches: Sequence[np.ndarray], where: str) -> np.ndarray:
    out = np.empty((len(sketches), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, sketch in enumerate(sketches):
        out[i] = _render_uint8(_check_strokes3(sketch, f"{where}: sketch {i}"))
    return out
