"""Networks: a backend's forward pass with canonical parameters against the
reference forward pass, so that a checkpoint computes the same function on every
backend.

The descriptions and :func:`sslspec.networks.parameter_shapes` come from the spec;
the forward pass under test is the backend's ``apply_network``, and the expected
one is :mod:`sslspec_conformance.reference_networks`. Networks are checked in
float32, the dtype every backend trains in.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from sslspec_conformance import reference, reference_networks
from sslspec_conformance.profiles import settings_for

NETWORK_DTYPE = "float32"


def _round32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def random_parameters(description, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Return float32 canonical parameters for ``description``.

    Weights are normal with variance ``1 / fan_in`` and norm scales are near 1.
    Biases, position embeddings, the mask token and running means are small and
    normal, and running variances are uniform on ``[0.5, 1.5]``.
    """
    from sslspec.networks import parameter_shapes

    params = {}
    for name, shape in parameter_shapes(description).items():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(part.startswith("norm") for part in name.split(".")[:-1])
        if leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_mean":
            value = 0.2 * rng.standard_normal(shape)
        elif leaf == "weight" and is_norm:
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf == "weight":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        elif leaf == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = 0.5 * rng.standard_normal(shape)
        params[name] = _round32(value)
    return params


@st.composite
def mlps(draw):
    from sslspec.networks import MLP

    return MLP(
        in_features=draw(st.integers(1, 16)),
        hidden_features=tuple(draw(st.lists(st.integers(1, 16), max_size=2))),
        out_features=draw(st.integers(1, 16)),
        batch_norm=draw(st.booleans()),
        output_activation=draw(st.booleans()),
    )


@st.composite
def conv_encoders(draw):
    from sslspec.networks import ConvEncoder

    channels = tuple(draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
    scale = 2 ** (len(channels) - 1)
    height = scale * draw(st.integers(1, 3))
    width = scale * draw(st.integers(1, 3))
    return ConvEncoder(
        in_channels=draw(st.integers(1, 3)),
        image_size=(height, width),
        channels=channels,
    )


def _transformer_sizes(draw):
    # The sine-cosine position embedding that backends initialise needs a width
    # divisible by 4.
    heads = draw(st.integers(1, 4))
    dim = draw(st.sampled_from([d for d in (4, 8, 12, 16, 24) if d % heads == 0]))
    return {
        "num_heads": heads,
        "depth": draw(st.integers(1, 2)),
        "mlp_ratio": draw(st.sampled_from([1.0, 1.5, 2.0, 4.0])),
        "dim": dim,
    }


@st.composite
def vit_encoders(draw):
    from sslspec.networks import ViTEncoder

    patch = draw(st.integers(1, 3))
    sizes = _transformer_sizes(draw)
    return ViTEncoder(
        in_channels=draw(st.integers(1, 3)),
        image_size=(patch * draw(st.integers(1, 4)), patch * draw(st.integers(1, 4))),
        patch_size=patch,
        embed_dim=sizes["dim"],
        depth=sizes["depth"],
        num_heads=sizes["num_heads"],
        mlp_ratio=sizes["mlp_ratio"],
    )


@st.composite
def mae_decoders(draw):
    from sslspec.networks import MAEDecoder

    sizes = _transformer_sizes(draw)
    side = draw(st.integers(1, 4))
    return MAEDecoder(
        num_patches=side * side,
        patch_dim=draw(st.integers(1, 12)),
        encoder_dim=draw(st.integers(1, 12)),
        decoder_dim=sizes["dim"],
        depth=sizes["depth"],
        num_heads=sizes["num_heads"],
        mlp_ratio=sizes["mlp_ratio"],
    )


def _mask(rng: np.random.Generator, batch: int, length: int, keep: int):
    noise = rng.uniform(size=(batch, length))
    return reference.generate_mask(noise, mask_ratio=(length - keep) / length)


@st.composite
def network_cases(draw, kind: str):
    """Draw a description of ``kind``, its parameters, inputs and options."""
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(2, 8), label="batch")
    options: dict = {}
    if kind == "MLP":
        description = draw(mlps())
        inputs = rng.standard_normal((batch, description.in_features))
    elif kind == "ConvEncoder":
        description = draw(conv_encoders())
        shape = (batch, description.in_channels, *description.image_size)
        inputs = rng.standard_normal(shape)
    elif kind == "ViTEncoder":
        description = draw(vit_encoders())
        shape = (batch, description.in_channels, *description.image_size)
        inputs = rng.standard_normal(shape)
        length = description.num_patches
        if draw(st.booleans(), label="masked"):
            keep = draw(st.integers(1, length), label="keep")
            options["ids_keep"] = _mask(rng, batch, length, keep).ids_keep
    else:
        description = draw(mae_decoders())
        length = description.num_patches
        keep = draw(st.integers(1, length), label="keep")
        options["ids_restore"] = _mask(rng, batch, length, keep).ids_restore
        inputs = rng.standard_normal((batch, keep, description.encoder_dim))
    params = random_parameters(description, rng)
    return description, params, _round32(inputs), options


NETWORK_CHECKS = [
    ("MLP", False),
    ("MLP", True),
    ("ConvEncoder", False),
    ("ConvEncoder", True),
    ("ViTEncoder", False),
    ("MAEDecoder", False),
]


@pytest.mark.sslspec_function("apply_network", dtype=NETWORK_DTYPE)
@pytest.mark.parametrize(
    "function, train",
    [(f"apply_network[{kind}]", train) for kind, train in NETWORK_CHECKS],
    ids=[f"{kind}-{'train' if train else 'eval'}" for kind, train in NETWORK_CHECKS],
)
@settings_for("network")
@given(data=st.data())
def test_apply_network(conformance, function, train, data):
    if not conformance.has("networks"):
        pytest.skip("the backend does not declare the networks capability")
    if not hasattr(conformance.backend, "apply_network"):
        pytest.skip("the backend declares networks but has no apply_network method")
    kind = function[len("apply_network[") : -1]
    description, params, inputs, options = data.draw(network_cases(kind), label="case")
    note(f"{description}; inputs {inputs.shape}; options {sorted(options)}")

    try:
        output = conformance.backend.apply_network(
            description,
            params,
            conformance.asarray(inputs, NETWORK_DTYPE),
            train=train,
            **options,
        )
    except NotImplementedError as error:
        pytest.skip(f"apply_network is not implemented for {kind}: {error}")

    expected = reference_networks.forward(
        description, params, inputs.astype(np.float64), train=train, **options
    )
    conformance.assert_close(
        np.asarray(output, dtype=np.float64),
        expected,
        dtype=NETWORK_DTYPE,
        kind="network",
        what=f"{kind} output ({'train' if train else 'eval'} mode)",
    )
