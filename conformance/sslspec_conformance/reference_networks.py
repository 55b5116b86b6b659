"""Float64 NumPy forward pass of each network description in :mod:`sslspec.networks`.

Written from the layer semantics that :mod:`sslspec.networks` documents, with the
canonical (PyTorch) parameter layout: linear weight ``(out, in)`` applied as
``x @ weight.T + bias``, convolution weight ``(out, in, kh, kw)`` applied as a
cross-correlation on NCHW images with zero padding. Batch norm uses the batch mean
and biased batch variance in training mode and the running buffers in evaluation
mode, with ``eps = 1e-5``. Layer norm uses the biased variance over the last axis,
with ``eps = 1e-6``. GELU is the exact ``x * Phi(x)``.

The forward passes return outputs only; the running-buffer update of training-mode
batch norm is not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from sslspec_conformance.reference import patchify

__all__ = ["forward"]

BATCH_NORM_EPS = 1e-5
LAYER_NORM_EPS = 1e-6

Params = Mapping[str, np.ndarray]


def _param(params: Params, name: str) -> np.ndarray:
    return np.asarray(params[name], dtype=np.float64)


def linear(params: Params, prefix: str, x: np.ndarray) -> np.ndarray:
    """Apply ``x @ weight.T + bias``; the bias is optional."""
    y = x @ _param(params, f"{prefix}.weight").T
    if f"{prefix}.bias" in params:
        y = y + _param(params, f"{prefix}.bias")
    return y


def batch_norm(
    params: Params, prefix: str, x: np.ndarray, *, train: bool, channel_axis: int = 1
) -> np.ndarray:
    """Normalise each channel with batch statistics (train) or running buffers."""
    axes = tuple(axis for axis in range(x.ndim) if axis != channel_axis)
    shape = [1] * x.ndim
    shape[channel_axis] = x.shape[channel_axis]
    if train:
        mean = x.mean(axis=axes)
        variance = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    else:
        mean = _param(params, f"{prefix}.running_mean")
        variance = _param(params, f"{prefix}.running_var")
    normalized = (x - mean.reshape(shape)) / np.sqrt(
        variance.reshape(shape) + BATCH_NORM_EPS
    )
    weight = _param(params, f"{prefix}.weight").reshape(shape)
    bias = _param(params, f"{prefix}.bias").reshape(shape)
    return normalized * weight + bias


def layer_norm(params: Params, prefix: str, x: np.ndarray) -> np.ndarray:
    """Normalise over the last axis with the biased variance, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    normalized = (x - mean) / np.sqrt(variance + LAYER_NORM_EPS)
    return normalized * _param(params, f"{prefix}.weight") + _param(
        params, f"{prefix}.bias"
    )


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray) -> np.ndarray:
    """Return the exact GELU ``x * Phi(x) = x * (1 + erf(x / sqrt(2))) / 2``."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def conv3x3(weight: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Cross-correlate NCHW ``images`` with ``weight`` (out, in, 3, 3), stride 1,
    zero padding 1."""
    batch, _, height, width = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((batch, weight.shape[0], height, width))
    for di in range(3):
        for dj in range(3):
            window = padded[:, :, di : di + height, dj : dj + width]
            out += np.einsum("oc,bchw->bohw", weight[:, :, di, dj], window)
    return out


def max_pool2x2(x: np.ndarray) -> np.ndarray:
    """Max over non-overlapping 2x2 windows of NCHW ``x``."""
    batch, channels, height, width = x.shape
    windows = x.reshape(batch, channels, height // 2, 2, width // 2, 2)
    return windows.max(axis=(3, 5))


def attention(params: Params, prefix: str, x: np.ndarray, num_heads: int) -> np.ndarray:
    """Multi-head self-attention with a fused ``qkv`` projection."""
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    qkv = linear(params, f"{prefix}.qkv", x)
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    heads = []
    for h in range(num_heads):
        columns = slice(h * head_dim, (h + 1) * head_dim)
        scores = (
            q[..., columns] @ np.swapaxes(k[..., columns], 1, 2) / math.sqrt(head_dim)
        )
        heads.append(softmax(scores) @ v[..., columns])
    return linear(params, f"{prefix}.proj", np.concatenate(heads, axis=-1))


def transformer_block(
    params: Params, prefix: str, x: np.ndarray, num_heads: int
) -> np.ndarray:
    """Pre-norm block: attention then MLP, each with a residual connection."""
    x = x + attention(
        params, f"{prefix}.attn", layer_norm(params, f"{prefix}.norm1", x), num_heads
    )
    hidden = gelu(
        linear(params, f"{prefix}.mlp.fc1", layer_norm(params, f"{prefix}.norm2", x))
    )
    return x + linear(params, f"{prefix}.mlp.fc2", hidden)


def mlp_forward(
    description, params: Params, x: np.ndarray, *, train: bool
) -> np.ndarray:
    """Forward pass of :class:`sslspec.networks.MLP` on (B, in_features) inputs."""
    last = len(description.hidden_features)
    for i in range(last + 1):
        x = linear(params, f"layers.{i}", x)
        if i < last:
            if description.batch_norm:
                x = batch_norm(params, f"norms.{i}", x, train=train)
            x = relu(x)
    if description.output_activation:
        x = relu(x)
    return x


def conv_encoder_forward(
    description, params: Params, images: np.ndarray, *, train: bool
) -> np.ndarray:
    """Forward pass of :class:`sslspec.networks.ConvEncoder` on NCHW images;
    returns (B, channels[-1]) features."""
    x = images
    last = len(description.channels) - 1
    for i in range(last + 1):
        x = conv3x3(_param(params, f"blocks.{i}.conv.weight"), x)
        x = relu(batch_norm(params, f"blocks.{i}.norm", x, train=train))
        if i < last:
            x = max_pool2x2(x)
    return x.mean(axis=(2, 3))


def vit_encoder_forward(
    description, params: Params, images: np.ndarray, *, ids_keep: np.ndarray | None
) -> np.ndarray:
    """Forward pass of :class:`sslspec.networks.ViTEncoder`; returns the normed
    tokens (B, K, D) of the patches ``ids_keep``, or (B, L, D) of all patches."""
    patches = patchify(images, description.patch_size)
    x = linear(params, "patch_embed", patches) + _param(params, "pos_embed")
    if ids_keep is not None:
        x = np.stack([x[b, ids_keep[b]] for b in range(x.shape[0])])
    for i in range(description.depth):
        x = transformer_block(params, f"blocks.{i}", x, description.num_heads)
    return layer_norm(params, "norm", x)


def mae_decoder_forward(
    description, params: Params, latent: np.ndarray, *, ids_restore: np.ndarray
) -> np.ndarray:
    """Forward pass of :class:`sslspec.networks.MAEDecoder` on the visible tokens
    (B, K, encoder_dim); returns (B, L, patch_dim)."""
    x = linear(params, "embed", latent)
    batch, visible, dim = x.shape
    masked = description.num_patches - visible
    mask_tokens = np.broadcast_to(_param(params, "mask_token"), (batch, masked, dim))
    shuffled = np.concatenate([x, mask_tokens], axis=1)
    x = np.stack([shuffled[b, ids_restore[b]] for b in range(batch)])
    x = x + _param(params, "pos_embed")
    for i in range(description.depth):
        x = transformer_block(params, f"blocks.{i}", x, description.num_heads)
    return linear(params, "pred", layer_norm(params, "norm", x))


def forward(
    description,
    params: Params,
    inputs: np.ndarray,
    *,
    ids_keep: np.ndarray | None = None,
    ids_restore: np.ndarray | None = None,
    train: bool = False,
) -> np.ndarray:
    """Return the float64 output of ``description`` with canonical ``params``.

    Dispatches on the class name of the description so that only the
    dataclasses, never code, come from :mod:`sslspec.networks`.
    """
    inputs = np.asarray(inputs, dtype=np.float64)
    kind = type(description).__name__
    if kind == "MLP":
        return mlp_forward(description, params, inputs, train=train)
    if kind == "ConvEncoder":
        return conv_encoder_forward(description, params, inputs, train=train)
    if kind == "ViTEncoder":
        return vit_encoder_forward(description, params, inputs, ids_keep=ids_keep)
    if kind == "MAEDecoder":
        if ids_restore is None:
            raise ValueError("an MAEDecoder needs ids_restore")
        return mae_decoder_forward(description, params, inputs, ids_restore=ids_restore)
    raise TypeError(f"no reference forward pass for {kind}")
