"""Invalid input: every backend raises the exception type the spec promises.

Each case builds its invalid arguments from the backend's own arrays, so the check
covers the backend's dtypes, devices and array type as well as the spec's checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from sslspec_conformance.harness import ConformanceError, spec_function

PAIR_LOSSES = (
    "nt_xent_loss",
    "byol_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "invariance_loss",
)
SINGLE_LOSSES = ("variance_loss", "covariance_loss")
BATCH_STATISTICS = (
    "barlow_twins_loss",
    "vicreg_loss",
    "variance_loss",
    "covariance_loss",
)


class Inputs:
    """Builds arrays for invalid calls on the backend under test."""

    def __init__(self, conformance) -> None:
        self.conformance = conformance
        dtypes = conformance.backend.dtypes()
        self.dtype = "float32" if "float32" in dtypes else dtypes[0]
        self.rng = np.random.default_rng(0)

    def array(self, *shape: int, dtype: str | None = None) -> Any:
        values = self.rng.standard_normal(shape)
        return self.conformance.asarray(values, dtype or self.dtype)

    def raw(self, values: np.ndarray) -> Any:
        """Convert without a cast, keeping integer and bool dtypes."""
        return self.conformance.asarray(values)

    def other_dtype(self) -> str:
        others = [d for d in self.conformance.backend.dtypes() if d != self.dtype]
        if not others:
            pytest.skip("the backend has a single floating dtype")
        return others[0]

    def foreign(self, *shape: int) -> Any:
        """Return an array of another Array API library than the backend's."""
        values = self.rng.standard_normal(shape).astype(np.float32)
        sample = self.array(1)
        if isinstance(sample, np.ndarray):
            strict = pytest.importorskip("array_api_strict")
            return strict.asarray(values)
        return values

    def elsewhere(self, *shape: int) -> Any:
        """Return an array on a device other than the one under test."""
        backend = self.conformance.backend
        values = self.rng.standard_normal(shape)
        for device in backend.devices():
            array = backend.asarray(values, dtype=self.dtype, device=device)
            if backend.device_of(array) != self.conformance.device:
                return array
        pytest.skip("the backend has a single device")


def _pair_cases(name: str) -> list[tuple[str, str, type, Callable]]:
    def call(*arrays, **options):
        return lambda: spec_function(name)(*arrays, **options)

    return [
        (
            name,
            "different shapes",
            ValueError,
            lambda i: call(i.array(4, 3), i.array(4, 2)),
        ),
        (
            name,
            "different batch sizes",
            ValueError,
            lambda i: call(i.array(4, 3), i.array(5, 3)),
        ),
        (name, "1-D arrays", ValueError, lambda i: call(i.array(4), i.array(4))),
        (
            name,
            "3-D arrays",
            ValueError,
            lambda i: call(i.array(2, 2, 3), i.array(2, 2, 3)),
        ),
        (name, "empty batch", ValueError, lambda i: call(i.array(0, 3), i.array(0, 3))),
        (
            name,
            "integer arrays",
            TypeError,
            lambda i: call(
                i.raw(np.ones((4, 3), np.int64)), i.raw(np.ones((4, 3), np.int64))
            ),
        ),
        (
            name,
            "bool arrays",
            TypeError,
            lambda i: call(i.raw(np.ones((4, 3), bool)), i.raw(np.ones((4, 3), bool))),
        ),
        (
            name,
            "different dtypes",
            TypeError,
            lambda i: call(i.array(4, 3), i.array(4, 3, dtype=i.other_dtype())),
        ),
        (
            name,
            "mixed libraries",
            TypeError,
            lambda i: call(i.array(4, 3), i.foreign(4, 3)),
        ),
        (
            name,
            "mixed devices",
            ValueError,
            lambda i: call(i.array(4, 3), i.elsewhere(4, 3)),
        ),
        (
            name,
            "nested lists",
            TypeError,
            lambda i: call([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]),
        ),
    ]


def _single_cases(name: str) -> list[tuple[str, str, type, Callable]]:
    def call(*arrays, **options):
        return lambda: spec_function(name)(*arrays, **options)

    return [
        (name, "1-D array", ValueError, lambda i: call(i.array(4))),
        (name, "3-D array", ValueError, lambda i: call(i.array(2, 2, 3))),
        (name, "empty batch", ValueError, lambda i: call(i.array(0, 3))),
        (
            name,
            "integer array",
            TypeError,
            lambda i: call(i.raw(np.ones((4, 3), np.int64))),
        ),
        (name, "bool array", TypeError, lambda i: call(i.raw(np.ones((4, 3), bool)))),
        (name, "nested lists", TypeError, lambda i: call([[1.0, 2.0], [3.0, 4.0]])),
    ]


def _batch_of_one(name: str) -> tuple[str, str, type, Callable]:
    def build(i):
        arrays = [i.array(1, 3)] * (1 if name in SINGLE_LOSSES else 2)
        return lambda: spec_function(name)(*arrays)

    return (name, "batch of one", ValueError, build)


def _option_case(name, label, error, options, arrays=2):
    def build(i):
        inputs = [i.array(4, 3) for _ in range(arrays)]
        return lambda: spec_function(name)(*inputs, **options)

    return (name, label, error, build)


def _mask_case(label, error, noise_shape, ratio, *, noise=None):
    def build(i):
        values = noise(i) if noise is not None else i.array(*noise_shape)
        return lambda: spec_function("generate_mask")(values, mask_ratio=ratio)

    return ("generate_mask", label, error, build)


def _reconstruction_case(label, error, shapes, options=None, *, arrays=None):
    def build(i):
        inputs = arrays(i) if arrays is not None else [i.array(*s) for s in shapes]
        return lambda: spec_function("reconstruction_loss")(*inputs, **(options or {}))

    return ("reconstruction_loss", label, error, build)


def _call_case(function, label, error, build_arguments):
    def build(i):
        args, kwargs = build_arguments(i)
        return lambda: spec_function(function)(*args, **kwargs)

    return (function, label, error, build)


CASES: list[tuple[str, str, type, Callable]] = []
for _name in PAIR_LOSSES:
    CASES += _pair_cases(_name)
for _name in SINGLE_LOSSES:
    CASES += _single_cases(_name)
for _name in BATCH_STATISTICS:
    CASES.append(_batch_of_one(_name))

CASES += [
    _option_case("nt_xent_loss", "zero temperature", ValueError, {"temperature": 0.0}),
    _option_case(
        "nt_xent_loss", "negative temperature", ValueError, {"temperature": -1.0}
    ),
    _option_case(
        "nt_xent_loss", "nan temperature", ValueError, {"temperature": math.nan}
    ),
    _option_case(
        "nt_xent_loss", "infinite temperature", ValueError, {"temperature": math.inf}
    ),
    _option_case(
        "nt_xent_loss", "string temperature", TypeError, {"temperature": "0.5"}
    ),
    _option_case("nt_xent_loss", "bool temperature", TypeError, {"temperature": True}),
    _call_case(
        "nt_xent_loss",
        "array temperature",
        TypeError,
        lambda i: ((i.array(4, 3), i.array(4, 3)), {"temperature": i.array()}),
    ),
    _option_case(
        "barlow_twins_loss", "negative lambda", ValueError, {"lambda_param": -1.0}
    ),
    _option_case(
        "barlow_twins_loss", "nan lambda", ValueError, {"lambda_param": math.nan}
    ),
    _option_case(
        "vicreg_loss", "negative weight", ValueError, {"variance_weight": -1.0}
    ),
    _option_case(
        "vicreg_loss", "infinite weight", ValueError, {"invariance_weight": math.inf}
    ),
    _option_case(
        "variance_loss", "zero target_std", ValueError, {"target_std": 0.0}, 1
    ),
    _option_case("variance_loss", "zero eps", ValueError, {"eps": 0.0}, 1),
    _option_case("variance_loss", "negative eps", ValueError, {"eps": -1e-4}, 1),
    _mask_case("ratio masking none", ValueError, (2, 8), 0.0),
    _mask_case("ratio masking all", ValueError, (2, 8), 1.0),
    _mask_case("ratio rounding to none", ValueError, (2, 4), 0.1),
    _mask_case("ratio rounding to all", ValueError, (2, 4), 0.9),
    _mask_case("single patch", ValueError, (2, 1), 0.5),
    _mask_case("1-D noise", ValueError, (8,), 0.5),
    _mask_case("3-D noise", ValueError, (2, 2, 4), 0.5),
    _mask_case(
        "integer noise",
        TypeError,
        None,
        0.5,
        noise=lambda i: i.raw(np.ones((2, 8), np.int64)),
    ),
    _mask_case("string ratio", TypeError, (2, 8), "0.5"),
    _reconstruction_case(
        "prediction and target shapes differ",
        ValueError,
        [(2, 4, 3), (2, 4, 2), (2, 4)],
    ),
    _reconstruction_case(
        "mask shape differs", ValueError, [(2, 4, 3), (2, 4, 3), (2, 3)]
    ),
    _reconstruction_case("2-D prediction", ValueError, [(2, 4), (2, 4), (2, 4)]),
    _reconstruction_case(
        "norm_pix_loss with one value per patch",
        ValueError,
        [(2, 4, 1), (2, 4, 1), (2, 4)],
        {"norm_pix_loss": True},
    ),
    _reconstruction_case(
        "norm_pix_loss not a bool",
        TypeError,
        [(2, 4, 3), (2, 4, 3), (2, 4)],
        {"norm_pix_loss": 1},
    ),
    _reconstruction_case(
        "zero eps", ValueError, [(2, 4, 3), (2, 4, 3), (2, 4)], {"eps": 0.0}
    ),
    _reconstruction_case(
        "integer prediction",
        TypeError,
        None,
        arrays=lambda i: [
            i.raw(np.ones((2, 4, 3), np.int64)),
            i.raw(np.ones((2, 4, 3), np.int64)),
            i.array(2, 4),
        ],
    ),
    _reconstruction_case(
        "integer mask",
        TypeError,
        None,
        arrays=lambda i: [
            i.array(2, 4, 3),
            i.array(2, 4, 3),
            i.raw(np.ones((2, 4), np.int64)),
        ],
    ),
    _reconstruction_case(
        "different dtypes",
        TypeError,
        None,
        arrays=lambda i: [
            i.array(2, 4, 3),
            i.array(2, 4, 3, dtype=i.other_dtype()),
            i.array(2, 4),
        ],
    ),
    _reconstruction_case(
        "mixed libraries",
        TypeError,
        None,
        arrays=lambda i: [i.array(2, 4, 3), i.foreign(2, 4, 3), i.array(2, 4)],
    ),
    _reconstruction_case(
        "mixed devices",
        ValueError,
        None,
        arrays=lambda i: [i.array(2, 4, 3), i.array(2, 4, 3), i.elsewhere(2, 4)],
    ),
    _call_case(
        "patchify",
        "patch size not dividing",
        ValueError,
        lambda i: ((i.array(2, 1, 6, 6), 4), {}),
    ),
    _call_case(
        "patchify", "3-D images", ValueError, lambda i: ((i.array(1, 6, 6), 2), {})
    ),
    _call_case(
        "patchify",
        "zero patch size",
        ValueError,
        lambda i: ((i.array(2, 1, 6, 6), 0), {}),
    ),
    _call_case(
        "patchify",
        "float patch size",
        TypeError,
        lambda i: ((i.array(2, 1, 6, 6), 1.5), {}),
    ),
    _call_case("patchify", "nested lists", TypeError, lambda i: (([[[[1.0]]]], 1), {})),
    _call_case(
        "unpatchify",
        "patch length not a multiple of p*p",
        ValueError,
        lambda i: ((i.array(2, 4, 5), 2), {}),
    ),
    _call_case(
        "unpatchify",
        "non-square grid without image_size",
        ValueError,
        lambda i: ((i.array(2, 6, 4), 2), {}),
    ),
    _call_case(
        "unpatchify",
        "image_size not matching the patches",
        ValueError,
        lambda i: ((i.array(2, 6, 4), 2), {"image_size": (4, 4)}),
    ),
    _call_case(
        "unpatchify",
        "image_size not divisible by the patch size",
        ValueError,
        lambda i: ((i.array(2, 6, 4), 2), {"image_size": (5, 6)}),
    ),
    _call_case(
        "unpatchify", "2-D patches", ValueError, lambda i: ((i.array(4, 4), 2), {})
    ),
    _call_case(
        "ema_update",
        "different names",
        ValueError,
        lambda i: (({"a": i.array(3)}, {"b": i.array(3)}), {}),
    ),
    _call_case(
        "ema_update",
        "different shapes",
        ValueError,
        lambda i: (({"a": i.array(3)}, {"a": i.array(4)}), {}),
    ),
    _call_case(
        "ema_update",
        "momentum above 1",
        ValueError,
        lambda i: (({"a": i.array(3)}, {"a": i.array(3)}), {"momentum": 1.5}),
    ),
    _call_case(
        "ema_update",
        "negative momentum",
        ValueError,
        lambda i: (({"a": i.array(3)}, {"a": i.array(3)}), {"momentum": -0.1}),
    ),
    _call_case(
        "ema_update",
        "integer arrays",
        TypeError,
        lambda i: (
            ({"a": i.raw(np.ones(3, np.int64))}, {"a": i.raw(np.ones(3, np.int64))}),
            {},
        ),
    ),
    _call_case(
        "ema_update",
        "different dtypes",
        TypeError,
        lambda i: (({"a": i.array(3)}, {"a": i.array(3, dtype=i.other_dtype())}), {}),
    ),
    _call_case(
        "ema_update",
        "mixed devices",
        ValueError,
        lambda i: (({"a": i.array(3)}, {"a": i.elsewhere(3)}), {}),
    ),
    _call_case(
        "ema_update",
        "mixed libraries",
        TypeError,
        lambda i: (({"a": i.array(3)}, {"a": i.foreign(3)}), {}),
    ),
    _call_case(
        "ema_update",
        "not a mapping",
        TypeError,
        lambda i: (([i.array(3)], [i.array(3)]), {}),
    ),
    _call_case(
        "momentum_schedule", "zero total steps", ValueError, lambda i: ((0, 0), {})
    ),
    _call_case("momentum_schedule", "float step", TypeError, lambda i: ((1.5, 10), {})),
    _call_case(
        "momentum_schedule",
        "base above final",
        ValueError,
        lambda i: ((1, 10), {"base_momentum": 0.99, "final_momentum": 0.9}),
    ),
    _call_case(
        "momentum_schedule",
        "base above 1",
        ValueError,
        lambda i: ((1, 10), {"base_momentum": 1.5}),
    ),
]


@pytest.mark.parametrize(
    "function, label, error, build",
    CASES,
    ids=[f"{function}-{label.replace(' ', '_')}" for function, label, _, _ in CASES],
)
def test_invalid_input(conformance, function, label, error, build):
    call = build(Inputs(conformance))
    try:
        call()
    except error:
        return
    except Exception as other:
        raise ConformanceError(
            f"{function} with {label}: expected {error.__name__}, got "
            f"{type(other).__name__}: {other}"
        ) from other
    raise ConformanceError(
        f"{function} with {label}: expected {error.__name__}, no error"
    )
