"""Every loss keeps the dtype and device of its inputs and stays finite."""

from __future__ import annotations

import numpy as np
import pytest
from array_helpers import (
    asarray,
    assert_finite,
    dtype_or_skip,
    evaluate,
    to_float,
    to_numpy,
    value_and_gradients,
)
from loss_cases import LOSS_CASE_IDS, LOSS_CASES

import sslspec

# Relative agreement with the float64 value expected of each dtype.
RELATIVE_TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-5}


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_loss_keeps_dtype(xp, case, dtype_name):
    dtype = dtype_or_skip(xp, dtype_name)
    rng = np.random.default_rng(0)
    raw_inputs = case.make_inputs(rng)
    raw_fixed = case.make_fixed(rng)
    inputs = [asarray(xp, x, dtype_name) for x in raw_inputs]
    fixed = [asarray(xp, x, dtype_name) for x in raw_fixed]

    loss = evaluate(xp, case, inputs, fixed)
    # The float64 value from NumPy, with the same inputs.
    reference = case(raw_inputs, raw_fixed)
    assert loss.dtype == dtype
    assert tuple(loss.shape) == ()
    assert to_float(loss) == pytest.approx(
        to_float(reference), rel=RELATIVE_TOLERANCE[dtype_name]
    )


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_loss_stays_on_device(case):
    # array-api-strict's extra devices reject any operation that mixes devices, so
    # an array created without device= inside a loss would raise.
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    rng = np.random.default_rng(0)
    inputs = [xp.asarray(x, device=device) for x in case.make_inputs(rng)]
    fixed = [xp.asarray(x, device=device) for x in case.make_fixed(rng)]
    assert case(inputs, fixed).device == device


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_loss_stays_on_torch_meta_device(case):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    inputs = [torch.empty(x.shape, device="meta") for x in case.make_inputs(rng)]
    fixed = [torch.empty(x.shape, device="meta") for x in case.make_fixed(rng)]
    assert case(inputs, fixed).device == torch.device("meta")


def test_mask_and_patches_stay_on_device():
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    noise = xp.asarray(np.random.default_rng(0).random((2, 10)), device=device)
    result = sslspec.generate_mask(noise)
    assert all(array.device == device for array in result)
    images = xp.asarray(np.ones((1, 3, 4, 4)), device=device)
    patches = sslspec.patchify(images, 2)
    assert patches.device == device
    assert sslspec.unpatchify(patches, 2).device == device


@pytest.mark.xfail(
    reason="array-api-strict 2.6.1 argsort returns int64 on its no_x64 device, which "
    "then rejects it",
    raises=ValueError,
    strict=True,
)
def test_mask_index_dtype_follows_device():
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("no_x64")
    noise = xp.asarray(np.ones((2, 10)), dtype=xp.float32, device=device)
    assert sslspec.generate_mask(noise).ids_keep.dtype == xp.int32


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_cold_nt_xent_finite_in_half_precision(xp, dtype_name):
    rng = np.random.default_rng(1)
    z_i = rng.standard_normal((16, 8))
    z_j = z_i + 0.1 * rng.standard_normal((16, 8))
    z_i[3] = 0.0
    z_j[5] = 0.0
    z_j[7] = -z_i[7]
    inputs = [asarray(xp, z_i, dtype_name), asarray(xp, z_j, dtype_name)]

    def loss(a, b):
        return sslspec.nt_xent_loss(a, b, temperature=0.05)

    value, gradients = value_and_gradients(xp, loss, inputs)
    assert_finite(value, gradients)
    assert value.dtype == inputs[0].dtype
    for gradient in gradients or []:
        assert gradient.dtype == inputs[0].dtype
    reference = to_float(loss(z_i, z_j))
    tolerance = RELATIVE_TOLERANCE[dtype_name]
    assert to_float(value) == pytest.approx(reference, rel=tolerance)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(
    "loss",
    [sslspec.barlow_twins_loss, sslspec.vicreg_loss],
    ids=["barlow_twins", "vicreg"],
)
def test_constant_dimension_finite(xp, loss, dtype_name):
    rng = np.random.default_rng(2)
    z_a = rng.standard_normal((8, 4))
    z_b = rng.standard_normal((8, 4))
    z_a[:, 1] = 3.0
    z_b[:, 2] = 0.0
    inputs = [asarray(xp, z_a, dtype_name), asarray(xp, z_b, dtype_name)]
    assert_finite(*value_and_gradients(xp, loss, inputs))


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize(
    "loss", [sslspec.nt_xent_loss, sslspec.byol_loss], ids=["nt_xent", "byol"]
)
def test_zero_rows_finite(xp, loss, dtype_name):
    z = np.zeros((4, 3))
    z[0] = [1.0, 2.0, 3.0]
    inputs = [asarray(xp, z, dtype_name), asarray(xp, z[::-1].copy(), dtype_name)]
    assert_finite(*value_and_gradients(xp, loss, inputs))


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_constant_patch_norm_pix_finite(xp, dtype_name):
    target = np.ones((2, 3, 4))
    prediction = np.zeros((2, 3, 4))
    mask = np.ones((2, 3))
    inputs = [asarray(xp, prediction, dtype_name), asarray(xp, target, dtype_name)]
    fixed = asarray(xp, mask, dtype_name)

    def loss(a, b):
        return sslspec.reconstruction_loss(a, b, fixed, norm_pix_loss=True)

    value, gradients = value_and_gradients(xp, loss, inputs)
    assert_finite(value, gradients)
    # A constant patch standardises to zeros, so the error is 0.
    assert to_float(value) == 0.0


def test_empty_mask_has_zero_gradient(xp):
    rng = np.random.default_rng(3)
    inputs = [asarray(xp, rng.standard_normal((2, 3, 4))) for _ in range(2)]
    mask = asarray(xp, np.zeros((2, 3)))

    def loss(a, b):
        return sslspec.reconstruction_loss(a, b, mask)

    value, gradients = value_and_gradients(xp, loss, inputs)
    assert to_float(value) == 0.0
    for gradient in gradients or []:
        np.testing.assert_array_equal(to_numpy(gradient), 0.0)
