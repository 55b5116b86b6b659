"""Batched data augmentations written against the Array API standard.

Every backend makes the two views of a batch with these functions, so SimCLR on
PyTorch and SimCLR on JAX see the same distribution of views. Each function takes
the batch and an explicit :class:`RandomSource`, draws per-sample parameters from
it and returns an array of the same shape, dtype and device.

Rules that make the functions safe under a compiler such as ``jax.jit``:

- the number and shapes of the random draws depend only on the input shape and on
  the (static) arguments, never on the data;
- a probabilistic step compares a uniform draw with its probability and selects
  with ``xp.where``, so there is no data-dependent Python branch;
- no output shape depends on the data.

Images are ``(B, C, H, W)``. Geometric transforms are expressed as one affine
matrix per sample in *centred pixel coordinates*: ``(u, v) = (col - (W - 1) / 2,
row - (H - 1) / 2)``, so ``u`` grows to the right and ``v`` downwards. A matrix maps
an output pixel to the input location it samples, which is read with bilinear
interpolation and zero padding outside the image (:func:`warp_affine`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as array_device

from .config import AugmentConfig

__all__ = [
    "RandomSource",
    "NumPyRandomSource",
    "warp_affine",
    "random_resized_crop",
    "random_affine",
    "horizontal_flip",
    "gaussian_noise",
    "random_erasing",
    "feature_mask",
    "augment_images",
    "augment_features",
    "two_views",
]


@runtime_checkable
class RandomSource(Protocol):
    """Source of random arrays for the augmentations.

    Both methods return a new array of the requested shape in the source's
    namespace, floating dtype and device. Each call must give fresh numbers: a
    stateful source advances its generator, a functional one (JAX) splits its key.
    """

    def uniform(self, shape: tuple[int, ...]) -> Any:
        """Return independent draws from the uniform distribution on [0, 1)."""
        ...

    def normal(self, shape: tuple[int, ...]) -> Any:
        """Return independent draws from the standard normal distribution."""
        ...


class NumPyRandomSource:
    """:class:`RandomSource` backed by a NumPy ``Generator``.

    Draws in float64 with NumPy, then converts them with ``xp.asarray`` to
    ``dtype`` on ``device``. This serves NumPy, array-api-strict and tests; the
    framework backends implement their own sources on their devices.

    Parameters
    ----------
    seed
        Seed of the ``numpy.random.Generator``, or a generator to draw from.
    xp
        Array API namespace of the returned arrays (default: array-api-compat's
        NumPy namespace).
    dtype
        Floating dtype of ``xp`` for the returned arrays (default ``xp.float32``).
    device
        Device for ``xp.asarray`` (default: the namespace's default device).
    """

    def __init__(
        self,
        seed: int | np.random.Generator = 0,
        *,
        xp: Any = None,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        if xp is None:
            import array_api_compat.numpy as xp
        self.generator = (
            seed
            if isinstance(seed, np.random.Generator)
            else np.random.default_rng(seed)
        )
        self.xp = xp
        self.dtype = xp.float32 if dtype is None else dtype
        self.device = device

    def _convert(self, values: np.ndarray) -> Any:
        return self.xp.asarray(values, dtype=self.dtype, device=self.device)

    def uniform(self, shape: tuple[int, ...]) -> Any:
        return self._convert(self.generator.random(shape))

    def normal(self, shape: tuple[int, ...]) -> Any:
        return self._convert(self.generator.standard_normal(shape))


def _draw_uniform(random: RandomSource, shape: tuple[int, ...], like: Any) -> Any:
    """Draw uniform numbers and cast them to the dtype of ``like``."""
    xp = array_namespace(like)
    values = random.uniform(shape)
    if values.dtype != like.dtype:
        values = xp.astype(values, like.dtype)
    return values


def _draw_normal(random: RandomSource, shape: tuple[int, ...], like: Any) -> Any:
    """Draw standard normal numbers and cast them to the dtype of ``like``."""
    xp = array_namespace(like)
    values = random.normal(shape)
    if values.dtype != like.dtype:
        values = xp.astype(values, like.dtype)
    return values


def _check_images(images: Any, name: str = "images") -> None:
    if images.ndim != 4:
        raise ValueError(
            f"{name} must have shape (B, C, H, W), got shape {tuple(images.shape)}"
        )


def _check_range(name: str, bounds: Sequence[float], *, low: float = 0.0) -> None:
    lower, upper = bounds
    if not (low <= lower <= upper):
        raise ValueError(
            f"{name} must be a pair (min, max) with {low} <= min <= max, got {bounds}"
        )


def _check_probability(name: str, probability: float) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {probability}")


def _matrices(xp: Any, rows: Sequence[Sequence[Any]]) -> Any:
    """Stack per-sample entries ``rows[i][j]`` of shape (B,) into (B, 3, 3)."""
    return xp.stack([xp.stack(list(row), axis=-1) for row in rows], axis=-2)


def _flip_matrices(signs: Any) -> Any:
    """Return (B, 3, 3) matrices that multiply ``u`` by ``signs`` (+1 or -1)."""
    xp = array_namespace(signs)
    zeros = xp.zeros_like(signs)
    ones = xp.ones_like(signs)
    return _matrices(
        xp, [[signs, zeros, zeros], [zeros, ones, zeros], [zeros, zeros, ones]]
    )


def _crop_matrices(
    uniform: Any,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Any:
    """Return (B, 3, 3) crop-and-resize matrices from four uniforms per sample.

    The crop covers a fraction ``s ~ U(scale)`` of the image area with aspect
    ratio (width over height) ``r``, ``log r ~ U(log ratio)``. Its sides are
    ``sqrt(s * r) * W`` and ``sqrt(s / r) * H``, clipped to the image, and its
    centre is uniform over the positions that keep it inside the image.
    """
    xp = array_namespace(uniform)
    area = scale[0] + (scale[1] - scale[0]) * uniform[:, 0]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = xp.exp(log_low + (log_high - log_low) * uniform[:, 1])
    width_fraction = xp.clip(xp.sqrt(area * aspect), 0.0, 1.0)
    height_fraction = xp.clip(xp.sqrt(area / aspect), 0.0, 1.0)
    offset_x = (uniform[:, 2] - 0.5) * (1.0 - width_fraction) * width
    offset_y = (uniform[:, 3] - 0.5) * (1.0 - height_fraction) * height
    zeros = xp.zeros_like(area)
    ones = xp.ones_like(area)
    return _matrices(
        xp,
        [
            [width_fraction, zeros, offset_x],
            [zeros, height_fraction, offset_y],
            [zeros, zeros, ones],
        ],
    )


def _inverse_rigid_matrices(angle: Any, shift_x: Any, shift_y: Any) -> Any:
    """Return (B, 3, 3) matrices that undo a rotation then a translation.

    The forward transform rotates by ``angle`` radians counterclockwise as the
    image is displayed (row 0 at the top) and then shifts by ``(shift_x,
    shift_y)`` pixels. In centred pixel coordinates with ``v`` pointing down it is
    ``p_out = R p_in + t`` with ``R = [[c, s], [-s, c]]``; the inverse is
    ``p_in = R^T (p_out - t)``.
    """
    xp = array_namespace(angle)
    cos = xp.cos(angle)
    sin = xp.sin(angle)
    zeros = xp.zeros_like(angle)
    ones = xp.ones_like(angle)
    return _matrices(
        xp,
        [
            [cos, -sin, -(cos * shift_x - sin * shift_y)],
            [sin, cos, -(sin * shift_x + cos * shift_y)],
            [zeros, zeros, ones],
        ],
    )


def _rigid_parameters(
    uniform: Any, height: int, width: int, max_degrees: float, max_translation: float
) -> tuple[Any, Any, Any]:
    """Map three uniforms per sample to an angle (radians) and a shift (pixels)."""
    angle = (2.0 * uniform[:, 0] - 1.0) * math.radians(max_degrees)
    shift_x = (2.0 * uniform[:, 1] - 1.0) * max_translation * width
    shift_y = (2.0 * uniform[:, 2] - 1.0) * max_translation * height
    return angle, shift_x, shift_y


def _index_dtype(xp: Any, device: Any) -> Any:
    """Return the namespace's default index dtype (int32 in JAX without x64)."""
    try:
        return xp.__array_namespace_info__().default_dtypes(device=device)["indexing"]
    except (AttributeError, TypeError, KeyError):
        return xp.int64


def warp_affine(images: Any, matrices: Any) -> Any:
    """Resample each image at the locations that its affine matrix gives.

    Output pixel ``(row, col)`` with centred coordinates ``(u, v)`` takes the
    input value at ``(x, y) = M[:2, :2] @ (u, v) + M[:2, 2]`` (also centred),
    interpolated bilinearly from the four neighbouring pixels. Neighbours outside
    the image count as zero. An identity matrix returns the input exactly, since
    every sample location then falls on a pixel centre with weight one.

    Parameters
    ----------
    images
        Array of shape ``(B, C, H, W)``, floating dtype.
    matrices
        Array of shape ``(B, 2, 3)`` or ``(B, 3, 3)`` in the dtype of ``images``;
        only the first two rows are used.

    Returns
    -------
    array
        The resampled images, same shape, dtype and device as ``images``.

    Notes
    -----
    The four neighbours are gathered with ``take_along_axis`` on the flattened
    pixels, which costs ``O(B * C * H * W)`` memory, independent of the size of
    the affine map.
    """
    _check_images(images)
    xp = array_namespace(images, matrices)
    batch, channels, height, width = images.shape
    if matrices.ndim != 3 or tuple(matrices.shape) not in (
        (batch, 2, 3),
        (batch, 3, 3),
    ):
        raise ValueError(
            f"matrices must have shape ({batch}, 2, 3) or ({batch}, 3, 3) for "
            f"{batch} images, got shape {tuple(matrices.shape)}"
        )
    dtype = images.dtype
    device = array_device(images)
    center_x = (width - 1) / 2
    center_y = (height - 1) / 2

    columns = xp.arange(width, dtype=dtype, device=device) - center_x
    rows = xp.arange(height, dtype=dtype, device=device) - center_y
    u = xp.reshape(xp.broadcast_to(columns[None, :], (height, width)), (1, -1))
    v = xp.reshape(xp.broadcast_to(rows[:, None], (height, width)), (1, -1))

    x = matrices[:, 0, 0:1] * u + matrices[:, 0, 1:2] * v + matrices[:, 0, 2:3]
    y = matrices[:, 1, 0:1] * u + matrices[:, 1, 1:2] * v + matrices[:, 1, 2:3]
    x = x + center_x
    y = y + center_y
    x0 = xp.floor(x)
    y0 = xp.floor(y)
    weight_x = x - x0
    weight_y = y - y0

    flat = xp.reshape(images, (batch, channels, height * width))
    index_dtype = _index_dtype(xp, device)
    result = None
    corners = (
        (0.0, 0.0, (1.0 - weight_x) * (1.0 - weight_y)),
        (1.0, 0.0, weight_x * (1.0 - weight_y)),
        (0.0, 1.0, (1.0 - weight_x) * weight_y),
        (1.0, 1.0, weight_x * weight_y),
    )
    for dx, dy, weight in corners:
        corner_x = x0 + dx
        corner_y = y0 + dy
        inside = (
            (corner_x >= 0)
            & (corner_x <= width - 1)
            & (corner_y >= 0)
            & (corner_y <= height - 1)
        )
        weight = weight * xp.astype(inside, dtype)
        index = xp.clip(corner_y, 0, height - 1) * width + xp.clip(
            corner_x, 0, width - 1
        )
        index = xp.astype(index, index_dtype)
        index = xp.broadcast_to(index[:, None, :], (batch, channels, height * width))
        contribution = xp.take_along_axis(flat, index, axis=-1) * weight[:, None, :]
        result = contribution if result is None else result + contribution
    return xp.reshape(result, (batch, channels, height, width))


def random_resized_crop(
    images: Any,
    random: RandomSource,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Any:
    """Crop a random rectangle of each image and resize it to the full size.

    The rectangle covers a fraction in ``scale`` of the image area, has an aspect
    ratio (width over height) drawn log-uniformly from ``ratio``, is clipped to
    the image and lies inside it. Draws one ``(B, 4)`` uniform array.
    """
    _check_images(images)
    _check_range("scale", scale)
    _check_range("ratio", ratio, low=1e-6)
    batch, _, height, width = images.shape
    uniform = _draw_uniform(random, (batch, 4), images)
    return warp_affine(images, _crop_matrices(uniform, height, width, scale, ratio))


def random_affine(
    images: Any,
    random: RandomSource,
    *,
    max_rotation_degrees: float = 15.0,
    max_translation: float = 0.1,
) -> Any:
    """Rotate and then shift each image by random amounts.

    The angle is uniform in ``[-max_rotation_degrees, max_rotation_degrees]``,
    positive meaning counterclockwise as displayed, about the image centre. The
    shift is uniform in ``[-max_translation, max_translation]`` times the width
    (horizontally) and the height (vertically). Draws one ``(B, 3)`` uniform
    array.
    """
    _check_images(images)
    if max_rotation_degrees < 0 or max_translation < 0:
        raise ValueError(
            f"max_rotation_degrees and max_translation must be non-negative, got "
            f"{max_rotation_degrees} and {max_translation}"
        )
    batch, _, height, width = images.shape
    uniform = _draw_uniform(random, (batch, 3), images)
    angle, shift_x, shift_y = _rigid_parameters(
        uniform, height, width, max_rotation_degrees, max_translation
    )
    return warp_affine(images, _inverse_rigid_matrices(angle, shift_x, shift_y))


def horizontal_flip(
    images: Any, random: RandomSource, *, probability: float = 0.5
) -> Any:
    """Mirror each image left to right with the given probability.

    Draws one ``(B,)`` uniform array; sample ``i`` is flipped when its draw is
    below ``probability``.
    """
    _check_images(images)
    _check_probability("probability", probability)
    xp = array_namespace(images)
    flip = _draw_uniform(random, (images.shape[0],), images) < probability
    return xp.where(flip[:, None, None, None], xp.flip(images, axis=-1), images)


def gaussian_noise(x: Any, random: RandomSource, *, std: float) -> Any:
    """Add independent Gaussian noise of standard deviation ``std`` to every entry.

    Works on any shape. The result is not clipped to the data's range. Draws one
    normal array of the shape of ``x``.
    """
    if std < 0:
        raise ValueError(f"std must be non-negative, got {std}")
    return x + std * _draw_normal(random, tuple(x.shape), x)


def random_erasing(
    images: Any,
    random: RandomSource,
    *,
    probability: float = 0.25,
    scale: tuple[float, float] = (0.02, 0.2),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> Any:
    """Set one random rectangle of each image to zero with the given probability.

    The rectangle's area fraction ``s`` is uniform in ``scale`` and its aspect
    ratio (height over width) ``r`` log-uniform in ``ratio``. Its sides are
    ``round(sqrt(s * r) * H)`` and ``round(sqrt(s / r) * W)`` pixels, clipped to
    ``[1, H]`` and ``[1, W]``, and its top-left corner is uniform over the
    positions that keep it inside the image, so an erased image loses between one
    pixel and the whole image. All channels are erased. Draws one ``(B, 5)``
    uniform array.
    """
    _check_images(images)
    _check_probability("probability", probability)
    _check_range("scale", scale)
    _check_range("ratio", ratio, low=1e-6)
    xp = array_namespace(images)
    batch, _, height, width = images.shape
    dtype = images.dtype
    device = array_device(images)
    uniform = _draw_uniform(random, (batch, 5), images)

    area = scale[0] + (scale[1] - scale[0]) * uniform[:, 1]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = xp.exp(log_low + (log_high - log_low) * uniform[:, 2])
    erase_height = xp.clip(xp.round(xp.sqrt(area * aspect) * height), 1, height)
    erase_width = xp.clip(xp.round(xp.sqrt(area / aspect) * width), 1, width)
    top = xp.floor(uniform[:, 3] * (height - erase_height + 1))
    left = xp.floor(uniform[:, 4] * (width - erase_width + 1))

    rows = xp.arange(height, dtype=dtype, device=device)[None, :, None]
    columns = xp.arange(width, dtype=dtype, device=device)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < (top + erase_height)[:, None, None])
        & (columns >= left[:, None, None])
        & (columns < (left + erase_width)[:, None, None])
    )
    erase = inside & (uniform[:, 0] < probability)[:, None, None]
    return xp.where(erase[:, None, :, :], xp.zeros_like(images), images)


def feature_mask(x: Any, random: RandomSource, *, probability: float) -> Any:
    """Set each entry of ``x`` to zero independently with the given probability.

    Works on any shape; draws one uniform array of the shape of ``x``.
    """
    _check_probability("probability", probability)
    xp = array_namespace(x)
    keep = _draw_uniform(random, tuple(x.shape), x) >= probability
    return xp.where(keep, x, xp.zeros_like(x))


def augment_images(images: Any, random: RandomSource, config: AugmentConfig) -> Any:
    """Make one augmented view of a batch of images.

    The geometric steps are combined into one affine matrix per sample and
    applied with a single bilinear resampling (:func:`warp_affine`), which blurs
    less than resampling once per step. In order:

    1. random resized crop (``crop_scale``, ``crop_ratio``);
    2. rotation by up to ``max_rotation_degrees`` and shift by up to
       ``max_translation`` of the side;
    3. horizontal flip with probability 0.5, if ``horizontal_flip``;
    4. Gaussian noise of standard deviation ``noise_std``, if it is positive;
    5. random erasing of one rectangle (area fraction in ``erase_scale``, aspect
       ratio in ``erase_ratio``) with probability ``erase_probability``, if it is
       positive.

    Random draws, in order: uniform arrays ``(B, 4)`` and ``(B, 3)``, a uniform
    ``(B,)`` with flips, a normal array of the image shape with noise, and a
    uniform ``(B, 5)`` with erasing.
    """
    _check_images(images)
    _check_range("crop_scale", config.crop_scale)
    _check_range("crop_ratio", config.crop_ratio, low=1e-6)
    xp = array_namespace(images)
    batch, _, height, width = images.shape

    crop = _crop_matrices(
        _draw_uniform(random, (batch, 4), images),
        height,
        width,
        config.crop_scale,
        config.crop_ratio,
    )
    angle, shift_x, shift_y = _rigid_parameters(
        _draw_uniform(random, (batch, 3), images),
        height,
        width,
        config.max_rotation_degrees,
        config.max_translation,
    )
    matrices = xp.matmul(crop, _inverse_rigid_matrices(angle, shift_x, shift_y))
    if config.horizontal_flip:
        flip = _draw_uniform(random, (batch,), images) < 0.5
        signs = xp.where(flip, -xp.ones_like(angle), xp.ones_like(angle))
        matrices = xp.matmul(matrices, _flip_matrices(signs))
    views = warp_affine(images, matrices)

    if config.noise_std > 0:
        views = gaussian_noise(views, random, std=config.noise_std)
    if config.erase_probability > 0:
        views = random_erasing(
            views,
            random,
            probability=config.erase_probability,
            scale=config.erase_scale,
            ratio=config.erase_ratio,
        )
    return views


def augment_features(x: Any, random: RandomSource, config: AugmentConfig) -> Any:
    """Make one augmented view of a batch of feature vectors ``(B, F)``.

    Adds Gaussian noise of standard deviation ``feature_noise_std`` (if
    positive), then zeroes each feature with probability
    ``feature_mask_probability`` (if positive).
    """
    if x.ndim != 2:
        raise ValueError(f"x must have shape (B, F), got shape {tuple(x.shape)}")
    if config.feature_noise_std > 0:
        x = gaussian_noise(x, random, std=config.feature_noise_std)
    if config.feature_mask_probability > 0:
        x = feature_mask(x, random, probability=config.feature_mask_probability)
    return x


def two_views(x: Any, random: RandomSource, config: AugmentConfig) -> tuple[Any, Any]:
    """Return two independent augmented views of a batch.

    A 4-D batch ``(B, C, H, W)`` goes through :func:`augment_images`, a 2-D batch
    ``(B, F)`` through :func:`augment_features`. The first view is drawn before
    the second.

    Raises
    ------
    ValueError
        If ``x`` is neither 2-D nor 4-D.
    """
    if x.ndim == 4:
        augment = augment_images
    elif x.ndim == 2:
        augment = augment_features
    else:
        raise ValueError(
            f"x must be images (B, C, H, W) or feature vectors (B, F), got shape "
            f"{tuple(x.shape)}"
        )
    view_a = augment(x, random, config)
    view_b = augment(x, random, config)
    return view_a, view_b
