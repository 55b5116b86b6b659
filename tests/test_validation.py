"""Invalid arguments raise TypeError or ValueError that name the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
from array_helpers import asarray

import sslspec


def floats(xp, *shape):
    return asarray(xp, np.ones(shape))


def integers(xp, *shape):
    return xp.asarray(np.ones(shape, dtype=np.int64))


def booleans(xp, *shape):
    return xp.asarray(np.ones(shape, dtype=bool))


class NotACollective:
    world_size = 2


class BadWorldSize:
    world_size = 0
    rank = 0

    def all_gather(self, x):
        return x

    def all_reduce_sum(self, x):
        return x


PAIR_LOSSES = [
    sslspec.nt_xent_loss,
    sslspec.byol_loss,
    sslspec.barlow_twins_loss,
    sslspec.vicreg_loss,
    sslspec.invariance_loss,
]
PAIR_NAMES = {
    sslspec.nt_xent_loss: ("z_i", "z_j"),
    sslspec.byol_loss: ("online_prediction", "target_projection"),
    sslspec.barlow_twins_loss: ("z_a", "z_b"),
    sslspec.vicreg_loss: ("z_a", "z_b"),
    sslspec.invariance_loss: ("z_a", "z_b"),
}
pair_losses = pytest.mark.parametrize(
    "loss", PAIR_LOSSES, ids=[loss.__name__ for loss in PAIR_LOSSES]
)


@pair_losses
def test_pair_rejects_different_shapes(xp, loss):
    first, second = PAIR_NAMES[loss]
    pattern = (
        rf"{first} and {second} must have the same shape, got \(4, 3\) and \(4, 2\)"
    )
    with pytest.raises(ValueError, match=pattern):
        loss(floats(xp, 4, 3), floats(xp, 4, 2))


@pair_losses
@pytest.mark.parametrize("shape", [(4,), (2, 4, 3)])
def test_pair_rejects_non_2d(xp, loss, shape):
    first, _ = PAIR_NAMES[loss]
    pattern = rf"{first} must be a 2-D array of shape \(batch, dim\), got shape"
    with pytest.raises(ValueError, match=pattern):
        loss(floats(xp, *shape), floats(xp, *shape))


@pair_losses
@pytest.mark.parametrize("make", [integers, booleans])
def test_pair_rejects_non_floating(xp, loss, make):
    first, _ = PAIR_NAMES[loss]
    with pytest.raises(TypeError, match=rf"{first} must have a real floating-point"):
        loss(make(xp, 4, 3), make(xp, 4, 3))


@pair_losses
def test_pair_rejects_mixed_dtypes(xp, loss):
    first, second = PAIR_NAMES[loss]
    pattern = rf"{first} and {second} must have the same dtype"
    with pytest.raises(TypeError, match=pattern):
        loss(asarray(xp, np.ones((4, 3)), "float32"), floats(xp, 4, 3))


@pair_losses
def test_pair_rejects_empty_batch(xp, loss):
    first, _ = PAIR_NAMES[loss]
    with pytest.raises(ValueError, match=rf"{first} must have at least one element"):
        loss(floats(xp, 0, 3), floats(xp, 0, 3))


@pair_losses
def test_pair_rejects_non_array(loss):
    first, _ = PAIR_NAMES[loss]
    with pytest.raises(TypeError, match=rf"{first} must be an array .* builtins.list"):
        loss([[1.0, 2.0]], np.ones((1, 2)))


@pair_losses
def test_pair_rejects_two_libraries(loss):
    torch = pytest.importorskip("torch")
    first, second = PAIR_NAMES[loss]
    pattern = rf"{first} and {second} must be arrays of the same library, got numpy"
    with pytest.raises(TypeError, match=pattern):
        loss(np.ones((4, 3)), torch.ones((4, 3), dtype=torch.float64))


@pair_losses
def test_pair_rejects_two_devices(loss):
    torch = pytest.importorskip("torch")
    first, second = PAIR_NAMES[loss]
    pattern = rf"{first} and {second} must be on the same device, got cpu and meta"
    with pytest.raises(ValueError, match=pattern):
        loss(torch.ones((4, 3)), torch.ones((4, 3), device="meta"))


@pair_losses
@pytest.mark.parametrize(
    ("collective", "error", "pattern"),
    [
        (NotACollective(), TypeError, "collective must be None or implement"),
        (BadWorldSize(), ValueError, "collective.world_size must be >= 1, got 0"),
    ],
)
def test_pair_rejects_collective(xp, loss, collective, error, pattern):
    with pytest.raises(error, match=pattern):
        loss(floats(xp, 4, 3), floats(xp, 4, 3), collective=collective)


@pytest.mark.parametrize(
    "loss",
    [sslspec.barlow_twins_loss, sslspec.vicreg_loss],
    ids=["barlow_twins_loss", "vicreg_loss"],
)
def test_batch_statistics_reject_batch_of_one(xp, loss):
    pattern = (
        r"z_a must have a global batch of at least 2 samples .* got shape \(1, 3\) "
        r"on each of 1 rank"
    )
    with pytest.raises(ValueError, match=pattern):
        loss(floats(xp, 1, 3), floats(xp, 1, 3))


@pytest.mark.parametrize(
    "term", [sslspec.variance_loss, sslspec.covariance_loss], ids=["variance", "cov"]
)
def test_single_view_terms_reject_bad_input(xp, term):
    with pytest.raises(ValueError, match="z must have a global batch of at least 2"):
        term(floats(xp, 1, 3))
    with pytest.raises(ValueError, match="z must be a 2-D array"):
        term(floats(xp, 3))
    with pytest.raises(TypeError, match="z must have a real floating-point dtype"):
        term(integers(xp, 4, 3))


@pytest.mark.parametrize("temperature", [0.0, -0.5, math.inf, math.nan])
def test_nt_xent_rejects_temperature(xp, temperature):
    pattern = rf"temperature must be finite and > 0.0, got {temperature!r}"
    with pytest.raises(ValueError, match=pattern):
        sslspec.nt_xent_loss(
            floats(xp, 4, 3), floats(xp, 4, 3), temperature=temperature
        )


def test_nt_xent_rejects_array_temperature(xp):
    with pytest.raises(TypeError, match="temperature must be a real Python number"):
        sslspec.nt_xent_loss(
            floats(xp, 4, 3), floats(xp, 4, 3), temperature=asarray(xp, 0.5)
        )


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("lambda_param", -1.0),
        ("lambda_param", math.inf),
    ],
)
def test_barlow_twins_rejects_weight(xp, keyword, value):
    with pytest.raises(ValueError, match=rf"{keyword} must be finite and >= 0.0"):
        sslspec.barlow_twins_loss(
            floats(xp, 4, 3), floats(xp, 4, 3), **{keyword: value}
        )


@pytest.mark.parametrize(
    "keyword", ["invariance_weight", "variance_weight", "covariance_weight"]
)
def test_vicreg_rejects_negative_weight(xp, keyword):
    with pytest.raises(ValueError, match=rf"{keyword} must be finite and >= 0.0"):
        sslspec.vicreg_loss(floats(xp, 4, 3), floats(xp, 4, 3), **{keyword: -1.0})


@pytest.mark.parametrize(
    ("keyword", "value"), [("target_std", 0.0), ("eps", 0.0), ("eps", -1e-4)]
)
def test_variance_rejects_parameter(xp, keyword, value):
    with pytest.raises(ValueError, match=rf"{keyword} must be finite and > 0.0"):
        sslspec.variance_loss(floats(xp, 4, 3), **{keyword: value})


@pytest.mark.parametrize(
    ("length", "ratio", "masked"),
    [(10, 0.04, 0), (10, 0.96, 10), (10, 0.0, 0), (10, 1.0, 10), (1, 0.5, 0)],
)
def test_mask_rejects_ratio_masking_none_or_all(xp, length, ratio, masked):
    pattern = (
        rf"mask_ratio must mask at least 1 and at most {length - 1} of the {length} "
        rf"patches, got mask_ratio={ratio}, which masks .* = {masked}"
    )
    with pytest.raises(ValueError, match=pattern):
        sslspec.generate_mask(floats(xp, 2, length), mask_ratio=ratio)


def test_mask_rejects_bad_noise(xp):
    with pytest.raises(ValueError, match="mask_ratio must be finite, got nan"):
        sslspec.generate_mask(floats(xp, 2, 10), mask_ratio=math.nan)
    with pytest.raises(TypeError, match="noise must have a real floating-point"):
        sslspec.generate_mask(integers(xp, 2, 10))
    with pytest.raises(ValueError, match=r"noise must be a 2-D array of shape"):
        sslspec.generate_mask(floats(xp, 10))


def test_reconstruction_rejects_bad_input(xp):
    patches = floats(xp, 2, 4, 3)
    mask = floats(xp, 2, 4)
    with pytest.raises(ValueError, match="prediction and target must have the same"):
        sslspec.reconstruction_loss(patches, floats(xp, 2, 4, 2), mask)
    with pytest.raises(ValueError, match=r"mask must have shape .* \(2, 4\)"):
        sslspec.reconstruction_loss(patches, patches, floats(xp, 2, 3))
    with pytest.raises(TypeError, match="mask must have a real floating-point or bool"):
        sslspec.reconstruction_loss(patches, patches, integers(xp, 2, 4))
    with pytest.raises(TypeError, match="norm_pix_loss must be True or False"):
        sslspec.reconstruction_loss(patches, patches, mask, norm_pix_loss="yes")
    with pytest.raises(ValueError, match="eps must be finite and > 0.0, got 0.0"):
        sslspec.reconstruction_loss(patches, patches, mask, eps=0.0)
    with pytest.raises(ValueError, match=r"prediction must be a 3-D array"):
        sslspec.reconstruction_loss(mask, mask, mask)


def test_reconstruction_norm_pix_needs_two_values(xp):
    patches = floats(xp, 2, 4, 1)
    pattern = r"norm_pix_loss=True needs at least 2 values per patch .* \(2, 4, 1\)"
    with pytest.raises(ValueError, match=pattern):
        sslspec.reconstruction_loss(
            patches, patches, floats(xp, 2, 4), norm_pix_loss=True
        )


def test_patchify_rejects_bad_input(xp):
    images = floats(xp, 1, 3, 6, 8)
    pattern = r"patch_size must divide .* got patch_size=4 and images of shape"
    with pytest.raises(ValueError, match=pattern):
        sslspec.patchify(images, 4)
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1, got 0"):
        sslspec.patchify(images, 0)
    with pytest.raises(TypeError, match="patch_size must be an integer"):
        sslspec.patchify(images, 2.0)
    with pytest.raises(ValueError, match=r"images must be a 4-D array"):
        sslspec.patchify(floats(xp, 3, 6, 8), 2)


def test_unpatchify_rejects_bad_input(xp):
    patches = floats(xp, 1, 6, 12)
    with pytest.raises(ValueError, match="square grid when image_size is None, got 6"):
        sslspec.unpatchify(patches, 2)
    with pytest.raises(ValueError, match=r"gives 2 x 2 = 4 patches, but patches has 6"):
        sslspec.unpatchify(patches, 2, image_size=(4, 4))
    with pytest.raises(ValueError, match=r"multiple of patch_size\*\*2 = 9"):
        sslspec.unpatchify(patches, 3, image_size=(6, 9))
    with pytest.raises(TypeError, match="image_size must be a"):
        sslspec.unpatchify(patches, 2, image_size=4)
    with pytest.raises(ValueError, match="patch_size must divide"):
        sslspec.unpatchify(patches, 2, image_size=(3, 8))


def test_checks_run_before_computation():
    # A matrix product would reject these shapes, so the library's own error
    # would come first if any computation ran before the checks.
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        sslspec.barlow_twins_loss(np.ones((4, 3)), np.ones((5, 2)))
