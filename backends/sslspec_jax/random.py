"""Random numbers for the augmentations from an explicit JAX key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["KeyRandom"]


class KeyRandom:
    """Source of uniform and normal draws that splits a JAX key on every call.

    It implements the augmentations' random-source protocol (``uniform(shape)``
    and ``normal(shape)``). The key is Python state, so inside a traced function
    the sequence of splits is fixed at trace time. The same starting key gives the
    same draws in every call of the compiled function, and a new key per step
    gives new draws without recompiling.

    Parameters
    ----------
    key
        A JAX PRNG key (typed, from :func:`jax.random.key`).
    dtype
        Floating dtype of the draws.
    """

    def __init__(self, key: jax.Array, *, dtype: Any = jnp.float32) -> None:
        self.key = key
        self.dtype = dtype

    def _next_key(self) -> jax.Array:
        self.key, subkey = jax.random.split(self.key)
        return subkey

    def uniform(self, shape: Sequence[int]) -> jax.Array:
        """Draw from U[0, 1)."""
        return jax.random.uniform(self._next_key(), tuple(shape), self.dtype)

    def normal(self, shape: Sequence[int]) -> jax.Array:
        """Draw from the standard normal distribution."""
        return jax.random.normal(self._next_key(), tuple(shape), self.dtype)
