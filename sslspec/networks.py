"""Framework-neutral network descriptions and their canonical parameters.

A description is a frozen dataclass of sizes and layer kinds. Every backend builds it
natively (``torch.nn.Module``, Flax NNX module, ...) and must use the parameter names
and shapes that :func:`parameter_shapes` returns, so that a checkpoint written by one
backend loads into another and computes the same function.

Canonical layout (the PyTorch layout):

- linear weight ``(out_features, in_features)``, applied as ``x @ weight.T + bias``;
- convolution weight ``(out_channels, in_channels, kh, kw)``, cross-correlation on
  NCHW images with zero padding;
- batch norm ``weight``, ``bias`` (affine) and the buffers ``running_mean`` and
  ``running_var``;
- layer norm ``weight`` and ``bias``.

Layer semantics shared by every backend:

- Batch norm, training mode: normalise with the batch mean and the biased batch
  variance, ``eps = 1e-5`` inside the square root, then update the buffers as
  ``running = 0.9 * running + 0.1 * batch_stat``, where the variance pushed into
  ``running_var`` is the unbiased one (as ``torch.nn.BatchNorm1d``). Evaluation
  mode normalises with the buffers. Buffers start at mean 0 and variance 1.
- Layer norm: biased variance over the last axis, ``eps = 1e-6``.
- GELU: the exact form ``x * Phi(x)`` with the normal CDF, not the tanh
  approximation.
- Multi-head self-attention: ``qkv = x @ qkv.weight.T + qkv.bias`` gives
  ``(B, T, 3 * D)``, split along the last axis into q, k and v (in that order), each
  split into ``num_heads`` contiguous heads of size ``D // num_heads``; weights
  ``softmax(q k^T / sqrt(D // num_heads))``; heads concatenated in order, then
  ``proj``.
- Transformer block (pre-norm): ``x = x + attn(norm1(x))``, then
  ``x = x + mlp(norm2(x))`` with ``mlp = fc2(gelu(fc1(x)))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "MLP",
    "ConvEncoder",
    "ViTEncoder",
    "MAEDecoder",
    "NetworkDescription",
    "parameter_shapes",
    "buffer_names",
    "output_features",
    "method_networks",
    "METHODS",
]

METHODS = ("simclr", "byol", "barlow-twins", "vicreg", "mae")


@dataclass(frozen=True)
class MLP:
    """Multilayer perceptron: linear layers with ReLU between them.

    Each hidden layer is ``linear -> batch norm (if batch_norm) -> ReLU``. A hidden
    linear layer followed by batch norm has no bias, since the norm's shift makes it
    redundant. The last layer is a linear layer with a bias, followed by ReLU only
    when ``output_activation`` is true (an encoder) and by nothing for a projection
    head or predictor.

    Parameters are ``layers.{i}.weight`` and ``layers.{i}.bias`` for the linear
    layers ``i = 0 .. len(hidden_features)``, and ``norms.{i}.weight``,
    ``norms.{i}.bias``, ``norms.{i}.running_mean``, ``norms.{i}.running_var`` for
    the batch norm after hidden layer ``i``.
    """

    in_features: int
    hidden_features: tuple[int, ...]
    out_features: int
    batch_norm: bool = True
    output_activation: bool = False


@dataclass(frozen=True)
class ConvEncoder:
    """Small convolutional encoder for NCHW images.

    Block ``i`` is ``conv 3x3 (stride 1, padding 1, no bias) -> batch norm -> ReLU``,
    followed by a 2x2 max pool (stride 2) in every block but the last. A global
    average pool over height and width gives ``(B, channels[-1])`` features.

    Parameters are ``blocks.{i}.conv.weight`` of shape ``(channels[i], c_in, 3, 3)``
    and ``blocks.{i}.norm.{weight,bias,running_mean,running_var}``.
    """

    in_channels: int = 1
    image_size: tuple[int, int] = (8, 8)
    channels: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class ViTEncoder:
    """Vision-transformer encoder over patch tokens, as the MAE encoder.

    Images are cut into patches with :func:`sslspec.patchify` (row-major patches,
    ``(p, p, C)`` inside a patch with the channel fastest). Tokens are
    ``patch_embed(patches) + pos_embed``; during MAE pretraining only the visible
    tokens (``ids_keep`` of :func:`sslspec.generate_mask`, gathered along the token
    axis) enter the ``depth`` transformer blocks; a final layer norm ``norm``
    follows. There is no class token: features for evaluation are the mean over all
    tokens of the normed output, with no mask.

    Parameters: ``patch_embed.weight`` ``(embed_dim, p * p * C)``,
    ``patch_embed.bias``, ``pos_embed`` ``(1, L, embed_dim)`` (initialised to the 2-D
    sine-cosine embedding of MAE, then trained), per block ``blocks.{i}.norm1``,
    ``blocks.{i}.attn.qkv`` ``(3 * D, D)``, ``blocks.{i}.attn.proj`` ``(D, D)``,
    ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1`` ``(hidden, D)``,
    ``blocks.{i}.mlp.fc2`` ``(D, hidden)`` (each with ``.weight`` and ``.bias``),
    and ``norm.weight``, ``norm.bias``. ``hidden = int(embed_dim * mlp_ratio)``.
    """

    in_channels: int = 1
    image_size: tuple[int, int] = (8, 8)
    patch_size: int = 2
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        height, width = self.image_size
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels


@dataclass(frozen=True)
class MAEDecoder:
    """Lightweight MAE decoder that reconstructs every patch.

    ``x = embed(latent)`` maps the visible tokens ``(B, K, encoder_dim)`` to
    ``decoder_dim``; ``mask_token`` is repeated to fill the ``L - K`` masked slots
    (appended after the visible tokens); the ``L`` tokens are put back in patch order
    by gathering with ``ids_restore``; ``pos_embed`` is added; then ``depth``
    transformer blocks, layer norm ``norm`` and the linear ``pred`` give
    ``(B, L, patch_dim)``.

    Parameters: ``embed`` ``(decoder_dim, encoder_dim)``, ``mask_token``
    ``(1, 1, decoder_dim)``, ``pos_embed`` ``(1, L, decoder_dim)``, blocks named as
    in :class:`ViTEncoder`, ``norm``, and ``pred`` ``(patch_dim, decoder_dim)``.
    """

    num_patches: int
    patch_dim: int
    encoder_dim: int = 64
    decoder_dim: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0


NetworkDescription = MLP | ConvEncoder | ViTEncoder | MAEDecoder


def _batch_norm_shapes(prefix: str, size: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (size,),
        f"{prefix}.bias": (size,),
        f"{prefix}.running_mean": (size,),
        f"{prefix}.running_var": (size,),
    }


def _linear_shapes(
    prefix: str, in_features: int, out_features: int, *, bias: bool = True
) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)
    return shapes


def _block_shapes(
    prefix: str, dim: int, mlp_ratio: float
) -> dict[str, tuple[int, ...]]:
    hidden = int(dim * mlp_ratio)
    shapes = {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,)}
    shapes |= _linear_shapes(f"{prefix}.attn.qkv", dim, 3 * dim)
    shapes |= _linear_shapes(f"{prefix}.attn.proj", dim, dim)
    shapes |= {f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,)}
    shapes |= _linear_shapes(f"{prefix}.mlp.fc1", dim, hidden)
    shapes |= _linear_shapes(f"{prefix}.mlp.fc2", hidden, dim)
    return shapes


def _validate(description: NetworkDescription) -> None:
    if isinstance(description, ViTEncoder | MAEDecoder):
        dims = (
            [("embed_dim", description.embed_dim)]
            if isinstance(description, ViTEncoder)
            else [("decoder_dim", description.decoder_dim)]
        )
        for name, dim in dims:
            if dim % 4:
                raise ValueError(
                    f"{name}={dim} must be divisible by 4 for the 2-D sine-cosine "
                    "position embedding (a sine and a cosine for each image axis)"
                )
            if dim % description.num_heads:
                raise ValueError(
                    f"{name}={dim} must be divisible by num_heads="
                    f"{description.num_heads}"
                )
    if isinstance(description, ViTEncoder):
        height, width = description.image_size
        if height % description.patch_size or width % description.patch_size:
            raise ValueError(
                f"patch_size={description.patch_size} must divide image_size="
                f"{description.image_size}"
            )
    if isinstance(description, ConvEncoder):
        pools = len(description.channels) - 1
        for side in description.image_size:
            if side % (2**pools):
                raise ValueError(
                    f"image_size={description.image_size} must be divisible by "
                    f"{2**pools} for {len(description.channels)} conv blocks "
                    "(a 2x2 max pool follows every block but the last)"
                )


def parameter_shapes(description: NetworkDescription) -> dict[str, tuple[int, ...]]:
    """Return the canonical name and shape of every parameter and buffer.

    The order of the mapping is the canonical order. Batch-norm buffers
    (``running_mean``, ``running_var``) are included; :func:`buffer_names` lists
    them.
    """
    _validate(description)
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(description, MLP):
        sizes = [
            description.in_features,
            *description.hidden_features,
            description.out_features,
        ]
        last = len(sizes) - 2
        for i in range(last + 1):
            is_hidden = i < last
            bias = not (is_hidden and description.batch_norm)
            shapes |= _linear_shapes(f"layers.{i}", sizes[i], sizes[i + 1], bias=bias)
            if is_hidden and description.batch_norm:
                shapes |= _batch_norm_shapes(f"norms.{i}", sizes[i + 1])
    elif isinstance(description, ConvEncoder):
        in_channels = description.in_channels
        for i, out_channels in enumerate(description.channels):
            shapes[f"blocks.{i}.conv.weight"] = (out_channels, in_channels, 3, 3)
            shapes |= _batch_norm_shapes(f"blocks.{i}.norm", out_channels)
            in_channels = out_channels
    elif isinstance(description, ViTEncoder):
        dim = description.embed_dim
        shapes |= _linear_shapes("patch_embed", description.patch_dim, dim)
        shapes["pos_embed"] = (1, description.num_patches, dim)
        for i in range(description.depth):
            shapes |= _block_shapes(f"blocks.{i}", dim, description.mlp_ratio)
        shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    elif isinstance(description, MAEDecoder):
        dim = description.decoder_dim
        shapes |= _linear_shapes("embed", description.encoder_dim, dim)
        shapes["mask_token"] = (1, 1, dim)
        shapes["pos_embed"] = (1, description.num_patches, dim)
        for i in range(description.depth):
            shapes |= _block_shapes(f"blocks.{i}", dim, description.mlp_ratio)
        shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
        shapes |= _linear_shapes("pred", dim, description.patch_dim)
    else:
        raise TypeError(
            f"description must be one of MLP, ConvEncoder, ViTEncoder or MAEDecoder, "
            f"got {type(description).__name__}"
        )
    return shapes


def buffer_names(description: NetworkDescription) -> list[str]:
    """Return the names of the non-trainable buffers (batch-norm running stats)."""
    return [
        name
        for name in parameter_shapes(description)
        if name.endswith((".running_mean", ".running_var"))
    ]


def output_features(description: NetworkDescription) -> int:
    """Return the width of the network's output features."""
    if isinstance(description, MLP):
        return description.out_features
    if isinstance(description, ConvEncoder):
        return description.channels[-1]
    if isinstance(description, ViTEncoder):
        return description.embed_dim
    if isinstance(description, MAEDecoder):
        return description.patch_dim
    raise TypeError(f"unknown description type {type(description).__name__}")


@dataclass(frozen=True)
class InputSpec:
    """Shape of one sample: ``(C, H, W)`` for images, ``(F,)`` for feature vectors."""

    shape: tuple[int, ...]

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclass(frozen=True)
class HeadSizes:
    """Widths of the heads that :func:`method_networks` builds."""

    projector_hidden: int = 512
    projector_out: int = 128
    predictor_hidden: int = 512
    mlp_encoder_hidden: tuple[int, ...] = (256, 256)
    conv_channels: tuple[int, ...] = (32, 64, 128)
    vit: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)


def method_networks(
    method: str, sample_shape: tuple[int, ...], sizes: HeadSizes | None = None
) -> dict[str, NetworkDescription]:
    """Return the networks a method trains, keyed by their canonical prefix.

    ``sample_shape`` is ``(C, H, W)`` for images and ``(F,)`` for feature vectors.
    The keys are the prefixes of the parameter names in a checkpoint: a parameter
    ``layers.0.weight`` of the projector is stored as ``projector.layers.0.weight``.

    - every method but MAE: ``encoder`` (a :class:`ConvEncoder` for images, an
      :class:`MLP` with ReLU output for feature vectors) and ``projector``;
    - SimCLR: two-layer projector without batch norm;
    - BYOL: two-layer projector and ``predictor`` with batch norm, and the target
      copies ``target_encoder`` and ``target_projector``;
    - Barlow Twins and VICReg: three-layer projector with batch norm;
    - MAE: ``encoder`` (:class:`ViTEncoder`, images only) and ``decoder``
      (:class:`MAEDecoder`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    sizes = sizes or HeadSizes()
    sample = InputSpec(tuple(int(s) for s in sample_shape))
    if method == "mae":
        if not sample.is_image:
            raise ValueError(
                f"method 'mae' needs images of shape (C, H, W), got samples of "
                f"shape {sample.shape}"
            )
        channels, height, width = sample.shape
        patch_size = sizes.vit.get("patch_size", 2 if min(height, width) <= 16 else 4)
        encoder = ViTEncoder(
            in_channels=channels,
            image_size=(height, width),
            **({"patch_size": patch_size} | sizes.vit),
        )
        decoder = MAEDecoder(
            num_patches=encoder.num_patches,
            patch_dim=encoder.patch_dim,
            encoder_dim=encoder.embed_dim,
            **sizes.decoder,
        )
        return {"encoder": encoder, "decoder": decoder}

    if sample.is_image:
        channels, height, width = sample.shape
        encoder: NetworkDescription = ConvEncoder(
            in_channels=channels,
            image_size=(height, width),
            channels=sizes.conv_channels,
        )
    elif len(sample.shape) == 1:
        encoder = MLP(
            in_features=sample.shape[0],
            hidden_features=sizes.mlp_encoder_hidden[:-1],
            out_features=sizes.mlp_encoder_hidden[-1],
            batch_norm=True,
            output_activation=True,
        )
    else:
        raise ValueError(
            f"samples must have shape (C, H, W) or (F,), got {sample.shape}"
        )
    width = output_features(encoder)
    if method == "simclr":
        projector = MLP(width, (sizes.projector_hidden,), sizes.projector_out, False)
        return {"encoder": encoder, "projector": projector}
    if method == "byol":
        projector = MLP(width, (sizes.projector_hidden,), sizes.projector_out, True)
        predictor = MLP(
            sizes.projector_out, (sizes.predictor_hidden,), sizes.projector_out, True
        )
        return {
            "encoder": encoder,
            "projector": projector,
            "predictor": predictor,
            "target_encoder": encoder,
            "target_projector": projector,
        }
    hidden = (sizes.projector_hidden, sizes.projector_hidden)
    projector = MLP(width, hidden, sizes.projector_hidden, True)
    return {"encoder": encoder, "projector": projector}


def flat_parameter_shapes(
    networks: Mapping[str, NetworkDescription],
) -> dict[str, tuple[int, ...]]:
    """Return ``prefix.name -> shape`` over all networks, in canonical order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, description in networks.items():
        for name, shape in parameter_shapes(description).items():
            shapes[f"{prefix}.{name}"] = shape
    return shapes


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> list[list[float]]:
    """Return MAE's fixed 2-D sine-cosine position embedding as nested lists.

    The first half of ``dim`` encodes the patch's column and the second half its
    row, as in the MAE authors' code; each half is ``[sin(pos * w_k), cos(pos *
    w_k)]`` with ``w_k = 1 / 10000 ** (k / (dim / 4))`` for ``k = 0 .. dim / 4 - 1``.
    Rows of the result are patches in row-major order. Backends use it to
    initialise ``pos_embed``.
    """
    if dim % 4:
        raise ValueError(
            f"dim={dim} must be divisible by 4 for a 2-D sin-cos embedding"
        )
    quarter = dim // 4
    omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    rows, cols = grid
    table = []
    for r in range(rows):
        for c in range(cols):
            embedding = []
            for pos in (c, r):
                embedding += [math.sin(pos * w) for w in omegas]
                embedding += [math.cos(pos * w) for w in omegas]
            table.append(embedding)
    return table
