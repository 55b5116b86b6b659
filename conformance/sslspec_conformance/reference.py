"""Float64 NumPy reference of every public function of sslspec.

Each function is written straight from its defining equation, for clarity rather than
speed, and shares no code with the spec in :mod:`sslspec`. Inputs are converted to
float64 first, so a backend's result at a low precision is compared with the exact
value for the same (rounded) inputs.

Conventions, with the sources that the spec's docstrings give for them:

- L2 normalisation divides a row by ``max(||row||, 1e-12)``, the floor of
  ``torch.nn.functional.normalize``, so an all-zero row stays zero.
- NT-Xent follows Algorithm 1 of the SimCLR paper (Chen et al., 2020). Each
  anchor's own similarity is excluded, its positive is in the denominator, and the
  loss is the mean over the 2N anchors.
- BYOL's loss is ``2 - 2 cos(p, z)`` per row, averaged over the batch (Grill et al.,
  2020). The momentum schedule is the one of the official BYOL code, with the step
  clamped to ``[0, K]``.
- Barlow Twins standardises each dimension over the batch with the biased variance
  and ``eps = 1e-5`` inside the square root, as ``BatchNorm1d(affine=False)`` does
  in the official code (Zbontar et al., 2021).
- VICReg uses the unbiased variance and covariance of the official code (Bardes et
  al., 2022). The two views' variance terms are averaged and their covariance
  terms summed.
- MAE masking keeps the ``K = L - round(L * mask_ratio)`` patches of smallest
  noise, ties going to the lower index, with Python's ``round`` (half to even).
  Reconstruction loss and patch layout follow the official MAE code (He et al.,
  2022), with the channel count read from the input.

Intermediate values pass through :func:`~sslspec_conformance.rounding.stored`,
which the tolerance estimate uses to model rounding and which otherwise returns
them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sslspec_conformance.rounding import stored

__all__ = [
    "NORM_FLOOR",
    "BARLOW_EPS",
    "l2_normalize_rows",
    "nt_xent_loss",
    "byol_loss",
    "ema_update",
    "momentum_schedule",
    "barlow_twins_loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "vicreg_loss",
    "Mask",
    "generate_mask",
    "reconstruction_loss",
    "patchify",
    "unpatchify",
]

#: Smallest row norm used as a divisor in L2 normalisation.
NORM_FLOOR = 1e-12

#: Epsilon inside the square root when Barlow Twins standardises a dimension.
BARLOW_EPS = 1e-5


def _float64(x: object) -> np.ndarray:
    return np.array(x, dtype=np.float64, copy=True)


def l2_normalize_rows(z: np.ndarray, *, floor: float = NORM_FLOOR) -> np.ndarray:
    """Divide each row of a 2-D array by ``max(||row||_2, floor)``."""
    z = _float64(z)
    out = np.empty_like(z)
    for k in range(z.shape[0]):
        norm = stored(math.sqrt(math.fsum(float(v) * float(v) for v in z[k])))
        out[k] = stored(z[k] / max(norm, floor))
    return out


def _logsumexp(values: np.ndarray) -> float:
    shift = float(np.max(values))
    total = stored(math.fsum(stored(np.exp(values - shift))))
    return stored(shift + math.log(total))


def nt_xent_loss(
    z_i: np.ndarray,
    z_j: np.ndarray,
    *,
    temperature: float = 0.5,
    norm_floor: float = NORM_FLOOR,
) -> float:
    r"""Return SimCLR's NT-Xent loss.

    With :math:`u_1..u_{2N}` the normalised rows of ``z_i`` then ``z_j``,
    :math:`s_{ab} = u_a \cdot u_b / \tau` and :math:`p(a) = (a + N) \bmod 2N`:

    .. math::

        L = \frac{1}{2N} \sum_a \Bigl(-s_{a,p(a)}
            + \log \sum_{b \ne a} e^{s_{ab}}\Bigr).
    """
    u = l2_normalize_rows(
        np.concatenate([_float64(z_i), _float64(z_j)]), floor=norm_floor
    )
    size = u.shape[0]
    half = size // 2
    terms = []
    for a in range(size):
        positive = (a + half) % size
        others = stored(
            np.array([u[a] @ u[b] / temperature for b in range(size) if b != a])
        )
        terms.append(_logsumexp(others) - stored(u[a] @ u[positive] / temperature))
    return math.fsum(terms) / size


def byol_loss(
    online_prediction: np.ndarray,
    target_projection: np.ndarray,
    *,
    norm_floor: float = NORM_FLOOR,
) -> float:
    r"""Return BYOL's loss :math:`\frac1N \sum_k 2 - 2 \cos(p_k, z_k)`."""
    p = l2_normalize_rows(online_prediction, floor=norm_floor)
    z = l2_normalize_rows(target_projection, floor=norm_floor)
    terms = [2.0 - 2.0 * stored(float(p[k] @ z[k])) for k in range(p.shape[0])]
    return math.fsum(terms) / len(terms)


def ema_update(
    online: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    *,
    momentum: float = 0.996,
) -> dict[str, np.ndarray]:
    """Return ``momentum * target + (1 - momentum) * online`` for every name."""
    if set(online) != set(target):
        raise ValueError("online and target must have the same names")
    return {
        key: stored(momentum * _float64(target[key]))
        + stored((1.0 - momentum) * _float64(online[key]))
        for key in target
    }


def momentum_schedule(
    step: int,
    total_steps: int,
    *,
    base_momentum: float = 0.996,
    final_momentum: float = 1.0,
) -> float:
    r"""Return :math:`m_f - (m_f - m_b) (\cos(\pi k / K) + 1) / 2` with the step
    :math:`k` clamped to ``[0, K]``."""
    k = min(max(step, 0), total_steps)
    weight = (math.cos(math.pi * k / total_steps) + 1.0) / 2.0
    return final_momentum - (final_momentum - base_momentum) * weight


def _standardize_columns(z: np.ndarray, eps: float) -> np.ndarray:
    """Standardise each column with its mean and biased variance."""
    z = _float64(z)
    out = np.empty_like(z)
    for j in range(z.shape[1]):
        column = z[:, j]
        mean = stored(math.fsum(column) / len(column))
        centred = stored(column - mean)
        variance = stored(math.fsum(centred**2) / len(column))
        out[:, j] = stored(centred / math.sqrt(variance + eps))
    return out


def barlow_twins_loss(
    z_a: np.ndarray,
    z_b: np.ndarray,
    *,
    lambda_param: float = 0.005,
    eps: float = BARLOW_EPS,
) -> float:
    r"""Return the Barlow Twins loss.

    With each column standardised over the batch (biased variance, ``eps``) and
    :math:`c = \hat z_a^\top \hat z_b / N`:

    .. math::

        L = \sum_i (1 - c_{ii})^2 + \lambda \sum_{i \ne j} c_{ij}^2 .
    """
    a = _standardize_columns(z_a, eps)
    b = _standardize_columns(z_b, eps)
    size, dim = a.shape
    c = stored(a.T @ b / size)
    on_diagonal = math.fsum((1.0 - c[i, i]) ** 2 for i in range(dim))
    off_diagonal = math.fsum(
        c[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j
    )
    return on_diagonal + lambda_param * off_diagonal


def invariance_loss(z_a: np.ndarray, z_b: np.ndarray) -> float:
    """Return the mean of ``(z_a - z_b) ** 2`` over all elements."""
    difference = stored(_float64(z_a) - _float64(z_b))
    return math.fsum((difference**2).ravel()) / difference.size


def _unbiased_variance(column: np.ndarray) -> float:
    mean = stored(math.fsum(column) / len(column))
    return stored(math.fsum(stored(column - mean) ** 2) / (len(column) - 1))


def variance_loss(
    z: np.ndarray, *, target_std: float = 1.0, eps: float = 1e-4
) -> float:
    r"""Return :math:`\frac1D \sum_j \max(0, \gamma - \sqrt{\mathrm{Var}(z_{:,j}) +
    \epsilon})` with the unbiased variance."""
    z = _float64(z)
    hinges = [
        max(0.0, target_std - stored(math.sqrt(_unbiased_variance(z[:, j]) + eps)))
        for j in range(z.shape[1])
    ]
    return math.fsum(hinges) / len(hinges)


def covariance_loss(z: np.ndarray) -> float:
    r"""Return :math:`\frac1D \sum_{i \ne j} C_{ij}^2` for the unbiased covariance
    matrix :math:`C` of the columns of ``z``."""
    z = _float64(z)
    size, dim = z.shape
    centred = stored(z - stored(z.mean(axis=0)))
    covariance = stored(centred.T @ centred / (size - 1))
    off_diagonal = math.fsum(
        covariance[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j
    )
    return off_diagonal / dim


def vicreg_loss(
    z_a: np.ndarray,
    z_b: np.ndarray,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
) -> float:
    """Return the VICReg loss: weighted invariance, the mean of the two views'
    variance terms, and the sum of their covariance terms."""
    variance = (variance_loss(z_a) + variance_loss(z_b)) / 2.0
    covariance = covariance_loss(z_a) + covariance_loss(z_b)
    return (
        invariance_weight * invariance_loss(z_a, z_b)
        + variance_weight * variance
        + covariance_weight * covariance
    )


@dataclass(frozen=True)
class Mask:
    """The patches MAE keeps and masks, per sample.

    Attributes
    ----------
    ids_keep : ndarray of shape (B, K)
        Indices of the kept patches, in increasing order of noise.
    ids_masked : ndarray of shape (B, L - K)
        Indices of the masked patches, in increasing order of noise.
    ids_restore : ndarray of shape (B, L)
        Inverse permutation: position of each patch in ``[ids_keep, ids_masked]``.
    mask : ndarray of shape (B, L)
        1.0 where a patch is masked, 0.0 where it is kept.
    """

    ids_keep: np.ndarray
    ids_masked: np.ndarray
    ids_restore: np.ndarray
    mask: np.ndarray


def kept_count(num_patches: int, mask_ratio: float) -> int:
    """Return ``L - round(L * mask_ratio)``, the number of patches kept."""
    return num_patches - round(num_patches * mask_ratio)


def generate_mask(noise: np.ndarray, *, mask_ratio: float = 0.75) -> Mask:
    """Return the MAE mask of each row of ``noise`` (B, L).

    Patches are ordered by increasing noise, ties by increasing index; the first
    ``K = L - round(L * mask_ratio)`` are kept.
    """
    noise = _float64(noise)
    batch, length = noise.shape
    keep = kept_count(length, mask_ratio)
    ids_keep = np.empty((batch, keep), dtype=np.int64)
    ids_masked = np.empty((batch, length - keep), dtype=np.int64)
    ids_restore = np.empty((batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.float64)
    for row in range(batch):
        order = sorted(range(length), key=lambda i, row=row: (noise[row, i], i))
        ids_keep[row] = order[:keep]
        ids_masked[row] = order[keep:]
        for position, patch in enumerate(order):
            ids_restore[row, patch] = position
        mask[row, order[:keep]] = 0.0
    return Mask(ids_keep, ids_masked, ids_restore, mask)


def reconstruction_loss(
    prediction: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    *,
    norm_pix_loss: bool = False,
    eps: float = 1e-6,
) -> float:
    r"""Return MAE's reconstruction loss over the masked patches.

    Per patch, the mean over its values of ``(prediction - target) ** 2``; then
    :math:`\sum_l \ell_l m_l / \sum_l m_l`, or 0 when the mask is all zero. With
    ``norm_pix_loss`` each target patch is first standardised by its mean and its
    unbiased variance: ``(t - mean) / sqrt(var + eps)``.
    """
    prediction = _float64(prediction)
    target = _float64(target)
    mask = _float64(mask)
    batch, length, _ = target.shape
    weighted = []
    weights = []
    for b in range(batch):
        for patch in range(length):
            values = target[b, patch]
            if norm_pix_loss:
                centred = stored(values - stored(values.mean()))
                values = stored(centred / math.sqrt(_unbiased_variance(values) + eps))
            difference = stored(prediction[b, patch] - values)
            error = stored(math.fsum(difference**2) / len(values))
            weighted.append(error * mask[b, patch])
            weights.append(mask[b, patch])
    total_weight = math.fsum(weights)
    if total_weight == 0.0:
        return 0.0
    return math.fsum(weighted) / total_weight


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Cut (B, C, H, W) images into (B, L, p * p * C) patches.

    Patch ``r * (W / p) + c`` contains ``images[:, :, r*p:(r+1)*p, c*p:(c+1)*p]``, laid
    out with index ``(i * p + j) * C + channel`` for pixel ``(i, j)`` of the patch.
    """
    batch, channels, height, width = images.shape
    p = patch_size
    rows, cols = height // p, width // p
    out = np.empty((batch, rows * cols, p * p * channels), dtype=images.dtype)
    for r in range(rows):
        for c in range(cols):
            for i in range(p):
                for j in range(p):
                    for channel in range(channels):
                        out[:, r * cols + c, (i * p + j) * channels + channel] = images[
                            :, channel, r * p + i, c * p + j
                        ]
    return out


def unpatchify(
    patches: np.ndarray, patch_size: int, *, image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Reassemble (B, L, p * p * C) patches into (B, C, H, W) images; the inverse of
    :func:`patchify`.

    ``C`` is the patch length over ``p * p``; the grid is ``image_size / p``, or
    square when ``image_size`` is None.
    """
    batch, length, patch_length = patches.shape
    p = patch_size
    channels = patch_length // (p * p)
    if image_size is None:
        side = math.isqrt(length)
        image_size = (side * p, side * p)
    height, width = image_size
    rows, cols = height // p, width // p
    out = np.empty((batch, channels, height, width), dtype=patches.dtype)
    for r in range(rows):
        for c in range(cols):
            for i in range(p):
                for j in range(p):
                    for channel in range(channels):
                        out[:, channel, r * p + i, c * p + j] = patches[
                            :, r * cols + c, (i * p + j) * channels + channel
                        ]
    return out
