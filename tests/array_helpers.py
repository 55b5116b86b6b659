"""Conversions between NumPy and the namespaces of the ``xp`` fixture."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

LIBRARY_OF_NAMESPACE = {
    "array_api_compat.numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "array_api_compat.torch": "torch",
    "jax.numpy": "jax",
}


def library_name(xp: Any) -> str:
    """Return "numpy", "array_api_strict", "torch" or "jax" for a test namespace."""
    return LIBRARY_OF_NAMESPACE[xp.__name__]


def dtype_or_skip(xp: Any, dtype_name: str) -> Any:
    """Return the dtype ``dtype_name`` of ``xp``, skipping the test if it has none."""
    dtype = getattr(xp, dtype_name, None)
    if dtype is None:
        pytest.skip(f"{xp.__name__} has no {dtype_name} dtype")
    return dtype


def asarray(xp: Any, values: Any, dtype_name: str = "float64") -> Any:
    """Convert NumPy data to an array of ``xp`` with the named dtype."""
    return xp.asarray(np.asarray(values), dtype=dtype_or_skip(xp, dtype_name))


def to_numpy(x: Any) -> np.ndarray:
    """Copy an array of any test namespace to NumPy; bfloat16 becomes float32."""
    module = type(x).__module__
    if module.startswith("torch"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() == 2:
            x = x.float()
        return x.numpy()
    array = np.asarray(x)
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


def to_float(x: Any) -> float:
    """Return a 0-D array of any test namespace as a Python float."""
    return float(to_numpy(x).astype(np.float64))


def evaluate(xp: Any, function: Any, *inputs: Any) -> Any:
    """Call ``function(*inputs)``, compiled with ``jax.jit`` for JAX.

    Eager JAX compiles each operation for every new shape and dtype, which is
    several times slower than compiling the whole function once.
    """
    if library_name(xp) == "jax":
        import jax

        return jax.jit(function)(*inputs)
    return function(*inputs)


def value_and_gradients(xp: Any, function: Any, inputs: list[Any]) -> tuple[Any, Any]:
    """Return ``function(*inputs)`` and its gradients with respect to ``inputs``.

    Gradients come from torch autograd or from ``jax.value_and_grad`` under
    ``jax.jit``. For a library without automatic differentiation the gradients
    are None.
    """
    library = library_name(xp)
    if library == "torch":
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        value = function(*leaves)
        value.backward()
        return value.detach(), [leaf.grad for leaf in leaves]
    if library == "jax":
        import jax

        argnums = tuple(range(len(inputs)))
        value, grads = jax.jit(jax.value_and_grad(function, argnums=argnums))(*inputs)
        return value, list(grads)
    return function(*inputs), None


def assert_finite(value: Any, gradients: Any) -> None:
    """Assert that a loss value and its gradients, if any, are all finite."""
    assert np.isfinite(to_float(value))
    for gradient in gradients or []:
        assert np.all(np.isfinite(to_numpy(gradient)))
