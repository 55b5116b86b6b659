"""Masked autoencoder (MAE) masking, reconstruction loss and patch layout."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from sslspec._numerics import representable_eps
from sslspec._validation import (
    check_bool,
    check_collective,
    check_int,
    check_ndim,
    check_nonempty,
    check_real,
    check_real_floating,
    check_same_dtype,
    check_same_shape,
    namespace_of,
)
from sslspec.distributed import Collective, _sum_over_ranks

__all__ = [
    "MaskResult",
    "generate_mask",
    "patchify",
    "reconstruction_loss",
    "unpatchify",
]


class MaskResult(NamedTuple):
    """Patches kept and masked for each sample, as returned by :func:`generate_mask`.

    A named tuple, so JAX treats it as a pytree and ``jax.jit`` can return it.
    The index arrays have the default indexing dtype of the namespace.
    """

    ids_keep: Any
    """Indices of the kept patches, shape (B, K), in order of increasing noise."""

    ids_masked: Any
    """Indices of the masked patches, shape (B, L - K), in order of increasing
    noise."""

    ids_restore: Any
    """Position of each patch in the shuffled order ``concat(ids_keep,
    ids_masked)``, shape (B, L). Gathering the shuffled sequence with these indices
    restores the original patch order."""

    mask: Any
    """1 for a masked patch and 0 for a kept one, shape (B, L), in the noise's
    dtype."""


def generate_mask(noise: Any, *, mask_ratio: float = 0.75) -> MaskResult:
    r"""Choose the patches to mask in each sample from per-patch noise.

    Each sample keeps the ``K = L - round(L * mask_ratio)`` patches with the
    smallest noise and masks the others, as MAE does with uniform noise. Ties go
    to the lower patch index (a stable sort), so every backend returns the same
    mask for the same noise.

    Parameters
    ----------
    noise : array of shape (B, L)
        Real floating noise, typically uniform on ``[0, 1)``, one value per patch.
        Draw it with the framework's random number generator.
    mask_ratio : float, default 0.75
        Fraction of patches to mask. ``round`` is Python's built-in (ties to even),
        and the ratio must mask at least one patch and keep at least one:
        ``1 <= round(L * mask_ratio) <= L - 1``.

    Returns
    -------
    MaskResult
        ``ids_keep`` (B, K), ``ids_masked`` (B, L - K) and ``ids_restore`` (B, L)
        in the namespace's default indexing dtype, and ``mask`` (B, L) in the dtype
        of ``noise`` with 1 for a masked patch. The default indexing dtype is
        int64 in NumPy, PyTorch and array-api-strict, and int32 in JAX unless
        ``jax_enable_x64`` is set.

    Raises
    ------
    TypeError
        If ``noise`` is not a real floating array or ``mask_ratio`` is not a real
        number.
    ValueError
        If ``noise`` is not a non-empty 2-D array or ``mask_ratio`` masks no patch
        or every patch.

    Notes
    -----
    The official MAE code keeps ``int(L * (1 - mask_ratio))`` patches. Float
    rounding makes that keep 0 patches for L = 10 and ratio 0.9, and 4 for L = 50
    and ratio 0.9, where this function keeps 1 and 5. Edifice also rounds
    ``L * mask_ratio``.

    References
    ----------
    K. He, X. Chen, S. Xie, Y. Li, P. Dollar, R. Girshick, "Masked Autoencoders
    Are Scalable Vision Learners", CVPR 2022, arXiv:2111.06377.
    """
    xp = namespace_of(noise=noise)
    check_real_floating(xp, "noise", noise)
    check_ndim("noise", noise, 2, "(batch, patches)")
    check_nonempty("noise", noise)
    mask_ratio = check_real("mask_ratio", mask_ratio)

    length = noise.shape[1]
    masked_count = round(length * mask_ratio)
    if not 1 <= masked_count <= length - 1:
        raise ValueError(
            f"mask_ratio must mask at least 1 and at most {length - 1} of the "
            f"{length} patches, got mask_ratio={mask_ratio}, which masks "
            f"round({length} * {mask_ratio}) = {masked_count}"
        )
    keep_count = length - masked_count

    index_dtype = _default_index_dtype(xp, noise)
    ids_shuffle = xp.astype(
        xp.argsort(noise, axis=-1, stable=True), index_dtype, copy=False
    )
    ids_restore = xp.astype(
        xp.argsort(ids_shuffle, axis=-1, stable=True), index_dtype, copy=False
    )
    mask = xp.astype(ids_restore >= keep_count, noise.dtype)
    return MaskResult(
        ids_keep=ids_shuffle[:, :keep_count],
        ids_masked=ids_shuffle[:, keep_count:],
        ids_restore=ids_restore,
        mask=mask,
    )


def reconstruction_loss(
    prediction: Any,
    target: Any,
    mask: Any,
    *,
    norm_pix_loss: bool = False,
    eps: float = 1e-6,
    collective: Collective | None = None,
) -> Any:
    r"""Compute MAE's mean squared reconstruction error over the masked patches.

    With :math:`m_{bl}` the mask (1 = masked) and :math:`P` the patch size:

    .. math::

        e_{bl} = \frac{1}{P} \sum_{p=1}^{P} (\hat x_{blp} - t_{blp})^2, \qquad
        L = \frac{\sum_{b,l} m_{bl} \, e_{bl}}{\sum_{b,l} m_{bl}} .

    With ``norm_pix_loss`` each target patch is first standardised by its own mean
    and unbiased variance, :math:`t \leftarrow (t - \bar t) /
    \sqrt{\operatorname{Var}(t) + \epsilon}`, as in the official code. A mask
    without any masked patch gives 0: the denominator is replaced by 1 where it is
    0, which leaves every other value exact and needs no branch on array values.

    Parameters
    ----------
    prediction, target : array of shape (B, L, P)
        Predicted and original patches (see :func:`patchify`), of the same real
        floating dtype and device.
    mask : array of shape (B, L)
        1 for a masked patch and 0 for a kept one, real floating or boolean, for
        example ``generate_mask(noise).mask``. It is converted to the dtype of
        ``prediction``; fractional weights are used as given.
    norm_pix_loss : bool, default False
        Whether to standardise each target patch. Needs ``P >= 2``.
    eps : float, default 1e-6
        Positive epsilon added to the patch variance. A value below the smallest
        normal number of the dtype is raised to it (6.1e-5 in float16).
    collective : Collective, optional
        Communication between ranks. With one, every rank returns the loss over the
        masked patches of the global batch. See :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The loss, in the dtype, namespace and device of ``prediction``.

    Raises
    ------
    TypeError
        If the arrays are not of one library, ``prediction`` and ``target`` are not
        real floating arrays of the same dtype, ``mask`` is neither real floating
        nor boolean, or ``norm_pix_loss`` is not a bool.
    ValueError
        If the shapes do not match, the arrays are on different devices,
        ``norm_pix_loss`` is set with ``P = 1``, or ``eps`` is not positive and
        finite.
    """
    xp = namespace_of(prediction=prediction, target=target, mask=mask)
    check_real_floating(xp, "prediction", prediction)
    check_real_floating(xp, "target", target)
    check_same_dtype("prediction", prediction, "target", target)
    if not (xp.isdtype(mask.dtype, "real floating") or xp.isdtype(mask.dtype, "bool")):
        raise TypeError(
            f"mask must have a real floating-point or boolean dtype, got dtype "
            f"{mask.dtype}"
        )
    check_ndim("prediction", prediction, 3, "(batch, patches, patch_size)")
    check_same_shape("prediction", prediction, "target", target)
    check_nonempty("prediction", prediction)
    check_ndim("mask", mask, 2, "(batch, patches)")
    if tuple(mask.shape) != tuple(prediction.shape[:2]):
        raise ValueError(
            f"mask must have shape (batch, patches) = {tuple(prediction.shape[:2])} "
            f"to match prediction, got shape {tuple(mask.shape)}"
        )
    norm_pix_loss = check_bool("norm_pix_loss", norm_pix_loss)
    eps = check_real("eps", eps, minimum=0.0, minimum_inclusive=False)
    if norm_pix_loss and prediction.shape[2] < 2:
        raise ValueError(
            "norm_pix_loss=True needs at least 2 values per patch to estimate an "
            f"unbiased variance, got target of shape {tuple(target.shape)}"
        )
    check_collective(collective)

    if norm_pix_loss:
        eps = representable_eps(xp, eps, target.dtype)
        mean = xp.mean(target, axis=-1, keepdims=True)
        variance = xp.var(target, axis=-1, correction=1, keepdims=True)
        target = (target - mean) / xp.sqrt(variance + eps)

    patch_error = xp.mean(xp.square(prediction - target), axis=-1)
    weights = xp.astype(mask, prediction.dtype)

    # Means rather than sums keep both values within float16 range. With equal
    # local batch sizes, their ratio over ranks is the global sum ratio.
    totals = _sum_over_ranks(
        xp.stack([xp.mean(patch_error * weights), xp.mean(weights)]), collective
    )
    masked_error = totals[0]
    masked_fraction = totals[1]
    return masked_error / xp.where(masked_fraction == 0, 1.0, masked_fraction)


def patchify(images: Any, patch_size: int) -> Any:
    r"""Split images into flattened square patches in MAE's layout.

    An image of ``h * w`` patches of ``p x p`` pixels becomes ``h * w`` rows,
    patches in row-major order. Inside a row the values are ordered
    ``(pixel row, pixel column, channel)`` with the channel fastest, as in the
    official MAE code:

    .. math::

        \text{patches}[b, i w + j, (u p + v) C + c]
        = \text{images}[b, c, i p + u, j p + v] .

    Parameters
    ----------
    images : array of shape (B, C, H, W)
        Images of any dtype and any channel count.
    patch_size : int
        Side ``p`` of the square patches. It must divide both H and W.

    Returns
    -------
    array of shape (B, (H / p) * (W / p), p * p * C)
        The patches, in the dtype, namespace and device of ``images``.

    Raises
    ------
    TypeError
        If ``images`` is not an array or ``patch_size`` is not an integer.
    ValueError
        If ``images`` is not 4-D, or ``patch_size`` is below 1 or does not divide
        the height and the width.

    Notes
    -----
    The official MAE code and solo-learn assume 3 channels; lightly and this
    function read the channel count from the input.
    """
    xp = namespace_of(images=images)
    check_ndim("images", images, 4, "(batch, channels, height, width)")
    patch_size = check_int("patch_size", patch_size, minimum=1)
    batch, channels, height, width = images.shape
    if height % patch_size != 0 or width % patch_size != 0:
        raise ValueError(
            f"patch_size must divide the image height and width, got "
            f"patch_size={patch_size} and images of shape {tuple(images.shape)}"
        )

    rows = height // patch_size
    columns = width // patch_size
    x = xp.reshape(images, (batch, channels, rows, patch_size, columns, patch_size))
    x = xp.permute_dims(x, (0, 2, 4, 3, 5, 1))
    return xp.reshape(x, (batch, rows * columns, patch_size * patch_size * channels))


def unpatchify(
    patches: Any,
    patch_size: int,
    *,
    image_size: tuple[int, int] | None = None,
) -> Any:
    r"""Reassemble images from patches in MAE's layout, the inverse of patchify.

    The channel count is read from the patch length, ``C = patch_length / p**2``.
    The patch grid is square unless ``image_size`` gives the image's height and
    width.

    Parameters
    ----------
    patches : array of shape (B, L, p * p * C)
        Patches as returned by :func:`patchify`, of any dtype.
    patch_size : int
        Side ``p`` of the square patches.
    image_size : tuple of two ints, optional
        Height and width ``(H, W)`` of the images, both multiples of ``p`` with
        ``(H / p) * (W / p) = L``. By default the grid is square, which needs ``L``
        to be a perfect square, and ``H = W = sqrt(L) * p``.

    Returns
    -------
    array of shape (B, C, H, W)
        The images, in the dtype, namespace and device of ``patches``.

    Raises
    ------
    TypeError
        If ``patches`` is not an array, ``patch_size`` is not an integer, or
        ``image_size`` is not a pair of integers.
    ValueError
        If ``patches`` is not 3-D, its patch length is not a multiple of ``p**2``,
        or the grid does not match ``L``.
    """
    xp = namespace_of(patches=patches)
    check_ndim("patches", patches, 3, "(batch, patches, patch_length)")
    patch_size = check_int("patch_size", patch_size, minimum=1)
    batch, length, patch_length = patches.shape

    pixels = patch_size * patch_size
    if patch_length % pixels != 0:
        raise ValueError(
            f"patches must have a patch length that is a multiple of "
            f"patch_size**2 = {pixels}, got patches of shape {tuple(patches.shape)} "
            f"with patch_size={patch_size}"
        )
    channels = patch_length // pixels
    rows, columns = _patch_grid(length, patch_size, image_size)

    x = xp.reshape(patches, (batch, rows, columns, patch_size, patch_size, channels))
    x = xp.permute_dims(x, (0, 5, 1, 3, 2, 4))
    return xp.reshape(x, (batch, channels, rows * patch_size, columns * patch_size))


def _patch_grid(
    length: int, patch_size: int, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    """Return the (rows, columns) grid of ``length`` patches, raising if none fits."""
    if image_size is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(
                f"patches must form a square grid when image_size is None, got "
                f"{length} patches; pass image_size=(height, width)"
            )
        return side, side

    if not isinstance(image_size, tuple | list) or len(image_size) != 2:
        raise TypeError(
            f"image_size must be a (height, width) pair of integers, got {image_size!r}"
        )
    height = check_int("image_size[0]", image_size[0], minimum=1)
    width = check_int("image_size[1]", image_size[1], minimum=1)
    if height % patch_size != 0 or width % patch_size != 0:
        raise ValueError(
            f"patch_size must divide the image height and width, got "
            f"patch_size={patch_size} and image_size={(height, width)}"
        )
    rows = height // patch_size
    columns = width // patch_size
    if rows * columns != length:
        raise ValueError(
            f"image_size={(height, width)} with patch_size={patch_size} gives "
            f"{rows} x {columns} = {rows * columns} patches, but patches has "
            f"{length}"
        )
    return rows, columns


def _default_index_dtype(xp: Any, x: Any) -> Any:
    """Return the namespace's default indexing dtype on the device of ``x``."""
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=array_api_compat.device(x))["indexing"]
