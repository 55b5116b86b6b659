"""VICReg: each term by hand, a loop reference and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_helpers import asarray, to_float
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_strategies import embedding_pairs

from sslspec import covariance_loss, invariance_loss, variance_loss, vicreg_loss


def covariance_by_loops(z: np.ndarray) -> list[list[float]]:
    count, dim = z.shape
    means = [sum(float(v) for v in z[:, j]) / count for j in range(dim)]
    return [
        [
            sum((z[k, i] - means[i]) * (z[k, j] - means[j]) for k in range(count))
            / (count - 1)
            for j in range(dim)
        ]
        for i in range(dim)
    ]


def variance_term_by_loops(z: np.ndarray, target_std=1.0, eps=1e-4) -> float:
    covariance = covariance_by_loops(z)
    dim = z.shape[1]
    hinges = [
        max(0.0, target_std - math.sqrt(covariance[j][j] + eps)) for j in range(dim)
    ]
    return sum(hinges) / dim


def covariance_term_by_loops(z: np.ndarray) -> float:
    covariance = covariance_by_loops(z)
    dim = z.shape[1]
    off_diagonal = [
        covariance[i][j] ** 2 for i in range(dim) for j in range(dim) if i != j
    ]
    return sum(off_diagonal) / dim


def invariance_by_loops(z_a: np.ndarray, z_b: np.ndarray) -> float:
    squares = [
        (float(a) - float(b)) ** 2 for a, b in zip(z_a.flat, z_b.flat, strict=True)
    ]
    return sum(squares) / len(squares)


def test_invariance_by_hand(xp):
    z_a = asarray(xp, [[1.0, 2.0], [3.0, 4.0]])
    z_b = asarray(xp, [[0.0, 2.0], [3.0, 0.0]])
    # Differences 1, 0, 0, 4.
    assert to_float(invariance_loss(z_a, z_b)) == pytest.approx(17.0 / 4.0, rel=1e-15)


def test_variance_and_covariance_by_hand(xp):
    # Unbiased variances 0.125 and 0.5, covariance 0.25.
    z = asarray(xp, [[0.0, 0.0], [0.5, 1.0]])
    expected_variance = (
        (1.0 - math.sqrt(0.125 + 1e-4)) + (1.0 - math.sqrt(0.5 + 1e-4))
    ) / 2.0
    assert to_float(variance_loss(z)) == pytest.approx(expected_variance, rel=1e-12)
    # Two off-diagonal entries of 0.25, squared, divided by D = 2.
    assert to_float(covariance_loss(z)) == pytest.approx(0.0625, rel=1e-12)


def test_variance_hinge_is_zero_above_target(xp):
    # Column standard deviations sqrt(2) and sqrt(8) exceed the target 1.
    z = asarray(xp, [[0.0, 0.0], [2.0, 4.0]])
    assert to_float(variance_loss(z)) == 0.0
    # With target 2 only the first column is below it.
    expected = (2.0 - math.sqrt(2.0 + 1e-4)) / 2.0
    loss = variance_loss(z, target_std=2.0)
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_variance_constant_dimension(xp):
    z = asarray(xp, [[3.0], [3.0], [3.0]])
    expected = 1.0 - math.sqrt(1e-4)
    assert to_float(variance_loss(z)) == pytest.approx(expected, rel=1e-12)
    assert to_float(variance_loss(z, eps=0.25)) == pytest.approx(0.5, rel=1e-12)


def test_vicreg_combines_terms(xp):
    rng = np.random.default_rng(0)
    z_a = 0.7 * rng.standard_normal((6, 3))
    z_b = z_a + 0.3 * rng.standard_normal((6, 3))
    weights = {
        "invariance_weight": 2.0,
        "variance_weight": 3.0,
        "covariance_weight": 5.0,
    }
    expected = (
        2.0 * invariance_by_loops(z_a, z_b)
        + 3.0 * (variance_term_by_loops(z_a) + variance_term_by_loops(z_b)) / 2.0
        + 5.0 * (covariance_term_by_loops(z_a) + covariance_term_by_loops(z_b))
    )
    loss = vicreg_loss(asarray(xp, z_a), asarray(xp, z_b), **weights)
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [1, 2])
def test_vicreg_default_weights_match_loops(xp, seed):
    rng = np.random.default_rng(seed)
    z_a = 0.7 * rng.standard_normal((9, 5))
    z_b = z_a + 0.3 * rng.standard_normal((9, 5))
    expected = (
        25.0 * invariance_by_loops(z_a, z_b)
        + 25.0 * (variance_term_by_loops(z_a) + variance_term_by_loops(z_b)) / 2.0
        + 1.0 * (covariance_term_by_loops(z_a) + covariance_term_by_loops(z_b))
    )
    loss = vicreg_loss(asarray(xp, z_a), asarray(xp, z_b))
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


@given(pair=embedding_pairs(min_batch=2))
def test_vicreg_symmetric_in_views(xp, pair):
    z_a, z_b = (asarray(xp, array) for array in pair)
    forward = to_float(vicreg_loss(z_a, z_b))
    swapped = to_float(vicreg_loss(z_b, z_a))
    assert swapped == pytest.approx(forward, rel=1e-12, abs=1e-12)


@given(pair=embedding_pairs(min_batch=2), data=st.data())
def test_vicreg_terms_invariant_to_order(xp, pair, data):
    z_a, z_b = pair
    order = data.draw(st.permutations(range(len(z_a))))
    loss = to_float(vicreg_loss(asarray(xp, z_a), asarray(xp, z_b)))
    permuted = to_float(vicreg_loss(asarray(xp, z_a[order]), asarray(xp, z_b[order])))
    assert permuted == pytest.approx(loss, rel=1e-12, abs=1e-12)


@given(pair=embedding_pairs(min_batch=2), data=st.data())
def test_variance_covariance_invariant_to_shift(xp, pair, data):
    z = pair[0]
    shift = np.array(data.draw(st.lists(st.integers(-8, 8), min_size=5, max_size=5)))
    shifted = z + shift[: z.shape[1]]
    for term in (variance_loss, covariance_loss):
        value = to_float(term(asarray(xp, z)))
        moved = to_float(term(asarray(xp, shifted)))
        assert moved == pytest.approx(value, rel=1e-12, abs=1e-12)
