"""BYOL: the loss, the target update and the momentum schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_helpers import asarray, to_float, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_strategies import embedding_pairs

from sslspec import byol_loss, ema_update, momentum_schedule


def byol_by_loops(prediction: np.ndarray, target: np.ndarray) -> float:
    total = 0.0
    for p, z in zip(prediction, target, strict=True):
        p_norm = max(math.sqrt(float(p @ p)), 1e-12)
        z_norm = max(math.sqrt(float(z @ z)), 1e-12)
        total += float(np.sum((p / p_norm - z / z_norm) ** 2))
    return total / len(prediction)


def test_byol_closed_forms(xp):
    # Rows: identical (cos 1), opposite (cos -1), orthogonal (cos 0), 45 degrees.
    prediction = asarray(xp, [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    target = asarray(xp, [[2.0, 0.0], [-3.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    expected = (0.0 + 4.0 + 2.0 + (2.0 - math.sqrt(2.0))) / 4.0
    assert to_float(byol_loss(prediction, target)) == pytest.approx(expected, rel=1e-12)


def test_byol_zero_row_counts_as_orthogonal(xp):
    prediction = asarray(xp, [[0.0, 0.0, 0.0]])
    target = asarray(xp, [[1.0, 2.0, 3.0]])
    assert to_float(byol_loss(prediction, target)) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_byol_matches_loops(xp, seed):
    rng = np.random.default_rng(seed)
    prediction = rng.standard_normal((9, 4))
    target = rng.standard_normal((9, 4))
    expected = byol_by_loops(prediction, target)
    loss = byol_loss(asarray(xp, prediction), asarray(xp, target))
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_byol_symmetrised_matches_official_sum(xp):
    # The official objective sums both directions; lightly's negative cosine
    # similarity is (byol_loss - 2) / 2.
    rng = np.random.default_rng(4)
    p1, p2, z1, z2 = (rng.standard_normal((5, 3)) for _ in range(4))
    symmetric = byol_loss(asarray(xp, p1), asarray(xp, z2)) + byol_loss(
        asarray(xp, p2), asarray(xp, z1)
    )
    expected = byol_by_loops(p1, z2) + byol_by_loops(p2, z1)
    assert to_float(symmetric) == pytest.approx(expected, rel=1e-12)

    cosine = np.mean(
        [
            p @ z / (np.linalg.norm(p) * np.linalg.norm(z))
            for p, z in zip(p1, z2, strict=True)
        ]
    )
    lightly_value = -cosine
    ours = to_float(byol_loss(asarray(xp, p1), asarray(xp, z2)))
    assert (ours - 2.0) / 2.0 == pytest.approx(lightly_value, rel=1e-12)


@given(pair=embedding_pairs())
def test_byol_symmetric_in_arguments(xp, pair):
    a, b = (asarray(xp, array) for array in pair)
    forward = to_float(byol_loss(a, b))
    backward = to_float(byol_loss(b, a))
    assert backward == pytest.approx(forward, rel=1e-12, abs=1e-12)


@given(pair=embedding_pairs(), scale=st.floats(0.01, 100.0), data=st.data())
def test_byol_invariant_to_scale_and_order(xp, pair, scale, data):
    a, b = pair
    order = data.draw(st.permutations(range(len(a))))
    loss = to_float(byol_loss(asarray(xp, a), asarray(xp, b)))
    changed = to_float(byol_loss(asarray(xp, scale * a[order]), asarray(xp, b[order])))
    assert changed == pytest.approx(loss, rel=1e-10, abs=1e-12)


def test_ema_update_values(xp):
    online = {"w": asarray(xp, [1.0, 2.0]), "b": asarray(xp, [[4.0]])}
    target = {"w": asarray(xp, [3.0, 6.0]), "b": asarray(xp, [[0.0]])}
    updated = ema_update(online, target, momentum=0.75)
    assert list(updated) == ["w", "b"]
    np.testing.assert_allclose(to_numpy(updated["w"]), [2.5, 5.0], rtol=1e-15)
    np.testing.assert_allclose(to_numpy(updated["b"]), [[1.0]], rtol=1e-15)


def test_ema_update_leaves_inputs_unchanged(xp):
    online = {"w": asarray(xp, [1.0, 2.0])}
    target = {"w": asarray(xp, [3.0, 6.0])}
    updated = ema_update(online, target)
    assert updated is not target
    np.testing.assert_array_equal(to_numpy(target["w"]), [3.0, 6.0])
    np.testing.assert_array_equal(to_numpy(online["w"]), [1.0, 2.0])


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_ema_update_end_points(xp, momentum):
    online = {"w": asarray(xp, [1.0, 2.0])}
    target = {"w": asarray(xp, [3.0, 6.0])}
    updated = ema_update(online, target, momentum=momentum)
    expected = [3.0, 6.0] if momentum == 1.0 else [1.0, 2.0]
    np.testing.assert_array_equal(to_numpy(updated["w"]), expected)


def test_ema_update_names_missing_keys(xp):
    online = {"w": asarray(xp, [1.0]), "extra": asarray(xp, [1.0])}
    target = {"w": asarray(xp, [1.0]), "bias": asarray(xp, [1.0])}
    with pytest.raises(ValueError, match=r"only in online: \['extra'\]") as error:
        ema_update(online, target)
    assert "only in target: ['bias']" in str(error.value)


def test_ema_update_names_shape_mismatch(xp):
    online = {"w": asarray(xp, [1.0, 2.0])}
    target = {"w": asarray(xp, [1.0, 2.0, 3.0])}
    with pytest.raises(ValueError, match=r"online\['w'\] and target\['w'\].*\(2,\)"):
        ema_update(online, target)


def test_ema_update_rejects_integer_parameters(xp):
    online = {"steps": xp.asarray([1])}
    target = {"steps": xp.asarray([1])}
    with pytest.raises(TypeError, match=r"online\['steps'\].*floating"):
        ema_update(online, target)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan])
def test_ema_update_rejects_momentum(xp, momentum):
    online = {"w": asarray(xp, [1.0])}
    with pytest.raises(ValueError, match="momentum"):
        ema_update(online, dict(online), momentum=momentum)


def test_momentum_schedule_known_values():
    assert momentum_schedule(0, 100) == 0.996
    assert momentum_schedule(100, 100) == 1.0
    assert momentum_schedule(50, 100) == pytest.approx(0.998, rel=1e-15)
    # cos(pi / 4) = sqrt(2) / 2, so the weight of the base is (1 + sqrt(2) / 2) / 2.
    expected = 1.0 - 0.004 * (1.0 + math.sqrt(2.0) / 2.0) / 2.0
    assert momentum_schedule(25, 100) == pytest.approx(expected, rel=1e-15)


def test_momentum_schedule_clamps_steps():
    assert momentum_schedule(-5, 10, base_momentum=0.9) == 0.9
    assert momentum_schedule(11, 10, base_momentum=0.9) == 1.0
    assert momentum_schedule(10**9, 10, final_momentum=0.999) == 0.999


@given(
    total_steps=st.integers(1, 10_000),
    base=st.floats(0.0, 1.0),
    spread=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_momentum_schedule_is_monotone(total_steps, base, spread, data):
    final = base + (1.0 - base) * spread
    first = data.draw(st.integers(-10, total_steps + 10))
    second = data.draw(st.integers(first, total_steps + 20))
    kwargs = {"base_momentum": base, "final_momentum": final}
    low = momentum_schedule(first, total_steps, **kwargs)
    high = momentum_schedule(second, total_steps, **kwargs)
    assert base <= low <= high <= final
    assert momentum_schedule(0, total_steps, **kwargs) == base
    assert momentum_schedule(total_steps, total_steps, **kwargs) == final


@pytest.mark.parametrize(
    ("arguments", "error", "pattern"),
    [
        ({"step": 1.5, "total_steps": 10}, TypeError, "step must be an integer"),
        ({"step": 1, "total_steps": 0}, ValueError, "total_steps must be"),
        ({"step": 1, "total_steps": True}, TypeError, "total_steps must be an integer"),
        (
            {"step": 1, "total_steps": 10, "base_momentum": 1.2},
            ValueError,
            "base_momentum must be",
        ),
        (
            {"step": 1, "total_steps": 10, "final_momentum": -0.5},
            ValueError,
            "final_momentum must be",
        ),
        (
            {"step": 1, "total_steps": 10, "base_momentum": 0.9, "final_momentum": 0.8},
            ValueError,
            "base_momentum must be <= final_momentum",
        ),
    ],
)
def test_momentum_schedule_rejects(arguments, error, pattern):
    with pytest.raises(error, match=pattern):
        momentum_schedule(**arguments)
