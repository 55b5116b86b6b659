"""Shared fixtures: the array libraries every spec test runs on, and Hypothesis.

Hypothesis profiles: ``ci`` (the default, derandomised, 25 examples per test) and
``thorough`` (2000 examples). Pick one with ``--hypothesis-profile=thorough``.
"""

from __future__ import annotations

import importlib

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile("ci")

# Float64 arrays in JAX need x64 mode, which must be set before the first JAX array
# is created.
try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass

# (fixture id, module that provides the namespace)
ARRAY_LIBRARIES = [
    ("numpy", "array_api_compat.numpy"),
    ("array_api_strict", "array_api_strict"),
    ("torch", "array_api_compat.torch"),
    ("jax", "jax.numpy"),
]


@pytest.fixture(scope="session", params=[name for name, _ in ARRAY_LIBRARIES])
def xp(request):
    """Array namespace of one library, skipping the test if it is not installed."""
    module = dict(ARRAY_LIBRARIES)[request.param]
    pytest.importorskip(request.param)
    namespace = importlib.import_module(module)
    if request.param == "array_api_strict":
        # Reject boolean-mask indexing and other data-dependent output shapes,
        # which cannot run under jax.jit or torch.compile.
        namespace.set_array_api_strict_flags(
            boolean_indexing=False, data_dependent_shapes=False
        )
    return namespace
