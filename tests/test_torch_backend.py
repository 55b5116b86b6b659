"""Tests of the PyTorch backend: devices, arrays, networks and the trainer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sslspec_torch import TorchBackend  # noqa: E402
from sslspec_torch.networks import (  # noqa: E402
    build_module,
    canonical_state,
    patchify,
)

import sslspec  # noqa: E402
from sslspec.backend import Backend, Trainer, load_backend  # noqa: E402
from sslspec.config import AugmentConfig, PretrainConfig  # noqa: E402
from sslspec.networks import (  # noqa: E402
    METHODS,
    MLP,
    ConvEncoder,
    HeadSizes,
    MAEDecoder,
    ViTEncoder,
    buffer_names,
    method_networks,
    parameter_shapes,
)

SMALL_SIZES = HeadSizes(
    projector_hidden=64,
    projector_out=32,
    predictor_hidden=64,
    mlp_encoder_hidden=(32, 32),
    conv_channels=(8, 16),
    vit={"embed_dim": 16, "depth": 1, "num_heads": 2},
    decoder={"decoder_dim": 16, "depth": 1, "num_heads": 2},
)
DESCRIPTIONS = [
    MLP(10, (16, 8), 4, batch_norm=True, output_activation=True),
    MLP(10, (16,), 4, batch_norm=False),
    MLP(10, (), 4),
    ConvEncoder(in_channels=3, image_size=(8, 8), channels=(4, 8, 16)),
    ViTEncoder(
        in_channels=1,
        image_size=(8, 8),
        patch_size=2,
        embed_dim=16,
        depth=2,
        num_heads=2,
    ),
    MAEDecoder(
        num_patches=16, patch_dim=4, encoder_dim=16, decoder_dim=8, depth=1, num_heads=2
    ),
]


@pytest.fixture(scope="module")
def backend():
    return TorchBackend()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    images = load_digits().images[:96] / 16.0
    return images.astype(np.float32)[:, None, :, :]


def small_config(method, **changes):
    values = {
        "method": method,
        "epochs": 1,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_epochs": 0,
        "steps_per_epoch": 100,
        "total_steps": 100,
        "sizes": SMALL_SIZES,
        "device": "cpu",
        "augment": AugmentConfig(noise_std=0.02, erase_probability=0.0),
    }
    return PretrainConfig(**(values | changes))


def random_params(description, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(description).items():
        if name.endswith("running_var"):
            params[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            params[name] = (rng.normal(size=shape) * 0.3).astype(np.float32)
    return params


# Backend protocol


def test_entry_point_loads_torch_backend():
    backend = load_backend("torch")
    assert isinstance(backend, TorchBackend)
    assert isinstance(backend, Backend)


def test_capabilities_and_version(backend):
    assert backend.name == "torch"
    assert backend.capabilities == {
        "autodiff",
        "distributed",
        "jit",
        "networks",
        "training",
    }
    assert callable(backend.launch)
    assert backend.version() == torch.__version__
    assert "cpu" in backend.devices()
    assert backend.dtypes() == ("float64", "float32", "float16", "bfloat16")
    assert backend.namespace().__name__ == "array_api_compat.torch"


def test_resolve_device(backend):
    assert backend.resolve_device("cpu") == "cpu"
    expected = backend.devices()[1] if len(backend.devices()) > 1 else "cpu"
    assert backend.resolve_device("auto") == expected
    with pytest.raises(ValueError, match="'tpu' is not a PyTorch device"):
        backend.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_clear(backend):
    with pytest.raises(
        ValueError, match=r"'cuda:1' is not available.*available devices: cpu"
    ):
        backend.resolve_device("cuda:1")


def test_asarray_and_back(backend):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = backend.asarray(array, dtype="bfloat16", device="cpu")
    assert tensor.dtype == torch.bfloat16
    assert backend.device_of(tensor) == "cpu"
    back = backend.to_numpy(tensor)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, array)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        backend.asarray(array, dtype="int8")


def test_value_and_grad(backend):
    x = torch.tensor([1.0, -2.0, 3.0])
    y = torch.tensor([0.5])
    value, (grad_x, grad_y) = backend.value_and_grad(lambda a, b: (a**2).sum(), x, y)
    assert float(value) == 14.0
    torch.testing.assert_close(grad_x, 2 * x)
    torch.testing.assert_close(grad_y, torch.zeros(1))
    assert not x.requires_grad


@pytest.mark.slow
def test_jit_compiles(backend):
    compiled = backend.jit(lambda a: torch.sin(a) * 2)
    x = torch.linspace(0, 1, 5)
    torch.testing.assert_close(compiled(x), torch.sin(x) * 2)


# Networks


@pytest.mark.parametrize("description", DESCRIPTIONS, ids=lambda d: type(d).__name__)
def test_module_has_canonical_names_and_shapes(description):
    module = build_module(description)
    shapes = parameter_shapes(description)
    state = canonical_state(module, description)
    assert list(state) == list(shapes)
    for name, tensor in state.items():
        assert tuple(tensor.shape) == shapes[name], name
    native = {
        name for name in module.state_dict() if not name.endswith("num_batches_tracked")
    }
    assert native == set(shapes)
    parameters = {name for name, _ in module.named_parameters()}
    assert parameters == set(shapes) - set(buffer_names(description))


@pytest.mark.parametrize("method", METHODS)
def test_method_networks_build(method):
    sample = (1, 8, 8)
    for description in method_networks(method, sample, SMALL_SIZES).values():
        module = build_module(description)
        assert set(canonical_state(module, description)) == set(
            parameter_shapes(description)
        )


def test_apply_mlp_matches_numpy(backend):
    description = MLP(5, (7,), 3, batch_norm=True, output_activation=True)
    params = random_params(description)
    x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    hidden = x @ params["layers.0.weight"].T
    hidden = (hidden - params["norms.0.running_mean"]) / np.sqrt(
        params["norms.0.running_var"] + 1e-5
    )
    hidden = np.maximum(hidden * params["norms.0.weight"] + params["norms.0.bias"], 0)
    expected = np.maximum(
        hidden @ params["layers.1.weight"].T + params["layers.1.bias"], 0
    )
    result = backend.apply_network(description, params, x)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_apply_mlp_train_mode_uses_batch_statistics(backend):
    description = MLP(5, (7,), 3, batch_norm=True)
    params = random_params(description)
    x = np.random.default_rng(2).normal(size=(16, 5)).astype(np.float32)
    hidden = x @ params["layers.0.weight"].T
    hidden = (hidden - hidden.mean(0)) / np.sqrt(hidden.var(0) + 1e-5)
    hidden = np.maximum(hidden * params["norms.0.weight"] + params["norms.0.bias"], 0)
    expected = hidden @ params["layers.1.weight"].T + params["layers.1.bias"]
    result = backend.apply_network(description, params, x, train=True)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)


def test_apply_float64_params(backend):
    description = MLP(4, (), 2)
    params = {k: v.astype(np.float64) for k, v in random_params(description).items()}
    x = np.ones((3, 4))
    result = backend.apply_network(description, params, x)
    assert result.dtype == np.float64
    np.testing.assert_allclose(
        result, x @ params["layers.0.weight"].T + params["layers.0.bias"]
    )


def test_apply_conv_encoder_shape(backend):
    description = ConvEncoder(in_channels=3, image_size=(8, 8), channels=(4, 8, 16))
    x = np.random.default_rng(3).random((2, 3, 8, 8)).astype(np.float32)
    result = backend.apply_network(description, random_params(description), x)
    assert result.shape == (2, 16)


def test_apply_vit_and_decoder(backend):
    encoder = ViTEncoder(
        image_size=(8, 8), patch_size=2, embed_dim=16, depth=1, num_heads=2
    )
    decoder = MAEDecoder(
        num_patches=16, patch_dim=4, encoder_dim=16, decoder_dim=8, depth=1, num_heads=2
    )
    images = np.random.default_rng(4).random((3, 1, 8, 8)).astype(np.float32)
    noise = np.random.default_rng(5).random((3, 16)).astype(np.float32)
    mask = sslspec.generate_mask(noise, mask_ratio=0.75)
    encoder_params = random_params(encoder)
    everything = backend.apply_network(encoder, encoder_params, images)
    assert everything.shape == (3, 16, 16)
    visible = backend.apply_network(
        encoder, encoder_params, images, ids_keep=np.asarray(mask.ids_keep)
    )
    assert visible.shape == (3, 4, 16)
    prediction = backend.apply_network(
        decoder,
        random_params(decoder),
        visible,
        ids_restore=np.asarray(mask.ids_restore),
    )
    assert prediction.shape == (3, 16, 4)
    with pytest.raises(ValueError, match="ids_restore is required"):
        backend.apply_network(decoder, random_params(decoder), visible)


def test_apply_rejects_wrong_params(backend):
    description = MLP(4, (), 2)
    params = random_params(description)
    params["layers.0.weight"] = np.zeros((3, 4), dtype=np.float32)
    params["extra"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"unexpected extra.*layers.0.weight has shape"
    ):
        backend.apply_network(description, params, np.zeros((1, 4)))


def test_patchify_matches_spec():
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(patchify(images, 2), sslspec.patchify(images, 2))


# Trainer


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_on_fixed_batch(backend, digits, method):
    config = small_config(method, lr=3e-3)
    trainer = backend.create_trainer(config, sample_shape=(1, 8, 8))
    assert isinstance(trainer, Trainer)
    batch = digits[:32]
    losses = [trainer.train_step(batch) for _ in range(25)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]), losses


def test_feature_vectors_train(backend):
    config = small_config("vicreg", augment=AugmentConfig())
    trainer = backend.create_trainer(config, sample_shape=(12,))
    batch = np.random.default_rng(6).normal(size=(16, 12)).astype(np.float32)
    losses = [trainer.train_step(batch) for _ in range(10)]
    assert np.mean(losses[-3:]) < losses[0]
    assert trainer.encode(batch).shape == (16, 32)


def test_bf16_step_is_finite(backend, digits):
    trainer = backend.create_trainer(
        small_config("simclr", precision="bf16"), sample_shape=(1, 8, 8)
    )
    loss = trainer.train_step(digits[:16])
    assert np.isfinite(loss)
    state = trainer.state_dict()
    assert state["encoder.blocks.0.conv.weight"].dtype == np.float32


def test_encode_shapes(backend, digits):
    for method, width in (("simclr", 16), ("mae", 16)):
        trainer = backend.create_trainer(small_config(method), sample_shape=(1, 8, 8))
        features = trainer.encode(digits[:10])
        assert features.shape == (10, width)
        assert features.dtype == np.float32


def test_same_seed_same_initialisation(backend):
    first = backend.create_trainer(small_config("byol"), sample_shape=(1, 8, 8))
    second = backend.create_trainer(small_config("byol"), sample_shape=(1, 8, 8))
    other = backend.create_trainer(small_config("byol", seed=1), sample_shape=(1, 8, 8))
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(
        a["encoder.blocks.0.conv.weight"], c["encoder.blocks.0.conv.weight"]
    )
    np.testing.assert_array_equal(
        a["encoder.blocks.0.conv.weight"], a["target_encoder.blocks.0.conv.weight"]
    )


def test_byol_target_follows_ema(backend, digits):
    config = small_config("byol", base_momentum=0.9)
    trainer = backend.create_trainer(config, sample_shape=(1, 8, 8))
    target_before = trainer.state_dict()["target_projector.layers.1.weight"]
    trainer.train_step(digits[:16])
    after = trainer.state_dict()
    momentum = sslspec.momentum_schedule(0, 100, base_momentum=0.9)
    expected = (
        momentum * target_before + (1 - momentum) * after["projector.layers.1.weight"]
    )
    np.testing.assert_allclose(
        after["target_projector.layers.1.weight"], expected, rtol=1e-6, atol=1e-7
    )


def test_state_names_are_canonical(backend):
    trainer = backend.create_trainer(small_config("byol"), sample_shape=(1, 8, 8))
    state = trainer.state_dict()
    networks = method_networks("byol", (1, 8, 8), SMALL_SIZES)
    for prefix, description in networks.items():
        for name, shape in parameter_shapes(description).items():
            assert state[f"{prefix}.{name}"].shape == shape
    assert state["optimizer.step"].dtype == np.int64
    assert state["rng.augment"].dtype == np.uint8
    assert "optimizer.exp_avg.encoder.blocks.0.conv.weight" in state
    assert "optimizer.exp_avg.target_encoder.blocks.0.conv.weight" not in state


@pytest.mark.parametrize("method", ["simclr", "byol", "mae"])
def test_state_round_trip_continues_identically(backend, digits, method):
    config = small_config(method)
    trainer = backend.create_trainer(config, sample_shape=(1, 8, 8))
    for start in (0, 16):
        trainer.train_step(digits[start : start + 16])
    state = trainer.state_dict()
    expected = [trainer.train_step(digits[i : i + 16]) for i in (32, 48)]

    restored = backend.create_trainer(config, sample_shape=(1, 8, 8))
    restored.load_state_dict(state)
    assert restored.step == 2
    result = [restored.train_step(digits[i : i + 16]) for i in (32, 48)]
    assert result == expected


def test_load_weights_only(backend, digits):
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    trainer.train_step(digits[:16])
    weights = {
        name: value
        for name, value in trainer.state_dict().items()
        if not name.startswith(("optimizer.", "rng."))
    }
    fresh = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    fresh.load_state_dict(weights)
    np.testing.assert_array_equal(fresh.encode(digits[:8]), trainer.encode(digits[:8]))
    assert fresh.step == 0


def test_load_state_ignores_random_state_of_another_backend(backend, digits, caplog):
    """A JAX checkpoint carries ``rng.key``, which cannot seed a torch.Generator."""
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    trainer.train_step(digits[:16])
    state = trainer.state_dict()
    generator_state = state.pop("rng.augment")
    state["rng.key"] = np.array([0, 42], dtype=np.uint32)
    fresh = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    before = fresh.generator.get_state().numpy().copy()
    with caplog.at_level("WARNING", logger="sslspec_torch.trainer"):
        fresh.load_state_dict(state)
    assert "rng.key is not a torch.Generator state" in caplog.text
    assert fresh.step == 1
    np.testing.assert_array_equal(fresh.generator.get_state().numpy(), before)
    np.testing.assert_array_equal(fresh.encode(digits[:8]), trainer.encode(digits[:8]))

    # Next to its own generator state, a foreign entry is ignored as well.
    state["rng.augment"] = generator_state
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.generator.get_state().numpy(), generator_state)


def test_load_state_reports_problems(backend):
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    state = trainer.state_dict()
    del state["projector.layers.0.weight"]
    state["encoder.blocks.0.conv.weight"] = np.zeros((3, 1, 3, 3), dtype=np.float32)
    state["decoder.embed.weight"] = np.zeros(1, dtype=np.float32)
    del state["optimizer.exp_avg_sq.encoder.blocks.1.conv.weight"]
    with pytest.raises(ValueError) as error:
        trainer.load_state_dict(state)
    message = str(error.value)
    assert "missing projector.layers.0.weight" in message
    assert "encoder.blocks.0.conv.weight has shape (3, 1, 3, 3)" in message
    assert "unexpected decoder.embed.weight" in message
    assert "missing optimizer.exp_avg_sq.encoder.blocks.1.conv.weight" in message


def test_trainer_requires_total_steps(backend, digits):
    trainer = backend.create_trainer(
        small_config("simclr", total_steps=0), sample_shape=(1, 8, 8)
    )
    with pytest.raises(ValueError, match="total_steps must be set"):
        trainer.train_step(digits[:8])


def test_batch_of_wrong_shape(backend):
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"batch must have shape \(B, 1, 8, 8\)"):
        trainer.train_step(np.zeros((4, 1, 6, 6), dtype=np.float32))


def test_foreign_random_state_is_ignored(backend, caplog):
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    state = trainer.state_dict()
    generator_state = state.pop("rng.augment")
    state["rng.key"] = np.zeros(2, dtype=np.uint32)
    trainer.load_state_dict(state)
    assert "rng.key is not a torch.Generator state" in caplog.text
    np.testing.assert_array_equal(trainer.state_dict()["rng.augment"], generator_state)


def test_misshapen_random_state(backend):
    trainer = backend.create_trainer(small_config("simclr"), sample_shape=(1, 8, 8))
    state = trainer.state_dict()
    state["rng.augment"] = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"rng.augment has shape \(16,\)"):
        trainer.load_state_dict(state)
