"""Datasets for pretraining: loading, validation, the train/test split and batches.

``--data`` accepts:

- ``digits`` (the default): scikit-learn's ``load_digits``, 1797 grayscale 8x8
  images of the digits 0-9, as ``(N, 1, 8, 8)`` float32 scaled from 0-16 to
  [0, 1];
- a ``.npy`` file with the samples, or a ``.npz`` file with an array ``x`` of
  samples and an optional array ``y`` of labels. Samples are feature vectors
  ``(N, F)``, grayscale images ``(N, H, W)`` (read as one channel) or images
  ``(N, C, H, W)``;
- a ``.csv`` file of numeric features, one sample per row. If the first row
  contains a field that is not a number it is the header, and a column named
  ``label`` or ``y`` (any case) contains the labels, which may be numbers or names;
- a folder of PNG or JPEG images with one subfolder per class, named after the
  class. Images directly in the folder, with no subfolders, are read without
  labels. All images must have the same size; they are read as grayscale
  (``C = 1``) unless one of them has colour, in which case all are read as RGB.
  8-bit pixels are scaled to [0, 1].

Every loader checks its input before training starts and raises
:class:`DataError` naming the file and what to fix. Labelled data is split 80/20,
stratified by class, with a fixed seed; unlabelled data is split at random with the
same seed and is not evaluated.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "split_dataset",
    "epoch_batches",
    "steps_per_epoch",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "MIN_BATCH_SIZE",
]

logger = logging.getLogger(__name__)

#: Seed of the train/test split, fixed so that every run of a dataset evaluates on
#: the same held-out samples whatever its ``--seed``.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
#: Batch norm and the losses' batch statistics (variance, covariance, negatives)
#: need at least two samples per batch.
MIN_BATCH_SIZE = 2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_COLUMNS = ("label", "y")


class DataError(ValueError):
    """Raised when the data cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Dataset:
    """Samples split into a training and a held-out test part.

    ``x_*`` are float32 arrays ``(N, F)`` or ``(N, C, H, W)``; ``y_*`` are int64
    class indices into ``classes``, or ``None`` for unlabelled data.
    """

    source: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: tuple[str, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` or ``(F,)``."""
        return tuple(int(size) for size in self.x_train.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None and self.y_test is not None


def load_dataset(source: str) -> Dataset:
    """Load, validate and split the data named by ``--data``.

    Parameters
    ----------
    source
        ``"digits"``, or the path of a ``.npy``, ``.npz`` or ``.csv`` file or of
        an image folder (see the module documentation).

    Raises
    ------
    DataError
        If the file is missing or unreadable, or its samples have the wrong
        shape, contain NaN or infinite values, are too few to split, or (for an
        image folder) differ in size.
    """
    if source == "digits":
        x, y, classes = _load_digits()
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"data {source!r} not found: give 'digits', or the path of an "
                f"existing .npy, .npz or .csv file or image folder"
            )
        if path.is_dir():
            x, y, classes = _load_image_folder(path)
        elif path.suffix.lower() == ".npy":
            x, y, classes = _load_npy(path)
        elif path.suffix.lower() == ".npz":
            x, y, classes = _load_npz(path)
        elif path.suffix.lower() == ".csv":
            x, y, classes = _load_csv(path)
        else:
            raise DataError(
                f"data file {source!r} has unsupported suffix {path.suffix!r}: "
                f"use .npy, .npz, .csv or a folder of images"
            )
    x = _validate_samples(source, x)
    if y is not None:
        y = _validate_labels(source, y, len(x))
    dataset = split_dataset(source, x, y, classes)
    logger.info(
        "loaded %s: %d training and %d test samples of shape %s, %s",
        source,
        len(dataset.x_train),
        len(dataset.x_test),
        dataset.sample_shape,
        f"{len(classes)} classes" if dataset.has_labels else "no labels",
    )
    return dataset


def _load_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return x, y, tuple(str(name) for name in digits.target_names)


def _encode_labels(
    source: str, labels: np.ndarray
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map labels (numbers or names) to class indices in sorted class order."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)):
            raise DataError(f"labels in {source!r} contain NaN or infinite values")
        if np.any(labels != np.round(labels)):
            raise DataError(
                f"labels in {source!r} must be integers or class names, found "
                f"fractional values such as {labels[labels != np.round(labels)][0]}"
            )
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iubUS":
        raise DataError(
            f"labels in {source!r} must be integers or class names, got dtype "
            f"{labels.dtype}"
        )
    classes, indices = np.unique(labels, return_inverse=True)
    return indices.astype(np.int64), tuple(str(name) for name in classes)


def _load_npy(path: Path) -> tuple[np.ndarray, None, tuple[str, ...]]:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {str(path)!r} as a .npy file: {error}") from error
    return x, None, ()


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "x" not in names:
                raise DataError(
                    f"{str(path)!r} must contain an array named 'x' with the "
                    f"samples (and optionally 'y' with labels); it contains "
                    f"{', '.join(names) or 'no arrays'}"
                )
            x = archive["x"]
            labels = archive["y"] if "y" in names else None
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {str(path)!r} as a .npz file: {error}") from error
    if labels is None:
        return x, None, ()
    if labels.ndim != 1:
        raise DataError(
            f"labels 'y' in {str(path)!r} must have shape (N,), got shape "
            f"{labels.shape}"
        )
    y, classes = _encode_labels(str(path), labels)
    return x, y, classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    try:
        with open(path, newline="") as file:
            rows = [row for row in csv.reader(file) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {str(path)!r} as CSV: {error}") from error
    if not rows:
        raise DataError(f"{str(path)!r} is empty: expected one sample per row")

    header = None
    if not all(_is_number(field.strip()) for field in rows[0]):
        header = [field.strip() for field in rows[0]]
        rows = rows[1:]
    if not rows:
        raise DataError(f"{str(path)!r} has a header but no samples")
    width = len(header) if header is not None else len(rows[0])
    for line, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise DataError(
                f"{str(path)!r} line {line} has {len(row)} fields, expected {width}"
            )

    label_column = None
    if header is not None:
        matches = [i for i, name in enumerate(header) if name.lower() in LABEL_COLUMNS]
        if len(matches) > 1:
            raise DataError(
                f"{str(path)!r} has several label columns "
                f"({', '.join(header[i] for i in matches)}); keep one column named "
                f"'label' or 'y'"
            )
        label_column = matches[0] if matches else None

    feature_columns = [i for i in range(width) if i != label_column]
    if not feature_columns:
        raise DataError(f"{str(path)!r} has no feature columns besides the labels")
    first_line = 2 if header else 1
    x = np.empty((len(rows), len(feature_columns)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, column in enumerate(feature_columns):
            text = row[column].strip()
            try:
                x[i, j] = float(text)
            except ValueError:
                name = header[column] if header else f"column {column + 1}"
                raise DataError(
                    f"{str(path)!r} line {first_line + i}, {name}: {text!r} is not a "
                    f"number; "
                    f"features must be numeric and the label column must be named "
                    f"'label' or 'y'"
                ) from None
    if label_column is None:
        return x, None, ()
    labels = np.array([row[label_column].strip() for row in rows])
    if all(_is_number(label) for label in labels):
        labels = labels.astype(np.float64)
    y, classes = _encode_labels(str(path), labels)
    return x, y, classes


def _read_image(path: Path) -> np.ndarray:
    """Return an image as float32 ``(H, W)`` or ``(H, W, 3)`` in [0, 1]."""
    try:
        from PIL import Image
    except ImportError as error:
        raise DataError(
            f"reading the image folder needs Pillow: pip install pillow ({error})"
        ) from error
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                scale = 65535.0 if mode.startswith("I;16") else pixels.max() or 1.0
                return (pixels / scale).astype(np.float32)
            if mode == "F":
                return np.asarray(image, dtype=np.float32)
            if mode in ("1", "L", "LA", "P") and not _has_colour(image):
                image = image.convert("L")
            else:
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(
            f"cannot read image {str(path)!r}: {error}; remove or replace the file"
        ) from error


def _has_colour(image: object) -> bool:
    """Return whether a palette image uses any non-grey colour."""
    if getattr(image, "mode", None) != "P":
        return False
    rgb = np.asarray(image.convert("RGB"))
    return bool(
        np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2])
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _load_image_folder(
    folder: Path,
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    subfolders = sorted(path for path in folder.iterdir() if path.is_dir())
    if subfolders:
        files = [
            (path, index)
            for index, sub in enumerate(subfolders)
            for path in _image_files(sub)
        ]
        classes = tuple(sub.name for sub in subfolders)
        empty = [sub.name for sub in subfolders if not _image_files(sub)]
        if empty:
            raise DataError(
                f"image folder {str(folder)!r}: class folders without PNG or JPEG "
                f"images: {', '.join(empty)}"
            )
    else:
        files = [(path, -1) for path in _image_files(folder)]
        classes = ()
    if not files:
        raise DataError(
            f"image folder {str(folder)!r} contains no PNG or JPEG images; put the "
            f"images of each class in a subfolder named after the class"
        )

    images = []
    first_path = files[0][0]
    first_size = None
    for path, _ in files:
        image = _read_image(path)
        size = image.shape[:2]
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise DataError(
                f"image {str(path)!r} is {size[1]}x{size[0]} pixels but "
                f"{str(first_path)!r} is {first_size[1]}x{first_size[0]}; all "
                f"images must have the same size, so resize them first"
            )
        images.append(image)

    colour = any(image.ndim == 3 for image in images)
    if colour:
        images = [
            image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
            for image in images
        ]
        x = np.stack(images).transpose(0, 3, 1, 2)
    else:
        x = np.stack(images)[:, None, :, :]
    if not classes:
        return x, None, ()
    y = np.array([label for _, label in files], dtype=np.int64)
    return x, y, classes


def _validate_samples(source: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"samples in {source!r} must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim not in (2, 4):
        raise DataError(
            f"samples in {source!r} have shape {x.shape}; expected feature vectors "
            f"(N, F), grayscale images (N, H, W) or images (N, C, H, W)"
        )
    if any(size == 0 for size in x.shape[1:]):
        raise DataError(f"samples in {source!r} have an empty axis: shape {x.shape}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        index = np.argwhere(bad)[0]
        raise DataError(
            f"samples in {source!r} contain {int(bad.sum())} NaN or infinite "
            f"values, the first in sample {index[0]} at position "
            f"{tuple(int(i) for i in index[1:])}; remove or impute them"
        )
    minimum = math.ceil(MIN_BATCH_SIZE / (1 - TEST_FRACTION)) + 1
    if len(x) < minimum:
        raise DataError(
            f"{source!r} has {len(x)} samples; at least {minimum} are needed so "
            f"that the training split holds {MIN_BATCH_SIZE} samples for the batch "
            f"statistics and the test split holds one"
        )
    return x


def _validate_labels(source: str, y: np.ndarray, count: int) -> np.ndarray:
    if y.shape != (count,):
        raise DataError(
            f"labels in {source!r} have shape {y.shape}, expected ({count},) to "
            f"match the {count} samples"
        )
    return y


def split_dataset(
    source: str,
    x: np.ndarray,
    y: np.ndarray | None,
    classes: tuple[str, ...] = (),
    *,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> Dataset:
    """Split samples into training and test parts.

    Labelled data is stratified by class when every class has at least two
    samples; otherwise (and for unlabelled data) the split is a random
    permutation. Both use ``seed``, so the split does not depend on the run's
    seed.
    """
    count = len(x)
    test_count = max(1, int(round(count * test_fraction)))
    stratify = None
    if y is not None:
        counts = np.bincount(y)
        present = counts[counts > 0]
        if present.min() >= 2 and test_count >= len(present):
            stratify = y
        else:
            logger.warning(
                "%s: some class has fewer than 2 samples or there are more classes "
                "than test samples, so the test split is not stratified",
                source,
            )
    from sklearn.model_selection import train_test_split

    train_index, test_index = train_test_split(
        np.arange(count), test_size=test_count, random_state=seed, stratify=stratify
    )
    return Dataset(
        source=source,
        x_train=x[train_index],
        x_test=x[test_index],
        y_train=None if y is None else y[train_index],
        y_test=None if y is None else y[test_index],
        classes=classes,
    )


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Return the number of full batches per epoch (the last partial one is dropped).

    A batch size above ``num_samples`` is reduced to ``num_samples``, so there is
    always at least one step.
    """
    return max(1, num_samples // batch_size)


def epoch_batches(
    num_samples: int, batch_size: int, *, seed: int, epoch: int
) -> Iterator[np.ndarray]:
    """Yield the sample indices of each batch of one epoch.

    The order is a permutation drawn from ``numpy.random.default_rng((seed,
    epoch))``, so it depends only on the seed and the epoch number, and a resumed
    run gets the same batches as an uninterrupted one. Batches have
    ``min(batch_size, num_samples)`` samples; the remainder is dropped.
    """
    batch_size = min(batch_size, num_samples)
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    for step in range(steps_per_epoch(num_samples, batch_size)):
        yield order[step * batch_size : (step + 1) * batch_size]
