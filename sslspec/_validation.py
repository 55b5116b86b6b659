"""Argument checks shared by the losses.

Every check reads only Python values, shapes, dtypes and devices, never array
values, so the checks run unchanged under ``jax.jit`` and ``torch.compile`` and
before any computation starts.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import array_api_compat

from sslspec.distributed import Collective


def namespace_of(**arrays: Any) -> Any:
    """Return the array namespace that all the named arrays share.

    Raises
    ------
    TypeError
        If an argument is not an array of an Array API library, or if two arguments
        come from different libraries.
    ValueError
        If two arguments are on different known devices.
    """
    namespaces = {}
    for name, x in arrays.items():
        try:
            namespaces[name] = array_api_compat.array_namespace(x)
        except TypeError:
            raise TypeError(
                f"{name} must be an array of a library that supports the Array API "
                f"standard (NumPy, PyTorch, JAX, CuPy, array-api-strict), "
                f"got an object of type {_type_name(x)}"
            ) from None

    names = list(arrays)
    first = names[0]
    xp = namespaces[first]
    first_device = array_api_compat.device(arrays[first])
    for name in names[1:]:
        if namespaces[name] is not xp:
            raise TypeError(
                f"{first} and {name} must be arrays of the same library, got "
                f"{_type_name(arrays[first])} and {_type_name(arrays[name])}"
            )
        device = array_api_compat.device(arrays[name])
        # The device of an array traced by jax.jit is unknown (None), and JAX
        # places traced and concrete arrays itself, so only known devices are
        # compared.
        if device is not None and first_device is not None and device != first_device:
            raise ValueError(
                f"{first} and {name} must be on the same device, got {first_device} "
                f"and {device}"
            )
    return xp


def check_real_floating(xp: Any, name: str, x: Any) -> None:
    """Raise TypeError unless ``x`` has a real floating-point dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating-point dtype, got dtype {x.dtype}; "
            f"convert it first, for example with xp.astype({name}, xp.float32)"
        )


def check_ndim(name: str, x: Any, ndim: int, layout: str) -> None:
    """Raise ValueError unless ``x`` has ``ndim`` axes; ``layout`` names them."""
    if x.ndim != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D array of shape {layout}, got shape "
            f"{tuple(x.shape)}"
        )


def check_nonempty(name: str, x: Any) -> None:
    """Raise ValueError if any axis of ``x`` has length 0."""
    if any(size == 0 for size in x.shape):
        raise ValueError(
            f"{name} must have at least one element along every axis, got shape "
            f"{tuple(x.shape)}"
        )


def check_same_shape(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raise ValueError unless ``a`` and ``b`` have the same shape."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def check_same_dtype(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """Raise TypeError unless ``a`` and ``b`` have the same dtype."""
    if a.dtype != b.dtype:
        raise TypeError(
            f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and "
            f"{b.dtype}"
        )


def check_embeddings(name: str, z: Any) -> Any:
    """Check one (batch, dim) embedding array and return its namespace."""
    xp = namespace_of(**{name: z})
    check_real_floating(xp, name, z)
    check_ndim(name, z, 2, "(batch, dim)")
    check_nonempty(name, z)
    return xp


def check_embedding_pair(name_a: str, a: Any, name_b: str, b: Any) -> Any:
    """Check two (batch, dim) views of the same batch and return their namespace."""
    xp = namespace_of(**{name_a: a, name_b: b})
    check_real_floating(xp, name_a, a)
    check_real_floating(xp, name_b, b)
    check_ndim(name_a, a, 2, "(batch, dim)")
    check_ndim(name_b, b, 2, "(batch, dim)")
    check_same_shape(name_a, a, name_b, b)
    check_same_dtype(name_a, a, name_b, b)
    check_nonempty(name_a, a)
    return xp


def check_global_batch(name: str, z: Any, world_size: int, minimum: int) -> int:
    """Return the global batch size, raising ValueError if it is below ``minimum``.

    The global batch is ``world_size`` local batches of ``z.shape[0]`` samples.
    """
    local = z.shape[0]
    total = local * world_size
    if total < minimum:
        raise ValueError(
            f"{name} must have a global batch of at least {minimum} samples to "
            f"estimate per-dimension batch statistics, got shape {tuple(z.shape)} on "
            f"each of {world_size} rank(s)"
        )
    return total


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    minimum_inclusive: bool = True,
    maximum: float | None = None,
    maximum_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite Python float inside the given bounds.

    Raises
    ------
    TypeError
        If ``value`` is not a real Python or NumPy scalar; arrays are rejected
        because checking their value would need a host synchronisation.
    ValueError
        If ``value`` is not finite or lies outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real Python number, got an object of type "
            f"{_type_name(value)}"
        )
    number = float(value)

    expected = []
    if minimum is not None:
        expected.append(f"{'>=' if minimum_inclusive else '>'} {minimum}")
    if maximum is not None:
        expected.append(f"{'<=' if maximum_inclusive else '<'} {maximum}")
    expected_text = " and ".join(["finite", *expected])

    below = minimum is not None and (
        number < minimum if minimum_inclusive else number <= minimum
    )
    above = maximum is not None and (
        number > maximum if maximum_inclusive else number >= maximum
    )
    if not math.isfinite(number) or below or above:
        raise ValueError(f"{name} must be {expected_text}, got {value!r}")
    return number


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as a Python int of at least ``minimum``.

    Accepts Python and NumPy integers, rejects bool, floats and arrays.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got an object of type {_type_name(value)}"
        ) from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Raise TypeError unless ``value`` is a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_collective(collective: Any) -> int:
    """Return the world size of ``collective``, or 1 for None.

    Raises
    ------
    TypeError
        If ``collective`` does not implement :class:`sslspec.distributed.Collective`
        or its ``world_size`` is not a Python int.
    ValueError
        If its ``world_size`` is below 1.
    """
    if collective is None:
        return 1
    if not isinstance(collective, Collective):
        raise TypeError(
            "collective must be None or implement sslspec.distributed.Collective "
            "(world_size, rank, all_gather, all_reduce_sum), got an object of type "
            f"{_type_name(collective)}"
        )
    world_size = collective.world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(
            "collective.world_size must be a Python int, got an object of type "
            f"{_type_name(world_size)}"
        )
    if world_size < 1:
        raise ValueError(f"collective.world_size must be >= 1, got {world_size}")
    return world_size


def _type_name(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"
