"""Numerical building blocks shared by the losses, in pure Array API calls."""

from __future__ import annotations

from typing import Any

# Lower bound on the squared L2 norm before dividing by the norm: a norm floor of
# 1e-12, the default of torch.nn.functional.normalize and of lightly's NT-Xent.
_SQUARED_NORM_FLOOR = 1e-24


def representable_eps(xp: Any, eps: float, dtype: Any) -> float:
    """Return ``eps``, raised to the smallest normal number of ``dtype`` if below it.

    An epsilon below the smallest normal number is subnormal (1e-5 and 1e-6 in
    float16, whose smallest normal is about 6.1e-5) or zero. Hardware and compilers
    that flush subnormals to zero would then turn a guarded ``0 / sqrt(0 + eps)``
    into ``0 / 0``. Raising the epsilon changes a result by less than the
    resolution of the dtype wherever the guarded quantity is not close to zero.
    """
    return max(eps, float(xp.finfo(dtype).smallest_normal))


def normalize_rows(xp: Any, x: Any) -> Any:
    """Divide each row of ``x`` by ``max(||row||_2, floor)``.

    ``floor`` is 1e-12 where the dtype can represent its square as a normal number
    and ``sqrt(smallest normal)`` otherwise (about 7.8e-3 in float16). The floor is
    applied to the squared norm, so an all-zero row becomes zero with a finite
    gradient: no square root of zero enters the gradient.
    """
    squared_floor = representable_eps(xp, _SQUARED_NORM_FLOOR, x.dtype)
    squared_norm = xp.sum(xp.square(x), axis=1, keepdims=True)
    # Multiplying by the inverse norm has a cheaper gradient than dividing.
    return x * (1.0 / xp.sqrt(xp.clip(squared_norm, min=squared_floor)))


def off_diagonal(xp: Any, matrix: Any) -> Any:
    """Return the off-diagonal entries of a square 2-D array as a (d - 1, d) array.

    In row-major order the diagonal entries sit every ``d + 1`` elements. After the
    first element is dropped, the remaining ``d * d - 1 = (d - 1) * (d + 1)``
    elements form ``d - 1`` rows of ``d + 1`` whose last entry is the next diagonal
    entry, so dropping the last column leaves exactly the off-diagonal entries.
    Summing them is exact, unlike subtracting the diagonal's share from a total.
    """
    size = matrix.shape[0]
    flat = xp.reshape(matrix, (size * size,))
    return xp.reshape(flat[1:], (size - 1, size + 1))[:, :-1]
