"""Losses: values, gradients and compiled values against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from sslspec_conformance.cases import LOSS_CASES, LOSS_NAMES
from sslspec_conformance.harness import perturbed_results, sensitivity, spec_function
from sslspec_conformance.profiles import settings_for


def _draw(data, function: str, dtype: str):
    case = data.draw(LOSS_CASES[function].draw_inputs(dtype), label="case")
    note(repr(case))
    return case


@pytest.mark.parametrize("function", LOSS_NAMES)
@settings_for("value")
@given(data=st.data())
def test_loss_value(conformance, function, dtype, data):
    case = _draw(data, function, dtype)
    loss = LOSS_CASES[function]
    arrays, exact = conformance.round_trip(case.arrays, dtype)
    options = loss.reference_options(dtype, case.options)

    result = spec_function(function)(*arrays, **case.options)

    conformance.assert_like(result, arrays[0], shape=(), what=function)
    conformance.assert_close(
        conformance.numpy(result),
        loss.reference(*exact, **options),
        dtype=dtype,
        sensitivity=sensitivity(loss.reference, exact, options, dtype),
        what=function,
    )


@pytest.mark.parametrize("function", LOSS_NAMES)
@settings_for("gradient")
@given(data=st.data())
def test_loss_gradient(conformance, function, dtype, data):
    if not conformance.has("autodiff"):
        pytest.skip("the backend does not declare the autodiff capability")
    case = _draw(data, function, dtype)
    loss = LOSS_CASES[function]
    arrays, exact = conformance.round_trip(case.arrays, dtype)
    options = loss.reference_options(dtype, case.options)
    wrt = loss.differentiable
    spec = spec_function(function)

    def objective(*differentiated):
        inputs = list(arrays)
        for index, value in zip(wrt, differentiated, strict=True):
            inputs[index] = value
        return spec(*inputs, **case.options)

    value, grads = conformance.backend.value_and_grad(
        objective, *(arrays[i] for i in wrt)
    )

    conformance.assert_close(
        conformance.numpy(value),
        loss.reference(*exact, **options),
        dtype=dtype,
        sensitivity=sensitivity(loss.reference, exact, options, dtype),
        what=f"{function} value from value_and_grad",
    )
    expected, nearby, step = perturbed_results(loss.gradient, exact, options, dtype)
    moved = (
        max(
            float(np.max(np.abs(np.asarray(m) - np.asarray(e)), initial=0.0))
            for result in nearby
            for m, e in zip(result, expected, strict=True)
        )
        / step
    )
    for position, (index, grad) in enumerate(zip(wrt, grads, strict=True)):
        what = f"gradient of {function} with respect to input {index}"
        conformance.assert_like(
            grad, arrays[index], shape=arrays[index].shape, what=what
        )
        conformance.assert_close(
            conformance.numpy(grad),
            expected[position],
            dtype=dtype,
            sensitivity=moved,
            kind="gradient",
            envelope=[result[position] for result in nearby],
            what=what,
        )


@pytest.mark.parametrize("function", LOSS_NAMES)
@settings_for("jit")
@given(data=st.data())
def test_loss_jit(conformance, function, dtype, data):
    if not conformance.has("jit"):
        pytest.skip("the backend does not declare the jit capability")
    case = _draw(data, function, dtype)
    loss = LOSS_CASES[function]
    arrays, exact = conformance.round_trip(case.arrays, dtype)
    options = loss.reference_options(dtype, case.options)
    spec = spec_function(function)
    spec_options = case.options

    compiled = conformance.jit(lambda *inputs: spec(*inputs, **spec_options))
    result = compiled(*arrays)
    eager = conformance.numpy(spec(*arrays, **spec_options))

    what = f"compiled {function}"
    conformance.assert_like(result, arrays[0], shape=(), what=what)
    moved = sensitivity(loss.reference, exact, options, dtype)
    conformance.assert_close(
        conformance.numpy(result),
        loss.reference(*exact, **options),
        dtype=dtype,
        sensitivity=moved,
        what=what,
    )
    conformance.assert_close(
        conformance.numpy(result),
        eager,
        dtype=dtype,
        sensitivity=np.maximum(moved, np.abs(eager)),
        what=f"{what} against the eager result",
    )


@pytest.mark.sslspec_function("reconstruction_loss")
def test_reconstruction_loss_boolean_mask(conformance, dtype):
    """A boolean mask gives exactly the result of the same mask as floats."""
    rng = np.random.default_rng(0)
    prediction, target = rng.standard_normal((2, 3, 5, 4))
    float_mask = (rng.uniform(size=(3, 5)) < 0.5).astype(np.float64)
    arrays = [conformance.asarray(a, dtype) for a in (prediction, target, float_mask)]
    bool_mask = conformance.asarray(float_mask.astype(bool))
    loss = spec_function("reconstruction_loss")

    with_float = conformance.numpy(loss(*arrays))
    with_bool = conformance.numpy(loss(arrays[0], arrays[1], bool_mask))

    conformance.assert_equal(
        with_bool, with_float, what="reconstruction_loss bool mask"
    )
