"""Tests of the JAX backend: protocol, devices, layers, parameter conversion and
the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from sslspec_jax import JaxBackend  # noqa: E402
from sslspec_jax import networks as jn  # noqa: E402
from sslspec_jax.random import KeyRandom  # noqa: E402

from sslspec import networks as spec  # noqa: E402
from sslspec.backend import Backend, load_backend  # noqa: E402

SMALL_NETWORKS = {
    "mlp": spec.MLP(10, (16, 12), 8, batch_norm=True, output_activation=True),
    "mlp-plain": spec.MLP(10, (16,), 8, batch_norm=False),
    "conv": spec.ConvEncoder(1, (8, 8), (4, 6, 8)),
    "vit": spec.ViTEncoder(
        1, (8, 8), 2, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0
    ),
    "decoder": spec.MAEDecoder(
        16, 4, encoder_dim=16, decoder_dim=8, depth=1, num_heads=2, mlp_ratio=2.0
    ),
}


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend()


def random_canonical(description, seed: int = 0) -> dict[str, np.ndarray]:
    """Return canonical parameters with every entry random, running variances
    positive."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in spec.parameter_shapes(description).items():
        if name.endswith("running_var"):
            params[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            params[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return params


# Backend protocol and devices.


def test_backend_loads_by_name():
    backend = load_backend("jax")
    assert isinstance(backend, JaxBackend)
    assert isinstance(backend, Backend)
    assert backend.name == "jax"
    assert backend.capabilities == {"autodiff", "jit", "networks", "training"}
    assert backend.version() == jax.__version__


def test_devices_are_resolvable(backend):
    names = backend.devices()
    assert names
    for name in names:
        assert backend.resolve_device(name) == name
    assert backend.resolve_device("auto") in names
    assert backend.resolve_device("cpu") == "cpu:0"


def test_auto_prefers_accelerator(backend):
    names = backend.devices()
    accelerators = [name for name in names if not name.startswith("cpu")]
    expected = accelerators[0] if accelerators else "cpu:0"
    assert backend.resolve_device("auto") == expected


@pytest.mark.parametrize("request_", ["cuda:99", "gpu:99", "cpu:7", "tpu:5"])
def test_unavailable_device_rejected(backend, request_):
    with pytest.raises(ValueError, match="available devices"):
        backend.resolve_device(request_)


def test_malformed_device_rejected(backend):
    with pytest.raises(ValueError, match="non-negative integer"):
        backend.resolve_device("cuda:first")


def test_dtypes_follow_x64_mode(backend):
    dtypes = backend.dtypes()
    assert {"float32", "float16", "bfloat16"} <= set(dtypes)
    assert ("float64" in dtypes) == bool(jax.config.read("jax_enable_x64"))


def test_asarray_casts_and_places(backend):
    device = backend.resolve_device("cpu")
    x = backend.asarray(np.arange(6.0).reshape(2, 3), dtype="bfloat16", device=device)
    assert x.dtype == jnp.bfloat16
    assert backend.device_of(x) == device
    back = backend.to_numpy(x)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, np.arange(6.0).reshape(2, 3))


def test_asarray_float64_needs_x64(backend):
    if jax.config.read("jax_enable_x64"):
        pytest.skip("64-bit mode is enabled")
    with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
        backend.asarray(np.ones(3), dtype="float64")


def test_namespace_is_jax_numpy(backend):
    assert backend.namespace() is jnp


def test_value_and_grad_all_arguments(backend):
    a = backend.asarray(np.array([1.0, 2.0, 3.0], np.float32))
    b = backend.asarray(np.array([4.0, 5.0, 6.0], np.float32))
    value, grads = backend.value_and_grad(lambda x, y: jnp.sum(x * y * y), a, b)
    assert float(value) == pytest.approx(1 * 16 + 2 * 25 + 3 * 36)
    np.testing.assert_allclose(np.asarray(grads[0]), [16.0, 25.0, 36.0])
    np.testing.assert_allclose(np.asarray(grads[1]), [8.0, 20.0, 36.0])


def test_jit_compiles_once(backend):
    traces = []

    def fn(x):
        traces.append(1)
        return x * 2

    compiled = backend.jit(fn)
    for value in (1.0, 2.0, 3.0):
        result = compiled(jnp.full((3,), value))
        np.testing.assert_allclose(np.asarray(result), np.full(3, 2 * value))
    assert len(traces) == 1


# Layers.


def test_batch_norm_running_variance_unbiased():
    norm = jn.BatchNorm(3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    norm.train()
    out = np.asarray(norm(x))
    host = np.asarray(x)
    expected = (host - host.mean(0)) / np.sqrt(host.var(0) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(norm.mean[...]), 0.1 * host.mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(norm.var[...]), 0.9 + 0.1 * host.var(0, ddof=1), rtol=1e-5
    )


def test_batch_norm_eval_uses_running_stats():
    norm = jn.BatchNorm(2)
    norm.mean[...] = jnp.asarray([1.0, -1.0])
    norm.var[...] = jnp.asarray([4.0, 0.25])
    norm.eval()
    out = np.asarray(norm(jnp.asarray([[3.0, 0.0]])))
    np.testing.assert_allclose(
        out, [[2.0 / math.sqrt(4.0 + 1e-5), 1.0 / math.sqrt(0.25 + 1e-5)]], rtol=1e-6
    )


def test_batch_norm_rejects_single_value():
    norm = jn.BatchNorm(2)
    with pytest.raises(ValueError, match="more than one value"):
        norm(jnp.ones((1, 2)))


def numpy_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    qkv = x @ qkv_w.T + qkv_b
    q, k, v = np.split(qkv, 3, axis=-1)

    def split(t):
        return t.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
    return out @ proj_w.T + proj_b


def test_attention_matches_formula():
    rng = np.random.default_rng(1)
    attention = jn.Attention(8, 2, rngs=nnx.Rngs(0), dtype=jnp.float32)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    params = jn.state_to_canonical(nnx.state(attention, nnx.Param))
    expected = numpy_attention(
        x.astype(np.float64),
        params["qkv.weight"],
        params["qkv.bias"],
        params["proj.weight"],
        params["proj.bias"],
        heads=2,
    )
    np.testing.assert_allclose(
        np.asarray(attention(jnp.asarray(x))), expected, rtol=1e-4, atol=1e-5
    )


def test_mlp_matches_numpy(backend):
    description = SMALL_NETWORKS["mlp"]
    params = random_canonical(description)
    x = np.random.default_rng(2).normal(size=(6, 10)).astype(np.float32)
    h = x.astype(np.float64)
    for i in range(3):
        h = h @ params[f"layers.{i}.weight"].T
        if i < 2:
            norm = f"norms.{i}"
            h = (h - params[f"{norm}.running_mean"]) / np.sqrt(
                params[f"{norm}.running_var"] + 1e-5
            )
            h = np.maximum(h * params[f"{norm}.weight"] + params[f"{norm}.bias"], 0)
        else:
            h = np.maximum(h + params["layers.2.bias"], 0)
    out = backend.apply_network(description, params, x)
    np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-5)


def test_layer_norm_and_gelu_constants():
    block = jn.Block(8, 2, 2.0, rngs=nnx.Rngs(0), dtype=jnp.float32)
    assert block.norm1.epsilon == 1e-6
    x = jnp.linspace(-3.0, 3.0, 7)
    exact = np.asarray(x) * 0.5 * (1 + np.vectorize(math.erf)(np.asarray(x) / 2**0.5))
    np.testing.assert_allclose(
        np.asarray(jax.nn.gelu(x, approximate=False)), exact, rtol=1e-6, atol=1e-7
    )


def test_decoder_needs_ids_restore(backend):
    description = SMALL_NETWORKS["decoder"]
    with pytest.raises(ValueError, match="ids_restore"):
        backend.apply_network(
            description, random_canonical(description), np.zeros((2, 4, 16))
        )


# Conversion to and from the canonical layout.


@pytest.mark.parametrize("kind", sorted(SMALL_NETWORKS))
def test_canonical_round_trip(kind):
    description = SMALL_NETWORKS[kind]
    model = jn.build_network(description, rngs=3)
    canonical = jn.to_canonical(model)
    shapes = spec.parameter_shapes(description)
    assert list(canonical) == list(shapes)
    for name, shape in shapes.items():
        assert canonical[name].shape == shape, name
        assert canonical[name].dtype == np.float32, name
    rebuilt = jn.to_canonical(jn.from_canonical(description, canonical))
    for name in shapes:
        np.testing.assert_array_equal(rebuilt[name], canonical[name])


def test_linear_and_conv_layouts():
    model = jn.build_network(SMALL_NETWORKS["conv"], rngs=0)
    kernel = np.asarray(model.blocks[1].conv.kernel[...])
    canonical = jn.to_canonical(model)["blocks.1.conv.weight"]
    assert kernel.shape == (3, 3, 4, 6)
    np.testing.assert_array_equal(canonical[5, 2, 0, 1], kernel[0, 1, 2, 5])
    mlp = jn.build_network(SMALL_NETWORKS["mlp"], rngs=0)
    kernel = np.asarray(mlp.layers[0].kernel[...])
    np.testing.assert_array_equal(jn.to_canonical(mlp)["layers.0.weight"], kernel.T)


def test_from_canonical_reports_problems():
    description = SMALL_NETWORKS["mlp"]
    params = random_canonical(description)
    params.pop("layers.0.weight")
    params["layers.1.weight"] = np.zeros((3, 3), np.float32)
    params["extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as raised:
        jn.from_canonical(description, params)
    message = str(raised.value)
    assert "missing: layers.0.weight" in message
    assert "unexpected: extra" in message
    assert "layers.1.weight has shape (3, 3), expected (12, 16)" in message


def test_load_canonical_in_place():
    description = SMALL_NETWORKS["vit"]
    model = jn.build_network(description, rngs=0)
    params = random_canonical(description, seed=5)
    jn.load_canonical(model, params)
    loaded = jn.to_canonical(model)
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_vit_encoder_keeps_visible_tokens(backend):
    description = SMALL_NETWORKS["vit"]
    params = random_canonical(description)
    images = np.random.default_rng(3).normal(size=(2, 1, 8, 8)).astype(np.float32)
    ids_keep = np.array([[0, 5, 9, 15], [3, 2, 1, 0]])
    out = backend.apply_network(description, params, images, ids_keep=ids_keep)
    assert out.shape == (2, 4, 16)
    full = backend.apply_network(description, params, images)
    assert full.shape == (2, 16, 16)


def test_key_random_splits_every_call():
    random = KeyRandom(jax.random.key(0))
    first = np.asarray(random.uniform((4,)))
    second = np.asarray(random.uniform((4,)))
    assert not np.array_equal(first, second)
    again = KeyRandom(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.uniform((4,))), first)
    assert random.normal((2, 3)).shape == (2, 3)
