"""The built-in synthetic sketch set: QuickDraw-like line drawings, generated as stroke-3 arrays and
rendered by :mod:`smoe_fast.vae.data.raster`; no files, no network, deterministic by seed."""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from .dataset import ImageDataset, _as_dataset
from .quickdraw import QUICKDRAW_CATEGORIES
from . import raster

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


def _face_eared(rng, n) -> Strokes:
    """A face with pointed ears: drawn like a cat head without whiskers (a style the two classes share)."""
    head = _arc(0, 0, 1, _uniform(rng, n, 0.95, 1.1), 0, 2 * math.pi, 32)
    return [head] + _cat_ears(rng, n, 0, 0, 0.95) + _face_parts(rng, n)


def _cat_face(rng, n) -> Strokes:
    """A cat drawn as a smiling round face with whiskers and no ears (shared with the face class)."""
    head = _arc(0, 0, _uniform(rng, n, 0.95, 1.1), 1.0, 0, 2 * math.pi, 32)
    spread = _uniform(rng, n, 0.12, 0.25)
    whiskers = [_polyline([(side * 0.3, 0.3 + 0.1 * k), (side * 1.35, 0.3 + k * spread)], 3)
                for side in (-1, 1) for k in (-1, 1)]
    return [head] + _face_parts(rng, n) + whiskers


def _eye_round(rng, n) -> Strokes:
    """An eye drawn as a circle with an iris and a pupil, no lids: a head outline with one dot."""
    outline = _arc(0, 0, _uniform(rng, n, 0.95, 1.1), 1.0, 0, 2 * math.pi, 32)
    iris_x, iris_y, iris_r = _uniform(rng, n, -0.3, 0.3), _uniform(rng, n, -0.3, 0.3), _uniform(rng, n, 0.35, 0.5)
    return [outline, _arc(iris_x, iris_y, iris_r, iris_r, 0, 2 * math.pi, 16),
            _arc(iris_x, iris_y, iris_r * 0.3, iris_r * 0.3, 0, 2 * math.pi, 8)]


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
    "face": (("round", _face_round), ("square", _face_square), ("spiky-hair", _face_spiky_hair),
             ("eared", _face_eared)),
    "cat": (("head", _cat_head), ("sitting", _cat_sitting), ("face", _cat_face)),
    "snowflake": (("6-arm-branched", lambda rng, n: _snowflake(rng, n, 6, True)),
                  ("8-arm-plain", lambda rng, n: _snowflake(rng, n, 8, False))),
    "pencil": (("horizontal", lambda rng, n: _pencil(rng, n, 0)), ("diagonal", lambda rng, n: _pencil(rng, n, 45)),
               ("vertical", lambda rng, n: _pencil(rng, n, 90))),
    "eye": (("open", lambda rng, n: _eye_open(rng, n, False)), ("lashes", lambda rng, n: _eye_open(rng, n, True)),
            ("closed", _eye_closed), ("round", _eye_round)),
}
SYNTHETIC_SUBSTYLES = {name: tuple(style for style, _ in styles) for name, styles in _SYNTHETIC_STYLES.items()}

# Shared jitter (unit coordinates; rotation in radians). Real doodles vary far more within a class than
# clean templates do; without these (version 1 of this set) classes were 98.8% linearly separable in a
# VAE's latent against 86.5% on real QuickDraw, and none of the paper's effects showed (issue 15).
_MAX_ROTATION = math.radians(20)
_WOBBLE = 0.05
_STROKE_SHIFT = 0.07     # each stroke placed independently off its template position (sloppy parts)
_PARTIAL = 0.4           # share of sketches left unfinished: only their first strokes are drawn
_PARTIAL_KEEP = (0.3, 0.75)  # share of the strokes an unfinished sketch keeps (at least one)
_QUANTISATION = 80.0  # unit coordinates -> QuickDraw-like integer coordinates (sketches span ~250)


def _rotate(points: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate [n, P, 2] by per-sketch angles [n] about the origin."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = points[..., 0], points[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)


def _finish_batch(rng: np.random.Generator, strokes: Strokes) -> list[np.ndarray]:
    """Jitter a batch of strokes and turn it into stroke-3 arrays -> n int16 [points, 3] arrays
    (unfinished sketches are shorter: they stop after their first strokes, as QuickDraw's often do)."""
    n = strokes[0].shape[0]
    strokes = [s + rng.normal(0, _STROKE_SHIFT, size=(n, 1, 2)) for s in _broadcast_strokes(strokes, n)]
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
    ends = np.cumsum(lengths)
    strokes3[:, ends - 1, 2] = 1
    kept = np.where(rng.random(n) < _PARTIAL,
                    np.maximum(1, np.ceil(rng.uniform(*_PARTIAL_KEEP, size=n) * len(lengths))).astype(np.int64),
                    len(lengths))
    return [sketch[:ends[k - 1]] for sketch, k in zip(strokes3, kept)]


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
    images = np.empty((num_images, raster.IMAGE_SIZE, raster.IMAGE_SIZE), np.uint8)
    for substyle_id, (label, style) in enumerate(style_table):
        rows = np.flatnonzero(substyles == substyle_id)
        if rows.size == 0:
            continue
        generate = _SYNTHETIC_STYLES[categories[label]][style][1]
        for row, sketch in zip(rows, _finish_batch(rng, generate(rng, rows.size))):
            images[row] = raster._render_uint8(sketch)
    return images, labels, substyles


@functools.lru_cache(maxsize=2)
def _synthetic_cached(num_train: int, num_test: int, seed: int, categories: tuple[str, ...]):
    # Separate child streams: test draws never depend on num_train, and train never on num_test.
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return (_synthetic_split(train_rng, num_train, categories), _synthetic_split(test_rng, num_test, categories))

def synthetic_sketches(num_train: int = 50_000, num_test: int = 5_000, seed: int = 0,
                       categories: Sequence[str] | None = None) -> tuple[ImageDataset, ImageDataset]:
    """The built-in synthetic sketch set: QuickDraw-like 28×28 line drawings, no files needed.

    Five categories named after the paper's (:data:`SYNTHETIC_CATEGORIES`), each with 2 to 4 sub-styles
    (:data:`SYNTHETIC_SUBSTYLES`: face round / square / spiky-hair / eared, cat head / sitting / face,
    snowflake 6-arm-branched / 8-arm-plain, pencil horizontal / diagonal / vertical, eye open / lashes /
    closed / round). Some sub-styles are drawn alike across classes, as real doodles are (an eared face
    and a cat head, a whiskered cat face and a face, a round eye and a round face), and 40% of the
    sketches are unfinished (only their first 30-75% of strokes), so classes overlap: a VAE's latent
    separates them about as well as real QuickDraw's (84% linear-probe accuracy in the quick preset,
    against 86.5% on real doodles; 98.8% with clean templates). Every sketch is jittered in part sizes
    and positions, per-stroke placement, aspect, shear, rotation (±20°) and stroke wobble, generated as
    int16 stroke-3 arrays and rendered by the same pipeline as QuickDraw (:func:`rasterize_strokes`).

    Classes are balanced (labels in ``categories`` order), sub-styles balanced within a class, rows
    shuffled. Sub-style ids are contiguous and unique across classes, in category then style order:
    ``substyle_names[id]`` is ``"class/style"`` (with all five categories: face 0-3, cat 4-6,
    snowflake 7-8, pencil 9-11, eye 12-15). The same arguments give bitwise identical images; train
    and test come from independent random streams of ``seed``. Results are cached in-process (as
    uint8) for the last two argument sets; each call returns fresh tensors.

    >>> train, test = synthetic_sketches(num_train=100, num_test=20, seed=1)
    >>> train.images.shape, int(train.substyles.max()) + 1
    (torch.Size([100, 1, 28, 28]), 16)
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

