"""Barlow Twins: closed forms, a loop reference and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_helpers import asarray, to_float
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_strategies import embedding_pairs

from sslspec import barlow_twins_loss

EPS = 1e-5


def barlow_twins_by_loops(
    z_a: np.ndarray, z_b: np.ndarray, lambda_param: float = 0.005
) -> float:
    count, dim = z_a.shape

    def standardise(z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z, dtype=np.float64)
        for column in range(dim):
            values = [float(v) for v in z[:, column]]
            mean = sum(values) / count
            variance = sum((v - mean) ** 2 for v in values) / count
            for row in range(count):
                out[row, column] = (values[row] - mean) / math.sqrt(variance + EPS)
        return out

    a = standardise(z_a)
    b = standardise(z_b)
    loss = 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(a[k, i] * b[k, j] for k in range(count)) / count
            loss += (1.0 - c) ** 2 if i == j else lambda_param * c * c
    return loss


# Four samples whose two columns have mean 0, biased variance 1 and no correlation.
UNCORRELATED = [[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]


def test_barlow_twins_identical_uncorrelated_views(xp):
    z = asarray(xp, UNCORRELATED)
    # C = I / (1 + eps), so each diagonal term is (eps / (1 + eps))**2.
    expected = 2.0 * (EPS / (1.0 + EPS)) ** 2
    assert to_float(barlow_twins_loss(z, z)) == pytest.approx(expected, rel=1e-9)


def test_barlow_twins_opposite_views(xp):
    z = np.array(UNCORRELATED)
    expected = 2.0 * (1.0 + 1.0 / (1.0 + EPS)) ** 2
    loss = barlow_twins_loss(asarray(xp, z), asarray(xp, -z))
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_barlow_twins_redundant_dimensions(xp):
    # Both columns equal: every entry of C is 1 / (1 + eps).
    z = asarray(xp, [[1.0, 1.0], [-1.0, -1.0]])
    c = 1.0 / (1.0 + EPS)
    expected = 2.0 * (1.0 - c) ** 2 + 0.1 * 2.0 * c**2
    loss = barlow_twins_loss(z, z, lambda_param=0.1)
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_barlow_twins_constant_dimension(xp):
    # The constant column standardises to zeros: C_11 = 0 adds (1 - 0)**2.
    z = asarray(xp, [[1.0, 5.0], [-1.0, 5.0]])
    expected = (EPS / (1.0 + EPS)) ** 2 + 1.0
    assert to_float(barlow_twins_loss(z, z)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lambda_param", [0.0, 0.005, 1.0])
def test_barlow_twins_matches_loops(xp, seed, lambda_param):
    rng = np.random.default_rng(seed)
    z_a = rng.standard_normal((6, 4))
    z_b = z_a + rng.standard_normal((6, 4))
    expected = barlow_twins_by_loops(z_a, z_b, lambda_param)
    loss = barlow_twins_loss(
        asarray(xp, z_a), asarray(xp, z_b), lambda_param=lambda_param
    )
    assert to_float(loss) == pytest.approx(expected, rel=1e-10)


@given(pair=embedding_pairs(min_batch=2))
def test_barlow_twins_symmetric_in_views(xp, pair):
    z_a, z_b = (asarray(xp, array) for array in pair)
    forward = to_float(barlow_twins_loss(z_a, z_b))
    swapped = to_float(barlow_twins_loss(z_b, z_a))
    assert swapped == pytest.approx(forward, rel=1e-10, abs=1e-12)


@given(pair=embedding_pairs(min_batch=2), data=st.data())
def test_barlow_twins_invariant_to_order_and_shift(xp, pair, data):
    z_a, z_b = pair
    order = data.draw(st.permutations(range(len(z_a))))
    shift = np.array(data.draw(st.lists(st.integers(-8, 8), min_size=5, max_size=5)))
    shift = shift[: z_a.shape[1]]
    loss = to_float(barlow_twins_loss(asarray(xp, z_a), asarray(xp, z_b)))
    changed = to_float(
        barlow_twins_loss(asarray(xp, z_a[order] + shift), asarray(xp, z_b[order]))
    )
    assert changed == pytest.approx(loss, rel=1e-9, abs=1e-12)
