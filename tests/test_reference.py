"""The conformance reference against closed forms derived by hand.

Every reference function of :mod:`sslspec_conformance.reference` is checked on tiny
inputs whose result follows from the equation on paper, and every analytic
gradient of :mod:`sslspec_conformance.reference_gradients` against central finite
differences of the reference value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sslspec_conformance import reference as ref
from sslspec_conformance import reference_gradients as grads
from sslspec_conformance import reference_networks as nets
from sslspec_conformance.harness import sensitivity
from sslspec_conformance.rounding import perturbed, stored

E1 = np.array([1.0, 0.0])
E2 = np.array([0.0, 1.0])


# L2 normalisation -------------------------------------------------------------


def test_normalize_rows_unit_length():
    out = ref.l2_normalize_rows(np.array([[3.0, 4.0], [0.0, -2.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, -1.0]])


def test_normalize_rows_zero_row_stays_zero():
    out = ref.l2_normalize_rows(np.zeros((1, 3)))
    assert np.all(out == 0.0)


def test_normalize_rows_below_floor_divides_by_floor():
    out = ref.l2_normalize_rows(np.array([[3e-13, 4e-13]]))
    np.testing.assert_allclose(out, [[0.3, 0.4]])


# NT-Xent ------------------------------------------------------------------------


def test_nt_xent_single_pair_is_zero():
    # With N = 1 each anchor's only other candidate is its positive.
    assert ref.nt_xent_loss(
        np.array([[1.0, 2.0]]), np.array([[-3.0, 0.5]])
    ) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
def test_nt_xent_identical_orthogonal_views(temperature):
    # Every anchor: positive similarity 1 / t, two others with similarity 0.
    views = np.stack([E1, E2])
    expected = -1.0 / temperature + math.log(math.exp(1.0 / temperature) + 2.0)
    assert ref.nt_xent_loss(views, views, temperature=temperature) == pytest.approx(
        expected
    )


def test_nt_xent_opposite_views():
    views = np.stack([E1, E2])
    expected = 1.0 + math.log(math.exp(-1.0) + 2.0)
    assert ref.nt_xent_loss(views, -views, temperature=1.0) == pytest.approx(expected)


def test_nt_xent_ignores_row_scale():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 3))
    scale = np.array([[2.0], [0.5], [7.0], [1e-3], [1e3]])
    assert ref.nt_xent_loss(a * scale, b) == pytest.approx(ref.nt_xent_loss(a, b))


# BYOL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, z, expected",
    [
        (E1, E1, 0.0),
        (E1, 3.0 * E1, 0.0),
        (E1, E2, 2.0),
        (E1, -E1, 4.0),
        (E1, np.zeros(2), 2.0),
        (E1, E1 + E2, 2.0 - math.sqrt(2.0)),
    ],
)
def test_byol_closed_forms(p, z, expected):
    assert ref.byol_loss(p[None], z[None]) == pytest.approx(expected, abs=1e-15)


def test_byol_is_batch_mean():
    p = np.stack([E1, E1])
    z = np.stack([E1, -E1])
    assert ref.byol_loss(p, z) == pytest.approx(2.0)


# EMA and schedule ---------------------------------------------------------------


@pytest.mark.parametrize("momentum, expected", [(0.0, 1.0), (1.0, 3.0), (0.5, 2.0)])
def test_ema_update_closed_forms(momentum, expected):
    out = ref.ema_update({"w": np.ones(2)}, {"w": np.full(2, 3.0)}, momentum=momentum)
    np.testing.assert_allclose(out["w"], expected)


def test_ema_update_rejects_different_names():
    with pytest.raises(ValueError):
        ref.ema_update({"a": np.ones(1)}, {"b": np.ones(1)})


@pytest.mark.parametrize(
    "step, expected",
    [(-3, 0.9), (0, 0.9), (5, 0.95), (10, 1.0), (15, 1.0)],
)
def test_momentum_schedule_closed_forms(step, expected):
    value = ref.momentum_schedule(step, 10, base_momentum=0.9, final_momentum=1.0)
    assert value == pytest.approx(expected)


def test_momentum_schedule_quarter_point():
    # k / K = 1/4: weight (cos(pi / 4) + 1) / 2.
    weight = (math.sqrt(0.5) + 1.0) / 2.0
    assert ref.momentum_schedule(1, 4) == pytest.approx(1.0 - 0.004 * weight)


# Barlow Twins --------------------------------------------------------------------


def test_barlow_orthogonal_design():
    # Columns with mean 0, biased variance 1 and zero correlation: c = I / (1 + eps).
    z = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    eps = ref.BARLOW_EPS
    assert ref.barlow_twins_loss(z, z) == pytest.approx(2.0 * (eps / (1.0 + eps)) ** 2)


def test_barlow_two_samples_one_dim():
    # Biased variance v of [a, b] is ((a - b) / 2) ** 2; c = v / (v + eps).
    z = np.array([[0.01], [-0.01]])
    v = 0.01**2
    expected = (ref.BARLOW_EPS / (v + ref.BARLOW_EPS)) ** 2
    assert ref.barlow_twins_loss(z, z) == pytest.approx(expected)


def test_barlow_constant_column_costs_one():
    z = np.array([[1.0, 5.0], [1.0, -5.0]])
    loss = ref.barlow_twins_loss(z, z, lambda_param=0.0)
    v = 25.0
    assert loss == pytest.approx(1.0 + (ref.BARLOW_EPS / (v + ref.BARLOW_EPS)) ** 2)


def test_barlow_off_diagonal_weight():
    # Two identical columns: every entry of c is v / (v + eps) = r.
    z = np.array([[1.0, 1.0], [-1.0, -1.0]])
    r = 1.0 / (1.0 + ref.BARLOW_EPS)
    loss = ref.barlow_twins_loss(z, z, lambda_param=0.25)
    assert loss == pytest.approx(2.0 * (1.0 - r) ** 2 + 0.25 * 2.0 * r**2)


# VICReg --------------------------------------------------------------------------


def test_invariance_mean_square():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 0.0], [0.0, 4.0]])
    assert ref.invariance_loss(a, b) == pytest.approx((4.0 + 9.0) / 4.0)


def test_variance_hinge_closed_forms():
    z = np.array([[1.0, 0.1, 7.0], [-1.0, -0.1, 7.0]])
    # Unbiased variances 2, 0.02 and 0.
    expected = (0.0 + (1.0 - math.sqrt(0.02 + 1e-4)) + (1.0 - math.sqrt(1e-4))) / 3.0
    assert ref.variance_loss(z) == pytest.approx(expected)


def test_variance_target_and_eps():
    z = np.array([[1.0], [-1.0]])
    assert ref.variance_loss(z, target_std=3.0, eps=0.5) == pytest.approx(
        3.0 - math.sqrt(2.5)
    )


def test_covariance_closed_forms():
    # Covariance [[2, 2], [2, 2]]: off-diagonal squares sum to 8, over D = 2.
    assert ref.covariance_loss(np.array([[1.0, 1.0], [-1.0, -1.0]])) == pytest.approx(
        4.0
    )
    design = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert ref.covariance_loss(design) == pytest.approx(0.0, abs=1e-15)


def test_vicreg_combines_terms():
    a = np.array([[1.0, 1.0], [-1.0, -1.0]])
    b = np.array([[1.0, 0.0], [-1.0, 0.0]])
    expected = (
        2.0 * ref.invariance_loss(a, b)
        + 3.0 * (ref.variance_loss(a) + ref.variance_loss(b)) / 2.0
        + 5.0 * (ref.covariance_loss(a) + ref.covariance_loss(b))
    )
    value = ref.vicreg_loss(
        a, b, invariance_weight=2.0, variance_weight=3.0, covariance_weight=5.0
    )
    assert value == pytest.approx(expected)
    # b has a constant column: variance hinge 1 - sqrt(1e-4) = 0.99 there.
    assert ref.variance_loss(b) == pytest.approx((0.0 + 0.99) / 2.0)


# MAE masks --------------------------------------------------------------------------


def test_generate_mask_orders_by_noise():
    mask = ref.generate_mask(np.array([[0.3, 0.1, 0.2, 0.4]]), mask_ratio=0.5)
    assert mask.ids_keep.tolist() == [[1, 2]]
    assert mask.ids_masked.tolist() == [[0, 3]]
    assert mask.ids_restore.tolist() == [[2, 0, 1, 3]]
    assert mask.mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_generate_mask_ties_keep_lower_index():
    mask = ref.generate_mask(np.array([[0.5, 0.2, 0.5, 0.2, 0.5]]), mask_ratio=0.4)
    assert mask.ids_keep.tolist() == [[1, 3, 0]]
    assert mask.ids_masked.tolist() == [[2, 4]]


@pytest.mark.parametrize(
    "length, ratio, kept",
    [(10, 0.25, 8), (6, 0.25, 4), (10, 0.9, 1), (50, 0.9, 5), (4, 0.75, 1)],
)
def test_kept_count_rounds_half_to_even(length, ratio, kept):
    assert ref.kept_count(length, ratio) == kept


def test_generate_mask_restore_inverts_shuffle():
    rng = np.random.default_rng(1)
    mask = ref.generate_mask(rng.uniform(size=(3, 20)), mask_ratio=0.75)
    shuffle = np.concatenate([mask.ids_keep, mask.ids_masked], axis=1)
    for row in range(3):
        assert np.array_equal(shuffle[row][mask.ids_restore[row]], np.arange(20))


# Reconstruction loss --------------------------------------------------------------


def test_reconstruction_plain_mean_over_masked():
    prediction = np.zeros((1, 2, 2))
    target = np.array([[[1.0, 1.0], [3.0, 3.0]]])
    assert ref.reconstruction_loss(prediction, target, np.array([[1.0, 0.0]])) == 1.0
    assert ref.reconstruction_loss(prediction, target, np.array([[0.0, 1.0]])) == 9.0
    assert ref.reconstruction_loss(prediction, target, np.array([[1.0, 1.0]])) == 5.0


def test_reconstruction_no_masked_patch_is_zero():
    ones = np.ones((1, 2, 2))
    assert ref.reconstruction_loss(ones, 2.0 * ones, np.zeros((1, 2))) == 0.0


def test_reconstruction_fractional_weights():
    prediction = np.zeros((1, 2, 1))
    target = np.array([[[1.0], [3.0]]])
    value = ref.reconstruction_loss(prediction, target, np.array([[0.25, 0.75]]))
    assert value == pytest.approx((0.25 * 1.0 + 0.75 * 9.0) / 1.0)


def test_reconstruction_norm_pix():
    # Patch [1, 3]: mean 2, unbiased variance 2, standardised to
    # [-1, 1] / sqrt(2 + eps).
    target = np.array([[[1.0, 3.0]]])
    value = ref.reconstruction_loss(
        np.zeros((1, 1, 2)), target, np.ones((1, 1)), norm_pix_loss=True, eps=1e-6
    )
    assert value == pytest.approx(1.0 / (2.0 + 1e-6))


# Patches ------------------------------------------------------------------------


def test_patchify_layout_channel_fastest():
    images = np.arange(2 * 2 * 2, dtype=np.float64).reshape(1, 2, 2, 2)
    # One 2x2 patch; pixel (i, j) channel c sits at (i * 2 + j) * 2 + c.
    expected = [[[0, 4, 1, 5, 2, 6, 3, 7]]]
    assert ref.patchify(images, 2).tolist() == expected


def test_patchify_row_major_patches():
    images = np.arange(4 * 6, dtype=np.float64).reshape(1, 1, 4, 6)
    patches = ref.patchify(images, 2)
    assert patches.shape == (1, 6, 4)
    assert patches[0, 1].tolist() == [2, 3, 8, 9]
    assert patches[0, 3].tolist() == [12, 13, 18, 19]


def test_unpatchify_inverts_patchify():
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, 3, 6, 4))
    restored = ref.unpatchify(ref.patchify(images, 2), 2, image_size=(6, 4))
    assert np.array_equal(restored, images)
    square = rng.standard_normal((1, 2, 6, 6))
    assert np.array_equal(ref.unpatchify(ref.patchify(square, 3), 3), square)


# Analytic gradients against finite differences ----------------------------------------


def _finite_difference(function, arrays, index, step=1e-6):
    x = arrays[index]
    gradient = np.zeros_like(x)
    for position in np.ndindex(x.shape):
        h = step * max(abs(x[position]), 1e-2)
        plus = [a.copy() for a in arrays]
        minus = [a.copy() for a in arrays]
        plus[index][position] += h
        minus[index][position] -= h
        gradient[position] = (function(*plus) - function(*minus)) / (2.0 * h)
    return gradient


def _gradient_cases():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 5, 4))
    stressed = a.copy()
    stressed[1] = 0.0  # zero row
    stressed[2] = stressed[3]  # duplicate row
    stressed[:, 0] = 0.7  # constant column
    prediction, target = rng.standard_normal((2, 2, 3, 4))
    mask = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    return [
        ("nt_xent", ref.nt_xent_loss, grads.nt_xent_loss, (a, b), {"temperature": 0.3}),
        ("nt_xent stressed", ref.nt_xent_loss, grads.nt_xent_loss, (stressed, b), {}),
        ("byol", ref.byol_loss, grads.byol_loss, (a, b), {}),
        ("byol stressed", ref.byol_loss, grads.byol_loss, (stressed, b), {}),
        (
            "barlow",
            ref.barlow_twins_loss,
            grads.barlow_twins_loss,
            (a, b),
            {"lambda_param": 0.1},
        ),
        (
            "barlow stressed",
            ref.barlow_twins_loss,
            grads.barlow_twins_loss,
            (stressed, b),
            {},
        ),
        ("vicreg", ref.vicreg_loss, grads.vicreg_loss, (a, b), {}),
        ("vicreg stressed", ref.vicreg_loss, grads.vicreg_loss, (stressed, b), {}),
        ("invariance", ref.invariance_loss, grads.invariance_loss, (a, b), {}),
        (
            "variance",
            ref.variance_loss,
            grads.variance_loss,
            (a,),
            {"target_std": 2.0, "eps": 1e-3},
        ),
        ("covariance", ref.covariance_loss, grads.covariance_loss, (a,), {}),
        (
            "reconstruction",
            lambda p, t: ref.reconstruction_loss(p, t, mask),
            lambda p, t: grads.reconstruction_loss(p, t, mask),
            (prediction, target),
            {},
        ),
        (
            "reconstruction norm_pix",
            lambda p, t: ref.reconstruction_loss(p, t, mask, norm_pix_loss=True),
            lambda p, t: grads.reconstruction_loss(p, t, mask, norm_pix_loss=True),
            (prediction, target),
            {},
        ),
    ]


@pytest.mark.parametrize(
    "name, value, gradient, arrays, options",
    _gradient_cases(),
    ids=[case[0] for case in _gradient_cases()],
)
def test_gradient_matches_finite_differences(name, value, gradient, arrays, options):
    analytic = gradient(*arrays, **options)
    assert len(analytic) == len(arrays)
    for index in range(len(arrays)):
        numeric = _finite_difference(
            lambda *xs: value(*xs, **options), list(arrays), index
        )
        scale = max(np.max(np.abs(numeric)), 1.0)
        np.testing.assert_allclose(analytic[index], numeric, rtol=0, atol=1e-6 * scale)


def test_normalize_vjp_below_floor():
    # Below the floor the map is x / floor, so its gradient is g / floor.
    g = np.array([[1.0, -2.0]])
    out = grads.normalize_rows_vjp(np.zeros((1, 2)), g, floor=0.5)
    np.testing.assert_allclose(out, g / 0.5)


def test_reconstruction_gradient_without_masked_patch_is_zero():
    ones = np.ones((1, 2, 2))
    grad_p, grad_t = grads.reconstruction_loss(ones, 2.0 * ones, np.zeros((1, 2)))
    assert not grad_p.any()
    assert not grad_t.any()


# Rounding model and sensitivity ----------------------------------------------------


def test_stored_is_identity_outside_perturbation():
    x = np.array([1.0, -2.0])
    assert stored(x) is x
    assert stored(3.0) == 3.0


def test_stored_perturbs_by_relative_step():
    x = np.full(1000, 2.0)
    with perturbed(1e-3, np.random.default_rng(0)):
        moved = stored(x)
    relative = np.abs(moved / x - 1.0)
    assert relative.max() <= 1e-3
    assert relative.max() > 5e-4


def test_sensitivity_grows_with_temperature_inverse():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 8, 3))
    warm = sensitivity(ref.nt_xent_loss, [a, b], {"temperature": 1.0}, "float32")
    cold = sensitivity(ref.nt_xent_loss, [a, b], {"temperature": 0.05}, "float32")
    # Logits are of size 1 / temperature, so a shared relative error moves the loss
    # by about that much.
    assert cold > 4.0 * warm
    assert cold > 15.0


def test_sensitivity_sees_cancellation_in_gradient():
    # One dimension: the exact gradient of BYOL is 0, but it is the difference of
    # two terms of size |g| / ||x||, which rounding does not cancel.
    p = np.array([[0.002], [-0.002], [0.01]])
    z = np.array([[0.002], [-0.01], [0.006]])
    exact = grads.byol_loss(p, z)
    assert np.all(exact[0] == 0.0)
    assert sensitivity(grads.byol_loss, [p, z], {}, "bfloat16") > 100.0


# Reference networks ------------------------------------------------------------------


def test_conv3x3_delta_kernel_is_identity():
    rng = np.random.default_rng(5)
    images = rng.standard_normal((2, 3, 4, 5))
    weight = np.zeros((3, 3, 3, 3))
    for channel in range(3):
        weight[channel, channel, 1, 1] = 1.0
    np.testing.assert_allclose(nets.conv3x3(weight, images), images)


def test_conv3x3_shift_kernel_zero_pads():
    images = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    weight = np.zeros((1, 1, 3, 3))
    weight[0, 0, 0, 0] = 1.0  # out[y, x] = in[y - 1, x - 1]
    expected = [[0, 0, 0], [0, 0, 1], [0, 3, 4]]
    assert nets.conv3x3(weight, images)[0, 0].tolist() == expected


def test_max_pool_and_gelu():
    x = np.array([[[[1.0, 5.0], [-2.0, 3.0]]]])
    assert nets.max_pool2x2(x).tolist() == [[[[5.0]]]]
    assert nets.gelu(np.array([0.0]))[0] == 0.0
    assert nets.gelu(np.array([1.0]))[0] == pytest.approx(0.8413447460685429)
    assert nets.gelu(np.array([-10.0]))[0] == pytest.approx(0.0, abs=1e-20)


def test_batch_norm_train_and_eval():
    params = {
        "n.weight": np.array([2.0]),
        "n.bias": np.array([1.0]),
        "n.running_mean": np.array([1.0]),
        "n.running_var": np.array([4.0]),
    }
    x = np.array([[1.0], [3.0]])
    train = nets.batch_norm(params, "n", x, train=True)
    np.testing.assert_allclose(
        train[:, 0], [1.0 - 2.0 / math.sqrt(1 + 1e-5), 1.0 + 2.0 / math.sqrt(1 + 1e-5)]
    )
    evaluated = nets.batch_norm(params, "n", x, train=False)
    np.testing.assert_allclose(
        evaluated[:, 0], [1.0, 1.0 + 2.0 * 2.0 / math.sqrt(4 + 1e-5)]
    )


def test_layer_norm_standardises_last_axis():
    params = {"n.weight": np.ones(3), "n.bias": np.zeros(3)}
    out = nets.layer_norm(params, "n", np.array([[1.0, 2.0, 3.0]]))
    scale = math.sqrt(2.0 / 3.0 + 1e-6)
    np.testing.assert_allclose(out, [[-1.0 / scale, 0.0, 1.0 / scale]])


def test_attention_single_token_returns_projected_values():
    dim = 4
    rng = np.random.default_rng(6)
    params = {
        "a.qkv.weight": rng.standard_normal((3 * dim, dim)),
        "a.qkv.bias": rng.standard_normal(3 * dim),
        "a.proj.weight": rng.standard_normal((dim, dim)),
        "a.proj.bias": rng.standard_normal(dim),
    }
    x = rng.standard_normal((1, 1, dim))
    values = (x @ params["a.qkv.weight"].T + params["a.qkv.bias"])[..., 2 * dim :]
    expected = values @ params["a.proj.weight"].T + params["a.proj.bias"]
    np.testing.assert_allclose(nets.attention(params, "a", x, num_heads=2), expected)


def test_mlp_forward_closed_form():
    from sslspec.networks import MLP

    description = MLP(2, (), 2, batch_norm=False, output_activation=True)
    params = {
        "layers.0.weight": np.array([[1.0, 0.0], [0.0, -1.0]]),
        "layers.0.bias": np.zeros(2),
    }
    out = nets.forward(description, params, np.array([[3.0, 4.0]]))
    assert out.tolist() == [[3.0, 0.0]]


def test_reference_networks_match_torch_functional():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(7)
    images = rng.standard_normal((2, 3, 6, 4))
    weight = rng.standard_normal((5, 3, 3, 3))
    expected = functional.conv2d(
        torch.from_numpy(images), torch.from_numpy(weight), padding=1
    )
    np.testing.assert_allclose(
        nets.conv3x3(weight, images), expected.numpy(), atol=1e-12
    )
    x = rng.standard_normal((4, 7))
    np.testing.assert_allclose(
        nets.gelu(x), functional.gelu(torch.from_numpy(x)).numpy(), atol=1e-15
    )
    params = {"n.weight": rng.standard_normal(7), "n.bias": rng.standard_normal(7)}
    expected = functional.layer_norm(
        torch.from_numpy(x),
        (7,),
        torch.from_numpy(params["n.weight"]),
        torch.from_numpy(params["n.bias"]),
        eps=1e-6,
    )
    np.testing.assert_allclose(
        nets.layer_norm(params, "n", x), expected.numpy(), atol=1e-12
    )
