"""Automatic gradients of every loss agree with central finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from loss_cases import LOSS_CASE_IDS, LOSS_CASES


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_torch_gradcheck(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    inputs = tuple(
        torch.tensor(x, dtype=torch.float64, requires_grad=True)
        for x in case.make_inputs(rng)
    )
    fixed = [torch.tensor(x, dtype=torch.float64) for x in case.make_fixed(rng)]
    assert torch.autograd.gradcheck(lambda *xs: case(list(xs), fixed), inputs)


def central_differences(function, inputs, step=1e-6):
    """Return d function / d inputs by central differences, one element at a time."""
    gradients = []
    for index, x in enumerate(inputs):
        gradient = np.empty_like(x)
        for position in np.ndindex(x.shape):
            shifted = [np.array(value) for value in inputs]
            shifted[index][position] = x[position] + step
            above = float(function(*shifted))
            shifted[index][position] = x[position] - step
            below = float(function(*shifted))
            gradient[position] = (above - below) / (2.0 * step)
        gradients.append(gradient)
    return gradients


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_jax_grad_matches_finite_differences(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    inputs = case.make_inputs(rng)
    fixed = [jnp.asarray(x, dtype=jnp.float64) for x in case.make_fixed(rng)]

    def loss(*xs):
        return case([jnp.asarray(x, dtype=jnp.float64) for x in xs], fixed)

    argnums = tuple(range(len(inputs)))
    automatic = jax.jit(jax.grad(loss, argnums=argnums))(*inputs)
    numeric = central_differences(jax.jit(loss), inputs)
    for computed, expected in zip(automatic, numeric, strict=True):
        np.testing.assert_allclose(np.asarray(computed), expected, rtol=1e-6, atol=1e-8)
