"""PyTorch modules for the network descriptions of :mod:`sslspec.networks`.

Each module's parameters and buffers carry exactly the canonical names and shapes
of :func:`sslspec.networks.parameter_shapes`, so :func:`canonical_state` and
:func:`load_canonical` move weights between a module and a checkpoint without any
renaming. The only extra entry PyTorch adds, batch norm's ``num_batches_tracked``,
is left out: it only matters when ``momentum=None``, and the canonical batch norm
uses momentum 0.1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslspec.networks import (
    MLP,
    ConvEncoder,
    MAEDecoder,
    NetworkDescription,
    ViTEncoder,
    parameter_shapes,
    sincos_pos_embed,
)

__all__ = [
    "MLPModule",
    "ConvEncoderModule",
    "ViTEncoderModule",
    "MAEDecoderModule",
    "build_module",
    "canonical_state",
    "load_canonical",
    "patchify",
    "BATCH_NORM_EPS",
    "BATCH_NORM_MOMENTUM",
    "LAYER_NORM_EPS",
]

BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1
LAYER_NORM_EPS = 1e-6


class MLPModule(nn.Module):
    """:class:`sslspec.networks.MLP`: ``linear -> batch norm -> ReLU`` per hidden
    layer, then a linear output layer (and ReLU for an encoder)."""

    def __init__(self, description: MLP) -> None:
        super().__init__()
        self.description = description
        sizes = [
            description.in_features,
            *description.hidden_features,
            description.out_features,
        ]
        hidden_count = len(description.hidden_features)
        self.layers = nn.ModuleList(
            nn.Linear(
                sizes[i],
                sizes[i + 1],
                bias=not (i < hidden_count and description.batch_norm),
            )
            for i in range(len(sizes) - 1)
        )
        if description.batch_norm and hidden_count:
            self.norms = nn.ModuleList(
                nn.BatchNorm1d(
                    sizes[i + 1], eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM
                )
                for i in range(hidden_count)
            )
        else:
            self.norms = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = F.relu(x)
        if self.description.output_activation:
            x = F.relu(x)
        return x


class _ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(
            out_channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class ConvEncoderModule(nn.Module):
    """:class:`sslspec.networks.ConvEncoder`: conv blocks with 2x2 max pooling
    between them and global average pooling at the end."""

    def __init__(self, description: ConvEncoder) -> None:
        super().__init__()
        channels = [description.in_channels, *description.channels]
        self.blocks = nn.ModuleList(
            _ConvBlock(channels[i], channels[i + 1])
            for i in range(len(description.channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < last:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class _MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class _TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention, then MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = _MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` images into ``(B, L, p * p * C)`` patches.

    Patches are in row-major order and each is flattened as ``(p, p, C)`` with
    the channel fastest, the layout of :func:`sslspec.patchify`.
    """
    batch, channels, height, width = images.shape
    rows, columns = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, columns, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, rows * columns, patch_size * patch_size * channels)


def _gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select tokens ``(B, T, D)`` along the token axis with ``indices (B, K)``."""
    expanded = indices.long()[:, :, None].expand(-1, -1, tokens.shape[-1])
    return torch.gather(tokens, 1, expanded)


def _sincos_parameter(dim: int, grid: tuple[int, int]) -> nn.Parameter:
    table = torch.tensor(sincos_pos_embed(dim, grid), dtype=torch.float32)
    return nn.Parameter(table[None])


def _init_transformer(module: nn.Module) -> None:
    """Xavier-uniform linear weights and zero biases, as the MAE reference does."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            nn.init.xavier_uniform_(child.weight)
            if child.bias is not None:
                nn.init.zeros_(child.bias)


class ViTEncoderModule(nn.Module):
    """:class:`sslspec.networks.ViTEncoder` over patch tokens, without a class
    token."""

    def __init__(self, description: ViTEncoder) -> None:
        super().__init__()
        self.description = description
        dim = description.embed_dim
        height, width = description.image_size
        grid = (height // description.patch_size, width // description.patch_size)
        self.patch_embed = nn.Linear(description.patch_dim, dim)
        self.pos_embed = _sincos_parameter(dim, grid)
        self.blocks = nn.ModuleList(
            _TransformerBlock(dim, description.num_heads, description.mlp_ratio)
            for _ in range(description.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        _init_transformer(self)

    def forward(
        self, images: torch.Tensor, ids_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the normed tokens ``(B, K, D)``: the visible ones if ``ids_keep``
        is given, else all ``L``."""
        tokens = self.patch_embed(patchify(images, self.description.patch_size))
        tokens = tokens + self.pos_embed
        if ids_keep is not None:
            tokens = _gather_tokens(tokens, ids_keep)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Return evaluation features: the mean of all normed tokens ``(B, D)``."""
        return self.forward(images).mean(dim=1)


class MAEDecoderModule(nn.Module):
    """:class:`sslspec.networks.MAEDecoder`: fills the masked slots with the mask
    token, restores patch order and predicts every patch."""

    def __init__(self, description: MAEDecoder) -> None:
        super().__init__()
        self.description = description
        dim = description.decoder_dim
        # The description gives only the patch count; a square grid is assumed
        # for the initial sine-cosine embedding and a single row otherwise.
        side = int(round(description.num_patches**0.5))
        grid = (side, side)
        if side * side != description.num_patches:
            grid = (1, description.num_patches)
        self.embed = nn.Linear(description.encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = _sincos_parameter(dim, grid)
        self.blocks = nn.ModuleList(
            _TransformerBlock(dim, description.num_heads, description.mlp_ratio)
            for _ in range(description.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pred = nn.Linear(dim, description.patch_dim)
        _init_transformer(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Return the predicted patches ``(B, L, patch_dim)`` from the visible
        tokens ``(B, K, encoder_dim)``."""
        tokens = self.embed(latent)
        batch, visible, dim = tokens.shape
        masked = self.description.num_patches - visible
        mask_tokens = self.mask_token.expand(batch, masked, dim).to(tokens.dtype)
        tokens = torch.cat([tokens, mask_tokens], dim=1)
        tokens = _gather_tokens(tokens, ids_restore) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.pred(self.norm(tokens))


_MODULES: dict[type, type[nn.Module]] = {
    MLP: MLPModule,
    ConvEncoder: ConvEncoderModule,
    ViTEncoder: ViTEncoderModule,
    MAEDecoder: MAEDecoderModule,
}


def build_module(description: NetworkDescription) -> nn.Module:
    """Return a freshly initialised module for ``description``.

    Initialisation draws from PyTorch's global generator; seed it (or fork it)
    around this call for reproducible weights.
    """
    parameter_shapes(description)
    try:
        module_type = _MODULES[type(description)]
    except KeyError:
        raise TypeError(
            f"description must be one of MLP, ConvEncoder, ViTEncoder or "
            f"MAEDecoder, got {type(description).__name__}"
        ) from None
    return module_type(description)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(module.named_parameters())
    tensors |= {
        name: buffer
        for name, buffer in module.named_buffers()
        if not name.endswith("num_batches_tracked")
    }
    return tensors


def canonical_state(
    module: nn.Module, description: NetworkDescription
) -> dict[str, torch.Tensor]:
    """Return the module's parameters and buffers by canonical name, in canonical
    order (the tensors themselves, not copies)."""
    tensors = _named_tensors(module)
    shapes = parameter_shapes(description)
    if set(tensors) != set(shapes):
        raise RuntimeError(
            f"module {type(module).__name__} does not match the canonical names: "
            f"missing {sorted(set(shapes) - set(tensors))}, unexpected "
            f"{sorted(set(tensors) - set(shapes))}"
        )
    return {name: tensors[name] for name in shapes}


def check_canonical(
    params: Mapping[str, object], description: NetworkDescription, *, prefix: str = ""
) -> None:
    """Raise ``ValueError`` naming each missing, unexpected or misshapen entry."""
    shapes = parameter_shapes(description)
    missing = [name for name in shapes if name not in params]
    unexpected = [name for name in params if name not in shapes]
    misshapen = [
        f"{prefix}{name} has shape {tuple(params[name].shape)}, expected {shape}"
        for name, shape in shapes.items()
        if name in params and tuple(params[name].shape) != shape
    ]
    problems = []
    if missing:
        problems.append("missing " + ", ".join(prefix + name for name in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(prefix + name for name in unexpected))
    problems += misshapen
    if problems:
        raise ValueError(
            f"parameters do not match {type(description).__name__}: "
            + "; ".join(problems)
        )


def load_canonical(
    module: nn.Module,
    description: NetworkDescription,
    params: Mapping[str, np.ndarray | torch.Tensor],
    *,
    prefix: str = "",
) -> None:
    """Copy canonical ``params`` into the module in place, keeping its dtype and
    device.

    Raises
    ------
    ValueError
        If a name is missing or unexpected, or a shape differs; the message names
        every such entry (with ``prefix``).
    """
    check_canonical(params, description, prefix=prefix)
    tensors = canonical_state(module, description)
    with torch.no_grad():
        for name, tensor in tensors.items():
            value = params[name]
            if not isinstance(value, torch.Tensor):
                # A copy, because arrays read from safetensors are read-only.
                value = torch.from_numpy(np.array(value))
            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
