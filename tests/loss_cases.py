"""One small input recipe per loss, for the tests that run every loss alike.

Each case splits its arguments into differentiable inputs (embeddings, patches),
whose leading axis is the batch, and fixed inputs (the MAE mask), also batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import sslspec


# eq=False keeps the default identity hash, which jax.jit needs of a function.
@dataclass(frozen=True, eq=False)
class LossCase:
    name: str
    function: Callable[..., Any]
    make_inputs: Callable[[np.random.Generator], list[np.ndarray]]
    make_fixed: Callable[[np.random.Generator], list[np.ndarray]] = lambda rng: []
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, inputs: list[Any], fixed: list[Any], **kwargs: Any) -> Any:
        return self.function(*inputs, *fixed, **self.kwargs, **kwargs)


def _pair(batch: int, dim: int) -> Callable[[np.random.Generator], list[np.ndarray]]:
    def make(rng: np.random.Generator) -> list[np.ndarray]:
        z_a = rng.standard_normal((batch, dim))
        z_b = z_a + 0.5 * rng.standard_normal((batch, dim))
        return [z_a, z_b]

    return make


def _single(batch: int, dim: int) -> Callable[[np.random.Generator], list[np.ndarray]]:
    def make(rng: np.random.Generator) -> list[np.ndarray]:
        # A standard deviation below 1 keeps VICReg's variance hinge active.
        return [0.6 * rng.standard_normal((batch, dim))]

    return make


def _patches(rng: np.random.Generator) -> list[np.ndarray]:
    target = rng.standard_normal((4, 6, 5))
    prediction = target + 0.3 * rng.standard_normal((4, 6, 5))
    return [prediction, target]


def _mask(rng: np.random.Generator) -> list[np.ndarray]:
    mask = np.zeros((4, 6))
    for row in mask:
        row[rng.permutation(6)[:4]] = 1.0
    return [mask]


LOSS_CASES = [
    LossCase("nt_xent", sslspec.nt_xent_loss, _pair(8, 5)),
    LossCase(
        "nt_xent_cold", sslspec.nt_xent_loss, _pair(8, 5), kwargs={"temperature": 0.05}
    ),
    LossCase("byol", sslspec.byol_loss, _pair(8, 5)),
    LossCase("barlow_twins", sslspec.barlow_twins_loss, _pair(8, 5)),
    LossCase("vicreg", sslspec.vicreg_loss, _pair(8, 5)),
    LossCase("invariance", sslspec.invariance_loss, _pair(8, 5)),
    LossCase("variance", sslspec.variance_loss, _single(8, 5)),
    LossCase("covariance", sslspec.covariance_loss, _single(8, 5)),
    LossCase("reconstruction", sslspec.reconstruction_loss, _patches, _mask),
    LossCase(
        "reconstruction_norm_pix",
        sslspec.reconstruction_loss,
        _patches,
        _mask,
        kwargs={"norm_pix_loss": True},
    ),
]

LOSS_CASE_IDS = [case.name for case in LOSS_CASES]
