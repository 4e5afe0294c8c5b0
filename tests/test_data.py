"""smoe_fast.data: rasterisation, the synthetic sketch set, both QuickDraw file formats, bad input.

QuickDraw files are built tiny in tmp_path in the real formats; nothing here touches the network.
"""
from __future__ import annotations

import io
import os
import urllib.error

import numpy as np
import pytest
import torch

from smoe_fast.vae.data import quickdraw, raster
from smoe_fast.vae.data import synthetic as synthetic_module  # the fixture below is called synthetic
from smoe_fast.vae.data import (DATA_SOURCES, QUICKDRAW_CATEGORIES, ImageDataset, load_data, load_quickdraw_bitmaps,
                            load_quickdraw_strokes, rasterize_batch, rasterize_strokes, synthetic_sketches)

# ----------------------------------------------------------------------------------------------------
# Rasterisation

# A 100x100 square drawn as one closed stroke (pen lifted on the last row).
SQUARE = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [-100, 0, 0], [0, -100, 1]], np.int16)
# Two horizontal lines, top and bottom, as two strokes: the pen is lifted between them.
TWO_LINES = np.array([[0, 0, 0], [100, 0, 1], [-100, 100, 0], [100, 0, 1]], np.int16)


def dark_extent(image: np.ndarray, axis: int, threshold: float = 0.5) -> tuple[int, int]:
    """First and last row (axis=1) or column (axis=0) holding a pixel darker than ``threshold``."""
    hits = np.flatnonzero((image < threshold).any(axis=axis))
    return int(hits[0]), int(hits[-1])


def test_rasterize_square_white_background_dark_outline():
    image = rasterize_strokes(SQUARE)
    assert image.shape == (28, 28) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.min() < 0.2                         # dark strokes
    # Inside the square and the margin stay white, up to faint Lanczos ringing.
    assert np.all(image[11:17, 11:17] > 0.95)
    assert np.all(image[0, :] > 0.95) and np.all(image[:, 0] > 0.95)
    # The larger side is scaled to 0.8*56 px on the 56 canvas, i.e. ~22.4 px at 28, centred.
    for axis in (0, 1):
        first, last = dark_extent(image, axis)
        assert 2 <= first <= 4 and 23 <= last <= 25, (axis, first, last)
        assert abs((first + last) / 2 - 13.5) <= 1.0


def test_rasterize_pen_lift_splits_strokes():
    image = rasterize_strokes(TWO_LINES)
    top, bottom = dark_extent(image, axis=1)
    assert top <= 5 and bottom >= 22                 # both lines are drawn
    # Without the split, a diagonal would join (100, 0) to (0, 100) through the centre.
    assert np.all(image[9:19, 9:19] == 1.0)


def test_rasterize_drops_strokes_with_fewer_than_two_points():
    # A lone point far away, then the square starting from there: if the lone point were kept it
    # would widen the bounding box and shrink the square.
    lone_point_first = np.concatenate([np.array([[1000, 1000, 1]], np.int16),
                                       np.array([[-1000, -1000, 0]], np.int16), SQUARE[1:]])
    np.testing.assert_array_equal(rasterize_strokes(lone_point_first), rasterize_strokes(SQUARE))


@pytest.mark.parametrize("strokes3, expect", [
    (np.zeros((0, 3), np.int16), "blank"),                    # empty sketch
    (np.array([[5, 5, 1]], np.int16), "blank"),               # one point only: no stroke survives
    (np.array([[5, 5, 0], [0, 0, 1]], np.int16), "dot"),      # zero extent: a dot at the centre
    (np.array([[0, 0, 0], [0, 50, 1]], np.float32), "line"),  # zero width, float input: a vertical line
])
def test_rasterize_degenerate_sketches(strokes3, expect):
    image = rasterize_strokes(strokes3)
    assert image.shape == (28, 28) and np.isfinite(image).all()
    if expect == "blank":
        assert np.all(image == 1.0)
    elif expect == "dot":
        dark = np.argwhere(image < 0.9)
        assert 0 < len(dark) <= 9 and np.all(np.abs(dark - 13.5) <= 2)
    else:
        left, right = dark_extent(image, axis=0)
        top, bottom = dark_extent(image, axis=1)
        assert right - left <= 3 and bottom - top >= 20


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.zeros(6), np.array([["a", "b", "c"]])],
                         ids=["two-columns", "flat", "strings"])
def test_rasterize_rejects_non_stroke3(bad):
    with pytest.raises(ValueError, match="stroke-3"):
        rasterize_strokes(bad)


def test_rasterize_batch_matches_single():
    batch = rasterize_batch([SQUARE, TWO_LINES])
    assert batch.shape == (2, 28, 28) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], rasterize_strokes(SQUARE))
    np.testing.assert_array_equal(batch[1], rasterize_strokes(TWO_LINES))
    assert rasterize_batch([]).shape == (0, 28, 28)


# ----------------------------------------------------------------------------------------------------
# Synthetic sketches

@pytest.fixture(scope="module")
def synthetic():
    return synthetic_sketches(num_train=1300, num_test=650, seed=0)


def test_synthetic_shapes_dtypes_ranges(synthetic):
    for split, size in zip(synthetic, (1300, 650)):
        assert isinstance(split, ImageDataset) and split.num_images == size
        assert split.images.shape == (size, 1, 28, 28) and split.images.dtype == torch.float32
        assert split.labels.shape == (size,) and split.labels.dtype == torch.int64
        assert split.substyles.shape == (size,) and split.substyles.dtype == torch.int64
        assert split.images.min() >= 0 and split.images.max() <= 1
        # Mostly white background with dark strokes, like QuickDraw.
        assert split.images.mean() > 0.7 and (split.images < 0.1).any()
        assert split.class_names == QUICKDRAW_CATEGORIES and split.num_classes == 5


def test_synthetic_labels_and_substyles_cover_everything(synthetic):
    train, _ = synthetic
    assert torch.bincount(train.labels).tolist() == [260] * 5   # balanced classes
    names = train.substyle_names
    assert torch.equal(torch.unique(train.substyles), torch.arange(len(names)))
    for label, class_name in enumerate(train.class_names):
        ids = torch.unique(train.substyles[train.labels == label]).tolist()
        assert 2 <= len(ids) <= 4
        assert all(names[i].startswith(class_name + "/") for i in ids)  # ids are unique across classes


def test_synthetic_substyles_are_visually_distinct(synthetic):
    # Per class, the mean images of any two sub-styles differ clearly and nearest-mean-image
    # classification recovers the held-out sub-styles; not perfectly, because 40% of the sketches are
    # unfinished (only their first strokes drawn, as in QuickDraw).
    train, test = synthetic
    x_train, x_test = train.images.flatten(1), test.images.flatten(1)
    for label, class_name in enumerate(train.class_names):
        ids = torch.unique(train.substyles[train.labels == label])
        means = torch.stack([x_train[train.substyles == i].mean(0) for i in ids])
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                rms = (means[a] - means[b]).pow(2).mean().sqrt()
                assert rms > 0.07, (class_name, a, b, float(rms))
        in_class = test.labels == label
        predicted = ids[torch.cdist(x_test[in_class], means).argmin(1)]
        accuracy = (predicted == test.substyles[in_class]).float().mean()
        assert accuracy > 0.8, (class_name, float(accuracy))


def test_synthetic_classes_overlap_like_real_doodles(synthetic):
    # The paper's effects need classes that are not trivially separable: a nearest-class-mean classifier
    # on pixels stays well below perfect, and sub-styles are shared between classes (the nearest
    # sub-style of a round face is the round eye, of a closed eye the horizontal pencil).
    train, test = synthetic
    x_train, x_test = train.images.flatten(1), test.images.flatten(1)
    class_means = torch.stack([x_train[train.labels == c].mean(0) for c in range(train.num_classes)])
    accuracy = (torch.cdist(x_test, class_means).argmin(1) == test.labels).float().mean()
    assert 0.5 < accuracy < 0.85, float(accuracy)
    names = train.substyle_names
    style_means = torch.stack([x_train[train.substyles == i].mean(0) for i in range(len(names))])
    distances = torch.cdist(style_means, style_means).fill_diagonal_(float("inf"))
    nearest = {names[i]: names[int(j)] for i, j in enumerate(distances.argmin(1))}
    assert nearest["face/round"] == "eye/round" and nearest["eye/closed"] == "pencil/horizontal"
    assert sum(a.split("/")[0] != b.split("/")[0] for a, b in nearest.items()) >= 4


def test_synthetic_deterministic_by_seed_and_splits_disjoint(synthetic):
    synthetic_module._synthetic_cached.cache_clear()  # regenerate from scratch, not from the in-process cache
    again = synthetic_sketches(num_train=1300, num_test=650, seed=0)
    for first, second in zip(synthetic, again):
        assert torch.equal(first.images, second.images)
        assert torch.equal(first.labels, second.labels) and torch.equal(first.substyles, second.substyles)
    other = synthetic_sketches(num_train=1300, num_test=650, seed=1)
    assert not torch.equal(other[0].images, synthetic[0].images)
    train, test = (split.images.flatten(1) for split in synthetic)
    assert torch.cdist(test, train).min() > 0  # no test image appears in train


def test_synthetic_test_split_independent_of_train_size():
    small = synthetic_sketches(num_train=10, num_test=20, seed=4)
    large = synthetic_sketches(num_train=30, num_test=20, seed=4)
    assert torch.equal(small[1].images, large[1].images)


def test_synthetic_returns_fresh_tensors():
    first = synthetic_sketches(num_train=10, num_test=5, seed=5)
    first[0].images.zero_()
    first[0].labels.zero_()
    second = synthetic_sketches(num_train=10, num_test=5, seed=5)
    assert second[0].images.max() == 1.0 and second[0].labels.max() > 0


def test_synthetic_uses_the_rasterize_pipeline(monkeypatch):
    monkeypatch.setattr(raster, "_render_uint8", lambda strokes3: np.zeros((28, 28), np.uint8))
    train, _ = synthetic_sketches(num_train=7, num_test=3, seed=123)
    assert torch.all(train.images == 0)


def test_synthetic_category_subset():
    train, test = synthetic_sketches(num_train=40, num_test=10, seed=0, categories=("pencil", "cat"))
    assert train.class_names == ("pencil", "cat")
    assert set(train.labels.tolist()) == {0, 1}
    assert train.substyle_names == ("pencil/horizontal", "pencil/diagonal", "pencil/vertical", "cat/head", "cat/sitting",
                                    "cat/face")
    assert torch.all((train.substyles < 3) == (train.labels == 0))


def test_load_data_synthetic_sizes():
    train, test = load_data("synthetic", num_train=25, num_test=10, seed=2)
    assert (train.num_images, test.num_images) == (25, 10)
    train, test = load_data("synthetic", fraction=0.001)
    assert (train.num_images, test.num_images) == (50, 5)
    assert DATA_SOURCES == ("synthetic", "quickdraw", "quickdraw-bitmap")


# ----------------------------------------------------------------------------------------------------
# QuickDraw sketch-rnn stroke files

def random_sketch(rng: np.random.Generator) -> np.ndarray:
    """A random int16 stroke-3 sketch of 2 or 3 strokes, as in the sketch-rnn files."""
    rows = []
    for _ in range(rng.integers(2, 4)):
        points = rng.integers(2, 6)
        stroke = np.zeros((points, 3), np.int16)
        stroke[:, :2] = rng.integers(-40, 40, size=(points, 2))
        stroke[-1, 2] = 1
        rows.append(stroke)
    return np.concatenate(rows)


def object_array(items) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def write_stroke_file(path, seed: int, sizes=(30, 5, 12)) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    splits = {key: [random_sketch(rng) for _ in range(size)] for key, size in zip(("train", "valid", "test"), sizes)}
    np.savez(path, **{key: object_array(sketches) for key, sketches in splits.items()})
    return splits


@pytest.fixture
def stroke_root(tmp_path):
    root = tmp_path / "strokes"
    root.mkdir()
    return root, {name: write_stroke_file(root / f"{name}.npz", seed) for seed, name in enumerate(("face", "cat"))}


# fraction 4e-4: train int(28.0) = 28 of 30 per class, test int(2.8) = 2 of 12.
# fraction 1.0: more than the files hold, so everything (30 / 12) per class.
@pytest.mark.parametrize("fraction, per_train, per_test", [(4e-4, 28, 2), (1.0, 30, 12)], ids=["p=4e-4", "p=1-capped"])
def test_quickdraw_strokes_split_rule_and_label_order(stroke_root, tmp_path, fraction, per_train, per_test):
    root, sketches = stroke_root
    categories = ("cat", "face")  # label order follows the argument, not the directory
    train, test = load_quickdraw_strokes(root, categories, fraction, cache_dir=tmp_path / "cache")
    assert train.class_names == categories and train.substyles is None
    assert train.labels.tolist() == [0] * per_train + [1] * per_train
    assert test.labels.tolist() == [0] * per_test + [1] * per_test
    expected_train = np.concatenate([rasterize_batch(sketches[c]["train"][:per_train]) for c in categories])
    expected_test = np.concatenate([rasterize_batch(sketches[c]["test"][:per_test]) for c in categories])
    np.testing.assert_array_equal(train.images[:, 0].numpy(), expected_train)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), expected_test)


def test_quickdraw_split_sizes_follow_paper():
    # PAPER.md: p=5% -> 3,500 train and 350 test per class; p=100% -> 70,000 and 2,500 (capped).
    assert quickdraw._split_sizes(0.05, 5, None, None) == (3500, 350)
    assert quickdraw._split_sizes(1.0, 5, None, None) == (70_000, 2_500)
    assert quickdraw._split_sizes(1.0, 5, 1000, 52) == (200, 10)  # num_train/num_test cap the totals


def test_quickdraw_strokes_cache_hit_skips_rasterising(stroke_root, tmp_path, monkeypatch):
    root, _ = stroke_root
    first = load_quickdraw_strokes(root, ("face", "cat"), 4e-4)   # default cache dir under root
    assert len(list((root / ".smoe_fast_cache").glob("*.npy"))) == 4  # 2 files x 2 splits

    def fail(strokes3):
        raise AssertionError("rasterised although the cache holds these images")
    monkeypatch.setattr(raster, "_render_uint8", fail)
    second = load_quickdraw_strokes(root, ("face", "cat"), 4e-4)
    assert torch.equal(first[0].images, second[0].images)
    assert torch.equal(first[1].images, second[1].images)


@pytest.mark.parametrize("damage", ["garbage-bytes", "truncated", "wrong-shape"])
def test_quickdraw_strokes_corrupt_cache_is_rebuilt(stroke_root, tmp_path, damage):
    root, _ = stroke_root
    cache_dir = tmp_path / "cache"
    reference = load_quickdraw_strokes(root, ("face",), 4e-4, cache_dir=cache_dir)
    for path in cache_dir.glob("*.npy"):
        if damage == "garbage-bytes":
            path.write_bytes(b"not a numpy file")
        elif damage == "truncated":
            path.write_bytes(path.read_bytes()[:150])
        else:
            np.save(path, np.zeros((3, 28, 28), np.uint8))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_quickdraw_strokes(root, ("face",), 4e-4, cache_dir=cache_dir)
    assert torch.equal(reference[0].images, rebuilt[0].images) and torch.equal(reference[1].images, rebuilt[1].images)
    for path in cache_dir.glob("*.npy"):  # the rebuilt cache is valid again
        assert np.load(path).shape[1:] == (28, 28)
    assert not list(cache_dir.glob("*.part"))  # atomic writes leave no temporary files


def test_quickdraw_strokes_cache_follows_source_file(stroke_root, tmp_path):
    root, _ = stroke_root
    cache_dir = tmp_path / "cache"
    before = load_quickdraw_strokes(root, ("face",), 4e-4, cache_dir=cache_dir)
    new_sketches = write_stroke_file(root / "face.npz", seed=99)
    os.utime(root / "face.npz", ns=(1, 1))  # a replaced file changes the cache key even at equal size
    after = load_quickdraw_strokes(root, ("face",), 4e-4, cache_dir=cache_dir)
    assert not torch.equal(before[0].images, after[0].images)
    np.testing.assert_array_equal(after[0].images[:, 0].numpy(), rasterize_batch(new_sketches["train"][:28]))


def test_load_data_dispatches_to_quickdraw(stroke_root, tmp_path):
    root, _ = stroke_root
    train, test = load_data("quickdraw", root=root, fraction=1.0, categories=("face", "cat"),
                            cache_dir=tmp_path / "cache", num_train=10, num_test=4)
    assert (train.num_images, test.num_images) == (10, 4)
    assert train.labels.tolist() == [0] * 5 + [1] * 5


# ----------------------------------------------------------------------------------------------------
# QuickDraw bitmaps

def write_bitmap_file(path, rows: int, seed: int) -> np.ndarray:
    bitmaps = np.random.default_rng(seed).integers(0, 256, size=(rows, 784), dtype=np.uint8)
    np.save(path, bitmaps)
    return bitmaps


@pytest.fixture
def bitmap_root(tmp_path):
    root = tmp_path / "bitmaps"
    root.mkdir()
    return root, {name: write_bitmap_file(root / f"full_numpy_bitmap_{name}.npy", 40, seed)
                  for seed, name in enumerate(("face", "eye"))}


# p=4e-4: train first 28 rows, test last 2 rows. p=1.0 on 40 rows: test last 20 (N // 2), train first 20.
@pytest.mark.parametrize("fraction, per_train, per_test", [(4e-4, 28, 2), (1.0, 20, 20)], ids=["p=4e-4", "p=1-capped"])
def test_quickdraw_bitmaps_inverted_and_split(bitmap_root, fraction, per_train, per_test):
    root, bitmaps = bitmap_root
    categories = ("eye", "face")
    train, test = load_data("quickdraw-bitmap", root=root, fraction=fraction, categories=categories)
    assert train.class_names == categories and train.images.dtype == torch.float32
    assert train.labels.tolist() == [0] * per_train + [1] * per_train
    assert test.labels.tolist() == [0] * per_test + [1] * per_test
    for label, name in enumerate(categories):
        raw = bitmaps[name].astype(np.float32)
        expected_train = (1 - raw[:per_train] / 255).reshape(-1, 1, 28, 28)
        expected_test = (1 - raw[40 - per_test:] / 255).reshape(-1, 1, 28, 28)
        np.testing.assert_allclose(train.images[train.labels == label].numpy(), expected_train, atol=1e-6, rtol=0)
        np.testing.assert_allclose(test.images[test.labels == label].numpy(), expected_test, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", [(784,), (1, 784), (28, 28)], ids=["N-784", "N-1-784", "N-28-28"])
def test_quickdraw_bitmap_layouts_load_alike(tmp_path, layout):
    # Public QuickDraw subsets store the same bytes as [N, 784], [N, 1, 784] or [N, 28, 28]
    bitmaps = write_bitmap_file(tmp_path / "flat.npy", 12, seed=5)
    np.save(tmp_path / "full_numpy_bitmap_cat.npy", bitmaps.reshape((12,) + layout))
    train, test = load_quickdraw_bitmaps(tmp_path, ("cat",), 1.0)
    expected = torch.from_numpy(1.0 - bitmaps.astype(np.float32) / 255).reshape(12, 1, 28, 28)
    torch.testing.assert_close(torch.cat([train.images, test.images]), expected, rtol=0, atol=1e-6)


def test_quickdraw_bitmaps_ink_becomes_dark(tmp_path):
    bitmaps = np.zeros((4, 784), np.uint8)
    bitmaps[:, 0] = 255  # ink at the top-left pixel, background elsewhere
    np.save(tmp_path / "full_numpy_bitmap_cat.npy", bitmaps)
    train, _ = load_quickdraw_bitmaps(tmp_path, ("cat",), 1.0)
    assert torch.all(train.images[:, 0, 0, 0] == 0.0) and torch.all(train.images[:, 0, 0, 1:] == 1.0)


# ----------------------------------------------------------------------------------------------------
# Downloads (never the network: urlopen is replaced)

class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_fetches_official_url_atomically(tmp_path, monkeypatch):
    source = tmp_path / "source.npz"
    write_stroke_file(source, seed=3)
    requested = []

    def fake_urlopen(url, timeout):
        requested.append((url, timeout))
        return FakeResponse(source.read_bytes())
    monkeypatch.setattr(quickdraw.urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "new-root"  # does not exist yet
    train, _ = load_quickdraw_strokes(root, ("hot air balloon",), 4e-4, download=True)
    assert requested == [("https://storage.googleapis.com/quickdraw_dataset/sketchrnn/hot%20air%20balloon.npz",
                          quickdraw.DOWNLOAD_TIMEOUT_S)]
    assert (root / "hot air balloon.npz").is_file() and train.num_images == 28
    assert not list(root.glob("*.part"))
    assert quickdraw.quickdraw_url("hot air balloon", bitmap=True) == (
        "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/hot%20air%20balloon.npy")


@pytest.mark.parametrize("source", ["quickdraw", "quickdraw-bitmap"])
def test_download_offline_error_names_url_and_manual_step(tmp_path, monkeypatch, source):
    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(quickdraw.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as info:
        load_data(source, root=tmp_path, categories=("face",), download=True)
    message = str(info.value)
    assert "https://storage.googleapis.com/quickdraw_dataset/" in message and "face" in message
    assert "offline" in message and str(tmp_path) in message
    assert not list(tmp_path.iterdir())  # no partial file left behind


# ----------------------------------------------------------------------------------------------------
# Bad input

def test_missing_root_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_quickdraw_strokes(missing)
    assert "face.npz" in str(info.value) and "download=True" in str(info.value)
    with pytest.raises(ValueError, match="need root"):
        load_data("quickdraw")


@pytest.mark.parametrize("source, present", [("quickdraw", "face.npz"), ("quickdraw-bitmap", "full_numpy_bitmap_face.npy")])
def test_missing_category_file(tmp_path, source, present):
    if source == "quickdraw":
        write_stroke_file(tmp_path / present, seed=0)
    else:
        write_bitmap_file(tmp_path / present, rows=10, seed=0)
    with pytest.raises(FileNotFoundError) as info:
        load_data(source, root=tmp_path, categories=("face", "cat"))
    message = str(info.value)
    assert "cat" in message and present in message and "https://" in message  # expected, found, what to do


def write_npz(path, **arrays):
    np.savez(path, **arrays)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"PK\x03\x04 definitely not a zip"), "cannot be read"),
    (lambda p: write_npz(p, train=object_array([SQUARE])), "keys 'train' and 'test'"),
    (lambda p: write_npz(p, train=object_array([SQUARE[:, :2]]), test=object_array([SQUARE])), r"shape \[n, 3\]"),
    (lambda p: write_npz(p, train=object_array([SQUARE.astype(str)]), test=object_array([SQUARE])), "dtype"),
    (lambda p: write_npz(p, train=np.zeros((2, 2, 5, 3)), test=object_array([SQUARE])), "1-D array of sketches"),
], ids=["corrupt-zip", "missing-test-key", "two-column-strokes", "string-strokes", "4-d-train"])
def test_bad_stroke_files(tmp_path, make, match):
    make(tmp_path / "face.npz")
    with pytest.raises(ValueError, match=match) as info:
        load_quickdraw_strokes(tmp_path, ("face",), 1.0, cache_dir=tmp_path / "cache")
    assert "face.npz" in str(info.value)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot be read"),
    (lambda p: np.save(p, np.zeros((5, 784), np.float32)), "found float32"),
    (lambda p: np.save(p, np.zeros((5, 28, 27), np.uint8)), r"\(5, 28, 27\)"),
    (lambda p: np.save(p, np.zeros((5, 2, 392), np.uint8)), r"\(5, 2, 392\)"),
    (lambda p: np.save(p, np.zeros((5, 1, 28, 28), np.uint8)), r"\(5, 1, 28, 28\)"),
    (lambda p: np.save(p, np.zeros((1, 784), np.uint8)), "at least 2"),
], ids=["corrupt", "float-dtype", "28x27-images", "two-channel-rows", "4-d-shape", "one-row"])
def test_bad_bitmap_files(tmp_path, make, match):
    make(tmp_path / "full_numpy_bitmap_face.npy")
    with pytest.raises(ValueError, match=match) as info:
        load_quickdraw_bitmaps(tmp_path, ("face",), 1.0)
    assert "full_numpy_bitmap_face.npy" in str(info.value)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        load_data("synthetic", fraction=fraction)


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "mnist"}, "unknown data source 'mnist'"),
    ({"categories": ("face", "dog")}, "unknown: \\['dog'\\]"),
    ({"categories": ("face", "face")}, "distinct"),
    ({"num_train": -1}, "num_train"),
    ({"num_test": 2.5}, "num_test"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_data(**kwargs)


def test_bad_quickdraw_categories(tmp_path):
    with pytest.raises(ValueError, match="distinct category names"):
        load_quickdraw_strokes(tmp_path, ())
