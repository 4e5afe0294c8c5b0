"""Image data for the SMoE-VAE: a built-in synthetic sketch set and the two QuickDraw file formats.

Every source yields ``(train, test)`` as two :class:`ImageDataset`, whose tensors training code indexes
directly (no DataLoader):

| field | shape, dtype | meaning |
|---|---|---|
| images | [N,1,28,28] float32 | in [0, 1]; white background 1.0, dark strokes ≈ 0 (PAPER.md) |
| labels | [N] int64 | class index, in ``class_names`` order |
| substyles | [N] int64 or None | sub-style id, unique across classes (synthetic only) |
| class_names | tuple[str, ...] | one name per class |
| substyle_names | tuple[str, ...] or None | ``"class/style"`` per sub-style id (synthetic only) |

Sources (:data:`DATA_SOURCES`, chosen by :func:`load_data`):

- ``"synthetic"`` (the default): line drawings generated as stroke-3 arrays and rendered with the same
  :func:`rasterize_strokes` pipeline as QuickDraw; no files, no network, deterministic by seed.
- ``"quickdraw"``: the sketch-rnn stroke files ``{name}.npz`` the authors used, rasterised here and
  cached on disk.
- ``"quickdraw-bitmap"``: the ``full_numpy_bitmap_{name}.npy`` files, already 28×28, inverted to the
  white-background convention.

Split rule for both QuickDraw formats (PAPER.md), with p = ``fraction``: train takes the first
int(p·70,000) sketches of each class, test the first min(int(0.1·p·70,000), 2,500) of each class's
test split. Labels follow the ``categories`` order; images are grouped by class, in file order.

>>> train, test = load_data("synthetic", num_train=1_000, num_test=200)
>>> train.images.shape, train.labels.dtype, train.class_names
(torch.Size([1000, 1, 28, 28]), torch.int64, ('face', 'cat', 'snowflake', 'pencil', 'eye'))
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "ImageDataset", "DATA_SOURCES", "QUICKDRAW_CATEGORIES", "SYNTHETIC_CATEGORIES", "SYNTHETIC_SUBSTYLES",
    "PIPELINE_VERSION", "rasterize_strokes", "rasterize_batch", "synthetic_sketches",
    "load_quickdraw_strokes", "load_quickdraw_bitmaps", "load_data", "quickdraw_url",
]

DATA_SOURCES = ("synthetic", "quickdraw", "quickdraw-bitmap")
QUICKDRAW_CATEGORIES = ("face", "cat", "snowflake", "pencil", "eye")

# Bump whenever rasterize_strokes changes what it draws: on-disk caches are keyed by it.
PIPELINE_VERSION = 1
CANVAS_SIZE = 56
IMAGE_SIZE = 28
FILL_FRACTION = 0.8
LINE_WIDTH = 3

# PAPER.md's split rule: per class, train = first int(p*70,000), test = first min(int(0.1*p*70,000), 2,500).
QUICKDRAW_TRAIN_PER_CLASS = 70_000
QUICKDRAW_TEST_CAP = 2_500

STROKES_URL = "https://storage.googleapis.com/quickdraw_dataset/sketchrnn/{name}.npz"
BITMAP_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/{name}.npy"
DOWNLOAD_TIMEOUT_S = 60.0

_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS  # Pillow >= 9.1 moved the filters to Resampling


class ImageDataset(NamedTuple):
    """Images with their labels; see the module docstring for the field table.

    ``len(dataset)`` is the number of fields (a NamedTuple); use :attr:`num_images`.
    """
    images: torch.Tensor
    labels: torch.Tensor
    substyles: torch.Tensor | None
    class_names: tuple[str, ...]
    substyle_names: tuple[str, ...] | None = None

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------
# Rasterisation (PAPER.md), shared by every source


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


# ----------------------------------------------------------------------------------------------------
# Synthetic sketches
#
# Each sub-style draws a batch of n sketches at once in unit coordinates (about [-1.5, 1.5], y down):
# a list of strokes, each [n, points, 2]. _finish_batch then applies the shared jitter (wobble along
# strokes, rotation, anisotropic scale, shear, translation), quantises to integer coordinates like
# QuickDraw's int16 strokes and emits stroke-3 arrays, which go through rasterize_strokes' pipeline.
# The pipeline normalises each sketch's bounding box, so global position and size do not survive
# rendering (as in QuickDraw); what varies in the images is the shape: part sizes and placements,
# aspect ratio, rotation and wobble.

Strokes = list[np.ndarray]


def _uniform(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, size=n)


def _arc(cx, cy, rx, ry, start, stop, num_points: int) -> np.ndarray:
    """Elliptic arc from angle ``start`` to ``stop`` (radians; each a scalar or [n]) -> [n, P, 2]."""
    t = np.linspace(0.0, 1.0, num_points)
    angle = np.asarray(start)[..., None] + (np.asarray(stop) - np.asarray(start))[..., None] * t
    x = np.asarray(cx)[..., None] + np.asarray(rx)[..., None] * np.cos(angle)
    y = np.asarray(cy)[..., None] + np.asarray(ry)[..., None] * np.sin(angle)
    return np.stack(np.broadcast_arrays(x, y), axis=-1)


def _polyline(corners: Sequence[tuple], points_per_edge: int) -> np.ndarray:
    """Straight segments through ``corners`` (each (x, y), scalars or [n]) -> [n, P, 2], densified
    so that the wobble bends the edges too."""
    coordinates = np.broadcast_arrays(*[np.asarray(value, np.float64) for corner in corners for value in corner])
    vertices = np.stack(coordinates, axis=-1).reshape(coordinates[0].shape + (len(corners), 2))  # [n, K, 2]
    t = np.arange(points_per_edge)[:, None] / points_per_edge
    edges = vertices[..., :-1, None, :] + (vertices[..., 1:, None, :] - vertices[..., :-1, None, :]) * t
    edges = edges.reshape(edges.shape[:-3] + (-1, 2))
    return np.concatenate([edges, vertices[..., -1:, :]], axis=-2)


def _broadcast_strokes(strokes: Strokes, n: int) -> Strokes:
    return [np.broadcast_to(s, (n,) + s.shape[-2:]) for s in strokes]


def _face_parts(rng, n, y_offset: float = 0.0) -> Strokes:
    """Eyes and a smile shared by the face styles (head spans about [-1, 1])."""
    eye_dx, eye_y, eye_r = _uniform(rng, n, 0.3, 0.45), _uniform(rng, n, -0.35, -0.15) + y_offset, _uniform(rng, n, 0.08, 0.14)
    mouth_y, mouth_r = _uniform(rng, n, -0.05, 0.15) + y_offset, _uniform(rng, n, 0.4, 0.6)
    bend = _uniform(rng, n, 0.2, 0.3) * math.pi
    return [_arc(-eye_dx, eye_y, eye_r, eye_r, 0, 2 * math.pi, 8),
            _arc(eye_dx, eye_y, eye_r, eye_r, 0, 2 * math.pi, 8),
            _arc(0, mouth_y, mouth_r, mouth_r * 0.8, bend, math.pi - bend, 10)]


def _face_round(rng, n) -> Strokes:
    start = _uniform(rng, n, 0, 2 * math.pi)
    head = _arc(0, 0, 1, _uniform(rng, n, 1.0, 1.2), start, start + _uniform(rng, n, 2.0, 2.15) * math.pi, 32)
    return [head] + _face_parts(rng, n)


def _face_square(rng, n) -> Strokes:
    def corner(x, y):
        return x + _uniform(rng, n, -0.08, 0.08), y + _uniform(rng, n, -0.08, 0.08)
    tl, tr, br, bl = corner(-1, -1.05), corner(1, -1.05), corner(1, 1.05), corner(-1, 1.05)
    return [_polyline([tl, tr, br, bl, tl], 6)] + _face_parts(rng, n)


def _face_spiky_hair(rng, n) -> Strokes:
    head = _arc(0, 0.1, 1, _uniform(rng, n, 0.95, 1.1), 0, 2 * math.pi, 32)
    spikes = _uniform(rng, n, 1.45, 1.7)
    angles = np.linspace(-0.9, -0.1, 9) * math.pi
    radius = np.where(np.arange(9) % 2 == 0, 1.0, spikes[:, None])  # [n, 9]: alternate scalp and spike tip
    hair = np.stack([radius * np.cos(angles), 0.1 + radius * np.sin(angles)], axis=-1)
    return [head, hair] + _face_parts(rng, n, y_offset=0.1)


def _cat_ears(rng, n, cx, cy, r) -> Strokes:
    """Two triangular ears on a head of radius r centred (cx, cy)."""
    height = _uniform(rng, n, 0.55, 0.8) * r
    ears = []
    for side in (-1, 1):
        base_out, base_in = (cx + side * 0.85 * r, cy - 0.5 * r), (cx + side * 0.2 * r, cy - 0.97 * r)
        tip = (cx + side * 0.7 * r, cy - r - height)
        ears.append(_polyline([base_out, tip, base_in], 4))
    return ears


def _cat_head(rng, n) -> Strokes:
    head = _arc(0, 0, _uniform(rng, n, 1.0, 1.15), 0.9, 0, 2 * math.pi, 32)
    eye_dx, eye_r = _uniform(rng, n, 0.3, 0.45), _uniform(rng, n, 0.08, 0.13)
    strokes = [head] + _cat_ears(rng, n, 0, 0, 0.95)
    strokes += [_arc(-eye_dx, -0.2, eye_r, eye_r * 1.4, 0, 2 * math.pi, 8),
                _arc(eye_dx, -0.2, eye_r, eye_r * 1.4, 0, 2 * math.pi, 8)]
    spread = _uniform(rng, n, 0.15, 0.3)
    for side in (-1, 1):
        for k in (-1, 0, 1):
            strokes.append(_polyline([(side * 0.25, 0.25 + 0.1 * k), (side * 1.45, 0.25 + k * spread)], 3))
    return strokes


def _cat_sitting(rng, n) -> Strokes:
    head_r = _uniform(rng, n, 0.38, 0.48)
    body = _arc(0, 0.55, _uniform(rng, n, 0.6, 0.8), _uniform(rng, n, 0.75, 0.9), -0.5 * math.pi, 1.5 * math.pi, 28)
    head = _arc(0, -0.65, head_r, head_r, 0, 2 * math.pi, 20)
    tail_len = _uniform(rng, n, 0.6, 0.9)
    t = np.linspace(0, 1, 10)[None, :]
    tail = np.stack(np.broadcast_arrays(0.6 + tail_len[:, None] * t, 1.2 - 1.2 * t ** 1.5 + 0.2 * np.sin(math.pi * t)), axis=-1)
    return [body, head, tail] + _cat_ears(rng, n, 0, -0.65, head_r)


def _snowflake(rng, n, arms: int, branched: bool) -> Strokes:
    strokes = []
    offset = _uniform(rng, n, 0, 2 * math.pi / arms)
    length = _uniform(rng, n, 0.9, 1.1)
    branch_at, branch_len = _uniform(rng, n, 0.5, 0.7), _uniform(rng, n, 0.3, 0.45)
    for k in range(arms):
        angle = offset + 2 * math.pi * k / arms
        direction = (np.cos(angle), np.sin(angle))
        strokes.append(_polyline([(0, 0), (length * direction[0], length * direction[1])], 5))
        if branched:
            hub = (branch_at * length * direction[0], branch_at * length * direction[1])
            ends = [(hub[0] + branch_len * np.cos(angle + s), hub[1] + branch_len * np.sin(angle + s))
                    for s in (0.8, -0.8)]
            strokes.append(_polyline([ends[0], hub, ends[1]], 3))
    return strokes


def _pencil(rng, n, angle_deg: float) -> Strokes:
    half_width, length = _uniform(rng, n, 0.13, 0.2), _uniform(rng, n, 1.6, 2.0)
    tip_len, eraser = _uniform(rng, n, 0.3, 0.45), _uniform(rng, n, 0.15, 0.25)
    back, front = -length / 2, length / 2 - tip_len
    strokes = [_polyline([(front, -half_width), (back, -half_width), (back, half_width), (front, half_width)], 6),
               _polyline([(front, -half_width), (front + tip_len, 0), (front, half_width)], 4),
               _polyline([(back + eraser, -half_width), (back + eraser, half_width)], 3)]
    # Either end may point forward; the orientation itself is the sub-style.
    angle = math.radians(angle_deg) + np.where(rng.random(n) < 0.5, 0.0, math.pi)
    return [_rotate(stroke, angle) for stroke in strokes]


def _eye_lids(rng, n):
    width, upper, lower = _uniform(rng, n, 1.0, 1.1), _uniform(rng, n, 0.5, 0.7), _uniform(rng, n, 0.35, 0.55)
    t = np.linspace(0, 1, 16)[None, :]
    x = width[:, None] * (2 * t - 1)
    upper_lid = np.stack([x, -upper[:, None] * np.sin(math.pi * t)], axis=-1)
    lower_lid = np.stack([x, lower[:, None] * np.sin(math.pi * t)], axis=-1)
    return upper_lid, lower_lid, upper


def _eye_open(rng, n, lashes: bool) -> Strokes:
    upper_lid, lower_lid, upper = _eye_lids(rng, n)
    iris_x, iris_r = _uniform(rng, n, -0.15, 0.15), _uniform(rng, n, 0.3, 0.42)
    strokes = [upper_lid, lower_lid, _arc(iris_x, 0, iris_r, iris_r, 0, 2 * math.pi, 16),
               _arc(iris_x, 0, iris_r * 0.35, iris_r * 0.35, 0, 2 * math.pi, 8)]
    if lashes:
        lash_len = _uniform(rng, n, 0.3, 0.45)
        for u in (0.2, 0.35, 0.5, 0.65, 0.8):
            base = upper_lid[:, round(u * 15)]
            tilt = (u - 0.5) * 1.6
            tip = (base[:, 0] + lash_len * np.sin(tilt), base[:, 1] - lash_len * np.cos(tilt))
            strokes.append(_polyline([(base[:, 0], base[:, 1]), tip], 3))
    return strokes


def _eye_closed(rng, n) -> Strokes:
    _, lid, _ = _eye_lids(rng, n)
    lash_len = _uniform(rng, n, 0.25, 0.4)
    strokes = [lid]
    for u in (0.25, 0.42, 0.58, 0.75):
        base = lid[:, round(u * 15)]
        tilt = (u - 0.5) * 1.6
        strokes.append(_polyline([(base[:, 0], base[:, 1]), (base[:, 0] + lash_len * np.sin(tilt),
                                                              base[:, 1] + lash_len * np.cos(tilt))], 3))
    return strokes


SYNTHETIC_CATEGORIES = QUICKDRAW_CATEGORIES
# Per category, its sub-styles in id order: (name, generator(rng, n) -> strokes).
_SYNTHETIC_STYLES: dict[str, tuple[tuple[str, Callable], ...]] = {
    "face": (("round", _face_round), ("square", _face_square), ("spiky-hair", _face_spiky_hair)),
    "cat": (("head", _cat_head), ("sitting", _cat_sitting)),
    "snowflake": (("6-arm-branched", lambda rng, n: _snowflake(rng, n, 6, True)),
                  ("8-arm-plain", lambda rng, n: _snowflake(rng, n, 8, False))),
    "pencil": (("horizontal", lambda rng, n: _pencil(rng, n, 0)), ("diagonal", lambda rng, n: _pencil(rng, n, 45)),
               ("vertical", lambda rng, n: _pencil(rng, n, 90))),
    "eye": (("open", lambda rng, n: _eye_open(rng, n, False)), ("lashes", lambda rng, n: _eye_open(rng, n, True)),
            ("closed", _eye_closed)),
}
SYNTHETIC_SUBSTYLES = {name: tuple(style for style, _ in styles) for name, styles in _SYNTHETIC_STYLES.items()}

# Shared jitter (unit coordinates; rotation in radians).
_MAX_ROTATION = math.radians(12)
_WOBBLE = 0.035
_QUANTISATION = 80.0  # unit coordinates -> QuickDraw-like integer coordinates (sketches span ~250)


def _rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate [n, P, 2] by per-sketch angles [n] about the origin."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = points[..., 0], points[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)


def _finish_batch(rng: np.random.Generator, strokes: Strokes) -> np.ndarray:
    """Jitter a batch of strokes and turn it into stroke-3 arrays -> int16 [n, points, 3]."""
    n = strokes[0].shape[0]
    strokes = _broadcast_strokes(strokes, n)
    lengths = [s.shape[1] for s in strokes]
    points = np.concatenate(strokes, axis=1)
    # Wobble: a slow random sine along each sketch's pen path plus a little per-point noise.
    t = np.arange(points.shape[1])[None, :, None]
    frequency = rng.uniform(0.1, 0.4, size=(n, 1, 2))
    phase = rng.uniform(0, 2 * math.pi, size=(n, 1, 2))
    points = points + _WOBBLE * np.sin(frequency * t + phase) + rng.normal(0, _WOBBLE / 3, size=points.shape)
    shear = rng.uniform(-0.12, 0.12, size=n)[:, None]
    points = np.stack([points[..., 0] + shear * points[..., 1], points[..., 1]], axis=-1)
    points = points * rng.uniform(0.85, 1.15, size=(n, 1, 2))
    points = _rotate(points, rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=n))
    points = points * rng.uniform(0.7, 1.3, size=(n, 1, 1)) + rng.uniform(-0.5, 0.5, size=(n, 1, 2))
    absolute = np.rint(points * _QUANTISATION + 128).astype(np.int64)
    strokes3 = np.zeros(points.shape[:2] + (3,), np.int16)
    strokes3[:, 0, :2] = absolute[:, 0]
    strokes3[:, 1:, :2] = np.diff(absolute, axis=1)
    strokes3[:, np.cumsum(lengths) - 1, 2] = 1
    return strokes3


def _synthetic_split(rng: np.random.Generator, num_images: int, categories: tuple[str, ...]):
    """Balanced classes and sub-styles in a random order -> (uint8 images, labels, substyles)."""
    style_table = [(label, style) for label, name in enumerate(categories)
                   for style in range(len(_SYNTHETIC_STYLES[name]))]
    # Classes are balanced, then sub-styles within each class, then everything shuffled.
    labels = np.arange(num_images) % len(categories)
    rank_in_class = np.arange(num_images) // len(categories)
    style_within = rank_in_class % np.array([len(_SYNTHETIC_STYLES[c]) for c in categories])[labels]
    first_id = np.cumsum([0] + [len(_SYNTHETIC_STYLES[c]) for c in categories])[:-1]
    substyles = first_id[labels] + style_within
    order = rng.permutation(num_images)
    labels, substyles = labels[order], substyles[order]
    images = np.empty((num_images, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for substyle_id, (label, style) in enumerate(style_table):
        rows = np.flatnonzero(substyles == substyle_id)
        if rows.size == 0:
            continue
        generate = _SYNTHETIC_STYLES[categories[label]][style][1]
        for row, sketch in zip(rows, _finish_batch(rng, generate(rng, rows.size))):
            images[row] = _render_uint8(sketch)
    return images, labels, substyles


@functools.lru_cache(maxsize=2)
def _synthetic_cached(num_train: int, num_test: int, seed: int, categories: tuple[str, ...]):
    # Separate child streams: test draws never depend on num_train, and train never on num_test.
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return (_synthetic_split(train_rng, num_train, categories), _synthetic_split(test_rng, num_test, categories))


def _as_dataset(images_u8: np.ndarray, labels: np.ndarray, substyles, class_names, substyle_names=None) -> ImageDataset:
    images = torch.from_numpy(images_u8).to(torch.float32).div_(255.0).unsqueeze(1)
    # torch.tensor copies: the in-process synthetic cache must never share memory with a caller.
    return ImageDataset(images=images, labels=torch.tensor(labels, dtype=torch.int64),
                        substyles=None if substyles is None else torch.tensor(substyles, dtype=torch.int64),
                        class_names=tuple(class_names), substyle_names=substyle_names)


def synthetic_sketches(num_train: int = 50_000, num_test: int = 5_000, seed: int = 0,
                       categories: Sequence[str] | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The built-in synthetic sketch set: QuickDraw-like 28×28 line drawings, no files needed.

    Five categories named after the paper's (:data:`SYNTHETIC_CATEGORIES`), each with 2 or 3 visually
    distinct sub-styles (:data:`SYNTHETIC_SUBSTYLES`: face round / square / spiky-hair, cat head /
    sitting, snowflake 6-arm-branched / 8-arm-plain, pencil horizontal / diagonal / vertical, eye
    open / lashes / closed), each jittered in part sizes and positions, aspect, shear, rotation
    (±12°) and stroke wobble. Sketches are generated as int16 stroke-3 arrays and rendered by the
    same pipeline as QuickDraw (:func:`rasterize_strokes`).

    Classes are balanced (labels in ``categories`` order), sub-styles balanced within a class, rows
    shuffled. Sub-style ids are contiguous and unique across classes, in category then style order:
    ``substyle_names[id]`` is ``"class/style"`` (with all five categories: face 0-2, cat 3-4,
    snowflake 5-6, pencil 7-9, eye 10-12). The same arguments give bitwise identical images; train
    and test come from independent random streams of ``seed``. Results are cached in-process (as
    uint8) for the last two argument sets; each call returns fresh tensors.

    >>> train, test = synthetic_sketches(num_train=100, num_test=20, seed=1)
    >>> train.images.shape, int(train.substyles.max()) + 1
    (torch.Size([100, 1, 28, 28]), 13)
    """
    categories = tuple(SYNTHETIC_CATEGORIES if categories is None else categories)
    unknown = [c for c in categories if c not in _SYNTHETIC_STYLES]
    if unknown or not categories or len(set(categories)) != len(categories):
        raise ValueError(f"synthetic categories: expected distinct names from {SYNTHETIC_CATEGORIES}, "
                         f"found {categories!r} (unknown: {unknown})")
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"synthetic_sketches: expected {name} to be an integer >= 0, found {value!r}")
    substyle_names = tuple(f"{c}/{style}" for c in categories for style in SYNTHETIC_SUBSTYLES[c])
    train, test = _synthetic_cached(int(num_train), int(num_test), int(seed), categories)
    return (_as_dataset(*train, categories, substyle_names), _as_dataset(*test, categories, substyle_names))


# ----------------------------------------------------------------------------------------------------
# QuickDraw files: locating, downloading, caching


def quickdraw_url(name: str, bitmap: bool = False) -> str:
    """Official download address of one category's sketch-rnn ``.npz`` (or bitmap ``.npy``) file."""
    return (BITMAP_URL if bitmap else STROKES_URL).format(name=urllib.parse.quote(name))


def _download(url: str, destination: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` into ``destination`` atomically (temporary file, then os.replace)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                file.write(chunk)
        os.replace(temporary, destination)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        Path(temporary).unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download {url} to {destination}: {error}. If this machine is offline, download "
            f"the file elsewhere and copy it into {destination.parent} (same file name).") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_root(root) -> Path:
    if root is None:
        raise ValueError("QuickDraw sources need root: the directory holding the category files "
                         "(or pass download=True with a writable root)")
    return Path(root).expanduser()


def _category_file(root: Path, file_name: str, url: str, download: bool) -> Path:
    path = root / file_name
    if path.is_file():
        return path
    if download:
        _download(url, path)
        return path
    if not root.is_dir():
        found = f"the directory {root} does not exist"
    else:
        listing = sorted(p.name for p in root.iterdir() if p.suffix in (".npz", ".npy"))
        found = f"{root} holds {listing[:12] or 'no .npz/.npy files'}"
    raise FileNotFoundError(f"expected QuickDraw file {path}, but {found}. Download {url} into {root}, "
                            f"or pass download=True (CLI: --download).")


def _check_categories(categories) -> tuple[str, ...]:
    categories = tuple(QUICKDRAW_CATEGORIES if categories is None else categories)
    if not categories or len(set(categories)) != len(categories) or not all(isinstance(c, str) and c for c in categories):
        raise ValueError(f"expected a non-empty sequence of distinct category names, found {categories!r}")
    return categories


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction <= 1:
        raise ValueError(f"expected fraction in (0, 1] (PAPER.md's p; 1.0 = 70,000 train sketches per class), "
                         f"found {fraction!r}")
    return float(fraction)


def _split_sizes(fraction: float, num_classes: int, num_train: int | None, num_test: int | None) -> tuple[int, int]:
    """Per-class (train, test) counts: PAPER.md's rule, optionally capped to totals num_train/num_test."""
    per_train = int(fraction * QUICKDRAW_TRAIN_PER_CLASS)
    per_test = min(int(0.1 * fraction * QUICKDRAW_TRAIN_PER_CLASS), QUICKDRAW_TEST_CAP)
    if num_train is not None:
        per_train = min(per_train, num_train // num_classes)
    if num_test is not None:
        per_test = min(per_test, num_test // num_classes)
    return per_train, per_test


def _cache_path(cache_dir: Path, source: Path, split: str, count: int) -> Path:
    stat = source.stat()
    # The source's size and mtime are part of the key, so a replaced file is never served stale.
    identity = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir / f"{source.stem}.{split}.{count}.v{PIPELINE_VERSION}.{identity}.npy"


def _read_cache(path: Path, count: int) -> np.ndarray | None:
    """Cached uint8 [count,28,28] images, or None when absent or unusable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        images = np.load(path, allow_pickle=False)
    except Exception as error:  # a damaged file may raise nearly anything; it is rebuilt either way
        warnings.warn(f"ignoring unreadable cache {path} ({error}); rebuilding it", stacklevel=3)
        return None
    if images.dtype != np.uint8 or images.shape != (count, IMAGE_SIZE, IMAGE_SIZE):
        warnings.warn(f"ignoring cache {path}: expected uint8 {(count, IMAGE_SIZE, IMAGE_SIZE)}, found "
                      f"{images.dtype} {images.shape}; rebuilding it", stacklevel=3)
        return None
    return images


def _write_cache(path: Path, images: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as error:
        warnings.warn(f"not caching rasterised images: cannot write in {path.parent} ({error})", stacklevel=3)
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, images)
        os.replace(temporary, path)
    except OSError as error:  # a full disk must not stop training: the images are in memory already
        warnings.warn(f"not caching rasterised images in {path}: {error}", stacklevel=3)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _load_stroke_file(path: Path) -> dict[str, np.ndarray]:
    try:
        # sketch-rnn files hold object arrays (pickled, written by Python 2): allow_pickle and latin1
        # are required. Only load files from the official source or your own.
        with np.load(path, allow_pickle=True, encoding="latin1") as archive:
            splits = {key: archive[key] for key in archive.files if key in ("train", "valid", "test")}
    except Exception as error:  # zipfile, pickle and numpy raise many types for a damaged file
        raise ValueError(f"{path}: expected a sketch-rnn .npz (keys train/valid/test of stroke-3 arrays), "
                         f"but it cannot be read ({type(error).__name__}: {error}). Delete it and download "
                         f"it again ({quickdraw_url(path.stem)}).") from error
    for key in ("train", "test"):
        if key not in splits:
            raise ValueError(f"{path}: expected keys 'train' and 'test' (sketch-rnn format), found "
                             f"{sorted(splits)}. Is this a sketch-rnn stroke file?")
        if splits[key].ndim != 1:
            raise ValueError(f"{path}[{key!r}]: expected a 1-D array of sketches, found shape {splits[key].shape}")
    return splits


def _rasterised_split(path: Path, splits: dict, split: str, count: int, cache_dir: Path | None) -> np.ndarray:
    count = min(count, splits[split].shape[0])
    cache = None if cache_dir is None else _cache_path(cache_dir, path, split, count)
    if cache is not None and (images := _read_cache(cache, count)) is not None:
        return images
    images = _rasterize_uint8(splits[split][:count], f"{path}[{split!r}]")
    if cache is not None:
        _write_cache(cache, images)
    return images


def _concatenate(per_class: list[np.ndarray], categories) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.full(len(images), label, np.int64) for label, images in enumerate(per_class)])
    return np.concatenate(per_class), labels


def load_quickdraw_strokes(root, categories: Sequence[str] = QUICKDRAW_CATEGORIES, fraction: float = 1.0,
                           cache_dir=None, download: bool = False, num_train: int | None = None,
                           num_test: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """Rasterised QuickDraw sketches from the sketch-rnn files ``{root}/{name}.npz`` (the paper's data).

    Per class, train = the first int(fraction·70,000) sketches of the file's ``train`` split and
    test = the first min(int(0.1·fraction·70,000), 2,500) of its ``test`` split, each capped at what
    the file holds; ``num_train``/``num_test`` optionally cap the totals (per class: total // classes).
    Labels follow ``categories``. Rasterised images are cached as uint8 ``.npy`` in ``cache_dir``
    (default ``{root}/.smoe_fast_cache``), keyed by file (path, size, mtime), split, count and
    :data:`PIPELINE_VERSION`; caches are written atomically and an unreadable or wrong-shaped one is
    rebuilt. ``download=True`` fetches missing files from :func:`quickdraw_url`.

    >>> train, test = load_quickdraw_strokes("data/quickdraw", fraction=0.05)   # doctest: +SKIP
    >>> train.images.shape                                                    # doctest: +SKIP
    torch.Size([17500, 1, 28, 28])
    """
    root, categories, fraction = _check_root(root), _check_categories(categories), _check_fraction(fraction)
    per_train, per_test = _split_sizes(fraction, len(categories), num_train, num_test)
    cache_dir = root / ".smoe_fast_cache" if cache_dir is None else Path(cache_dir).expanduser()
    train_parts, test_parts = [], []
    for name in categories:
        path = _category_file(root, f"{name}.npz", quickdraw_url(name), download)
        splits = _load_stroke_file(path)
        train_parts.append(_rasterised_split(path, splits, "train", per_train, cache_dir))
        test_parts.append(_rasterised_split(path, splits, "test", per_test, cache_dir))
    return (_as_dataset(*_concatenate(train_parts, categories), None, categories),
            _as_dataset(*_concatenate(test_parts, categories), None, categories))


def _load_bitmap_file(path: Path) -> np.ndarray:
    try:
        bitmaps = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError for damaged files
        raise ValueError(f"{path}: expected a QuickDraw bitmap .npy (uint8, shape [N, 784]), but it cannot be "
                         f"read ({type(error).__name__}: {error}). Delete it and download it again "
                         f"({quickdraw_url(path.stem.removeprefix('full_numpy_bitmap_'), bitmap=True)}).") from error
    if bitmaps.dtype != np.uint8 or bitmaps.ndim != 2 or bitmaps.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"{path}: expected a QuickDraw bitmap array of dtype uint8 and shape [N, 784], found "
                         f"{bitmaps.dtype} {bitmaps.shape}. Is this a full_numpy_bitmap_*.npy file?")
    if bitmaps.shape[0] < 2:
        raise ValueError(f"{path}: expected at least 2 bitmaps (one train, one test), found {bitmaps.shape[0]}")
    return bitmaps


def load_quickdraw_bitmaps(root, categories: Sequence[str] = QUICKDRAW_CATEGORIES, fraction: float = 1.0,
                           download: bool = False, num_train: int | None = None,
                           num_test: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """QuickDraw bitmaps from ``{root}/full_numpy_bitmap_{name}.npy`` (uint8 [N, 784], ink 255 on 0).

    Inverted to the paper's convention, x = 1 − b/255 (white background 1.0). These files have no
    train/test split, so per class: test = the LAST n_test rows and train = the FIRST n_train rows,
    with n_test = min(int(0.1·fraction·70,000), 2,500, N // 2) and n_train = min(int(fraction·70,000),
    N − n_test); the two never overlap. ``num_train``/``num_test`` optionally cap the totals as in
    :func:`load_quickdraw_strokes`. No cache is needed: the files are read memory-mapped.
    """
    root, categories, fraction = _check_root(root), _check_categories(categories), _check_fraction(fraction)
    per_train, per_test = _split_sizes(fraction, len(categories), num_train, num_test)
    train_parts, test_parts = [], []
    for name in categories:
        bitmaps = _load_bitmap_file(_category_file(root, f"full_numpy_bitmap_{name}.npy",
                                                   quickdraw_url(name, bitmap=True), download))
        rows = bitmaps.shape[0]
        n_test = min(per_test, rows // 2)
        n_train = min(per_train, rows - n_test)
        train_parts.append(255 - np.asarray(bitmaps[:n_train]).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        test_parts.append(255 - np.asarray(bitmaps[rows - n_test:]).reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
    return (_as_dataset(*_concatenate(train_parts, categories), None, categories),
            _as_dataset(*_concatenate(test_parts, categories), None, categories))


# ----------------------------------------------------------------------------------------------------
# The one entry point for the CLI and training


def load_data(source: str = "synthetic", root=None, fraction: float = 1.0, categories: Sequence[str] | None = None,
              seed: int = 0, download: bool = False, cache_dir=None, num_train: int | None = None,
              num_test: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` from one of :data:`DATA_SOURCES`.

    - ``"synthetic"``: :func:`synthetic_sketches`; ``num_train``/``num_test`` are the sizes (defaults
      50,000 / 5,000, scaled by ``fraction``), ``seed`` picks the draw; ``root``, ``download`` and
      ``cache_dir`` are unused.
    - ``"quickdraw"``: :func:`load_quickdraw_strokes` (sketch-rnn ``.npz`` in ``root``).
    - ``"quickdraw-bitmap"``: :func:`load_quickdraw_bitmaps` (``full_numpy_bitmap_*.npy`` in ``root``).

    For QuickDraw, ``fraction`` is PAPER.md's p and ``num_train``/``num_test`` cap the totals;
    ``seed`` is unused (the split is by file order).

    >>> train, test = load_data("synthetic", num_train=500, num_test=100, seed=3)
    >>> train.num_images, test.num_images
    (500, 100)
    """
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}: expected one of {DATA_SOURCES}")
    fraction = _check_fraction(fraction)
    if source == "synthetic":
        num_train = round(50_000 * fraction) if num_train is None else num_train
        num_test = round(5_000 * fraction) if num_test is None else num_test
        return synthetic_sketches(num_train=num_train, num_test=num_test, seed=seed, categories=categories)
    categories = _check_categories(categories)
    if source == "quickdraw":
        return load_quickdraw_strokes(root, categories, fraction, cache_dir=cache_dir, download=download,
                                      num_train=num_train, num_test=num_test)
    return load_quickdraw_bitmaps(root, categories, fraction, download=download, num_train=num_train,
                                  num_test=num_test)
