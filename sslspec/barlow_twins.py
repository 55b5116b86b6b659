"""Barlow Twins' redundancy-reduction loss."""

from __future__ import annotations

import math
from typing import Any

from sslspec._numerics import off_diagonal, representable_eps
from sslspec._validation import (
    check_collective,
    check_embedding_pair,
    check_global_batch,
    check_real,
)
from sslspec.distributed import Collective, _mean_over_ranks, _sum_over_ranks

__all__ = ["barlow_twins_loss"]

# Added to the batch variance inside the square root, as torch.nn.BatchNorm1d's
# default eps, which the authors' code uses to standardise each dimension.
_BATCH_NORM_EPS = 1e-5


def barlow_twins_loss(
    z_a: Any,
    z_b: Any,
    *,
    lambda_param: float = 0.005,
    collective: Collective | None = None,
) -> Any:
    r"""Compute the Barlow Twins loss of two views of a batch.

    Each dimension of each view is standardised over the batch with the biased
    variance, then the cross-correlation matrix of the two views is pushed towards
    the identity:

    .. math::

        \hat z_{kd} = \frac{z_{kd} - \mu_d}{\sqrt{\sigma_d^2 + 10^{-5}}}, \quad
        C = \frac{1}{N} \hat z_a^\top \hat z_b, \quad
        L = \sum_i (1 - C_{ii})^2 + \lambda \sum_i \sum_{j \ne i} C_{ij}^2 ,

    with :math:`\mu_d` and :math:`\sigma_d^2 = \frac{1}{N}\sum_k (z_{kd} -
    \mu_d)^2` the batch mean and biased batch variance. This is what the authors'
    code computes with ``BatchNorm1d(affine=False)`` in training mode. A constant
    dimension standardises to zeros, so its diagonal term is 1 and the loss and
    gradients stay finite.

    Parameters
    ----------
    z_a, z_b : array of shape (N, D)
        Embeddings of the two views, of the same real floating dtype and device,
        with a global batch of at least 2 samples.
    lambda_param : float, default 0.005
        Weight :math:`\lambda \ge 0` of the off-diagonal (redundancy) term. The
        paper and lightly use 5e-3; the authors' command line defaults to 0.0051.
    collective : Collective, optional
        Communication between ranks. With one, the means, variances and ``C`` are
        computed over the global batch and every rank returns the same loss. See
        :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The loss, in the dtype, namespace and device of ``z_a``.

    Raises
    ------
    TypeError
        If the views are not real floating arrays of one library and one dtype, or
        ``lambda_param`` is not a real number.
    ValueError
        If the views are not 2-D of the same non-empty shape, are on different
        devices, the global batch has fewer than 2 samples, or ``lambda_param`` is
        negative or not finite.

    Notes
    -----
    In float16 the epsilon is raised from 1e-5 to the smallest normal float16
    number (about 6.1e-5), because 1e-5 is subnormal there.

    References
    ----------
    J. Zbontar, L. Jing, I. Misra, Y. LeCun, S. Deny, "Barlow Twins:
    Self-Supervised Learning via Redundancy Reduction", ICML 2021,
    arXiv:2103.03230.
    """
    xp = check_embedding_pair("z_a", z_a, "z_b", z_b)
    lambda_param = check_real("lambda_param", lambda_param, minimum=0.0)
    world_size = check_collective(collective)
    global_size = check_global_batch("z_a", z_a, world_size, minimum=2)

    # Each standardised view is also scaled by 1 / sqrt(N), so that the product of
    # the two is C. Splitting 1 / N between both factors keeps small entries out
    # of float16's subnormal range for large batches.
    eps = representable_eps(xp, _BATCH_NORM_EPS, z_a.dtype)
    scale = 1.0 / math.sqrt(global_size)
    scaled_a = _standardize(xp, z_a, eps, scale, collective)
    scaled_b = _standardize(xp, z_b, eps, scale, collective)
    correlation = _sum_over_ranks(scaled_a.T @ scaled_b, collective)

    # The diagonal of C is computed from the (N, D) factors: taking it from the
    # (D, D) matrix would cost a D x D gradient scatter in the backward pass.
    on_diagonal = 1.0 - _sum_over_ranks(xp.sum(scaled_a * scaled_b, axis=0), collective)
    redundancy = off_diagonal(xp, correlation)
    return xp.sum(xp.square(on_diagonal)) + lambda_param * xp.sum(xp.square(redundancy))


def _standardize(
    xp: Any, z: Any, eps: float, scale: float, collective: Collective | None
) -> Any:
    """Standardise each column over the global batch, then multiply by ``scale``.

    The variance is the biased one, as in batch normalisation.
    """
    centred = z - _mean_over_ranks(xp.mean(z, axis=0), collective)
    variance = _mean_over_ranks(xp.mean(xp.square(centred), axis=0), collective)
    # Multiplying by a per-column factor has a cheaper gradient than dividing.
    return centred * (scale / xp.sqrt(variance + eps))
