"""Analytic float64 gradients of the reference losses in :mod:`.reference`.

Each function returns the gradient of the matching loss with respect to each of its
array inputs, derived by hand from the equations in :mod:`.reference`. The package's
own tests check every one against central finite differences of the reference
losses, so the two are independent checks of each other.

Two results recur below. For a row normalised as ``u = x / n`` with
``n = ||x|| > floor``, the vector-Jacobian product is ``(g - u (u . g)) / n``; below
the floor the divisor is the constant ``floor`` and the product is ``g / floor``.
For a column standardised as ``y = (x - mean) / s`` with
``s = sqrt(sum((x - mean) ** 2) / (N - ddof) + eps)``, it is
``(g - mean(g)) / s - (x - mean) * sum(g * (x - mean)) / ((N - ddof) * s ** 3)``.
"""

from __future__ import annotations

import numpy as np

from sslspec_conformance.reference import BARLOW_EPS, NORM_FLOOR, l2_normalize_rows
from sslspec_conformance.rounding import stored

__all__ = [
    "nt_xent_loss",
    "byol_loss",
    "barlow_twins_loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "vicreg_loss",
    "reconstruction_loss",
]


def _float64(x: object) -> np.ndarray:
    return np.array(x, dtype=np.float64, copy=True)


def normalize_rows_vjp(
    x: np.ndarray, g: np.ndarray, *, floor: float = NORM_FLOOR
) -> np.ndarray:
    """Pull ``g`` (gradient with respect to the normalised rows) back to ``x``."""
    out = np.empty_like(g)
    for k in range(x.shape[0]):
        norm = stored(float(np.sqrt(x[k] @ x[k])))
        if norm > floor:
            u = stored(x[k] / norm)
            out[k] = stored((stored(g[k]) - stored(u * stored(u @ g[k]))) / norm)
        else:
            out[k] = stored(g[k] / floor)
    return out


def standardize_vjp(x: np.ndarray, g: np.ndarray, *, eps: float, ddof: int, axis: int):
    """Pull ``g`` back through standardisation of ``x`` along ``axis``."""
    count = x.shape[axis]
    centred = stored(x - stored(x.mean(axis=axis, keepdims=True)))
    variance = stored((centred**2).sum(axis=axis, keepdims=True) / (count - ddof))
    scale = stored(np.sqrt(variance + eps))
    projection = stored((g * centred).sum(axis=axis, keepdims=True))
    direct = stored(stored(g - stored(g.mean(axis=axis, keepdims=True))) / scale)
    through_scale = stored(centred * projection / ((count - ddof) * scale**3))
    return direct - through_scale


def nt_xent_loss(z_i, z_j, *, temperature: float = 0.5, norm_floor: float = NORM_FLOOR):
    """Return the gradients of NT-Xent with respect to ``z_i`` and ``z_j``.

    With ``D[a, b] = (softmax_{b != a}(s_a)[b] - [b == p(a)]) / 2N`` the gradient of
    the loss with respect to the matrix of similarities, the gradient with respect
    to the normalised rows is ``(D + D^T) u / tau``.
    """
    x = np.concatenate([_float64(z_i), _float64(z_j)])
    size = x.shape[0]
    half = size // 2
    u = l2_normalize_rows(x, floor=norm_floor)
    logits = stored(u @ u.T / temperature)
    d = np.zeros((size, size))
    for a in range(size):
        others = np.array([b for b in range(size) if b != a])
        shifted = stored(np.exp(logits[a, others] - logits[a, others].max()))
        d[a, others] = stored(shifted / stored(shifted.sum()))
        d[a, (a + half) % size] -= 1.0
    d = stored(d / size)
    upstream = stored((d + d.T) @ u / temperature)
    g = normalize_rows_vjp(x, upstream, floor=norm_floor)
    return g[:half], g[half:]


def byol_loss(online_prediction, target_projection, *, norm_floor: float = NORM_FLOOR):
    """Return the gradients of BYOL's loss with respect to both inputs."""
    p = _float64(online_prediction)
    z = _float64(target_projection)
    size = p.shape[0]
    u = l2_normalize_rows(p, floor=norm_floor)
    v = l2_normalize_rows(z, floor=norm_floor)
    return (
        normalize_rows_vjp(p, -2.0 * v / size, floor=norm_floor),
        normalize_rows_vjp(z, -2.0 * u / size, floor=norm_floor),
    )


def _standardize(z: np.ndarray, eps: float) -> np.ndarray:
    centred = stored(z - stored(z.mean(axis=0)))
    return stored(centred / np.sqrt(stored((centred**2).mean(axis=0)) + eps))


def barlow_twins_loss(
    z_a, z_b, *, lambda_param: float = 0.005, eps: float = BARLOW_EPS
):
    """Return the gradients of the Barlow Twins loss with respect to both views.

    ``dL/dc`` is ``-2 (1 - c_ii)`` on the diagonal and ``2 lambda c_ij`` off it;
    with ``c = a^T b / N``, ``dL/da = b (dL/dc)^T / N`` and ``dL/db = a dL/dc / N``.
    """
    z_a = _float64(z_a)
    z_b = _float64(z_b)
    size = z_a.shape[0]
    a = _standardize(z_a, eps)
    b = _standardize(z_b, eps)
    c = stored(a.T @ b / size)
    dc = 2.0 * lambda_param * c
    np.fill_diagonal(dc, -2.0 * (1.0 - np.diag(c)))
    dc = stored(dc)
    grad_a = stored(b @ dc.T / size)
    grad_b = stored(a @ dc / size)
    return (
        standardize_vjp(z_a, grad_a, eps=eps, ddof=0, axis=0),
        standardize_vjp(z_b, grad_b, eps=eps, ddof=0, axis=0),
    )


def invariance_loss(z_a, z_b):
    """Return the gradients of the mean squared difference."""
    difference = stored(_float64(z_a) - _float64(z_b))
    grad = 2.0 * difference / difference.size
    return grad, -grad


def variance_loss(z, *, target_std: float = 1.0, eps: float = 1e-4):
    """Return the gradient of VICReg's variance hinge, a one-element tuple.

    The hinge passes no gradient where ``target_std - std <= 0``, as ReLU's
    derivative at 0 is 0 in PyTorch and JAX.
    """
    z = _float64(z)
    size, dim = z.shape
    centred = stored(z - stored(z.mean(axis=0)))
    std = stored(np.sqrt(stored((centred**2).sum(axis=0) / (size - 1)) + eps))
    active = (target_std - std) > 0.0
    grad = -(active / (dim * std)) * centred / (size - 1)
    return (grad,)


def covariance_loss(z):
    """Return the gradient of VICReg's covariance term, a one-element tuple.

    With ``C = Zc^T Zc / (N - 1)`` and ``O`` its off-diagonal part,
    ``dL/dZc = 4 Zc O / (D (N - 1))``; centring passes it through unchanged because
    the columns of ``Zc O`` already sum to zero.
    """
    z = _float64(z)
    size, dim = z.shape
    centred = stored(z - stored(z.mean(axis=0)))
    covariance = stored(centred.T @ centred / (size - 1))
    np.fill_diagonal(covariance, 0.0)
    return (stored(4.0 * centred @ covariance / (dim * (size - 1))),)


def vicreg_loss(
    z_a,
    z_b,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
):
    """Return the gradients of the VICReg loss with respect to both views."""
    invariance_a, invariance_b = invariance_loss(z_a, z_b)
    grads = []
    for z, invariance in ((z_a, invariance_a), (z_b, invariance_b)):
        (variance,) = variance_loss(z)
        (covariance,) = covariance_loss(z)
        grads.append(
            invariance_weight * invariance
            + variance_weight * variance / 2.0
            + covariance_weight * covariance
        )
    return tuple(grads)


def reconstruction_loss(
    prediction, target, mask, *, norm_pix_loss: bool = False, eps: float = 1e-6
):
    """Return the gradients of MAE's reconstruction loss with respect to
    ``prediction`` and ``target`` (the mask is not differentiated)."""
    prediction = _float64(prediction)
    target = _float64(target)
    mask = _float64(mask)
    patch_dim = target.shape[-1]
    total_weight = mask.sum()
    if total_weight == 0.0:
        zeros = np.zeros_like(prediction)
        return zeros, zeros.copy()
    if norm_pix_loss:
        centred = stored(target - stored(target.mean(axis=-1, keepdims=True)))
        variance = stored((centred**2).sum(axis=-1, keepdims=True) / (patch_dim - 1))
        normalized = stored(centred / np.sqrt(variance + eps))
    else:
        normalized = target
    difference = stored(prediction - normalized)
    weights = stored(mask / stored(total_weight))
    grad_prediction = stored(2.0 * difference / patch_dim * weights[..., None])
    grad_normalized = -grad_prediction
    if norm_pix_loss:
        grad_target = standardize_vjp(target, grad_normalized, eps=eps, ddof=1, axis=-1)
    else:
        grad_target = grad_normalized
    return grad_prediction, grad_target
