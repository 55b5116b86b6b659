"""The tolerance table of the conformance suite and the input domain per dtype.

A result ``actual`` passes against the float64 reference ``expected`` when

.. code-block:: text

    |actual - expected| <= atol + rtol * scale,
    scale = max(|expected|, sensitivity)

elementwise. ``sensitivity`` estimates how far rounding can move the exact result
for these inputs: the suite evaluates the reference with every input and every
intermediate value it stores multiplied by ``1 + h * delta`` (see
:mod:`sslspec_conformance.rounding` and
:func:`sslspec_conformance.harness.sensitivity`) and takes the largest change
divided by ``h``. Where a function is well conditioned, ``scale`` is the size of
the result. Where it is ill conditioned, as for a constant column with a large
offset or a temperature of 0.05, ``scale`` grows with the damage rounding does.
Each rtol is therefore a fixed multiple of the dtype's unit roundoff, the same for
every function.

Gradients compare the whole array at once: ``scale`` is the largest entry of the
reference gradient or of its sensitivity, and an entry passes if it lies within
the tolerance of the interval spanned by the reference gradients at the exact and
the perturbed inputs, which admits either side of a kink. Network outputs compare
the whole array with ``scale`` the largest entry of the reference output.

The ratio ``|actual - expected| / (atol + rtol * scale)`` is the error relative to
the tolerance; a check passes when its largest ratio is at most 1, and reports show
that largest ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Tolerance",
    "Domain",
    "UNIT_ROUNDOFF",
    "TOLERANCES",
    "DOMAINS",
    "tolerance",
    "domain",
    "perturbation_step",
    "SMALLEST_NORMAL",
    "raised_epsilon",
    "format_table",
]

#: Unit roundoff ``2 ** -(mantissa bits + 1)`` of each floating dtype.
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


@dataclass(frozen=True)
class Tolerance:
    """Absolute and relative tolerances of one dtype, per kind of check.

    Network checks run in float32 only, so the other dtypes have no network
    tolerance (None).
    """

    dtype: str
    rtol: float
    atol: float
    gradient_rtol: float
    gradient_atol: float
    network_rtol: float | None = None
    network_atol: float | None = None


def _multiple(dtype: str, factor: int) -> float:
    return factor * UNIT_ROUNDOFF[dtype]


#: The one tolerance table. Each rtol is a power-of-two multiple of the dtype's
#: unit roundoff ``u``, four to twelve times the largest error relative to
#: ``u * scale`` seen on the NumPy, PyTorch and JAX backends (docs/conformance.md
#: lists the measurements). Each atol is 1e-3 times its rtol, so it only matters
#: where the result and its sensitivity are both below 1e-3.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        "float64",
        rtol=_multiple("float64", 128),
        atol=_multiple("float64", 128) * 1e-3,
        gradient_rtol=_multiple("float64", 256),
        gradient_atol=_multiple("float64", 256) * 1e-3,
    ),
    "float32": Tolerance(
        "float32",
        rtol=_multiple("float32", 64),
        atol=_multiple("float32", 64) * 1e-3,
        gradient_rtol=_multiple("float32", 128),
        gradient_atol=_multiple("float32", 128) * 1e-3,
        network_rtol=_multiple("float32", 128),
        network_atol=_multiple("float32", 128) * 1e-3,
    ),
    "float16": Tolerance(
        "float16",
        rtol=_multiple("float16", 16),
        atol=_multiple("float16", 16) * 1e-3,
        gradient_rtol=_multiple("float16", 64),
        gradient_atol=_multiple("float16", 64) * 1e-3,
    ),
    "bfloat16": Tolerance(
        "bfloat16",
        rtol=_multiple("bfloat16", 16),
        atol=_multiple("bfloat16", 16) * 1e-3,
        gradient_rtol=_multiple("bfloat16", 32),
        gradient_atol=_multiple("bfloat16", 32) * 1e-3,
    ),
}


@dataclass(frozen=True)
class Domain:
    """The inputs the strategies draw in one dtype.

    Attributes
    ----------
    max_magnitude : float
        Largest absolute value of an embedding, patch or parameter.
    min_row_norm : float
        Smallest norm of a near-zero row (exact zero rows are drawn too).
    min_eps : float
        Smallest ``eps`` passed to a function that takes one.
    """

    dtype: str
    max_magnitude: float
    min_row_norm: float
    min_eps: float


#: Input domain per dtype. The largest magnitude keeps every sum of squares the
#: spec forms (D * N * max**2 for the VICReg covariance) inside the dtype's range;
#: the smallest row norm and eps keep squared norms and epsilons normal numbers.
DOMAINS: dict[str, Domain] = {
    "float64": Domain("float64", max_magnitude=1e6, min_row_norm=1e-10, min_eps=1e-8),
    "float32": Domain("float32", max_magnitude=1e4, min_row_norm=1e-6, min_eps=1e-8),
    "float16": Domain("float16", max_magnitude=1.0, min_row_norm=2e-2, min_eps=1e-4),
    "bfloat16": Domain("bfloat16", max_magnitude=1e4, min_row_norm=1e-6, min_eps=1e-8),
}


#: Smallest positive normal number of each dtype.
SMALLEST_NORMAL = {
    "float64": 2.0**-1022,
    "float32": 2.0**-126,
    "float16": 2.0**-14,
    "bfloat16": 2.0**-126,
}


def raised_epsilon(eps: float, dtype: str) -> float:
    """Return ``eps`` raised to the smallest normal number of ``dtype``.

    The spec raises every epsilon (and the squared norm floor of L2 normalisation)
    that is below the smallest normal number of the dtype, because hardware that
    flushes subnormals to zero would turn it into 0. Only float16 is affected at
    the spec's defaults: 1e-5, 1e-6 and 1e-24 become 6.1e-5 there. The suite
    evaluates the reference with the raised values in that dtype.
    """
    return max(eps, SMALLEST_NORMAL[dtype])


def tolerance(dtype: str) -> Tolerance:
    """Return the tolerances of ``dtype``; raise KeyError naming the known dtypes."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(
            f"no tolerance for dtype {dtype!r}; the table covers "
            f"{', '.join(TOLERANCES)}"
        ) from None


def domain(dtype: str) -> Domain:
    """Return the input domain of ``dtype``."""
    try:
        return DOMAINS[dtype]
    except KeyError:
        raise KeyError(
            f"no input domain for dtype {dtype!r}; known: {', '.join(DOMAINS)}"
        ) from None


def perturbation_step(dtype: str) -> float:
    """Return the relative step ``h`` of the sensitivity estimate for ``dtype``."""
    return max(UNIT_ROUNDOFF[dtype], 1e-8)


def format_table() -> str:
    """Return the tolerance table as Markdown, as the documentation shows it."""

    def cell(value: float | None, dtype: str) -> str:
        if value is None:
            return "-"
        return f"{value:.3g} ({value / UNIT_ROUNDOFF[dtype]:.4g} u)"

    lines = [
        "| dtype | unit roundoff u | rtol | atol | gradient rtol | gradient atol "
        "| network rtol | network atol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in TOLERANCES.items():
        cells = [
            cell(value, name)
            for value in (
                row.rtol,
                row.atol,
                row.gradient_rtol,
                row.gradient_atol,
                row.network_rtol,
                row.network_atol,
            )
        ]
        lines.append(f"| {name} | {UNIT_ROUNDOFF[name]:.3g} | {' | '.join(cells)} |")
    return "\n".join(lines)
