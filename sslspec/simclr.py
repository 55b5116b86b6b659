"""SimCLR's normalised temperature-scaled cross-entropy loss (NT-Xent)."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from sslspec._numerics import normalize_rows
from sslspec._validation import check_collective, check_embedding_pair, check_real
from sslspec.distributed import Collective, _mean_over_ranks

__all__ = ["nt_xent_loss"]


def nt_xent_loss(
    z_i: Any,
    z_j: Any,
    *,
    temperature: float = 0.5,
    collective: Collective | None = None,
) -> Any:
    r"""Compute the NT-Xent contrastive loss of two views of a batch.

    Row ``k`` of ``z_i`` and row ``k`` of ``z_j`` are two views of sample ``k``.
    With :math:`u_1, \dots, u_{2N}` the L2-normalised rows of ``z_i`` then
    ``z_j``, :math:`s_{ab} = u_a^\top u_b / \tau` and :math:`p(a)` the index of
    the other view of anchor ``a``:

    .. math::

        \ell_a = -s_{a,p(a)} + \log \sum_{b \ne a} \exp(s_{ab}), \qquad
        L = \frac{1}{2N} \sum_{a=1}^{2N} \ell_a .

    Each anchor's similarity with itself is excluded from the denominator and its
    positive is included, as in Algorithm 1 of the SimCLR paper. lightly's
    ``NTXentLoss`` returns the same value. The official TensorFlow 2 code returns
    twice this value. The log-sum-exp subtracts ``1 / temperature``, an upper bound
    of every logit, where no row can underflow to ``log(0)`` in the dtype, and each
    row's maximum at colder temperatures, so no exponential overflows.

    Parameters
    ----------
    z_i, z_j : array of shape (N, D)
        Embeddings of the two views, of the same real floating dtype and device.
        Rows need not be normalised. A row of zeros stays zero after
        normalisation, with finite values and gradients.
    temperature : float, default 0.5
        Positive, finite Python number :math:`\tau` (lightly's default; the SimCLR
        paper uses 0.1 to 0.5).
    collective : Collective, optional
        Communication between ranks. With one, both views are gathered from every
        rank, each local anchor is contrasted with all ``2 * N * world_size``
        gathered embeddings, and every rank returns the loss of the global batch.
        See :mod:`sslspec.distributed` for the gradient convention.

    Returns
    -------
    array of shape ()
        The loss, in the dtype, namespace and device of ``z_i``.

    Raises
    ------
    TypeError
        If the views are not real floating arrays of one library and one dtype, or
        ``temperature`` is not a real number.
    ValueError
        If the views are not 2-D of the same non-empty shape, are on different
        devices, or ``temperature`` is not positive and finite.

    Notes
    -----
    Each row is divided by ``max(||row||, floor)`` with ``floor = 1e-12``, except in
    float16, where the floor is ``sqrt(smallest normal) ~ 7.8e-3`` because 1e-24
    underflows.

    References
    ----------
    T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020, arXiv:2002.05709.
    """
    xp = check_embedding_pair("z_i", z_i, "z_j", z_j)
    temperature = check_real(
        "temperature", temperature, minimum=0.0, minimum_inclusive=False
    )
    world_size = check_collective(collective)

    local_size = z_i.shape[0]
    global_size = local_size * world_size
    offset = 0 if collective is None else collective.rank * local_size
    device = array_api_compat.device(z_i)

    anchors = normalize_rows(xp, xp.concat([z_i, z_j], axis=0))
    u_i = anchors[:local_size, :]
    u_j = anchors[local_size:, :]
    if collective is None:
        candidates = anchors
    else:
        candidates = xp.concat(
            [collective.all_gather(u_i), collective.all_gather(u_j)], axis=0
        )

    # Anchor k of view i sits at candidate column offset + k, anchor k of view j at
    # global_size + offset + k. offset may be a traced 0-D array (JAX), so the
    # mask is built by comparison rather than by slicing.
    local_index = xp.arange(local_size, device=device)
    self_columns = xp.concat(
        [local_index + offset, local_index + (global_size + offset)], axis=0
    )
    columns = xp.arange(2 * global_size, device=device)
    is_self = self_columns[:, None] == columns[None, :]

    logits = (anchors * (1.0 / temperature)) @ candidates.T
    logits = xp.where(is_self, -xp.inf, logits)
    if _bound_shift_is_safe(xp, logits.dtype, temperature):
        shift = 1.0 / temperature
        log_denominator = xp.log(xp.sum(xp.exp(logits - shift), axis=1)) + shift
    else:
        row_max = xp.max(logits, axis=1, keepdims=True)
        log_denominator = (
            xp.log(xp.sum(xp.exp(logits - row_max), axis=1)) + row_max[:, 0]
        )

    # Both anchors of pair k share the positive similarity u_i[k] . u_j[k] / tau.
    positive = xp.sum(u_i * u_j, axis=1) * (1.0 / temperature)
    local_loss = xp.mean(log_denominator) - xp.mean(positive)
    return _mean_over_ranks(local_loss, collective)


def _bound_shift_is_safe(xp: Any, dtype: Any, temperature: float) -> bool:
    """Return whether the log-sum-exp may shift every row by ``1 / temperature``.

    Up to rounding, no logit exceeds ``1 / temperature``, the logit of two parallel
    unit rows, so that shift never overflows. As a constant it adds nothing to the
    backward pass. Every logit is at least ``-1 / temperature``, so no row
    underflows while ``exp(-2 / temperature)`` is a normal number of the dtype:
    temperature >= 0.023 in float32 and bfloat16, >= 0.0029 in float64, >= 0.21 in
    float16. Colder temperatures shift each row by its maximum, which keeps the
    largest term at 1.
    """
    smallest_normal = float(xp.finfo(dtype).smallest_normal)
    return 2.0 / temperature <= -math.log(smallest_normal)
