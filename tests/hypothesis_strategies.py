"""Hypothesis strategies shared by the spec tests.

Shapes come from a short list because eager JAX compiles every operation once per
new shape. A few shapes keep the JAX runs fast and still cover a batch of 1, a
single dimension and a batch above 16.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

BATCH_SIZES = (1, 4, 17)
DIMENSIONS = (1, 5)


def grid_arrays(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Float64 arrays with entries from {-4, ..., 4}: zero rows and ties happen."""
    return hnp.arrays(np.float64, shape, elements=st.integers(-4, 4).map(float))


def embedding_pairs(min_batch: int = 1) -> st.SearchStrategy[tuple[np.ndarray, ...]]:
    """Two float64 (batch, dim) arrays of the same shape."""
    batch_sizes = [size for size in BATCH_SIZES if size >= min_batch]
    shapes = st.tuples(st.sampled_from(batch_sizes), st.sampled_from(DIMENSIONS))
    return shapes.flatmap(
        lambda shape: st.tuples(grid_arrays(shape), grid_arrays(shape))
    )
