"""Every public function traces under jax.jit and torch.compile(fullgraph=True).

Tracing fails on Python branches over array values and on data-dependent shapes,
so these tests also show that the spec has neither.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
from loss_cases import LOSS_CASE_IDS, LOSS_CASES

import sslspec


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_loss_under_jax_jit(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    inputs = case.make_inputs(rng)
    fixed = case.make_fixed(rng)
    expected = float(case(inputs, fixed))

    def loss(xs, fs):
        return case(xs, fs)

    traced = jax.jit(loss)(
        [jnp.asarray(x) for x in inputs], [jnp.asarray(x) for x in fixed]
    )
    assert float(traced) == pytest.approx(expected, rel=1e-12)


def test_mask_and_patches_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 3, size=(3, 20)).astype(np.float64)
    images = rng.standard_normal((2, 3, 8, 12))

    mask = jax.jit(lambda n: sslspec.generate_mask(n, mask_ratio=0.6))(
        jnp.asarray(noise)
    )
    expected = sslspec.generate_mask(noise, mask_ratio=0.6)
    for traced, eager in zip(mask, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(traced), eager)

    def round_trip(x):
        patches = sslspec.patchify(x, 4)
        return patches, sslspec.unpatchify(patches, 4, image_size=(8, 12))

    patches, restored = jax.jit(round_trip)(jnp.asarray(images))
    np.testing.assert_array_equal(np.asarray(patches), sslspec.patchify(images, 4))
    np.testing.assert_array_equal(np.asarray(restored), images)


@contextlib.contextmanager
def ignore_lru_cache_warning():
    # array-api-compat's lru_cache-wrapped helpers make Dynamo warn that it traces
    # through the cache; the helpers are pure, so the traced code is correct.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lru_cache.*", category=UserWarning)
        yield


# Importing inductor triggers torch's own deprecation warning for script_method.
@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")
def test_nt_xent_under_torch_inductor():
    torch = pytest.importorskip("torch")
    # The default inductor backend generates and compiles C++; one small loss keeps
    # that to seconds.
    rng = np.random.default_rng(3)
    z_i = torch.tensor(rng.standard_normal((8, 6)), dtype=torch.float32)
    z_j = torch.tensor(rng.standard_normal((8, 6)), dtype=torch.float32)
    compiled = torch.compile(sslspec.nt_xent_loss, fullgraph=True)
    with ignore_lru_cache_warning():
        value = compiled(z_i, z_j, temperature=0.1)
    expected = sslspec.nt_xent_loss(z_i, z_j, temperature=0.1)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_everything_under_torch_compile():
    torch = pytest.importorskip("torch")
    # Dynamo with fullgraph=True fails on any graph break, and AOTAutograd traces
    # the backward pass. The aot_eager backend skips inductor's code generation,
    # which takes about a minute for this many functions on two CPU cores.
    rng = np.random.default_rng(2)
    z_a = torch.tensor(rng.standard_normal((8, 6)), dtype=torch.float32)
    z_b = torch.tensor(rng.standard_normal((8, 6)), dtype=torch.float32)
    images = torch.tensor(rng.standard_normal((2, 3, 8, 8)), dtype=torch.float32)
    noise = torch.tensor(rng.integers(0, 3, size=(2, 4)), dtype=torch.float32)

    def everything(z_a, z_b, images, noise):
        mask = sslspec.generate_mask(noise, mask_ratio=0.75)
        patches = sslspec.patchify(images, 4)
        losses = torch.stack(
            [
                sslspec.nt_xent_loss(z_a, z_b, temperature=0.1),
                sslspec.byol_loss(z_a, z_b),
                sslspec.barlow_twins_loss(z_a, z_b),
                sslspec.vicreg_loss(z_a, z_b),
                sslspec.reconstruction_loss(
                    patches * 0.5, patches, mask.mask, norm_pix_loss=True
                ),
            ]
        )
        return losses, mask, sslspec.unpatchify(patches, 4)

    compiled = torch.compile(everything, fullgraph=True, backend="aot_eager")
    leaves = [z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)]
    with ignore_lru_cache_warning():
        losses, mask, restored = compiled(*leaves, images, noise)
    losses.sum().backward()

    eager_leaves = [z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)]
    eager_losses, eager_mask, _ = everything(*eager_leaves, images, noise)
    eager_losses.sum().backward()

    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-5)
    for compiled_leaf, eager_leaf in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(
            compiled_leaf.grad, eager_leaf.grad, rtol=1e-4, atol=1e-5
        )
    for traced, eager in zip(mask, eager_mask, strict=True):
        torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(restored, images)
