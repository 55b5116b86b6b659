"""Network descriptions: size validation and the sine-cosine position embedding."""

from __future__ import annotations

import numpy as np
import pytest

from sslspec.networks import (
    ConvEncoder,
    MAEDecoder,
    ViTEncoder,
    parameter_shapes,
    sincos_pos_embed,
)


def authors_layout(dim: int, rows: int, cols: int) -> np.ndarray:
    """The MAE authors' layout, built independently with NumPy.

    ``np.meshgrid(columns, rows)`` puts the column index in the first grid, and
    the first half of the embedding encodes that grid.
    """
    grid = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    halves = []
    for positions in grid:
        angles = np.outer(positions.reshape(-1), omega)
        halves += [np.sin(angles), np.cos(angles)]
    return np.concatenate(halves, axis=1)


@pytest.mark.parametrize(("dim", "rows", "cols"), [(8, 4, 4), (16, 2, 3), (64, 4, 4)])
def test_sincos_matches_authors_layout(dim, rows, cols):
    table = np.asarray(sincos_pos_embed(dim, (rows, cols)))
    assert table.shape == (rows * cols, dim)
    np.testing.assert_allclose(table, authors_layout(dim, rows, cols), atol=1e-12)


def test_sincos_first_half_follows_column():
    table = np.asarray(sincos_pos_embed(8, (3, 3)))
    # Patches 0 and 3 share column 0, and patches 0 and 1 share row 0.
    np.testing.assert_array_equal(table[0, :4], table[3, :4])
    np.testing.assert_array_equal(table[0, 4:], table[1, 4:])
    assert not np.array_equal(table[0, :4], table[1, :4])


def test_sincos_rejects_dim_not_divisible_by_four():
    with pytest.raises(ValueError, match="dim=6 must be divisible by 4"):
        sincos_pos_embed(6, (2, 2))


@pytest.mark.parametrize(
    ("description", "message"),
    [
        (ViTEncoder(embed_dim=30, num_heads=3), "embed_dim=30 must be divisible by 4"),
        (
            ViTEncoder(embed_dim=36, num_heads=8),
            "embed_dim=36 must be divisible by num_heads=8",
        ),
        (
            MAEDecoder(num_patches=16, patch_dim=4, decoder_dim=18, num_heads=2),
            "decoder_dim=18 must be divisible by 4",
        ),
        (ViTEncoder(patch_size=3), r"patch_size=3 must divide image_size=\(8, 8\)"),
        (ConvEncoder(image_size=(6, 6)), r"image_size=\(6, 6\) must be divisible by 4"),
    ],
)
def test_invalid_sizes_are_rejected(description, message):
    with pytest.raises(ValueError, match=message):
        parameter_shapes(description)


def test_valid_vit_has_position_embedding_per_patch():
    shapes = parameter_shapes(ViTEncoder(embed_dim=32, num_heads=4, patch_size=2))
    assert shapes["pos_embed"] == (1, 16, 32)
