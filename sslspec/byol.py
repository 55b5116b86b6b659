"""BYOL's regression loss, target-network update and momentum schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sslspec._numerics import normalize_rows
from sslspec._validation import (
    check_collective,
    check_embedding_pair,
    check_int,
    check_real,
    check_real_floating,
    check_same_dtype,
    check_same_shape,
    namespace_of,
)
from sslspec.distributed import Collective, _mean_over_ranks

__all__ = ["byol_loss", "ema_update", "momentum_schedule"]


def byol_loss(
    online_prediction: Any,
    target_projection: Any,
    *,
    collective: Collective | None = None,
) -> Any:
    r"""Compute BYOL's normalised mean squared error between prediction and target.

    For each row, with :math:`\cos(p, z) = p^\top z / (\|p\| \|z\|)`:

    .. math::

        L = \frac{1}{N} \sum_{k=1}^{N}
            \left\| \frac{p_k}{\|p_k\|} - \frac{z_k}{\|z_k\|} \right\|^2
          = \frac{1}{N} \sum_{k=1}^{N} \bigl(2 - 2 \cos(p_k, z_k)\bigr).

    The value lies in ``[0, 4]``. This is one direction of BYOL's loss. The
    official code sums both directions, where each view's online prediction
    regresses the other view's target projection, and blocks the gradient into
    the target network::

        # p1, p2: online network predictions for views 1 and 2
        # z1, z2: target network projections, computed without gradient
        #         (torch: under torch.no_grad() or .detach();
        #          JAX: jax.lax.stop_gradient)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)

    Other conventions are affine maps of this value: lightly's
    ``NegativeCosineSimilarity`` returns ``(byol_loss - 2) / 2``, Edifice returns
    ``byol_loss``, and the official code returns the symmetrised sum above.

    Parameters
    ----------
    online_prediction, target_projection : array of shape (N, D)
        Rows to compare, of the same real floating dtype and device. Rows need not
        be normalised. An all-zero row is treated as the zero vector, so its cosine
        is 0 and its term 2, with finite gradients.
    collective : Collective, optional
        Communication between ranks. With one, every rank returns the mean over
        the global batch. See :mod:`sslspec.distributed`.

    Returns
    -------
    array of shape ()
        The loss, in the dtype, namespace and device of the inputs.

    Raises
    ------
    TypeError
        If the inputs are not real floating arrays of one library and one dtype.
    ValueError
        If the inputs are not 2-D of the same non-empty shape or are on different
        devices.

    References
    ----------
    J.-B. Grill et al., "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning", NeurIPS 2020, arXiv:2006.07733.
    """
    xp = check_embedding_pair(
        "online_prediction", online_prediction, "target_projection", target_projection
    )
    check_collective(collective)

    cosine = xp.sum(
        normalize_rows(xp, online_prediction) * normalize_rows(xp, target_projection),
        axis=1,
    )
    local_loss = 2.0 - 2.0 * xp.mean(cosine)
    return _mean_over_ranks(local_loss, collective)


def ema_update(
    online: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    momentum: float = 0.996,
) -> dict[str, Any]:
    r"""Return the target parameters moved towards the online ones.

    For every name ``k``:

    .. math::

        \text{target}'_k = m \, \text{target}_k + (1 - m) \, \text{online}_k .

    The inputs are not modified. Apply it to trainable parameters only, as BYOL
    does; running statistics such as batch-norm buffers are copied or kept as the
    training code decides.

    Parameters
    ----------
    online, target : mapping of str to array
        Parameters by name, with the same names. Each pair of arrays must have the
        same shape, real floating dtype, library and device.
    momentum : float, default 0.996
        Python number ``m`` in ``[0, 1]``; see :func:`momentum_schedule`. BYOL's
        default base momentum is 0.996.

    Returns
    -------
    dict of str to array
        The updated target parameters, in the order of ``target``, each in the
        dtype, namespace and device of its inputs.

    Raises
    ------
    TypeError
        If an argument is not a mapping, an entry is not a real floating array, or
        a pair of entries differs in library or dtype.
    ValueError
        If the names differ (the error lists them), a pair of entries differs in
        shape or device, or ``momentum`` is outside ``[0, 1]``.
    """
    for name, parameters in (("online", online), ("target", target)):
        if not isinstance(parameters, Mapping):
            raise TypeError(
                f"{name} must be a mapping from parameter name to array, got an "
                f"object of type {type(parameters).__qualname__}"
            )
    momentum = check_real("momentum", momentum, minimum=0.0, maximum=1.0)

    only_online = [key for key in online if key not in target]
    only_target = [key for key in target if key not in online]
    if only_online or only_target:
        raise ValueError(
            "online and target must contain the same parameter names; "
            f"names only in online: {only_online}, names only in target: "
            f"{only_target}"
        )

    for key in target:
        online_name = f"online[{key!r}]"
        target_name = f"target[{key!r}]"
        xp = namespace_of(**{online_name: online[key], target_name: target[key]})
        check_real_floating(xp, online_name, online[key])
        check_real_floating(xp, target_name, target[key])
        check_same_shape(online_name, online[key], target_name, target[key])
        check_same_dtype(online_name, online[key], target_name, target[key])

    return {
        key: momentum * target[key] + (1.0 - momentum) * online[key] for key in target
    }


def momentum_schedule(
    step: int,
    total_steps: int,
    *,
    base_momentum: float = 0.996,
    final_momentum: float = 1.0,
) -> float:
    r"""Return BYOL's cosine-scheduled target momentum for a training step.

    With :math:`k` the step clamped to ``[0, K]`` and :math:`K` ``total_steps``:

    .. math::

        m_k = m_\text{final}
              - (m_\text{final} - m_\text{base})
                \frac{\cos(\pi k / K) + 1}{2} .

    The momentum equals ``base_momentum`` at step 0, rises monotonically, and
    equals ``final_momentum`` from step ``K`` on. With the defaults this is the
    official BYOL schedule. lightly's ``cosine_schedule`` divides by ``K - 1``
    instead of ``K``, and solo-learn does not clamp the step, so its momentum
    falls again after ``K``.

    Parameters
    ----------
    step : int
        Current step. Negative steps are clamped to 0.
    total_steps : int
        Number of steps ``K`` over which the momentum rises, at least 1.
    base_momentum : float, default 0.996
        Momentum at step 0, in ``[0, 1]``.
    final_momentum : float, default 1.0
        Momentum from step ``K`` on, in ``[base_momentum, 1]``.

    Returns
    -------
    float
        The momentum, a Python float.

    Raises
    ------
    TypeError
        If ``step`` or ``total_steps`` is not an integer, or a momentum is not a
        real number.
    ValueError
        If ``total_steps`` is below 1, a momentum is outside ``[0, 1]``, or
        ``base_momentum > final_momentum``.
    """
    step = check_int("step", step)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    base_momentum = check_real("base_momentum", base_momentum, minimum=0.0, maximum=1.0)
    final_momentum = check_real(
        "final_momentum", final_momentum, minimum=0.0, maximum=1.0
    )
    if base_momentum > final_momentum:
        raise ValueError(
            f"base_momentum must be <= final_momentum, got base_momentum="
            f"{base_momentum} and final_momentum={final_momentum}"
        )

    step = min(max(step, 0), total_steps)
    if step == 0:
        return base_momentum
    if step == total_steps:
        return final_momentum

    weight = (math.cos(math.pi * step / total_steps) + 1.0) / 2.0
    momentum = final_momentum - (final_momentum - base_momentum) * weight
    # Rounding in the line above can step outside [base, final] by one unit in the
    # last place. Clamping keeps the schedule monotone with exact end points.
    return min(max(momentum, base_momentum), final_momentum)
