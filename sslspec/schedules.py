"""Learning-rate schedule shared by every backend's trainer."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine_lr"]


def warmup_cosine_lr(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    final_lr: float = 0.0,
) -> float:
    """Return the learning rate for optimisation step ``step`` (counted from 0).

    The rate rises linearly from ``base_lr / warmup_steps`` at step 0 to
    ``base_lr`` at step ``warmup_steps - 1``, then follows a half cosine from
    ``base_lr`` down to ``final_lr`` at step ``total_steps``::

        lr = final_lr + (base_lr - final_lr) * (1 + cos(pi * t)) / 2,
        t = (step - warmup_steps) / (total_steps - warmup_steps)

    Steps past ``total_steps`` keep ``final_lr``. With ``warmup_steps = 0`` the
    cosine starts at step 0.

    Raises
    ------
    ValueError
        If a step count is negative or ``warmup_steps`` exceeds ``total_steps``.
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(
            f"warmup_steps and total_steps must be non-negative, got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must not exceed total_steps={total_steps}"
        )

    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps

    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
