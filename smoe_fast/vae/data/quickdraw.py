"""The two QuickDraw file formats: sketch-rnn stroke files (rasterised here, cached on disk) and
full_numpy_bitmap files; locating, downloading and PAPER.md's split rule."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .dataset import ImageDataset, _as_dataset
from .raster import IMAGE_SIZE, PIPELINE_VERSION, _rasterize_uint8

QUICKDRAW_CATEGORIES = ("face", "cat", "snowflake", "pencil", "eye")

# PAPER.md's split rule: per class, train = first int(p*70,000), test = first min(int(0.1*p*70,000), 2,500).
QUICKDRAW_TRAIN_PER_CLASS = 70_000
QUICKDRAW_TEST_CAP = 2_500

STROKES_URL = "https://storage.googleapis.com/quickdraw_dataset/sketchrnn/{name}.npz"
BITMAP_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/{name}.npy"
DOWNLOAD_TIMEOUT_S = 60.0


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


# Layouts of one 28x28 bitmap per row that public QuickDraw bitmap files use; all hold the same bytes.
BITMAP_SHAPES = ("[N, 784]", "[N, 1, 784]", "[N, 28, 28]")


def _load_bitmap_file(path: Path) -> np.ndarray:
    """The bitmaps of one ``.npy`` file as uint8 [N, 784] (memory-mapped; [N, 1, 784] and [N, 28, 28]
    files are viewed, not copied)."""
    expected = f"uint8 with shape {' or '.join(BITMAP_SHAPES)}"
    try:
        bitmaps = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # numpy raises ValueError/OSError/EOFError/UnpicklingError for damaged files
        raise ValueError(f"{path}: expected a QuickDraw bitmap .npy ({expected}), but it cannot be "
                         f"read ({type(error).__name__}: {error}). Delete it and download it again "
                         f"({quickdraw_url(path.stem.removeprefix('full_numpy_bitmap_'), bitmap=True)}).") from error
    pixels = IMAGE_SIZE * IMAGE_SIZE
    shape = bitmaps.shape
    known = (len(shape) == 2 and shape[1] == pixels) or (len(shape) == 3 and shape[1:] in ((1, pixels),
                                                                                        (IMAGE_SIZE, IMAGE_SIZE)))
    if bitmaps.dtype != np.uint8 or not known:
        raise ValueError(f"{path}: expected a QuickDraw bitmap array of dtype {expected}, found "
                         f"{bitmaps.dtype} {shape}. Is this a full_numpy_bitmap_*.npy file?")
    if shape[0] < 2:
        raise ValueError(f"{path}: expected at least 2 bitmaps (one train, one test), found {shape[0]}")
    return bitmaps.reshape(shape[0], pixels)


def load_quickdraw_bitmaps(root, categories: Sequence[str] = QUICKDRAW_CATEGORIES, fraction: float = 1.0,
                           download: bool = False, num_train: int | None = None,
                           num_test: int | None = None) -> tuple[ImageDataset, ImageDataset]:
    """QuickDraw bitmaps from ``{root}/full_numpy_bitmap_{name}.npy`` (uint8 [N, 784], [N, 1, 784] or
    [N, 28, 28], ink 255 on 0).

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

