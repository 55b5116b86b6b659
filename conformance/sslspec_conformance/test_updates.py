"""BYOL's target update and momentum schedule against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from sslspec_conformance import reference
from sslspec_conformance.harness import ConformanceError, spec_function
from sslspec_conformance.profiles import settings_for
from sslspec_conformance.strategies import parameter_dicts, schedule_steps


def _draw_parameters(conformance, data, dtype):
    case = data.draw(parameter_dicts(dtype), label="case")
    note(repr(case))
    online = {
        k: conformance.asarray(v, dtype) for k, v in case.options["online"].items()
    }
    target = {
        k: conformance.asarray(v, dtype) for k, v in case.options["target"].items()
    }
    return online, target, case.options["momentum"]


def _check_update(conformance, result, online, target, momentum, dtype, what):
    if not isinstance(result, dict) or list(result) != list(target):
        raise ConformanceError(
            f"{what}: expected a dict with the names of target in order, got "
            f"{type(result).__name__} with names {list(result)}"
        )
    exact_online = {k: conformance.numpy(v) for k, v in online.items()}
    exact_target = {k: conformance.numpy(v) for k, v in target.items()}
    expected = reference.ema_update(exact_online, exact_target, momentum=momentum)
    for key, value in result.items():
        conformance.assert_like(value, target[key], shape=target[key].shape, what=key)
        # The sum of the magnitudes of the two terms bounds the rounding error of
        # a two-term sum, also where the terms cancel.
        terms = momentum * np.abs(exact_target[key]) + (1.0 - momentum) * np.abs(
            exact_online[key]
        )
        conformance.assert_close(
            conformance.numpy(value),
            expected[key],
            dtype=dtype,
            sensitivity=terms,
            what=f"{what}[{key!r}]",
        )


@pytest.mark.sslspec_function("ema_update")
@settings_for("value")
@given(data=st.data())
def test_ema_update(conformance, dtype, data):
    online, target, momentum = _draw_parameters(conformance, data, dtype)

    result = spec_function("ema_update")(online, target, momentum=momentum)

    _check_update(conformance, result, online, target, momentum, dtype, "ema_update")


@pytest.mark.sslspec_function("ema_update")
@settings_for("jit")
@given(data=st.data())
def test_ema_update_jit(conformance, dtype, data):
    if not conformance.has("jit"):
        pytest.skip("the backend does not declare the jit capability")
    online, target, momentum = _draw_parameters(conformance, data, dtype)
    ema_update = spec_function("ema_update")

    compiled = conformance.jit(lambda o, t: ema_update(o, t, momentum=momentum))
    result = compiled(online, target)

    _check_update(
        conformance, result, online, target, momentum, dtype, "compiled ema_update"
    )


@pytest.mark.sslspec_function("momentum_schedule", dtype="python")
@settings_for("value")
@given(case=schedule_steps())
def test_momentum_schedule(conformance, case):
    options = case.options

    result = spec_function("momentum_schedule")(**options)

    if not isinstance(result, float):
        raise ConformanceError(
            f"momentum_schedule: expected a Python float, got {type(result).__name__}"
        )
    expected = reference.momentum_schedule(**options)
    conformance.assert_close(
        result, expected, dtype="float64", sensitivity=1.0, what="momentum_schedule"
    )
    lowest = min(options["base_momentum"], options["final_momentum"])
    highest = max(options["base_momentum"], options["final_momentum"])
    if not lowest <= result <= highest:
        raise ConformanceError(
            f"momentum_schedule: {result!r} lies outside [{lowest!r}, {highest!r}]"
        )
