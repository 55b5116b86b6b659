"""MAE: masking, the reconstruction loss and the patch layout."""

from __future__ import annotations

import numpy as np
import pytest
from array_helpers import asarray, to_float, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sslspec import generate_mask, patchify, reconstruction_loss, unpatchify


def patchify_by_loops(images: np.ndarray, p: int) -> np.ndarray:
    batch, channels, height, width = images.shape
    columns = width // p
    out = np.empty((batch, (height // p) * columns, p * p * channels), images.dtype)
    for i in range(height // p):
        for j in range(columns):
            for u in range(p):
                for v in range(p):
                    for c in range(channels):
                        out[:, i * columns + j, (u * p + v) * channels + c] = images[
                            :, c, i * p + u, j * p + v
                        ]
    return out


def reconstruction_by_loops(prediction, target, mask, norm_pix_loss, eps=1e-6):
    batch, length, size = prediction.shape
    weighted = 0.0
    count = 0.0
    for b in range(batch):
        for patch in range(length):
            t = target[b, patch].astype(np.float64)
            if norm_pix_loss:
                mean = sum(t) / size
                variance = sum((t - mean) ** 2) / (size - 1)
                t = (t - mean) / np.sqrt(variance + eps)
            error = sum((prediction[b, patch] - t) ** 2) / size
            weighted += mask[b, patch] * error
            count += mask[b, patch]
    return weighted / count


# --- generate_mask -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "ratio", "kept"),
    [(10, 0.9, 1), (50, 0.9, 5), (196, 0.75, 49), (16, 0.75, 4), (10, 0.25, 8)],
)
def test_mask_keeps_length_minus_rounded_masked(xp, length, ratio, kept):
    # 10 * 0.25 = 2.5 rounds to 2 (ties to even), so 8 patches are kept.
    noise = asarray(xp, np.linspace(0.0, 1.0, 2 * length).reshape(2, length))
    result = generate_mask(noise, mask_ratio=ratio)
    assert tuple(result.ids_keep.shape) == (2, kept)
    assert tuple(result.ids_masked.shape) == (2, length - kept)
    assert tuple(result.ids_restore.shape) == (2, length)
    assert tuple(result.mask.shape) == (2, length)


def test_mask_small_noise_kept_ties_to_lower_index(xp):
    noise = asarray(xp, [[0.3, 0.1, 0.2, 0.1], [0.5, 0.5, 0.5, 0.5]])
    result = generate_mask(noise, mask_ratio=0.5)
    np.testing.assert_array_equal(to_numpy(result.ids_keep), [[1, 3], [0, 1]])
    np.testing.assert_array_equal(to_numpy(result.ids_masked), [[2, 0], [2, 3]])
    np.testing.assert_array_equal(
        to_numpy(result.ids_restore), [[3, 0, 2, 1], [0, 1, 2, 3]]
    )
    np.testing.assert_array_equal(to_numpy(result.mask), [[1, 0, 1, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_mask_dtypes(xp, dtype_name):
    noise = asarray(xp, np.full((2, 5), 0.5), dtype_name)
    result = generate_mask(noise, mask_ratio=0.4)
    assert result.mask.dtype == noise.dtype
    # The conftest enables JAX's x64 mode, so every namespace here defaults to int64.
    for ids in (result.ids_keep, result.ids_masked, result.ids_restore):
        assert ids.dtype == xp.int64


def test_mask_index_dtype_in_jax_without_x64():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(False):
        noise = jnp.asarray(np.full((2, 5), 0.5), dtype=jnp.float32)
        result = generate_mask(noise, mask_ratio=0.4)
        assert result.ids_keep.dtype == jnp.int32
        assert result.ids_restore.dtype == jnp.int32
        assert result.mask.dtype == jnp.float32


mask_inputs = st.tuples(
    st.sampled_from([1, 3]), st.sampled_from([17, 33]), st.floats(0.02, 0.98)
).flatmap(
    lambda args: st.tuples(
        # Few distinct values, so that most rows contain ties.
        hnp.arrays(np.float64, args[:2], elements=st.sampled_from([0.0, 0.25, 0.5])),
        st.just(args[2]),
    )
)


@given(inputs=mask_inputs)
def test_mask_partitions_and_restores(xp, inputs):
    noise, ratio = inputs
    length = noise.shape[1]
    masked_count = round(length * ratio)
    if not 1 <= masked_count <= length - 1:
        with pytest.raises(ValueError, match="mask_ratio"):
            generate_mask(asarray(xp, noise), mask_ratio=ratio)
        return

    result = generate_mask(asarray(xp, noise), mask_ratio=ratio)
    keep = to_numpy(result.ids_keep)
    masked = to_numpy(result.ids_masked)
    restore = to_numpy(result.ids_restore)
    mask = to_numpy(result.mask)
    shuffle = np.concatenate([keep, masked], axis=1)
    for row in range(noise.shape[0]):
        assert sorted(shuffle[row]) == list(range(length))
        assert np.array_equal(shuffle[row][restore[row]], np.arange(length))
        assert np.array_equal(np.flatnonzero(mask[row]), np.sort(masked[row]))
        assert keep.shape[1] == length - masked_count
        # Kept patches have the smallest noise, and among equal noise the lowest
        # indices.
        order = [(noise[row, i], i) for i in shuffle[row]]
        assert order == sorted(order)


# --- reconstruction_loss -------------------------------------------------------------


def test_reconstruction_by_hand(xp):
    prediction = asarray(xp, np.zeros((1, 2, 2)))
    target = asarray(xp, [[[1.0, 1.0], [3.0, 3.0]]])
    only_first = asarray(xp, [[1.0, 0.0]])
    only_second = asarray(xp, [[0.0, 1.0]])
    both = asarray(xp, [[1.0, 1.0]])
    assert to_float(reconstruction_loss(prediction, target, only_first)) == 1.0
    assert to_float(reconstruction_loss(prediction, target, only_second)) == 9.0
    assert to_float(reconstruction_loss(prediction, target, both)) == 5.0


def test_reconstruction_empty_mask_is_zero(xp):
    rng = np.random.default_rng(0)
    prediction = asarray(xp, rng.standard_normal((2, 3, 4)))
    target = asarray(xp, rng.standard_normal((2, 3, 4)))
    mask = asarray(xp, np.zeros((2, 3)))
    assert to_float(reconstruction_loss(prediction, target, mask)) == 0.0


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_matches_loops(xp, norm_pix_loss, seed):
    rng = np.random.default_rng(seed)
    prediction = rng.standard_normal((3, 5, 6))
    target = 2.0 + rng.standard_normal((3, 5, 6))
    mask = (rng.random((3, 5)) < 0.6).astype(np.float64)
    mask[0, 0] = 1.0
    expected = reconstruction_by_loops(prediction, target, mask, norm_pix_loss)
    loss = reconstruction_loss(
        asarray(xp, prediction),
        asarray(xp, target),
        asarray(xp, mask),
        norm_pix_loss=norm_pix_loss,
    )
    assert to_float(loss) == pytest.approx(expected, rel=1e-12)


def test_reconstruction_accepts_boolean_mask(xp):
    rng = np.random.default_rng(2)
    prediction = asarray(xp, rng.standard_normal((2, 4, 3)))
    target = asarray(xp, rng.standard_normal((2, 4, 3)))
    mask = np.array([[True, False, True, True], [False, False, True, False]])
    from_bool = reconstruction_loss(prediction, target, xp.asarray(mask))
    from_float = reconstruction_loss(prediction, target, asarray(xp, mask))
    assert to_float(from_bool) == to_float(from_float)


# --- patchify and unpatchify ---------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 5])
def test_patchify_matches_loops(xp, channels):
    rng = np.random.default_rng(channels)
    images = rng.standard_normal((2, channels, 6, 9))
    patches = patchify(asarray(xp, images), 3)
    assert tuple(patches.shape) == (2, 6, 9 * channels)
    np.testing.assert_array_equal(to_numpy(patches), patchify_by_loops(images, 3))


def test_patchify_keeps_integer_images(xp):
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    patches = patchify(xp.asarray(images), 2)
    assert patches.dtype == xp.uint8
    np.testing.assert_array_equal(to_numpy(patches), patchify_by_loops(images, 2))


def test_unpatchify_square_and_explicit_grid(xp):
    images = np.arange(1 * 2 * 4 * 6, dtype=np.float64).reshape(1, 2, 4, 6)
    patches = patchify(asarray(xp, images), 2)
    restored = unpatchify(patches, 2, image_size=(4, 6))
    np.testing.assert_array_equal(to_numpy(restored), images)

    square = np.arange(1 * 3 * 4 * 4, dtype=np.float64).reshape(1, 3, 4, 4)
    restored_square = unpatchify(patchify(asarray(xp, square), 2), 2)
    np.testing.assert_array_equal(to_numpy(restored_square), square)


image_shapes = st.tuples(
    st.sampled_from([1, 2]),  # batch
    st.sampled_from([1, 3, 4]),  # channels
    st.sampled_from([1, 2, 3]),  # patch rows
    st.sampled_from([1, 3]),  # patch columns
    st.sampled_from([1, 2, 4]),  # patch size
)


@given(shape=image_shapes, data=st.data())
def test_unpatchify_inverts_patchify(xp, shape, data):
    batch, channels, rows, columns, p = shape
    images = data.draw(
        hnp.arrays(
            np.float64,
            (batch, channels, rows * p, columns * p),
            elements=st.floats(-1e3, 1e3),
        )
    )
    patches = patchify(asarray(xp, images), p)
    assert tuple(patches.shape) == (batch, rows * columns, p * p * channels)
    restored = unpatchify(patches, p, image_size=(rows * p, columns * p))
    np.testing.assert_array_equal(to_numpy(restored), images)
