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
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sslspec_jax import JaxBackend  # noqa: E402
from sslspec_jax import networks as jn  # noqa: E402
from sslspec_jax import trainer as trainer_module  # noqa: E402
from sslspec_jax.random import KeyRandom  # noqa: E402
from sslspec_jax.trainer import JaxTrainer, build_optimizer, method_loss  # noqa: E402

import sslspec  # noqa: E402
from sslspec import networks as spec  # noqa: E402
from sslspec.backend import Backend, load_backend  # noqa: E402
from sslspec.config import AugmentConfig, PretrainConfig  # noqa: E402
from sslspec.networks import HeadSizes  # noqa: E402
from sslspec.schedules import warmup_cosine_lr  # noqa: E402

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


def test_asarray_float64_follows_x64_mode(backend):
    if jax.config.read("jax_enable_x64"):
        x = backend.asarray(np.ones(3), dtype="float64")
        assert x.dtype == jnp.float64
    else:
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
    norm.mean[...] = jnp.asarray([1.0, -1.0], jnp.float32)
    norm.var[...] = jnp.asarray([4.0, 0.25], jnp.float32)
    norm.eval()
    out = np.asarray(norm(jnp.asarray([[3.0, 0.0]], jnp.float32)))
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

    # Changing every pixel of the other patches leaves the output unchanged.
    patch = description.patch_size
    visible = np.zeros((2, 16), bool)
    np.put_along_axis(visible, ids_keep, True, axis=1)
    pixels = np.kron(visible.reshape(2, 4, 4), np.ones((patch, patch)))[:, None]
    scrambled = np.where(pixels > 0, images, 100.0 * images + 3.0)
    assert np.mean(scrambled != images) == pytest.approx(0.75)
    again = backend.apply_network(description, params, scrambled, ids_keep=ids_keep)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5)


def test_key_random_splits_every_call():
    random = KeyRandom(jax.random.key(0))
    first = np.asarray(random.uniform((4,)))
    second = np.asarray(random.uniform((4,)))
    assert not np.array_equal(first, second)
    again = KeyRandom(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.uniform((4,))), first)
    assert random.normal((2, 3)).shape == (2, 3)


# Trainer.

FEATURE_SIZES = HeadSizes(
    projector_hidden=16,
    projector_out=8,
    predictor_hidden=16,
    mlp_encoder_hidden=(16, 16),
)
IMAGE_SIZES = HeadSizes(
    projector_hidden=32,
    projector_out=16,
    predictor_hidden=32,
    conv_channels=(4, 8),
    vit={"embed_dim": 16, "depth": 1, "num_heads": 2},
    decoder={"decoder_dim": 8, "depth": 1, "num_heads": 2},
)
FEATURE_SHAPE = (12,)
IMAGE_SHAPE = (1, 8, 8)
FEATURE_METHODS = ("simclr", "byol", "barlow-twins", "vicreg")


def feature_config(method: str, **changes) -> PretrainConfig:
    values = {
        "method": method,
        "backend": "jax",
        "epochs": 2,
        "batch_size": 16,
        "warmup_epochs": 1,
        "steps_per_epoch": 3,
        "total_steps": 6,
        "device": "cpu",
        "sizes": FEATURE_SIZES,
    }
    return PretrainConfig(**(values | changes))


def feature_batches(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((16, *FEATURE_SHAPE)).astype(np.float32)
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def feature_runs():
    """Three training steps of every method but MAE on feature vectors."""
    runs = {}
    for method in FEATURE_METHODS:
        trainer = JaxTrainer(feature_config(method), sample_shape=FEATURE_SHAPE)
        losses = [trainer.train_step(batch) for batch in feature_batches(3)]
        runs[method] = (trainer, losses)
    return runs


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_method_trains(feature_runs, method):
    trainer, losses = feature_runs[method]
    assert trainer.step == 3
    assert all(math.isfinite(loss) for loss in losses)
    assert len(set(losses)) == 3
    features = trainer.encode(feature_batches(1, seed=9)[0])
    assert features.shape == (16, 16)
    assert features.dtype == np.float32


def test_state_names_match_torch_trainer(feature_runs):
    trainer, _ = feature_runs["byol"]
    names = set(trainer.state_dict())
    torch_trainer = pytest.importorskip("sslspec_torch.trainer")
    reference = torch_trainer.TorchTrainer(
        feature_config("byol"), sample_shape=FEATURE_SHAPE, device="cpu"
    )
    expected = set(reference.state_dict())
    assert names - {"rng.key"} == expected - {"rng.augment"}
    assert "rng.key" in names


def test_state_names_are_canonical(feature_runs):
    trainer, _ = feature_runs["barlow-twins"]
    state = trainer.state_dict()
    shapes = spec.flat_parameter_shapes(trainer.descriptions)
    for name, shape in shapes.items():
        assert state[name].shape == shape, name
    assert state["optimizer.step"] == 3
    assert state["optimizer.step"].dtype == np.int64
    assert state["rng.key"].dtype == np.uint32
    moment = state["optimizer.exp_avg.projector.layers.0.weight"]
    assert moment.shape == shapes["projector.layers.0.weight"]
    assert np.any(moment != 0)


def test_state_stays_on_device(feature_runs):
    trainer, _ = feature_runs["simclr"]
    leaves = jax.tree.leaves((trainer.params, trainer.batch_stats, trainer.opt_state))
    for leaf in leaves:
        assert leaf.devices() == {trainer.device}


def test_train_step_compiles_once(feature_runs, monkeypatch):
    trainer, _ = feature_runs["vicreg"]
    seconds = trainer.compile_seconds
    assert seconds is not None and seconds > 0

    def fail(*args, **kwargs):
        raise AssertionError("the training step was compiled again")

    monkeypatch.setattr(trainer_module, "make_train_step", fail)
    trainer.train_step(feature_batches(1, seed=4)[0])
    assert trainer.compile_seconds == seconds
    assert trainer.extra_metrics() == {"devices": 1, "compile_seconds": seconds}


def test_resume_matches_uninterrupted(feature_runs):
    config = feature_config("byol")
    batches = feature_batches(5)
    full = JaxTrainer(config, sample_shape=FEATURE_SHAPE)
    expected = [full.train_step(batch) for batch in batches]
    first = JaxTrainer(config, sample_shape=FEATURE_SHAPE)
    losses = [first.train_step(batch) for batch in batches[:2]]
    resumed = JaxTrainer(config.replace(seed=7), sample_shape=FEATURE_SHAPE)
    resumed.load_state_dict(first.state_dict())
    losses += [resumed.train_step(batch) for batch in batches[2:]]
    assert losses == expected
    final, reference = resumed.state_dict(), full.state_dict()
    for name, value in reference.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)


def test_byol_target_follows_ema(feature_runs):
    config = feature_config("byol")
    trainer = JaxTrainer(config, sample_shape=FEATURE_SHAPE)
    trainer.train_step(feature_batches(1)[0])
    before = trainer.state_dict()
    trainer.train_step(feature_batches(1, seed=3)[0])
    after = trainer.state_dict()
    momentum = sslspec.momentum_schedule(
        1,
        config.total_steps,
        base_momentum=config.base_momentum,
        final_momentum=config.final_momentum,
    )
    buffers = {
        f"{prefix}.{name}"
        for prefix in ("encoder", "projector")
        for name in spec.buffer_names(trainer.descriptions[prefix])
    }
    for prefix in ("encoder", "projector"):
        for name in spec.parameter_shapes(trainer.descriptions[prefix]):
            online = f"{prefix}.{name}"
            if online in buffers:
                continue
            target = f"target_{online}"
            expected = momentum * before[target] + (1 - momentum) * after[online]
            np.testing.assert_allclose(
                after[target], expected, rtol=1e-6, atol=1e-7, err_msg=target
            )


def byol_gradients(trainer: JaxTrainer, stop_target_gradient: bool):
    """Return the gradients of BYOL's loss with respect to the online and the
    target parameters."""
    config = trainer.config
    batch = jnp.asarray(feature_batches(1)[0])

    def loss(params, target_params):
        online = nnx.merge(trainer._graphdef, params, trainer.batch_stats, copy=True)
        target = nnx.merge(
            trainer._target_graphdef, target_params, trainer.target_stats, copy=True
        )
        return method_loss(
            config,
            online,
            target,
            batch,
            KeyRandom(jax.random.key(0)),
            stop_target_gradient=stop_target_gradient,
        )

    grads = jax.grad(loss, argnums=(0, 1))(trainer.params, trainer.target_params)
    return jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])


def test_byol_target_gets_no_gradient(feature_runs):
    trainer, _ = feature_runs["byol"]
    online, target = byol_gradients(trainer, stop_target_gradient=True)
    assert target
    for leaf in target:
        assert not np.any(np.asarray(leaf))
    assert any(np.any(np.asarray(leaf)) for leaf in online)
    _, leaking = byol_gradients(trainer, stop_target_gradient=False)
    assert any(np.any(np.asarray(leaf)) for leaf in leaking)


def test_adamw_schedule_matches_torch():
    torch = pytest.importorskip("torch")
    config = feature_config("simclr", lr=0.1, weight_decay=0.3, total_steps=7)
    optimizer = build_optimizer(config)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(5).astype(np.float32)
    grads = rng.standard_normal((8, 5)).astype(np.float32)

    params = {"w": jnp.asarray(start)}
    state = optimizer.init(params)
    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    reference = torch.optim.AdamW(
        [weight], lr=config.lr, weight_decay=config.weight_decay
    )
    for step, grad in enumerate(grads):
        updates, state = optimizer.update({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        for group in reference.param_groups:
            group["lr"] = warmup_cosine_lr(
                step,
                base_lr=config.lr,
                warmup_steps=config.steps_per_epoch,
                total_steps=config.total_steps,
            )
        weight.grad = torch.from_numpy(grad.copy())
        reference.step()
        np.testing.assert_allclose(
            np.asarray(params["w"]),
            weight.detach().numpy(),
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"step {step}",
        )


def test_encode_pads_last_batch(feature_runs, monkeypatch):
    trainer, _ = feature_runs["simclr"]
    inputs = np.concatenate(feature_batches(2, seed=5))[:27]
    whole = trainer.encode(inputs)
    monkeypatch.setattr(trainer_module, "ENCODE_BATCH_SIZE", 8)
    np.testing.assert_allclose(trainer.encode(inputs), whole, rtol=1e-5, atol=1e-6)
    assert trainer.encode(inputs[:0]).shape == (0, 0)


def test_load_state_reports_problems(feature_runs):
    trainer, _ = feature_runs["simclr"]
    state = trainer.state_dict()
    state.pop("encoder.layers.0.weight")
    state["encoder.extra"] = np.zeros(1, np.float32)
    state["projector.layers.0.bias"] = np.zeros(3, np.float32)
    state.pop("optimizer.exp_avg.projector.layers.1.bias")
    state["rng.key"] = np.zeros(5, np.uint32)
    with pytest.raises(ValueError) as raised:
        trainer.load_state_dict(state)
    message = str(raised.value)
    assert "missing encoder.layers.0.weight" in message
    assert "unexpected encoder.extra" in message
    assert "projector.layers.0.bias has shape (3,), expected (16,)" in message
    assert "missing optimizer.exp_avg.projector.layers.1.bias" in message
    assert "rng.key has shape (5,), expected (2,)" in message


def test_weights_load_without_optimizer_or_rng(feature_runs):
    trainer, _ = feature_runs["vicreg"]
    fresh = JaxTrainer(feature_config("vicreg"), sample_shape=FEATURE_SHAPE)
    key = np.asarray(jax.random.key_data(fresh.key))
    weights = {
        name: value
        for name, value in trainer.state_dict().items()
        if not name.startswith(("optimizer.", "rng."))
    }
    fresh.load_state_dict(weights | {"rng.augment": np.zeros(8, np.uint8)})
    inputs = feature_batches(1, seed=2)[0]
    np.testing.assert_array_equal(fresh.encode(inputs), trainer.encode(inputs))
    assert fresh.step == 0
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(fresh.key)), key)


def test_trainer_requires_total_steps():
    trainer = JaxTrainer(
        feature_config("simclr", total_steps=0), sample_shape=FEATURE_SHAPE
    )
    with pytest.raises(ValueError, match="total_steps"):
        trainer.train_step(feature_batches(1)[0])


def test_batch_of_wrong_shape(feature_runs):
    trainer, _ = feature_runs["simclr"]
    with pytest.raises(ValueError, match=r"batch must have shape \(B, 12\)"):
        trainer.train_step(np.zeros((16, 11), np.float32))


def test_bf16_step_keeps_float32_state():
    config = feature_config("simclr", precision="bf16")
    trainer = JaxTrainer(config, sample_shape=FEATURE_SHAPE)
    losses = [trainer.train_step(batch) for batch in feature_batches(2)]
    assert all(math.isfinite(loss) for loss in losses)
    for leaf in jax.tree.leaves(trainer.params):
        assert leaf.dtype == jnp.float32
    assert trainer.encode(feature_batches(1)[0]).dtype == np.float32


def test_create_trainer_uses_config_device(backend):
    config = feature_config("simclr", device="auto")
    trainer = backend.create_trainer(config, sample_shape=FEATURE_SHAPE)
    assert trainer.device_name == backend.resolve_device("auto")
    with pytest.raises(ValueError, match="available devices"):
        backend.create_trainer(
            config.replace(device="cuda:99"), sample_shape=FEATURE_SHAPE
        )


# MAE.


def mae_config(**changes) -> PretrainConfig:
    values = {
        "method": "mae",
        "backend": "jax",
        "batch_size": 16,
        "warmup_epochs": 1,
        "steps_per_epoch": 2,
        "total_steps": 4,
        "device": "cpu",
        "sizes": IMAGE_SIZES,
    }
    return PretrainConfig(**(values | changes))


def image_batch(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(16, *IMAGE_SHAPE)).astype(np.float32)


def test_mae_encoder_sees_only_kept_patches(monkeypatch):
    # A fresh cache makes the training step trace (and compile) again here.
    monkeypatch.setattr(trainer_module, "_CACHE", trainer_module._CompileCache())
    generate_mask = sslspec.generate_mask
    encoder_call = jn.ViTEncoder.__call__
    masks, encoder_calls = [], []

    def spy_mask(noise, **kwargs):
        masks.append((noise, generate_mask(noise, **kwargs)))
        return masks[-1][1]

    def spy_encoder(self, images, ids_keep=None):
        output = encoder_call(self, images, ids_keep)
        encoder_calls.append((ids_keep, output.shape))
        return output

    monkeypatch.setattr(sslspec, "generate_mask", spy_mask)
    monkeypatch.setattr(jn.ViTEncoder, "__call__", spy_encoder)
    config = mae_config()
    trainer = JaxTrainer(config, sample_shape=IMAGE_SHAPE)
    losses = [trainer.train_step(image_batch(seed)) for seed in range(2)]

    # The step was traced once, and the encoder received only the kept patches.
    ((noise, mask),) = masks
    length = trainer.descriptions["encoder"].num_patches
    keep = length - round(length * config.mask_ratio)
    assert noise.shape == (16, length)
    assert noise.dtype == jnp.float32
    ((ids_keep, latent_shape),) = encoder_calls
    assert ids_keep is mask.ids_keep
    assert latent_shape == (16, keep, 16)

    assert all(math.isfinite(loss) for loss in losses)
    assert losses[1] < losses[0]
    features = trainer.encode(image_batch(5))
    assert features.shape == (16, 16)
    state = trainer.state_dict()
    assert state["encoder.pos_embed"].shape == (1, 16, 16)
    assert state["decoder.mask_token"].shape == (1, 1, 8)


# Driver.

DRIVER_SIZES = HeadSizes(
    projector_hidden=32,
    projector_out=16,
    predictor_hidden=32,
    conv_channels=(4, 8),
)


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    images = (digits.images[:200] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=images, y=digits.target[:200])
    return str(path)


def driver_config(data: str, **changes) -> PretrainConfig:
    values = {
        "method": "byol",
        "backend": "jax",
        "data": data,
        "epochs": 3,
        "batch_size": 32,
        "warmup_epochs": 1,
        "device": "cpu",
        "sizes": DRIVER_SIZES,
        "augment": AugmentConfig(erase_probability=0.0),
    }
    return PretrainConfig(**(values | changes))


def test_driver_resume_after_crash_matches(tmp_path, digits_file, monkeypatch):
    from sslspec.checkpoint import load_checkpoint
    from sslspec.pretrain import pretrain, resume_run

    config = driver_config(digits_file)
    full = pretrain(config, out_dir=tmp_path / "full")
    expected = full["loss_history"]
    assert len(expected) == 3
    assert 0.0 <= full["knn_accuracy"] <= 1.0

    original = JaxTrainer.train_step
    calls = {"count": 0}

    def crash_in_second_epoch(self, batch):
        calls["count"] += 1
        if calls["count"] == 7:
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(JaxTrainer, "train_step", crash_in_second_epoch)
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(config, out_dir=run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert checkpoint.epoch == 1
    assert checkpoint.tensors["rng.key"].dtype == np.uint32

    monkeypatch.setattr(JaxTrainer, "train_step", original)
    resumed = resume_run(run_dir)
    assert resumed["loss_history"] == expected
    assert resumed["knn_accuracy"] == full["knn_accuracy"]
    assert resumed["linear_probe_accuracy"] == full["linear_probe_accuracy"]
