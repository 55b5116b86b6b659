"""The losses under test: how to draw inputs, call the spec and the reference.

Each :class:`LossCase` ties a public loss of :mod:`sslspec` to its reference value
and analytic reference gradient, to the strategy that draws its inputs, and to the
indices of the inputs its gradient is checked for. The loss itself is looked up by
name at run time and never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from sslspec_conformance import reference
from sslspec_conformance import reference_gradients as gradients
from sslspec_conformance.strategies import (
    Case,
    embeddings,
    reconstruction_inputs,
    temperatures,
)
from sslspec_conformance.tolerances import domain, raised_epsilon

__all__ = ["LossCase", "LOSS_CASES", "LOSS_NAMES"]


def _no_dtype_options(dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class LossCase:
    """One loss of the spec and everything the suite needs to check it.

    Attributes
    ----------
    name : str
        Name of the function in :mod:`sslspec`.
    reference, gradient : callable
        Reference value and analytic reference gradients (a tuple, one per
        differentiable input).
    draw_inputs : callable
        ``draw_inputs(dtype)`` returns a strategy of :class:`Case`.
    differentiable : tuple of int
        Positions of the inputs that gradients are checked for.
    dtype_options : callable
        ``dtype_options(dtype, options)`` returns extra keyword arguments for the
        reference in ``dtype``: the epsilons and norm floor the spec raises to the
        smallest normal number (see
        :func:`~sslspec_conformance.tolerances.raised_epsilon`).
    """

    name: str
    reference: Callable[..., float]
    gradient: Callable[..., tuple]
    draw_inputs: Callable[[str], st.SearchStrategy[Case]]
    differentiable: tuple[int, ...]
    dtype_options: Callable[[str, dict[str, Any]], dict[str, Any]] = _no_dtype_options

    def reference_options(self, dtype: str, options: dict[str, Any]) -> dict[str, Any]:
        """Return the keyword arguments of the reference for ``options``."""
        return {**options, **self.dtype_options(dtype, options)}


def _with_options(strategy, options):
    """Return ``strategy`` with ``options`` (a strategy of dicts) merged in."""

    def merge(pair):
        case, extra = pair
        return Case(case.arrays, {**case.options, **extra}, case.description)

    return st.tuples(strategy, options).map(merge)


def _pairs(dtype: str):
    return embeddings(dtype, count=2)


def _single(dtype: str):
    return embeddings(dtype, count=1)


def _nt_xent_inputs(dtype: str):
    return _with_options(
        embeddings(dtype, count=2),
        st.fixed_dictionaries({"temperature": temperatures()}),
    )


def _barlow_inputs(dtype: str):
    lambdas = st.one_of(st.just(0.005), st.floats(0.0, 1.0))
    return _with_options(
        embeddings(dtype, count=2), st.fixed_dictionaries({"lambda_param": lambdas})
    )


def _vicreg_inputs(dtype: str):
    weight = st.floats(0.0, 50.0)
    weights = st.one_of(
        st.just({}),
        st.fixed_dictionaries(
            {
                "invariance_weight": weight,
                "variance_weight": weight,
                "covariance_weight": weight,
            }
        ),
    )
    return _with_options(embeddings(dtype, count=2), weights)


def _variance_inputs(dtype: str):
    limits = domain(dtype)
    options = st.one_of(
        st.just({}),
        st.fixed_dictionaries(
            {
                "target_std": st.floats(0.1, 4.0),
                "eps": st.floats(limits.min_eps, 1e-2),
            }
        ),
    )
    return _with_options(embeddings(dtype, count=1), options)


def _norm_floor(dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"norm_floor": math.sqrt(raised_epsilon(reference.NORM_FLOOR**2, dtype))}


def _barlow_eps(dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"eps": raised_epsilon(reference.BARLOW_EPS, dtype)}


def _variance_eps(dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"eps": raised_epsilon(options.get("eps", 1e-4), dtype)}


def _reconstruction_eps(dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"eps": raised_epsilon(options.get("eps", 1e-6), dtype)}


LOSS_CASES: dict[str, LossCase] = {
    case.name: case
    for case in [
        LossCase(
            "nt_xent_loss",
            reference.nt_xent_loss,
            gradients.nt_xent_loss,
            _nt_xent_inputs,
            (0, 1),
            _norm_floor,
        ),
        LossCase(
            "byol_loss",
            reference.byol_loss,
            gradients.byol_loss,
            _pairs,
            (0, 1),
            _norm_floor,
        ),
        LossCase(
            "barlow_twins_loss",
            reference.barlow_twins_loss,
            gradients.barlow_twins_loss,
            _barlow_inputs,
            (0, 1),
            _barlow_eps,
        ),
        LossCase(
            "vicreg_loss",
            reference.vicreg_loss,
            gradients.vicreg_loss,
            _vicreg_inputs,
            (0, 1),
        ),
        LossCase(
            "invariance_loss",
            reference.invariance_loss,
            gradients.invariance_loss,
            _pairs,
            (0, 1),
        ),
        LossCase(
            "variance_loss",
            reference.variance_loss,
            gradients.variance_loss,
            _variance_inputs,
            (0,),
            _variance_eps,
        ),
        LossCase(
            "covariance_loss",
            reference.covariance_loss,
            gradients.covariance_loss,
            _single,
            (0,),
        ),
        LossCase(
            "reconstruction_loss",
            reference.reconstruction_loss,
            gradients.reconstruction_loss,
            reconstruction_inputs,
            (0, 1),
            _reconstruction_eps,
        ),
    ]
}

LOSS_NAMES = tuple(LOSS_CASES)
