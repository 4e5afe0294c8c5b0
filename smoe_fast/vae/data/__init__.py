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

from typing import Sequence

from .dataset import ImageDataset
from .quickdraw import (QUICKDRAW_CATEGORIES, _check_categories, _check_fraction, load_quickdraw_bitmaps,
                        load_quickdraw_strokes, quickdraw_url)
from .raster import PIPELINE_VERSION, rasterize_batch, rasterize_strokes
from .synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_SUBSTYLES, synthetic_sketches

__all__ = [
    "ImageDataset", "DATA_SOURCES", "QUICKDRAW_CATEGORIES", "SYNTHETIC_CATEGORIES", "SYNTHETIC_SUBSTYLES",
    "PIPELINE_VERSION", "rasterize_strokes", "rasterize_batch", "synthetic_sketches",
    "load_quickdraw_strokes", "load_quickdraw_bitmaps", "load_data", "quickdraw_url",
]

# The one list of data sources: the CLI's and the reproduction's --data choices come from here.
DATA_SOURCES = ("synthetic", "quickdraw", "quickdraw-bitmap")


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
