"""Hypothesis strategies for the conformance suite.

Hypothesis draws the structure of each input (sizes, a seed, a magnitude and the
numerical stresses to apply), and NumPy's generator fills in the values from the
seed. Large arrays therefore cost one draw, and a failure shrinks towards small
sizes and few stresses.

Every strategy takes the dtype under test and keeps to its
:class:`~sslspec_conformance.tolerances.Domain`: no absolute value above
``max_magnitude``, and every row either exactly zero or of norm at least
``min_row_norm``.

Sizes come from :func:`sizes` and :func:`embedding_shapes`. Under the ``thorough``
profile they draw every size in a range. Under ``ci`` they pick from a short menu
of the range's ends and sizes just above 16. Frameworks that compile a kernel per
shape then reuse their kernels across examples; JAX compiles every operation that
way, even outside ``jit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from sslspec_conformance import profiles
from sslspec_conformance.tolerances import Domain, domain

__all__ = [
    "MIN_BATCH",
    "MAX_BATCH",
    "MAX_DIM",
    "STRESSES",
    "Case",
    "sizes",
    "embedding_shapes",
    "batch_sizes",
    "dims",
    "temperatures",
    "embeddings",
    "mask_noise",
    "images",
    "patches",
    "parameter_dicts",
    "schedule_steps",
    "reconstruction_inputs",
]

MIN_BATCH = 2
MAX_BATCH = 64
MAX_DIM = 128

#: Numerical stresses that :func:`embeddings` applies, each to a random row or
#: column: an all-zero row, a row of norm near ``min_row_norm``, a copy of another
#: row, a column of one constant value, and a row scaled up to ``max_magnitude``.
STRESSES = (
    "zero_row",
    "near_zero_row",
    "duplicate_row",
    "constant_column",
    "large_row",
)

#: Relations of the second view to the first.
VIEW_RELATIONS = ("independent", "correlated", "identical", "negated")


@dataclass
class Case:
    """Arrays drawn for one example, with a description for failure reports.

    ``arrays`` are float64 and ``options`` contains the keyword arguments to pass.
    """

    arrays: tuple[np.ndarray, ...]
    options: dict = field(default_factory=dict)
    description: str = ""

    def __repr__(self) -> str:
        shapes = ", ".join(str(a.shape) for a in self.arrays)
        return f"Case({self.description}; shapes {shapes}; options {self.options})"


def sizes(min_value: int, max_value: int, menu: tuple[int, ...] = ()):
    """Sizes from ``min_value`` to ``max_value``.

    Under ``thorough``, any size, with both sides of 16 (where sorting algorithms
    change) equally likely. Under ``ci``, one of ``menu``, or by default the ends
    of the range and 17 where they allow it.
    """
    if profiles.active() == "ci":
        choices = menu or (min_value, 17, max_value)
        return st.sampled_from(
            sorted({c for c in choices if min_value <= c <= max_value})
        )
    if max_value <= 16 or min_value > 16:
        return st.integers(min_value, max_value)
    return st.one_of(st.integers(min_value, 16), st.integers(17, max_value))


#: (batch, dim) pairs of embeddings under ``ci``: both minima, a batch and a
#: dimension just above 16 on either side of each other, and both maxima.
CI_EMBEDDING_SHAPES = ((2, 1), (3, 17), (17, 3), (MAX_BATCH, MAX_DIM))


def embedding_shapes(
    min_batch: int = MIN_BATCH, max_batch: int = MAX_BATCH, max_dim: int = MAX_DIM
):
    """(batch, dim) shapes of embeddings."""
    if profiles.active() == "ci":
        menu = [
            (n, d)
            for n, d in CI_EMBEDDING_SHAPES
            if min_batch <= n <= max_batch and d <= max_dim
        ]
        return st.sampled_from(menu or [(min_batch, 1)])
    return st.tuples(batch_sizes(min_batch, max_batch), dims(max_dim))


def batch_sizes(min_value: int = MIN_BATCH, max_value: int = MAX_BATCH):
    """Batch sizes from ``min_value`` to ``max_value`` (2 to 64 by default)."""
    return sizes(min_value, max_value)


def dims(max_value: int = MAX_DIM):
    """Embedding dimensions from 1 to ``max_value`` (128 by default)."""
    return sizes(1, max_value)


def temperatures():
    """NT-Xent temperatures from 0.05 to 10, the ends included."""
    return st.one_of(
        st.sampled_from([0.05, 0.1, 0.5, 10.0]), st.floats(0.05, 10.0, allow_nan=False)
    )


def _magnitudes(limits: Domain):
    candidates = {1.0, 1e-2, 1e2, limits.max_magnitude}
    return st.sampled_from(sorted(m for m in candidates if m <= limits.max_magnitude))


def _base(rng: np.random.Generator, shape: tuple[int, ...], distribution: str):
    if distribution == "normal":
        return rng.standard_normal(shape)
    if distribution == "uniform":
        return rng.uniform(-1.0, 1.0, shape)
    # "positive": all entries of one sign, as after a ReLU.
    return np.abs(rng.standard_normal(shape))


def _scale_to(x: np.ndarray, magnitude: float) -> np.ndarray:
    peak = np.max(np.abs(x)) if x.size else 0.0
    return x if peak == 0.0 else x * (magnitude / peak)


def _random_direction(rng: np.random.Generator, dim: int) -> np.ndarray:
    direction = rng.standard_normal(dim)
    norm = np.linalg.norm(direction)
    return direction / norm if norm > 0 else np.ones(dim) / np.sqrt(dim)


def _apply_stress(
    x: np.ndarray,
    stress: str,
    rng: np.random.Generator,
    limits: Domain,
    magnitude: float,
) -> None:
    rows, cols = x.shape
    k = int(rng.integers(rows))
    if stress == "zero_row":
        x[k] = 0.0
    elif stress == "near_zero_row":
        norm = min(limits.min_row_norm * 10.0 ** rng.uniform(0.0, 2.0), magnitude)
        x[k] = _random_direction(rng, cols) * norm
    elif stress == "duplicate_row":
        x[k] = x[int(rng.integers(rows))]
    elif stress == "constant_column":
        x[:, int(rng.integers(cols))] = magnitude * rng.uniform(-1.0, 1.0)
    elif stress == "large_row":
        x[k] = _scale_to(x[k], limits.max_magnitude)
    else:
        raise ValueError(f"unknown stress {stress!r}; known: {', '.join(STRESSES)}")


def _enforce_domain(x: np.ndarray, limits: Domain) -> np.ndarray:
    """Clip to the domain and lift rows of tiny norm to ``min_row_norm``."""
    x = np.clip(x, -limits.max_magnitude, limits.max_magnitude)
    for k in range(x.shape[0]):
        norm = float(np.linalg.norm(x[k]))
        if 0.0 < norm < limits.min_row_norm:
            x[k] = x[k] * (limits.min_row_norm * 2.0 / norm)
    return x


@st.composite
def embeddings(
    draw,
    dtype: str,
    *,
    count: int = 2,
    min_batch: int = MIN_BATCH,
    max_batch: int = MAX_BATCH,
    max_dim: int = MAX_DIM,
) -> Case:
    """Draw ``count`` embedding arrays of one shape (N, D), possibly stressed.

    With two arrays, the second is independent of the first, a small perturbation
    of it, identical to it, or its negation.
    """
    limits = domain(dtype)
    size, dim = draw(embedding_shapes(min_batch, max_batch, max_dim), label="shape")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    distribution = draw(st.sampled_from(["normal", "uniform", "positive"]))
    magnitude = draw(_magnitudes(limits), label="magnitude")
    relation = draw(st.sampled_from(VIEW_RELATIONS)) if count == 2 else "independent"
    stresses = draw(st.lists(st.sampled_from(STRESSES), unique=True, max_size=3))

    rng = np.random.default_rng(seed)
    first = _scale_to(_base(rng, (size, dim), distribution), magnitude)
    arrays = [first]
    for _ in range(count - 1):
        if relation == "independent":
            other = _scale_to(_base(rng, (size, dim), distribution), magnitude)
        elif relation == "correlated":
            other = first + 0.1 * magnitude * rng.standard_normal((size, dim))
        elif relation == "identical":
            other = first.copy()
        else:
            other = -first
        arrays.append(other)
    for x in arrays:
        for stress in stresses:
            _apply_stress(x, stress, rng, limits, magnitude)
    arrays = [_enforce_domain(x, limits) for x in arrays]
    description = (
        f"{distribution} values of magnitude {magnitude:g}, views {relation}, "
        f"stresses {stresses or 'none'}, seed {seed}"
    )
    return Case(tuple(arrays), {}, description)


@st.composite
def mask_noise(draw, dtype: str) -> Case:
    """Draw (B, L) noise and a ``mask_ratio`` that keeps and masks at least one.

    The noise is uniform on ``[0, 1)``, or has many ties (a few distinct values,
    or one value), or is already sorted or reversed.
    """
    batch = draw(batch_sizes(), label="batch")
    length = draw(sizes(2, MAX_DIM, (2, 16, 17, MAX_DIM)), label="L")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    kind = draw(st.sampled_from(["uniform", "ties", "constant", "sorted", "reversed"]))
    by_count = draw(st.booleans())
    if by_count:
        masked = draw(st.integers(1, length - 1), label="masked")
        ratio = masked / length
    else:
        ratio = draw(
            st.floats(0.0, 1.0).filter(lambda r: 1 <= round(length * r) <= length - 1)
        )
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        noise = rng.uniform(0.0, 1.0, (batch, length))
    elif kind == "ties":
        levels = int(rng.integers(2, 5))
        noise = rng.integers(0, levels, (batch, length)) / levels
    elif kind == "constant":
        noise = np.full((batch, length), 0.5)
    elif kind == "sorted":
        noise = np.sort(rng.uniform(0.0, 1.0, (batch, length)), axis=1)
    else:
        noise = np.sort(rng.uniform(0.0, 1.0, (batch, length)), axis=1)[:, ::-1].copy()
    return Case((noise,), {"mask_ratio": ratio}, f"{kind} noise, seed {seed}")


@st.composite
def images(draw, dtype: str) -> Case:
    """Draw (B, C, H, W) images and a patch size that divides H and W."""
    limits = domain(dtype)
    batch = draw(sizes(1, 16, (1, 3)), label="batch")
    channels = draw(sizes(1, 4, (1, 3)), label="channels")
    patch_size = draw(sizes(1, 8, (1, 2, 5)), label="patch_size")
    rows = draw(sizes(1, 8, (1, 3, 8)), label="rows")
    cols = draw(sizes(1, 8, (1, 3, 8)), label="cols")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    shape = (batch, channels, rows * patch_size, cols * patch_size)
    values = _scale_to(rng.standard_normal(shape), limits.max_magnitude)
    return Case((values,), {"patch_size": patch_size}, f"seed {seed}")


@st.composite
def patches(draw, dtype: str) -> Case:
    """Draw (B, L, p * p * C) patches and the ``image_size`` of their grid."""
    case = draw(images(dtype))
    (values,) = case.arrays
    p = case.options["patch_size"]
    batch, channels, height, width = values.shape
    length = (height // p) * (width // p)
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    patch_values = rng.standard_normal((batch, length, p * p * channels))
    options = {"patch_size": p, "image_size": (height, width)}
    return Case((patch_values,), options, f"seed {seed}")


@st.composite
def parameter_dicts(draw, dtype: str) -> Case:
    """Draw online and target parameter mappings and a momentum in [0, 1]."""
    limits = domain(dtype)
    count = draw(st.integers(1, 4), label="parameters")
    shapes = draw(
        st.lists(
            st.lists(sizes(1, 16, (1, 3, 16)), min_size=0, max_size=3).map(tuple),
            min_size=count,
            max_size=count,
        )
    )
    momentum = draw(
        st.one_of(st.sampled_from([0.0, 0.996, 1.0]), st.floats(0.0, 1.0)),
        label="momentum",
    )
    magnitude = draw(_magnitudes(limits), label="magnitude")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    names = [f"layers.{i}.weight" for i in range(count)]
    online = {}
    target = {}
    for name, shape in zip(names, shapes, strict=True):
        online[name] = _scale_to(rng.standard_normal(shape), magnitude)
        target[name] = _scale_to(rng.standard_normal(shape), magnitude)
    return Case((), {"online": online, "target": target, "momentum": momentum}, "")


@st.composite
def schedule_steps(draw) -> Case:
    """Draw arguments of ``momentum_schedule``, with steps before 0 and after K."""
    total = draw(st.one_of(st.integers(1, 20), st.integers(1, 10**6)), label="K")
    step = draw(st.integers(-5, total + 5), label="step")
    base = draw(st.one_of(st.just(0.996), st.floats(0.0, 1.0)), label="base")
    final = draw(st.one_of(st.just(1.0), st.floats(base, 1.0)), label="final")
    options = {"base_momentum": base, "final_momentum": final}
    return Case((), {"step": step, "total_steps": total, **options}, "")


@st.composite
def reconstruction_inputs(draw, dtype: str) -> Case:
    """Draw prediction and target (B, L, P), a mask (B, L) and the options."""
    limits = domain(dtype)
    batch = draw(batch_sizes(max_value=16), label="batch")
    length = draw(sizes(1, 64, (1, 17, 64)), label="L")
    patch_dim = draw(sizes(1, 48, (1, 2, 48)), label="P")
    norm_pix_loss = draw(st.booleans()) if patch_dim >= 2 else False
    mask_kind = draw(st.sampled_from(["random", "none", "all", "fractional"]))
    magnitude = draw(_magnitudes(limits), label="magnitude")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    options: dict = {"norm_pix_loss": norm_pix_loss}
    if norm_pix_loss and (dtype == "float16" or draw(st.booleans())):
        options["eps"] = draw(st.floats(limits.min_eps, 1e-2), label="eps")

    rng = np.random.default_rng(seed)
    shape = (batch, length, patch_dim)
    prediction = _scale_to(rng.standard_normal(shape), magnitude)
    target = _scale_to(rng.standard_normal(shape), magnitude)
    if draw(st.booleans()):
        # Constant patches: norm_pix_loss divides them by sqrt(eps) alone.
        target[:, int(rng.integers(length))] = magnitude * rng.uniform(-1.0, 1.0)
    if mask_kind == "random":
        mask = (rng.uniform(size=(batch, length)) < 0.75).astype(np.float64)
    elif mask_kind == "none":
        mask = np.zeros((batch, length))
    elif mask_kind == "all":
        mask = np.ones((batch, length))
    else:
        mask = rng.uniform(size=(batch, length))
    description = f"mask {mask_kind}, magnitude {magnitude:g}, seed {seed}"
    return Case((prediction, target, mask), options, description)
