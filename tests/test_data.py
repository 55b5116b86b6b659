"""Tests of data loading, validation, the split and the batch order."""

from __future__ import annotations

import numpy as np
import pytest

from sslspec.data import (
    DataError,
    epoch_batches,
    load_dataset,
    split_dataset,
    steps_per_epoch,
)


def save_png(path, pixels):
    from PIL import Image

    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def test_digits_shape_and_range():
    dataset = load_dataset("digits")
    assert dataset.x_train.shape == (1438, 1, 8, 8)
    assert dataset.x_test.shape == (359, 1, 8, 8)
    assert dataset.x_train.dtype == np.float32
    assert dataset.x_train.min() == 0.0
    assert dataset.x_train.max() == 1.0
    assert dataset.classes == tuple(str(i) for i in range(10))
    assert dataset.sample_shape == (1, 8, 8)


def test_digits_split_is_stratified_and_fixed():
    first = load_dataset("digits")
    second = load_dataset("digits")
    np.testing.assert_array_equal(first.y_test, second.y_test)
    counts = np.bincount(first.y_test, minlength=10)
    assert counts.min() >= 35
    assert counts.max() <= 37


def test_npz_with_labels(tmp_path):
    path = tmp_path / "data.npz"
    x = np.random.default_rng(0).random((50, 6))
    y = np.array(["cat", "dog"] * 25)
    np.savez(path, x=x, y=y)
    dataset = load_dataset(str(path))
    assert dataset.sample_shape == (6,)
    assert dataset.classes == ("cat", "dog")
    assert len(dataset.x_train) + len(dataset.x_test) == 50
    assert dataset.has_labels


def test_npy_without_labels_and_grayscale(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((20, 8, 8), dtype=np.uint8))
    dataset = load_dataset(str(path))
    assert dataset.sample_shape == (1, 8, 8)
    assert not dataset.has_labels


def test_csv_with_label_column(tmp_path):
    path = tmp_path / "table.csv"
    rows = ["a,b,label"] + [
        f"{i},{i * 2},{'odd' if i % 2 else 'even'}" for i in range(20)
    ]
    path.write_text("\n".join(rows) + "\n")
    dataset = load_dataset(str(path))
    assert dataset.sample_shape == (2,)
    assert dataset.classes == ("even", "odd")


def test_csv_without_header(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("\n".join(f"{i},{i + 1},{i + 2}" for i in range(10)) + "\n")
    dataset = load_dataset(str(path))
    assert dataset.sample_shape == (3,)
    assert not dataset.has_labels


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (tmp_path / name).mkdir()
        for i in range(6):
            save_png(tmp_path / name / f"{i}.png", rng.integers(0, 256, (8, 8)))
    dataset = load_dataset(str(tmp_path))
    assert dataset.sample_shape == (1, 8, 8)
    assert dataset.classes == ("circle", "square")
    assert dataset.x_train.max() <= 1.0


def test_image_folder_rgb(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(5):
        save_png(tmp_path / "a" / f"{i}.png", rng.integers(0, 256, (4, 4, 3)))
    save_png(tmp_path / "a" / "grey.png", rng.integers(0, 256, (4, 4)))
    dataset = load_dataset(str(tmp_path))
    assert dataset.sample_shape == (3, 4, 4)


def test_missing_file():
    with pytest.raises(DataError, match=r"'/no/such/file.npz' not found"):
        load_dataset("/no/such/file.npz")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    with pytest.raises(DataError, match=r"data.txt.*unsupported suffix"):
        load_dataset(str(path))


def test_wrong_shape(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.zeros((10, 2, 3, 4, 5)))
    with pytest.raises(DataError, match=r"data.npy.*shape \(10, 2, 3, 4, 5\)"):
        load_dataset(str(path))


def test_npz_without_x(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, features=np.zeros((10, 2)))
    with pytest.raises(DataError, match=r"data.npz.*array named 'x'.*features"):
        load_dataset(str(path))


def test_labels_of_wrong_length(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros(9, dtype=int))
    with pytest.raises(DataError, match=r"data.npz.*shape \(9,\), expected \(10,\)"):
        load_dataset(str(path))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path, bad):
    path = tmp_path / "data.npy"
    x = np.zeros((10, 3))
    x[4, 1] = bad
    np.save(path, x)
    with pytest.raises(DataError, match=r"data.npy.*NaN or infinite.*sample 4"):
        load_dataset(str(path))


def test_too_few_samples(tmp_path):
    path = tmp_path / "data.npy"
    np.save(path, np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"data.npy.*3 samples.*at least 4"):
        load_dataset(str(path))


def test_csv_non_numeric_feature(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(DataError, match=r"table.csv.*line 3, b: 'x' is not a number"):
        load_dataset(str(path))


def test_csv_ragged_rows(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"table.csv.*line 2 has 3 fields, expected 2"):
        load_dataset(str(path))


def test_image_folder_mixed_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):
        save_png(tmp_path / "a" / f"{i}.png", np.zeros((8, 8)))
    save_png(tmp_path / "a" / "9.png", np.zeros((8, 6)))
    with pytest.raises(DataError, match=r"9.png.*6x8 pixels.*same size"):
        load_dataset(str(tmp_path))


def test_image_folder_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(4):
        save_png(tmp_path / "a" / f"{i}.png", np.zeros((8, 8)))
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*broken.png"):
        load_dataset(str(tmp_path))


def test_image_folder_empty(tmp_path):
    with pytest.raises(DataError, match="contains no PNG or JPEG images"):
        load_dataset(str(tmp_path))


def test_split_without_stratification_for_singletons():
    x = np.arange(20, dtype=np.float32)[:, None]
    y = np.array([0] * 19 + [1])
    dataset = split_dataset("toy", x, y)
    assert len(dataset.x_test) == 4
    assert len(dataset.x_train) == 16


def test_epoch_batches_deterministic():
    first = list(epoch_batches(10, 3, seed=1, epoch=2))
    second = list(epoch_batches(10, 3, seed=1, epoch=2))
    other_epoch = list(epoch_batches(10, 3, seed=1, epoch=3))
    assert len(first) == 3
    assert all(len(batch) == 3 for batch in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(first, other_epoch, strict=True)
    )
    assert len(np.unique(np.concatenate(first))) == 9


def test_batch_larger_than_data():
    batches = list(epoch_batches(5, 8, seed=0, epoch=0))
    assert len(batches) == 1
    assert sorted(batches[0]) == [0, 1, 2, 3, 4]
    assert steps_per_epoch(5, 8) == 1
