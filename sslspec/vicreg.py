"""VICReg's variance-invariance-covariance loss and its three terms."""

from __future__ import annotations

import math
from typing import Any

from sslspec._numerics import off_diagonal, representable_eps
from sslspec._validation import (
    check_collective,
    check_embedding_pair,
    check_embeddings,
    check_global_batch,
    check_real,
)
from sslspec.distributed import Collective, _mean_over_ranks, _sum_over_ranks

__all__ = ["covariance_loss", "invariance_loss", "variance_loss", "vicreg_loss"]

# The authors' code adds 1e-4 to the variance before the square root.
_VARIANCE_EPS = 1e-4


def vicreg_loss(
    z_a: Any,
    z_b: Any,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    collective: Collective | None = None,
) -> Any:
    r"""Compute the VICReg loss of two views of a batch.

    .. math::

        L = \lambda \, I(z_a, z_b)
          + \mu \, \frac{V(z_a) + V(z_b)}{2}
          + \nu \, \bigl(C(z_a) + C(z_b)\bigr),

    with :math:`I`, :math:`V` and :math:`C` the terms computed by
    :func:`invariance_loss`, :func:`variance_loss` (target standard deviation 1,
    epsilon 1e-4) and :func:`covariance_loss`. The two variance terms are averaged
    and the two covariance terms summed, as in the authors' ``main_vicreg.py``
    and lightly. The paper's equation and solo-learn sum the variance terms, which
    equals this loss with ``variance_weight`` doubled.

    Parameters
    ----------
    z_a, z_b : array of shape (N, D)
        Embeddings of the two views, of the same real floating dtype and device,
        with a global batch of at least 2 samples.
    invariance_weight, variance_weight, covariance_weight : float
        Finite, non-negative Python numbers :math:`\lambda`, :math:`\mu`,
        :math:`\nu`, by default 25, 25 and 1 as in the paper.
    collective : Collective, optional
        Communication between ranks. With one, all three terms are computed over
        the global batch and every rank returns the same loss. See
        :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The loss, in the dtype, namespace and device of ``z_a``.

    Raises
    ------
    TypeError
        If the views are not real floating arrays of one library and one dtype, or
        a weight is not a real number.
    ValueError
        If the views are not 2-D of the same non-empty shape, are on different
        devices, the global batch has fewer than 2 samples, or a weight is negative
        or not finite.

    References
    ----------
    A. Bardes, J. Ponce, Y. LeCun, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", ICLR 2022, arXiv:2105.04906.
    """
    xp = check_embedding_pair("z_a", z_a, "z_b", z_b)
    invariance_weight = check_real("invariance_weight", invariance_weight, minimum=0.0)
    variance_weight = check_real("variance_weight", variance_weight, minimum=0.0)
    covariance_weight = check_real("covariance_weight", covariance_weight, minimum=0.0)
    world_size = check_collective(collective)
    global_size = check_global_batch("z_a", z_a, world_size, minimum=2)

    eps = representable_eps(xp, _VARIANCE_EPS, z_a.dtype)
    centred_a = _centre(xp, z_a, collective)
    centred_b = _centre(xp, z_b, collective)

    invariance = _invariance(xp, z_a, z_b, collective)
    variance = (
        _variance_term(xp, centred_a, global_size, 1.0, eps, collective)
        + _variance_term(xp, centred_b, global_size, 1.0, eps, collective)
    ) / 2.0
    covariance = _covariance_term(
        xp, centred_a, global_size, collective
    ) + _covariance_term(xp, centred_b, global_size, collective)
    return (
        invariance_weight * invariance
        + variance_weight * variance
        + covariance_weight * covariance
    )


def invariance_loss(z_a: Any, z_b: Any, *, collective: Collective | None = None) -> Any:
    r"""Compute VICReg's invariance term, the mean squared error of two views.

    .. math::

        I(z_a, z_b) = \frac{1}{N D} \sum_{k=1}^{N} \sum_{d=1}^{D}
                      (z_{a,kd} - z_{b,kd})^2 .

    Parameters
    ----------
    z_a, z_b : array of shape (N, D)
        Embeddings of the two views, of the same real floating dtype and device.
    collective : Collective, optional
        Communication between ranks. With one, every rank returns the mean over
        the global batch. See :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The term, in the dtype, namespace and device of ``z_a``.

    Raises
    ------
    TypeError
        If the views are not real floating arrays of one library and one dtype.
    ValueError
        If the views are not 2-D of the same non-empty shape or are on different
        devices.
    """
    xp = check_embedding_pair("z_a", z_a, "z_b", z_b)
    check_collective(collective)
    return _invariance(xp, z_a, z_b, collective)


def variance_loss(
    z: Any,
    *,
    target_std: float = 1.0,
    eps: float = 1e-4,
    collective: Collective | None = None,
) -> Any:
    r"""Compute VICReg's variance term, a hinge on each dimension's batch std.

    .. math::

        V(z) = \frac{1}{D} \sum_{d=1}^{D}
               \max\Bigl(0, \gamma - \sqrt{\operatorname{Var}(z_{:,d}) +
               \epsilon}\Bigr),

    with :math:`\operatorname{Var}` the unbiased batch variance (divided by
    ``N - 1``), as in the authors' code.

    Parameters
    ----------
    z : array of shape (N, D)
        Embeddings of one view, of a real floating dtype, with a global batch of at
        least 2 samples.
    target_std : float, default 1.0
        Target standard deviation :math:`\gamma > 0`.
    eps : float, default 1e-4
        Positive :math:`\epsilon` that keeps the square root's gradient finite for
        a constant dimension. A value below the smallest normal number of the
        dtype is raised to it.
    collective : Collective, optional
        Communication between ranks. With one, the variance is that of the global
        batch and every rank returns the same term. See :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The term, in the dtype, namespace and device of ``z``.

    Raises
    ------
    TypeError
        If ``z`` is not a real floating array, or ``target_std`` or ``eps`` is not
        a real number.
    ValueError
        If ``z`` is not a non-empty 2-D array, the global batch has fewer than 2
        samples, or ``target_std`` or ``eps`` is not positive and finite.
    """
    xp = check_embeddings("z", z)
    target_std = check_real(
        "target_std", target_std, minimum=0.0, minimum_inclusive=False
    )
    eps = check_real("eps", eps, minimum=0.0, minimum_inclusive=False)
    world_size = check_collective(collective)
    global_size = check_global_batch("z", z, world_size, minimum=2)

    eps = representable_eps(xp, eps, z.dtype)
    centred = _centre(xp, z, collective)
    return _variance_term(xp, centred, global_size, target_std, eps, collective)


def covariance_loss(z: Any, *, collective: Collective | None = None) -> Any:
    r"""Compute VICReg's covariance term, the squared off-diagonal covariances.

    .. math::

        K = \frac{1}{N - 1} \sum_{k=1}^{N} (z_k - \bar z)(z_k - \bar z)^\top,
        \qquad
        C(z) = \frac{1}{D} \sum_{i \ne j} K_{ij}^2 ,

    as in the authors' code (the covariance with ``N - 1``, divided by the
    dimension ``D``).

    Parameters
    ----------
    z : array of shape (N, D)
        Embeddings of one view, of a real floating dtype, with a global batch of at
        least 2 samples.
    collective : Collective, optional
        Communication between ranks. With one, the covariance is that of the global
        batch and every rank returns the same term. See :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The term, in the dtype, namespace and device of ``z``.

    Raises
    ------
    TypeError
        If ``z`` is not a real floating array.
    ValueError
        If ``z`` is not a non-empty 2-D array or the global batch has fewer than 2
        samples.
    """
    xp = check_embeddings("z", z)
    world_size = check_collective(collective)
    global_size = check_global_batch("z", z, world_size, minimum=2)

    centred = _centre(xp, z, collective)
    return _covariance_term(xp, centred, global_size, collective)


def _invariance(xp: Any, z_a: Any, z_b: Any, collective: Collective | None) -> Any:
    return _mean_over_ranks(xp.mean(xp.square(z_a - z_b)), collective)


def _centre(xp: Any, z: Any, collective: Collective | None) -> Any:
    """Subtract the global batch mean of each column."""
    return z - _mean_over_ranks(xp.mean(z, axis=0), collective)


def _variance_term(
    xp: Any,
    centred: Any,
    global_size: int,
    target_std: float,
    eps: float,
    collective: Collective | None,
) -> Any:
    # The global mean of squares times N / (N - 1) is the unbiased variance.
    mean_square = _mean_over_ranks(xp.mean(xp.square(centred), axis=0), collective)
    variance = mean_square * (global_size / (global_size - 1))
    std = xp.sqrt(variance + eps)
    return xp.mean(xp.clip(target_std - std, min=0.0))


def _covariance_term(
    xp: Any, centred: Any, global_size: int, collective: Collective | None
) -> Any:
    # Scaling each factor by 1 / sqrt(N - 1) before the product keeps the entries
    # of the local product within float16 range for large batches.
    scaled = centred * (1.0 / math.sqrt(global_size - 1))
    covariance = _sum_over_ranks(scaled.T @ scaled, collective)
    redundancy = off_diagonal(xp, covariance)
    return xp.sum(xp.square(redundancy)) / centred.shape[1]
