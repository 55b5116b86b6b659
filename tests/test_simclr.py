"""NT-Xent: closed forms, a loop reference and invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_helpers import asarray, to_float
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_strategies import embedding_pairs

from sslspec import nt_xent_loss


def nt_xent_by_loops(z_i: np.ndarray, z_j: np.ndarray, temperature: float) -> float:
    """SimCLR Algorithm 1, one anchor at a time."""
    z = np.concatenate([z_i, z_j]).astype(np.float64)
    count = len(z)
    units = [row / max(math.sqrt(sum(v * v for v in row)), 1e-12) for row in z]
    total = 0.0
    for anchor in range(count):
        positive = (anchor + count // 2) % count
        logits = [
            float(units[anchor] @ units[other]) / temperature
            for other in range(count)
            if other != anchor
        ]
        denominator = math.log(sum(math.exp(logit) for logit in logits))
        total += denominator - float(units[anchor] @ units[positive]) / temperature
    return total / count


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_orthogonal_pairs(xp, temperature):
    # Two pairs of identical views along orthogonal axes: every anchor has its
    # positive at cosine 1 and two negatives at cosine 0.
    z = asarray(xp, [[1.0, 0.0], [0.0, 1.0]])
    expected = math.log(1.0 + 2.0 * math.exp(-1.0 / temperature))
    loss = nt_xent_loss(z, z, temperature=temperature)
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_nt_xent_opposite_views(xp):
    # Positives at cosine -1 and two negatives at cosine 0 for every anchor.
    z_i = asarray(xp, [[1.0, 0.0], [0.0, 1.0]])
    z_j = asarray(xp, [[-1.0, 0.0], [0.0, -1.0]])
    temperature = 0.5
    expected = 1.0 / temperature + math.log(2.0 + math.exp(-1.0 / temperature))
    loss = nt_xent_loss(z_i, z_j, temperature=temperature)
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_nt_xent_single_pair_is_zero(xp):
    # With one pair the positive is the only candidate of each anchor.
    z_i = asarray(xp, [[1.0, 2.0, 3.0]])
    z_j = asarray(xp, [[-3.0, 0.5, 1.0]])
    assert to_float(nt_xent_loss(z_i, z_j)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
# 0.002 is cold enough that float64 shifts by each row's maximum instead of 1 / tau.
@pytest.mark.parametrize("temperature", [0.002, 0.1, 0.5])
def test_nt_xent_matches_loops(xp, seed, temperature):
    rng = np.random.default_rng(seed)
    z_i = rng.standard_normal((7, 4))
    z_j = rng.standard_normal((7, 4))
    expected = nt_xent_by_loops(z_i, z_j, temperature)
    loss = nt_xent_loss(asarray(xp, z_i), asarray(xp, z_j), temperature=temperature)
    assert to_float(loss) == pytest.approx(expected, rel=1e-10)


def test_nt_xent_zero_rows_match_loops(xp):
    z_i = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])
    z_j = np.array([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = nt_xent_by_loops(z_i, z_j, 0.5)
    loss = nt_xent_loss(asarray(xp, z_i), asarray(xp, z_j))
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


@given(views=embedding_pairs())
def test_nt_xent_symmetric_in_views(xp, views):
    z_i, z_j = (asarray(xp, view) for view in views)
    forward = to_float(nt_xent_loss(z_i, z_j))
    swapped = to_float(nt_xent_loss(z_j, z_i))
    assert swapped == pytest.approx(forward, rel=1e-12, abs=1e-12)


@given(views=embedding_pairs(), data=st.data())
def test_nt_xent_invariant_to_batch_order(xp, views, data):
    z_i, z_j = views
    order = data.draw(st.permutations(range(len(z_i))))
    loss = to_float(nt_xent_loss(asarray(xp, z_i), asarray(xp, z_j)))
    permuted = to_float(nt_xent_loss(asarray(xp, z_i[order]), asarray(xp, z_j[order])))
    assert permuted == pytest.approx(loss, rel=1e-12, abs=1e-12)


@given(
    views=embedding_pairs(),
    scales=st.lists(st.floats(0.01, 100.0), min_size=34, max_size=34),
)
def test_nt_xent_invariant_to_row_scale(xp, views, scales):
    z_i, z_j = views
    count = len(z_i)
    scale_i = np.array(scales[:count])[:, None]
    scale_j = np.array(scales[17 : 17 + count])[:, None]
    loss = to_float(nt_xent_loss(asarray(xp, z_i), asarray(xp, z_j)))
    scaled = to_float(
        nt_xent_loss(asarray(xp, z_i * scale_i), asarray(xp, z_j * scale_j))
    )
    assert scaled == pytest.approx(loss, rel=1e-10, abs=1e-12)


def test_nt_xent_large_logits_stay_finite(xp):
    # At temperature 1e-3 the logits reach 1000, and exp(1000) overflows float64.
    rng = np.random.default_rng(3)
    z_i = rng.standard_normal((6, 3))
    z_j = -z_i
    loss = to_float(nt_xent_loss(asarray(xp, z_i), asarray(xp, z_j), temperature=1e-3))
    assert math.isfinite(loss)
    # Each positive is at cosine -1 and, for every other pair, one of its two views
    # is at cosine >= 0, so each anchor's term is at least 1 / temperature.
    assert loss >= 1.0 / 1e-3
