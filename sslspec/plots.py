"""PNG plots of a run: loss per epoch, singular-value spectrum and a 2-D PCA.

The figures are drawn with matplotlib's object-oriented API on an Agg canvas, so
they need no display and leave pyplot's global state alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_loss", "plot_spectrum", "plot_pca", "singular_values"]


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | os.PathLike[str]) -> None:
    figure.savefig(os.fspath(path), format="png")


def plot_loss(
    loss_history: Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str = "training loss",
) -> None:
    """Plot the mean training loss of each epoch."""
    figure, axes = _figure()
    epochs = np.arange(1, len(loss_history) + 1)
    axes.plot(epochs, loss_history, marker="." if len(loss_history) < 30 else None)
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    _save(figure, path)


def singular_values(features: np.ndarray) -> np.ndarray:
    """Return the singular values of the centred features, largest first,
    divided by the largest (all zeros if the features are constant)."""
    features = np.asarray(features, dtype=np.float64)
    centred = features - features.mean(axis=0, keepdims=True)
    values = np.linalg.svd(centred, compute_uv=False)
    if values.size == 0 or values[0] == 0:
        return np.zeros_like(values)
    return values / values[0]


def plot_spectrum(
    features: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    *,
    title: str = "singular values of the test embeddings",
) -> None:
    """Plot the normalised singular-value spectrum of each set of features.

    A spectrum that drops to zero after a few values means that the embeddings
    span only a few dimensions (dimensional collapse). A complete collapse leaves
    one value or none.
    """
    figure, axes = _figure()
    for label, values in features.items():
        spectrum = singular_values(values)
        positive = spectrum[spectrum > 0]
        axes.plot(np.arange(1, len(positive) + 1), positive, label=label)
    axes.set_yscale("log")
    axes.set_xlabel("index")
    axes.set_ylabel("singular value / largest")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    _save(figure, path)


def _class_colours(count: int) -> list[Any]:
    """Return ``count`` distinct colours from the tab10 or tab20 colour map."""
    from matplotlib import colormaps

    colour_map = colormaps["tab10" if count <= 10 else "tab20"]
    return [colour_map(i) for i in range(count)]


def plot_pca(
    features: np.ndarray,
    labels: np.ndarray | None,
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] = (),
    title: str = "test embeddings, 2-D PCA",
) -> None:
    """Scatter the features projected on their first two principal components,
    coloured by label when labels are given."""
    features = np.asarray(features, dtype=np.float64)
    centred = features - features.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))

    figure, axes = _figure(6.0, 5.0)
    if labels is None:
        axes.scatter(projected[:, 0], projected[:, 1], s=6)
    else:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        if len(classes) <= 20:
            colours = _class_colours(len(classes))
            for colour, label in zip(colours, classes, strict=True):
                chosen = labels == label
                name = class_names[label] if label < len(class_names) else str(label)
                axes.scatter(
                    projected[chosen, 0],
                    projected[chosen, 1],
                    s=6,
                    color=colour,
                    label=name,
                )
            axes.legend(title="class", fontsize="small", ncol=2, markerscale=2)
        else:
            axes.scatter(projected[:, 0], projected[:, 1], c=labels, s=6)
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    axes.set_title(title)
    _save(figure, path)
