"""Tests of the Array API augmentations on NumPy, array-api-strict and PyTorch, and
under ``jax.jit``."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

from sslspec.augment import (
    NumPyRandomSource,
    augment_features,
    augment_images,
    feature_mask,
    gaussian_noise,
    horizontal_flip,
    random_affine,
    random_erasing,
    random_resized_crop,
    two_views,
    warp_affine,
)
from sslspec.config import AugmentConfig

NAMESPACES = {
    "numpy": "array_api_compat.numpy",
    "array_api_strict": "array_api_strict",
    "torch": "array_api_compat.torch",
}


@pytest.fixture(params=list(NAMESPACES))
def xp(request):
    """Array namespace to test on; eager JAX is left out because it compiles every
    operation, and :func:`test_jit_two_views` covers JAX."""
    pytest.importorskip(request.param)
    return importlib.import_module(NAMESPACES[request.param])


def source(xp, seed=0, dtype=None):
    return NumPyRandomSource(seed, xp=xp, dtype=dtype)


def to_numpy(array) -> np.ndarray:
    return np.from_dlpack(array)


def images_array(xp, batch=4, channels=2, height=8, width=6, seed=1):
    values = np.random.default_rng(seed).random((batch, channels, height, width))
    return xp.asarray(values.astype(np.float32))


def identity(xp, batch):
    return xp.asarray(
        np.broadcast_to(np.eye(3, dtype=np.float32), (batch, 3, 3)).copy()
    )


def rotation(xp, degrees, batch=1):
    angle = math.radians(degrees)
    matrix = np.array(
        [
            [math.cos(angle), -math.sin(angle), 0.0],
            [math.sin(angle), math.cos(angle), 0.0],
            [0.0, 0.0, 1.0],
        ],
        dtype=np.float32,
    )
    return xp.asarray(np.broadcast_to(matrix, (batch, 3, 3)).copy())


def test_warp_identity_is_exact(xp):
    images = images_array(xp)
    result = warp_affine(images, identity(xp, 4))
    assert np.array_equal(to_numpy(result), to_numpy(images))


def test_warp_rotation_matches_rot90(xp):
    grid = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    result = to_numpy(warp_affine(xp.asarray(grid), rotation(xp, 90.0)))
    np.testing.assert_allclose(result[0, 0], np.rot90(grid[0, 0]), atol=1e-5)


def test_warp_half_pixel_shift_interpolates(xp):
    row = np.array([[[[0.0, 2.0, 4.0, 6.0]]]], dtype=np.float32)
    matrix = np.eye(3, dtype=np.float32)[None].copy()
    matrix[0, 0, 2] = 0.5
    result = to_numpy(warp_affine(xp.asarray(row), xp.asarray(matrix)))
    # Sample positions 0.5, 1.5, 2.5 and 3.5: the last neighbour is outside.
    np.testing.assert_allclose(result[0, 0, 0], [1.0, 3.0, 5.0, 3.0], atol=1e-6)


def test_warp_outside_is_zero(xp):
    images = xp.ones((1, 1, 4, 4), dtype=xp.float32)
    matrix = np.eye(3, dtype=np.float32)[None].copy()
    matrix[0, 0, 2] = 10.0
    result = to_numpy(warp_affine(images, xp.asarray(matrix)))
    assert np.all(result == 0.0)


def test_warp_rejects_bad_matrix_shape(xp):
    with pytest.raises(ValueError, match="matrices must have shape"):
        warp_affine(images_array(xp), xp.zeros((4, 2, 2), dtype=xp.float32))


def test_warp_rejects_non_image():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        warp_affine(np.zeros((3, 4), dtype=np.float32), np.zeros((3, 3, 3)))


def test_crop_full_scale_is_identity(xp):
    images = images_array(xp, height=6, width=6)
    result = random_resized_crop(images, source(xp), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(to_numpy(result), to_numpy(images), atol=1e-6)


def test_crop_keeps_constant_image_inside(xp):
    images = xp.ones((8, 1, 8, 8), dtype=xp.float32)
    result = to_numpy(random_resized_crop(images, source(xp), scale=(0.3, 0.6)))
    # A crop inside the image resamples only interior pixels, so a constant image
    # stays constant away from the border where a neighbour may be outside.
    np.testing.assert_allclose(result[:, :, 1:-1, 1:-1], 1.0, atol=1e-5)


def test_affine_zero_range_is_identity(xp):
    images = images_array(xp)
    result = random_affine(
        images, source(xp), max_rotation_degrees=0.0, max_translation=0.0
    )
    np.testing.assert_allclose(to_numpy(result), to_numpy(images), atol=1e-6)


def test_affine_changes_images(xp):
    images = images_array(xp)
    result = random_affine(images, source(xp), max_rotation_degrees=30.0)
    assert not np.allclose(to_numpy(result), to_numpy(images))


def test_flip_probability_one_mirrors(xp):
    images = images_array(xp)
    result = to_numpy(horizontal_flip(images, source(xp), probability=1.0))
    np.testing.assert_array_equal(result, to_numpy(images)[..., ::-1])


def test_flip_probability_zero_keeps(xp):
    images = images_array(xp)
    result = to_numpy(horizontal_flip(images, source(xp), probability=0.0))
    np.testing.assert_array_equal(result, to_numpy(images))


def test_noise_statistics(xp):
    x = xp.zeros((200, 500), dtype=xp.float32)
    noise = to_numpy(gaussian_noise(x, source(xp), std=0.3))
    assert abs(noise.mean()) < 0.01
    assert abs(noise.std() - 0.3) < 0.01


def test_noise_rejects_negative_std(xp):
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(xp.zeros((2, 3)), source(xp), std=-1.0)


@pytest.mark.parametrize("scale", [(0.02, 0.2), (0.3, 0.5), (1.0, 1.0)])
def test_erasing_area_within_bounds(xp, scale):
    height, width = 16, 12
    images = xp.ones((64, 3, height, width), dtype=xp.float32)
    ratio = (0.3, 3.3)
    result = to_numpy(
        random_erasing(images, source(xp), probability=1.0, scale=scale, ratio=ratio)
    )
    erased = result == 0.0
    # Every channel is erased at the same pixels.
    assert np.all(erased == erased[:, :1])
    area = erased[:, 0].sum(axis=(1, 2))
    assert np.all(area >= 1)
    assert np.all(area <= height * width)
    for sample, count in zip(erased[:, 0], area, strict=True):
        rows = np.flatnonzero(sample.any(axis=1))
        columns = np.flatnonzero(sample.any(axis=0))
        # The erased pixels form one filled rectangle.
        assert count == len(rows) * len(columns)
        assert rows[-1] - rows[0] + 1 == len(rows)
        assert columns[-1] - columns[0] + 1 == len(columns)
    # Rounding each side to whole pixels moves the area by less than one row plus
    # one column (clipped sides only shrink it).
    fractions = area / (height * width)
    slack = (height + width + 1) / (height * width)
    assert np.all(fractions <= scale[1] + slack)


def test_erasing_probability_zero_keeps(xp):
    images = images_array(xp)
    result = random_erasing(images, source(xp), probability=0.0)
    np.testing.assert_array_equal(to_numpy(result), to_numpy(images))


def test_erasing_probability_is_per_sample(xp):
    images = xp.ones((2000, 1, 8, 8), dtype=xp.float32)
    result = to_numpy(random_erasing(images, source(xp), probability=0.25))
    fraction = np.mean((result == 0.0).any(axis=(1, 2, 3)))
    assert abs(fraction - 0.25) < 0.03


def test_feature_mask_rate(xp):
    x = xp.ones((100, 200), dtype=xp.float32)
    masked = to_numpy(feature_mask(x, source(xp), probability=0.2))
    assert set(np.unique(masked)) <= {0.0, 1.0}
    assert abs(np.mean(masked == 0.0) - 0.2) < 0.01


def test_feature_mask_rejects_bad_probability(xp):
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        feature_mask(xp.ones((2, 2)), source(xp), probability=1.5)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_images_same_seed_same_output(xp, flip):
    config = AugmentConfig(horizontal_flip=flip, erase_probability=0.5)
    images = images_array(xp)
    first = augment_images(images, source(xp, seed=3), config)
    second = augment_images(images, source(xp, seed=3), config)
    other = augment_images(images, source(xp, seed=4), config)
    np.testing.assert_array_equal(to_numpy(first), to_numpy(second))
    assert not np.array_equal(to_numpy(first), to_numpy(other))


def test_augment_images_keeps_shape_and_dtype(xp):
    images = images_array(xp)
    result = augment_images(images, source(xp), AugmentConfig())
    assert result.shape == images.shape
    assert result.dtype == images.dtype


def test_augment_images_float64_with_float32_source(xp):
    images = xp.asarray(np.zeros((2, 1, 4, 4)), dtype=xp.float64)
    result = augment_images(images, source(xp), AugmentConfig())
    assert result.dtype == xp.float64


def test_augment_images_no_op_config_is_identity(xp):
    config = AugmentConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        max_rotation_degrees=0.0,
        max_translation=0.0,
        noise_std=0.0,
        erase_probability=0.0,
    )
    images = images_array(xp, height=6, width=6)
    result = augment_images(images, source(xp), config)
    np.testing.assert_allclose(to_numpy(result), to_numpy(images), atol=1e-6)


class CountingSource:
    """Record the shape of every draw."""

    def __init__(self):
        self.inner = NumPyRandomSource(0)
        self.draws = []

    def uniform(self, shape):
        self.draws.append(("uniform", tuple(shape)))
        return self.inner.uniform(shape)

    def normal(self, shape):
        self.draws.append(("normal", tuple(shape)))
        return self.inner.normal(shape)


def test_draws_do_not_depend_on_data():
    config = AugmentConfig(horizontal_flip=True, erase_probability=0.5)
    counts = []
    for seed in range(3):
        counting = CountingSource()
        images = np.random.default_rng(seed).random((5, 1, 8, 8)).astype(np.float32)
        augment_images(images, counting, config)
        counts.append(counting.draws)
    assert counts[0] == counts[1] == counts[2]
    assert counts[0] == [
        ("uniform", (5, 4)),
        ("uniform", (5, 3)),
        ("uniform", (5,)),
        ("normal", (5, 1, 8, 8)),
        ("uniform", (5, 5)),
    ]


def test_augment_features(xp):
    x = xp.ones((50, 40), dtype=xp.float32)
    config = AugmentConfig(feature_noise_std=0.0, feature_mask_probability=0.5)
    result = to_numpy(augment_features(x, source(xp), config))
    assert result.shape == (50, 40)
    assert 0.4 < np.mean(result == 0.0) < 0.6


def test_augment_features_rejects_images(xp):
    with pytest.raises(ValueError, match=r"\(B, F\)"):
        augment_features(images_array(xp), source(xp), AugmentConfig())


def test_two_views_chooses_by_ndim(xp):
    images = images_array(xp)
    view_a, view_b = two_views(images, source(xp), AugmentConfig())
    assert view_a.shape == images.shape
    assert not np.array_equal(to_numpy(view_a), to_numpy(view_b))
    features = xp.ones((6, 5), dtype=xp.float32)
    view_a, view_b = two_views(features, source(xp), AugmentConfig())
    assert view_a.shape == (6, 5)


def test_two_views_rejects_3d(xp):
    with pytest.raises(ValueError, match="images"):
        two_views(xp.ones((2, 3, 4)), source(xp), AugmentConfig())


def test_torch_matches_shapes_and_device():
    torch = pytest.importorskip("torch")
    from sslspec_torch.trainer import TorchRandomSource

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 8, 8)
    view_a, view_b = two_views(images, TorchRandomSource(generator), AugmentConfig())
    assert view_a.shape == images.shape
    assert view_a.dtype == torch.float32
    assert view_a.device == images.device
    identity_result = warp_affine(images, torch.eye(3).expand(4, 3, 3))
    assert torch.equal(identity_result, images)


class JaxKeySource:
    """Functional random source: each call splits the key, as under ``jax.jit``."""

    def __init__(self, key):
        self.key = key

    def _next(self):
        import jax

        self.key, subkey = jax.random.split(self.key)
        return subkey

    def uniform(self, shape):
        import jax

        return jax.random.uniform(self._next(), shape, dtype="float32")

    def normal(self, shape):
        import jax

        return jax.random.normal(self._next(), shape, dtype="float32")


def test_jit_two_views():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    config = AugmentConfig(horizontal_flip=True, erase_probability=0.5)

    @jax.jit
    def views(images, key):
        return two_views(images, JaxKeySource(key), config)

    images = jnp.asarray(np.random.default_rng(0).random((4, 1, 8, 8)), jnp.float32)
    view_a, view_b = views(images, jax.random.key(0))
    again_a, _ = views(images, jax.random.key(0))
    assert view_a.shape == images.shape
    assert view_a.dtype == jnp.float32
    assert not np.array_equal(np.asarray(view_a), np.asarray(view_b))
    np.testing.assert_array_equal(np.asarray(view_a), np.asarray(again_a))
