"""Flax NNX versions of the networks in :mod:`sslspec.networks`.

The modules use Flax's own parameter layouts (linear kernel ``(in, out)``,
convolution kernel ``(kh, kw, in, out)`` on NHWC activations, norm ``scale``) and
:func:`to_canonical` / :func:`from_canonical` convert them to and from the canonical
PyTorch layout, so a checkpoint written by any backend loads here and computes the
same function.

Attribute paths mirror the canonical names: the Flax variable
``("blocks", 0, "attn", "qkv", "kernel")`` is the canonical
``blocks.0.attn.qkv.weight``, transposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslspec import networks as spec
from sslspec.mae import patchify

__all__ = [
    "BatchNorm",
    "Attention",
    "Block",
    "MLP",
    "ConvEncoder",
    "ViTEncoder",
    "MAEDecoder",
    "build_network",
    "canonical_name",
    "to_canonical",
    "from_canonical",
    "load_canonical",
    "state_to_canonical",
    "canonical_to_state",
]

Initializer = Callable[..., jax.Array]


def _uniform_fan_in(fan_in: int) -> Initializer:
    """Return U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for linear and
    convolution weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(
    in_features: int,
    out_features: int,
    *,
    rngs: nnx.Rngs,
    dtype: Any,
    use_bias: bool = True,
    xavier: bool = False,
) -> nnx.Linear:
    """Build a linear layer initialised as PyTorch does, or with Xavier-uniform
    weights and zero bias (the MAE transformer initialisation)."""
    if xavier:
        kernel_init = nnx.initializers.xavier_uniform()
        bias_init = nnx.initializers.zeros_init()
    else:
        kernel_init = _uniform_fan_in(in_features)
        bias_init = _uniform_fan_in(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """Batch norm over the last axis with PyTorch's running statistics.

    Flax's :class:`flax.nnx.BatchNorm` pushes the biased batch variance into its
    running variance; the canonical layer (``torch.nn.BatchNorm1d/2d``) pushes the
    unbiased one, so this module does the same. ``momentum`` follows the Flax
    convention and weights the old running value: the canonical update
    ``running = 0.9 * running + 0.1 * batch_stat`` is ``momentum=0.9``.

    In training mode (``use_running_average=False``, set by ``Module.train()``) the
    input is normalised with the batch mean and biased variance and the running
    statistics are updated. In evaluation mode (``Module.eval()``) it is normalised
    with the running statistics. Statistics and output are float32 whatever the
    input dtype.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
    ) -> None:
        self.num_features = num_features
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            if count < 2:
                raise ValueError(
                    f"batch norm in training mode needs more than one value per "
                    f"feature, got input of shape {x.shape}"
                )
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            unbiased = var * (count / (count - 1))
            self.mean[...] = self.momentum * self.mean[...] + (
                1 - self.momentum
            ) * jax.lax.stop_gradient(mean)
            self.var[...] = self.momentum * self.var[...] + (
                1 - self.momentum
            ) * jax.lax.stop_gradient(unbiased)
        inverse = jax.lax.rsqrt(var + self.epsilon)
        return (x - mean) * inverse * self.scale[...] + self.bias[...]


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance (use_fast_variance=False) as in torch.nn.LayerNorm, so that
    # outputs agree with PyTorch to float32 rounding.
    return nnx.LayerNorm(
        dim, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class MLP(nnx.Module):
    """:class:`sslspec.networks.MLP` with canonical attribute paths
    ``layers.{i}`` and ``norms.{i}``."""

    def __init__(
        self, description: spec.MLP, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ) -> None:
        self.description = description
        sizes = [
            description.in_features,
            *description.hidden_features,
            description.out_features,
        ]
        hidden = len(sizes) - 2
        layers = []
        norms = []
        for i in range(hidden + 1):
            is_hidden = i < hidden
            use_bias = not (is_hidden and description.batch_norm)
            layers.append(
                _linear(
                    sizes[i], sizes[i + 1], rngs=rngs, dtype=dtype, use_bias=use_bias
                )
            )
            if is_hidden and description.batch_norm:
                norms.append(BatchNorm(sizes[i + 1]))
        self.layers = nnx.List(layers)
        self.norms = nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                if self.description.batch_norm:
                    x = self.norms[i](x)
                x = jax.nn.relu(x)
        if self.description.output_activation:
            x = jax.nn.relu(x)
        return x


class ConvBlock(nnx.Module):
    """3x3 convolution without bias, then batch norm (ReLU is applied by the
    caller)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs, dtype: Any
    ) -> None:
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=(3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=_uniform_fan_in(in_channels * 9),
            dtype=dtype,
            rngs=rngs,
        )
        self.norm = BatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class ConvEncoder(nnx.Module):
    """:class:`sslspec.networks.ConvEncoder`. Takes NCHW images like the canonical
    network and runs NHWC inside, as XLA convolutions prefer."""

    def __init__(
        self,
        description: spec.ConvEncoder,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        self.description = description
        blocks = []
        in_channels = description.in_channels
        for out_channels in description.channels:
            blocks.append(ConvBlock(in_channels, out_channels, rngs=rngs, dtype=dtype))
            in_channels = out_channels
        self.blocks = nnx.List(blocks)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jnp.transpose(images, (0, 2, 3, 1))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = jax.nn.relu(block(x))
            if i < last:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection, laid out as in
    :mod:`sslspec.networks`. Softmax runs in float32."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, rngs=rngs, dtype=dtype, xavier=True)
        self.proj = _linear(dim, dim, rngs=rngs, dtype=dtype, xavier=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x)
        q, k, v = (
            part.reshape(batch, tokens, self.num_heads, head_dim)
            for part in jnp.split(qkv, 3, axis=-1)
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        return self.proj(out.reshape(batch, tokens, dim))


class FeedForward(nnx.Module):
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any) -> None:
        self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype, xavier=True)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype, xavier=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
    ) -> None:
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _sincos(dim: int, grid: tuple[int, int]) -> jax.Array:
    table = spec.sincos_pos_embed(dim, grid)
    return jnp.asarray(np.asarray(table, dtype=np.float32)[None])


class ViTEncoder(nnx.Module):
    """:class:`sslspec.networks.ViTEncoder` (the MAE encoder)."""

    def __init__(
        self,
        description: spec.ViTEncoder,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        self.description = description
        dim = description.embed_dim
        self.patch_embed = _linear(
            description.patch_dim, dim, rngs=rngs, dtype=dtype, xavier=True
        )
        height, width = description.image_size
        grid = (height // description.patch_size, width // description.patch_size)
        self.pos_embed = nnx.Param(_sincos(dim, grid))
        self.blocks = nnx.List(
            [
                Block(
                    dim,
                    description.num_heads,
                    description.mlp_ratio,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(description.depth)
            ]
        )
        self.norm = _layer_norm(dim, rngs)

    def __call__(
        self, images: jax.Array, ids_keep: jax.Array | None = None
    ) -> jax.Array:
        """Return the normed tokens ``(B, K, D)`` of the visible patches
        ``ids_keep`` ``(B, K)``, or of every patch when ``ids_keep`` is None."""
        patches = patchify(images, self.description.patch_size)
        x = self.patch_embed(patches) + self.pos_embed[...].astype(patches.dtype)
        if ids_keep is not None:
            x = jnp.take_along_axis(x, ids_keep[:, :, None].astype(jnp.int32), axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, images: jax.Array) -> jax.Array:
        """Return evaluation features: the mean over all tokens, no mask."""
        return jnp.mean(self(images), axis=1)


class MAEDecoder(nnx.Module):
    """:class:`sslspec.networks.MAEDecoder`."""

    def __init__(
        self,
        description: spec.MAEDecoder,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        self.description = description
        dim = description.decoder_dim
        self.embed = _linear(
            description.encoder_dim, dim, rngs=rngs, dtype=dtype, xavier=True
        )
        self.mask_token = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, 1, dim), jnp.float32)
        )
        side = math.isqrt(description.num_patches)
        if side * side == description.num_patches:
            self.pos_embed = nnx.Param(_sincos(dim, (side, side)))
        else:
            # NOTE: the description has no grid shape, so a non-square patch grid
            # is embedded as a single row, as the PyTorch backend does.
            self.pos_embed = nnx.Param(_sincos(dim, (1, description.num_patches)))
        self.blocks = nnx.List(
            [
                Block(
                    dim,
                    description.num_heads,
                    description.mlp_ratio,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(description.depth)
            ]
        )
        self.norm = _layer_norm(dim, rngs)
        self.pred = _linear(
            dim, description.patch_dim, rngs=rngs, dtype=dtype, xavier=True
        )

    def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """Return patch predictions ``(B, L, patch_dim)`` from the visible tokens
        ``latent`` ``(B, K, encoder_dim)``."""
        x = self.embed(latent)
        batch, visible, dim = x.shape
        hidden = self.description.num_patches - visible
        mask_tokens = jnp.broadcast_to(
            self.mask_token[...].astype(x.dtype), (batch, hidden, dim)
        )
        x = jnp.concatenate([x, mask_tokens], axis=1)
        x = jnp.take_along_axis(x, ids_restore[:, :, None].astype(jnp.int32), axis=1)
        x = x + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)).astype(jnp.float32)


_MODULES: dict[type, type[nnx.Module]] = {
    spec.MLP: MLP,
    spec.ConvEncoder: ConvEncoder,
    spec.ViTEncoder: ViTEncoder,
    spec.MAEDecoder: MAEDecoder,
}


def build_network(
    description: spec.NetworkDescription,
    *,
    rngs: nnx.Rngs | int = 0,
    dtype: Any = jnp.float32,
) -> nnx.Module:
    """Build the NNX module for ``description`` with freshly initialised parameters.

    Parameters
    ----------
    description
        A network description from :mod:`sslspec.networks`.
    rngs
        Random streams (or an integer seed) for the initialisation.
    dtype
        Compute dtype of linear layers, convolutions and attention; parameters and
        norms stay float32.
    """
    module = _MODULES.get(type(description))
    if module is None:
        raise TypeError(
            f"description must be one of MLP, ConvEncoder, ViTEncoder or MAEDecoder, "
            f"got {type(description).__name__}"
        )
    spec.parameter_shapes(description)  # validates the sizes
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs)
    return module(description, rngs=rngs, dtype=dtype)


# Flax leaf name -> canonical leaf name.
_LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "pos_embed": "pos_embed",
    "mask_token": "mask_token",
}
_CANONICAL_VARIABLES = nnx.Any(nnx.Param, nnx.BatchStat)


def canonical_name(path: tuple[Any, ...]) -> str:
    """Return the canonical name of the Flax variable at ``path``."""
    *parents, leaf = (str(part) for part in path)
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"variable {'.'.join(map(str, path))} has no canonical name")
    return ".".join([*parents, _LEAF_NAMES[leaf]])


def _to_canonical_array(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
    return value


def _from_canonical_array(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    return value


def _to_numpy(value: Any) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    if array.dtype == jnp.bfloat16:
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def state_to_canonical(state: nnx.State) -> dict[str, np.ndarray]:
    """Convert an NNX state (parameters and batch statistics) to canonical NumPy
    arrays keyed by canonical name."""
    canonical = {}
    for path, variable in nnx.to_flat_state(state):
        value = variable[...] if isinstance(variable, nnx.Variable) else variable
        leaf = str(path[-1])
        canonical[canonical_name(path)] = _to_canonical_array(leaf, _to_numpy(value))
    return canonical


def canonical_to_state(
    state: nnx.State,
    params: Mapping[str, Any],
    *,
    strict: bool = True,
    device: jax.Device | None = None,
) -> nnx.State:
    """Return a copy of ``state`` whose variables contain the canonical ``params``.

    Parameters
    ----------
    state
        Template state; gives the Flax paths, shapes and dtypes.
    params
        Canonical name -> array in the PyTorch layout.
    strict
        Raise on names in ``params`` that ``state`` lacks. Missing names always
        raise.
    device
        Where to put the arrays; by default the device of each template variable.

    Raises
    ------
    ValueError
        Naming every missing, unexpected or misshapen entry.
    """
    flat = list(nnx.to_flat_state(state))
    names = [canonical_name(path) for path, _ in flat]
    missing = [name for name in names if name not in params]
    unexpected = sorted(set(params) - set(names)) if strict else []
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected)}")
    new_flat = []
    for (path, variable), name in zip(flat, names, strict=True):
        if name not in params:
            continue
        template = variable.get_value()
        leaf = str(path[-1])
        expected = _to_canonical_array(leaf, np.empty(template.shape)).shape
        value = np.asarray(params[name])
        if value.shape != expected:
            problems.append(f"{name} has shape {value.shape}, expected {expected}")
            continue
        value = _from_canonical_array(leaf, value).astype(template.dtype)
        target = device if device is not None else _device_of(template)
        new_flat.append((path, variable.replace(jax.device_put(value, target))))
    if problems:
        raise ValueError("canonical parameters do not match: " + "; ".join(problems))
    return nnx.from_flat_state(new_flat)


def _device_of(array: jax.Array) -> jax.Device | None:
    devices = getattr(array, "devices", None)
    if devices is None:
        return None
    found = devices()
    return next(iter(found)) if len(found) == 1 else None


def to_canonical(model: nnx.Module) -> dict[str, np.ndarray]:
    """Return the parameters and batch-norm buffers of ``model`` as canonical NumPy
    arrays (PyTorch layout), in the order of
    :func:`sslspec.networks.parameter_shapes`."""
    canonical = state_to_canonical(nnx.state(model, _CANONICAL_VARIABLES))
    description = getattr(model, "description", None)
    if description is None:
        return canonical
    return {name: canonical[name] for name in spec.parameter_shapes(description)}


def load_canonical(model: nnx.Module, params: Mapping[str, Any]) -> nnx.Module:
    """Overwrite the parameters and buffers of ``model`` with canonical ``params``
    in place and return ``model``.

    Raises
    ------
    ValueError
        Naming every missing, unexpected or misshapen entry.
    """
    state = nnx.state(model, _CANONICAL_VARIABLES)
    nnx.update(model, canonical_to_state(state, params))
    return model


def from_canonical(
    description: spec.NetworkDescription,
    params: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    device: jax.Device | None = None,
) -> nnx.Module:
    """Build the NNX module for ``description`` with the canonical ``params``.

    Parameters are not initialised randomly first: the module is traced abstractly
    and then filled from ``params``.

    Raises
    ------
    ValueError
        Naming every missing, unexpected or misshapen entry.
    """
    abstract = nnx.eval_shape(lambda: build_network(description, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    if device is None:
        device = jax.devices()[0]
    filled = canonical_to_state(state, params, device=device)
    return nnx.merge(graphdef, filled)
