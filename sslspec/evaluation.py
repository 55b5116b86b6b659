"""Evaluation of frozen features: weighted k-NN and a linear probe.

Both protocols fit on the training split and score on the held-out test split:

- k-NN (as DINO evaluates): features are L2-normalised, each test sample takes the
  ``k = 20`` training samples of highest cosine similarity, and each neighbour
  votes for its class with weight ``exp(similarity / 0.07)``. The class with the
  largest total wins, the lowest class index on a tie. Implemented in NumPy.
- Linear probe: scikit-learn's ``LogisticRegression`` on features standardised with
  a ``StandardScaler`` fitted on the training split.

:func:`evaluate_features` runs both on one set of features. The pretraining driver
calls it for the pretrained encoder, for the same encoder at its random
initialisation and for the flattened raw inputs.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

__all__ = [
    "KNN_K",
    "KNN_TEMPERATURE",
    "knn_predict",
    "knn_accuracy",
    "linear_probe_accuracy",
    "evaluate_features",
]

logger = logging.getLogger(__name__)

KNN_K = 20
KNN_TEMPERATURE = 0.07
_CHUNK = 1024


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _check_features(
    name: str, features: np.ndarray, labels: np.ndarray | None = None
) -> None:
    if np.ndim(features) != 2:
        raise ValueError(
            f"{name} features must have shape (N, D), got {np.shape(features)}"
        )
    if labels is not None and np.shape(labels) != (len(features),):
        raise ValueError(
            f"{name} labels must have shape ({len(features)},), got {np.shape(labels)}"
        )


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
    """Predict a class for each test sample by similarity-weighted k-NN votes.

    Parameters
    ----------
    train_features, test_features
        Arrays ``(N, D)`` and ``(M, D)``; each row is L2-normalised here.
    train_labels
        Non-negative integer classes ``(N,)``.
    k
        Number of neighbours; reduced to ``N`` if larger.
    temperature
        Votes weigh ``exp(cosine_similarity / temperature)``.

    Returns
    -------
    numpy.ndarray
        Predicted classes ``(M,)``, int64.
    """
    _check_features("train", train_features, train_labels)
    _check_features("test", test_features)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    train = _normalise(train_features)
    test = _normalise(test_features)
    k = min(k, len(train))
    num_classes = int(train_labels.max()) + 1

    predictions = np.empty(len(test), dtype=np.int64)
    for start in range(0, len(test), _CHUNK):
        similarity = test[start : start + _CHUNK] @ train.T
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        neighbour_similarity = np.take_along_axis(similarity, neighbours, axis=1)
        # Subtracting each row's maximum keeps exp() finite; it scales every vote
        # of the row by the same factor, so the winner does not change.
        scaled = (
            neighbour_similarity - neighbour_similarity.max(axis=1, keepdims=True)
        ) / temperature
        weights = np.exp(scaled)
        votes = np.zeros((len(similarity), num_classes))
        rows = np.repeat(np.arange(len(similarity)), k)
        np.add.at(votes, (rows, train_labels[neighbours].ravel()), weights.ravel())
        predictions[start : start + len(similarity)] = votes.argmax(axis=1)
    return predictions


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Return the fraction of test samples that :func:`knn_predict` classifies
    correctly."""
    _check_features("test", test_features, test_labels)
    predictions = knn_predict(
        train_features, train_labels, test_features, k=k, temperature=temperature
    )
    return float(np.mean(predictions == np.asarray(test_labels)))


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    max_iter: int = 2000,
) -> float:
    """Return the test accuracy of a logistic regression on standardised features.

    The ``StandardScaler`` and the ``LogisticRegression`` (L2 penalty, ``C = 1``,
    L-BFGS) are fitted on the training features only. A fit that stops at
    ``max_iter`` iterations is logged as a warning.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_features("train", train_features, train_labels)
    _check_features("test", test_features, test_labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(np.asarray(train_features, dtype=np.float64), train_labels)
    if any(issubclass(item.category, ConvergenceWarning) for item in caught):
        logger.warning(
            "linear probe did not converge in %d iterations; its accuracy may be low",
            max_iter,
        )
    return float(probe.score(np.asarray(test_features, dtype=np.float64), test_labels))


def evaluate_features(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, Any]:
    """Return ``knn_accuracy`` and ``linear_probe_accuracy`` for one feature set.

    The linear probe needs at least two classes in the training split; with one
    class its accuracy is ``None`` and the reason is logged.
    """
    results: dict[str, Any] = {
        "knn_accuracy": knn_accuracy(
            train_features, train_labels, test_features, test_labels
        )
    }
    if len(np.unique(train_labels)) < 2:
        logger.warning("linear probe skipped: the training split has one class")
        results["linear_probe_accuracy"] = None
    else:
        results["linear_probe_accuracy"] = linear_probe_accuracy(
            train_features, train_labels, test_features, test_labels
        )
    return results
