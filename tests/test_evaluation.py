"""Tests of the k-NN classifier and the linear probe."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sslspec.evaluation import (
    evaluate_features,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
)


def brute_force_knn(train, train_labels, test, k, temperature):
    """Classify each test sample with an explicit loop over every training sample."""
    predictions = []
    for query in test:
        query = query / np.linalg.norm(query)
        scored = []
        for feature, label in zip(train, train_labels, strict=True):
            similarity = float(query @ (feature / np.linalg.norm(feature)))
            scored.append((similarity, int(label)))
        scored.sort(key=lambda item: -item[0])
        votes = {}
        for similarity, label in scored[:k]:
            votes[label] = votes.get(label, 0.0) + math.exp(similarity / temperature)
        best = max(votes.values())
        predictions.append(min(label for label, vote in votes.items() if vote == best))
    return np.array(predictions)


@pytest.mark.parametrize(
    ("k", "temperature", "num_classes"),
    [(20, 0.07, 5), (1, 0.07, 3), (7, 0.5, 4), (200, 0.07, 6)],
)
def test_knn_matches_brute_force(k, temperature, num_classes):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(120, 16))
    labels = rng.integers(0, num_classes, 120)
    train += labels[:, None] * 0.3
    test = rng.normal(size=(40, 16)) + rng.integers(0, num_classes, 40)[:, None] * 0.3
    expected = brute_force_knn(train, labels, test, min(k, 120), temperature)
    result = knn_predict(train, labels, test, k=k, temperature=temperature)
    np.testing.assert_array_equal(result, expected)


def test_knn_separable_clusters_are_perfect():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    labels = np.repeat(np.arange(4), 30)
    train = centres[labels] + rng.normal(size=(120, 4))
    test_labels = np.repeat(np.arange(4), 10)
    test = centres[test_labels] + rng.normal(size=(40, 4))
    assert knn_accuracy(train, labels, test, test_labels) == 1.0


def test_knn_is_scale_invariant():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(50, 8))
    labels = rng.integers(0, 3, 50)
    test = rng.normal(size=(20, 8))
    first = knn_predict(train, labels, test)
    second = knn_predict(train * 1000.0, labels, test * 0.001)
    np.testing.assert_array_equal(first, second)


def test_knn_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"train labels must have shape \(5,\)"):
        knn_predict(np.zeros((5, 2)), np.zeros(4, dtype=int), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"test features must have shape \(N, D\)"):
        knn_predict(np.zeros((5, 2)), np.zeros(5, dtype=int), np.zeros(2))


def test_linear_probe_on_separable_data():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 200)
    features = rng.normal(size=(200, 5)) + np.eye(3, 5)[labels] * 6
    accuracy = linear_probe_accuracy(
        features[:150], labels[:150], features[150:], labels[150:]
    )
    assert accuracy > 0.95


def test_evaluate_features_single_class_skips_probe():
    features = np.random.default_rng(3).normal(size=(30, 4))
    labels = np.zeros(30, dtype=int)
    results = evaluate_features(features[:20], labels[:20], features[20:], labels[20:])
    assert results["knn_accuracy"] == 1.0
    assert results["linear_probe_accuracy"] is None
