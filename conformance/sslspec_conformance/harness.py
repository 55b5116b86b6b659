"""Backend wrapper and checks that every conformance test uses.

:class:`Harness` wraps one backend and the device the suite runs on. It converts
NumPy inputs to the backend's arrays and back, checks dtype, device and shape of
results, and compares values with the reference under the tolerance table of
:mod:`sslspec_conformance.tolerances`. Each comparison records its error relative to
the tolerance, which the plugin reports per test.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sslspec_conformance.rounding import perturbed
from sslspec_conformance.tolerances import perturbation_step, tolerance

__all__ = [
    "Harness",
    "ConformanceError",
    "sensitivity",
    "perturbed_results",
    "begin_recording",
    "end_recording",
    "record",
    "spec_function",
    "fresh_copy",
]

#: Bit width and machine epsilon of each floating dtype the suite supports.
FLOAT_FORMATS = {
    "float64": (64, 2.0**-52),
    "float32": (32, 2.0**-23),
    "float16": (16, 2.0**-10),
    "bfloat16": (16, 2.0**-7),
}

#: Measurements of the test now running, or None outside a conformance test.
_measurements: dict[str, Any] | None = None


def begin_recording() -> None:
    """Start collecting measurements for a new test."""
    global _measurements
    _measurements = {"worst_ratio": None, "checks": 0}


def end_recording() -> dict[str, Any]:
    """Stop collecting and return what the test measured."""
    global _measurements
    measured = _measurements or {"worst_ratio": None, "checks": 0}
    _measurements = None
    return measured


def record(ratio: float) -> None:
    """Record the error of one check relative to its tolerance."""
    if _measurements is None:
        return
    _measurements["checks"] += 1
    worst = _measurements["worst_ratio"]
    if worst is None or not ratio <= worst:
        _measurements["worst_ratio"] = ratio


class ConformanceError(AssertionError):
    """Raised when a backend's result differs from the reference or the spec."""


def spec_function(name: str) -> Callable[..., Any]:
    """Return the public function ``name`` of :mod:`sslspec`."""
    import sslspec

    try:
        return getattr(sslspec, name)
    except AttributeError:
        raise ConformanceError(
            f"sslspec has no public function {name!r}; the suite checks every "
            "function of the spec"
        ) from None


def perturbed_results(
    function: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    options: dict[str, Any],
    dtype: str,
    *,
    samples: int = 2,
    seed: int = 0,
) -> tuple[Any, list[Any], float]:
    """Evaluate the reference ``function`` exactly and under rounding.

    Returns the exact result, the results with every input array and every stored
    intermediate value (see :mod:`sslspec_conformance.rounding`) multiplied
    elementwise by ``1 + h * delta``, and ``h``. The first perturbed result uses
    ``delta = 1`` everywhere, which models a rounding error shared by many values.
    The other ``samples`` draw ``delta`` uniform on ``[-1, 1]`` per value. ``h``
    comes from :func:`~sslspec_conformance.tolerances.perturbation_step`.
    """
    step = perturbation_step(dtype)
    rng = np.random.default_rng(seed)
    exact = function(*arrays, **options)
    moved = []
    for sample in range(samples + 1):
        generator = None if sample == 0 else rng
        if generator is None:
            inputs = [a * (1.0 + step) for a in arrays]
        else:
            inputs = [
                a * (1.0 + step * rng.uniform(-1.0, 1.0, np.shape(a))) for a in arrays
            ]
        with perturbed(step, generator):
            moved.append(function(*inputs, **options))
    return exact, moved, step


def sensitivity(
    function: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    options: dict[str, Any],
    dtype: str,
    **sampling: Any,
) -> np.ndarray:
    """Estimate how far rounding in ``dtype`` can move ``function``'s result.

    Returns the largest change of each result entry over
    :func:`perturbed_results`, divided by ``h``. A tuple of arrays gives the
    largest change over all of them, as one number.
    """
    exact, moved, step = perturbed_results(function, arrays, options, dtype, **sampling)
    largest: Any = 0.0
    for result in moved:
        if isinstance(exact, tuple):
            change = max(
                float(np.max(np.abs(np.asarray(m) - np.asarray(e)), initial=0.0))
                for m, e in zip(result, exact, strict=True)
            )
        else:
            change = np.abs(np.asarray(result) - np.asarray(exact))
        largest = np.maximum(largest, change / step)
    return np.asarray(largest, dtype=np.float64)


_copies = itertools.count()


def fresh_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """Return a copy of ``function`` with a code object of its own.

    Compilers cache per code object and may stop compiling a function that has
    been recompiled often (``torch.compile`` falls back to eager execution after
    ``torch._dynamo.config.recompile_limit`` recompilations, 8 by default), so
    the suite compiles a fresh copy in every example.
    """
    code = function.__code__
    renamed = code.replace(co_name=f"{code.co_name}_copy{next(_copies)}")
    return types.FunctionType(
        renamed,
        function.__globals__,
        renamed.co_name,
        function.__defaults__,
        function.__closure__,
    )


class Harness:
    """The backend under test, the device it runs on, and the checks.

    Parameters
    ----------
    backend
        A :class:`sslspec.backend.Backend`.
    device : str
        Device every input is placed on.
    """

    def __init__(self, backend: Any, device: str) -> None:
        self.backend = backend
        self.device = device
        self.xp = backend.namespace()

    def jit(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``backend.jit`` of a fresh copy of ``function``."""
        return self.backend.jit(fresh_copy(function))

    def has(self, capability: str) -> bool:
        """Return whether the backend declares ``capability``."""
        return capability in self.backend.capabilities

    def asarray(self, array: Any, dtype: str | None = None) -> Any:
        """Convert a NumPy array to the backend, cast to ``dtype``, on the device."""
        return self.backend.asarray(np.asarray(array), dtype=dtype, device=self.device)

    def numpy(self, array: Any) -> np.ndarray:
        """Return a backend array as a float64 (or integer) NumPy array."""
        values = np.asarray(self.backend.to_numpy(array))
        if np.issubdtype(values.dtype, np.floating):
            return values.astype(np.float64)
        return values

    def round_trip(self, arrays: Sequence[np.ndarray], dtype: str):
        """Convert ``arrays`` to ``dtype`` on the backend.

        Returns the backend arrays and their exact values as float64 NumPy arrays,
        which is what the reference receives.
        """
        converted = [self.asarray(a, dtype) for a in arrays]
        for array in converted:
            self.assert_dtype(array, dtype, what="backend.asarray")
        return converted, [self.numpy(a) for a in converted]

    def assert_dtype(self, array: Any, dtype: str, *, what: str) -> None:
        """Check that ``array`` has the floating dtype named ``dtype``.

        Compares the bit width and machine epsilon from the namespace's ``finfo``,
        which distinguishes bfloat16 from float16 even where the namespace names
        neither.
        """
        bits, eps = FLOAT_FORMATS[dtype]
        info = self.xp.finfo(array.dtype)
        if info.bits != bits or float(info.eps) != eps:
            raise ConformanceError(
                f"{what}: requested dtype {dtype}, got {array.dtype} "
                f"({info.bits} bits, eps {float(info.eps):g})"
            )

    def assert_like(
        self, result: Any, like: Any, *, shape: tuple[int, ...], what: str
    ) -> None:
        """Check that ``result`` has the dtype and device of ``like`` and ``shape``."""
        if not hasattr(result, "dtype") or not hasattr(result, "shape"):
            raise ConformanceError(
                f"{what}: expected an array of this backend, got an object of type "
                f"{type(result).__name__}"
            )
        if result.dtype != like.dtype:
            raise ConformanceError(
                f"{what}: dtype {result.dtype} differs from the input dtype "
                f"{like.dtype}"
            )
        device = self.backend.device_of(result)
        if device != self.device:
            raise ConformanceError(
                f"{what}: result is on device {device!r}, but the inputs are on "
                f"{self.device!r}"
            )
        if tuple(result.shape) != tuple(shape):
            raise ConformanceError(
                f"{what}: shape {tuple(result.shape)} differs from the expected {shape}"
            )

    def assert_close(
        self,
        actual: Any,
        expected: Any,
        *,
        dtype: str,
        sensitivity: Any = 0.0,
        kind: str = "value",
        envelope: Sequence[Any] = (),
        what: str,
    ) -> float:
        """Compare ``actual`` with the reference ``expected`` under the tolerance
        of ``dtype`` and return the error relative to the tolerance.

        ``kind`` picks the column of the table. ``"value"`` compares entry by
        entry with ``scale = max(|expected|, sensitivity)``. ``"gradient"`` and
        ``"network"`` use one scale for the whole array, its largest entry.
        ``envelope`` holds further reference results (at inputs moved by
        rounding): the error of an entry is then its distance from the interval
        that ``expected`` and those results span. Gradients use it, so that at a
        kink (a hinge exactly at 0, say) either one-sided gradient, or any value
        between them, passes.
        """
        actual = np.asarray(actual, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        if actual.shape != expected.shape:
            raise ConformanceError(
                f"{what}: shape {actual.shape} differs from the reference "
                f"{expected.shape}"
            )
        row = tolerance(dtype)
        if kind == "value":
            rtol, atol = row.rtol, row.atol
            scale = np.maximum(np.abs(expected), sensitivity)
        elif kind in ("gradient", "network"):
            if kind == "gradient":
                rtol, atol = row.gradient_rtol, row.gradient_atol
            elif row.network_rtol is None or row.network_atol is None:
                raise ValueError(f"the tolerance table has no network row for {dtype}")
            else:
                rtol, atol = row.network_rtol, row.network_atol
            scale = max(
                float(np.max(np.abs(expected), initial=0.0)),
                float(np.max(sensitivity, initial=0.0)),
            )
        else:
            raise ValueError(f"kind must be value, gradient or network, got {kind!r}")

        allowed = atol + rtol * scale
        lower = expected
        upper = expected
        for other in envelope:
            lower = np.minimum(lower, np.asarray(other, dtype=np.float64))
            upper = np.maximum(upper, np.asarray(other, dtype=np.float64))
        with np.errstate(invalid="ignore"):
            error = np.maximum(np.maximum(lower - actual, actual - upper), 0.0)
        error = np.where(np.isnan(error) | np.isinf(actual), np.inf, error)
        ratios = error / allowed
        worst = float(np.max(ratios, initial=0.0))
        record(worst)
        if not worst <= 1.0:
            index = np.unravel_index(int(np.argmax(ratios)), ratios.shape)
            at = f" at index {tuple(int(i) for i in index)}" if ratios.ndim else ""
            raise ConformanceError(
                f"{what}: {actual[index]!r} differs from the reference "
                f"{expected[index]!r}{at} by {float(error[index]):.3g}, "
                f"{worst:.3g} times the {dtype} tolerance "
                f"(atol {atol:g} + rtol {rtol:g} * scale "
                f"{float(np.broadcast_to(scale, ratios.shape)[index]):.3g})"
            )
        return worst

    def assert_equal(self, actual: Any, expected: Any, *, what: str) -> None:
        """Check that ``actual`` equals ``expected`` exactly, entry by entry."""
        actual = np.asarray(actual)
        expected = np.asarray(expected)
        if actual.shape != expected.shape:
            raise ConformanceError(
                f"{what}: shape {actual.shape} differs from the reference "
                f"{expected.shape}"
            )
        mismatched = actual != expected
        record(0.0 if not mismatched.any() else float("inf"))
        if mismatched.any():
            where = np.argwhere(mismatched)
            first = tuple(int(i) for i in where[0])
            raise ConformanceError(
                f"{what}: {int(mismatched.sum())} of {actual.size} entries differ from "
                f"the reference; first at index {first}: {actual[first]!r} instead "
                f"of {expected[first]!r}"
            )
