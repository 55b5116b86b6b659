"""Model of rounding for the reference: perturb every stored intermediate value.

The reference functions pass each intermediate array they compute (normalised rows,
logits, column means, the cross-correlation matrix, ...) through :func:`stored`.
Normally that returns the value unchanged. Inside :func:`perturbed` it multiplies
each entry by ``1 + step * delta`` with ``delta`` uniform on ``[-1, 1]``, which is
the standard model of floating-point arithmetic: every operation's result carries
a relative error of at most one unit roundoff. Comparing a perturbed evaluation
with an exact one estimates how far rounding in a dtype can move the result, which
sets the scale of the tolerance (see :mod:`sslspec_conformance.tolerances`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["stored", "perturbed"]

_perturbation: tuple[float, np.random.Generator | None] | None = None


def _factors(shape: tuple[int, ...]) -> Any:
    step, rng = _perturbation
    if rng is None:
        return 1.0 + step
    return 1.0 + step * rng.uniform(-1.0, 1.0, shape)


def stored(value: Any) -> Any:
    """Return ``value``, or inside :func:`perturbed` a perturbed copy of it."""
    if _perturbation is None:
        return value
    if np.ndim(value) == 0:
        return float(value) * float(_factors(()))
    array = np.asarray(value, dtype=np.float64)
    return array * _factors(array.shape)


@contextmanager
def perturbed(step: float, rng: np.random.Generator | None) -> Iterator[None]:
    """Perturb every value passed to :func:`stored` by a relative ``step``.

    With a generator each entry gets its own random factor. With ``rng=None``
    every entry is multiplied by ``1 + step``, which models a rounding error shared
    by many values, such as a rounded ``1 / temperature``.
    """
    global _perturbation
    previous = _perturbation
    _perturbation = (step, rng)
    try:
        yield
    finally:
        _perturbation = previous
