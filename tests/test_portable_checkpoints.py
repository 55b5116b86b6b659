"""Checkpoints move between the PyTorch and JAX backends unchanged.

Parameters written in the canonical layout by one backend must load into the other
and compute the same function to float32 rounding. This holds for every network
type, in evaluation mode (running statistics) and in training mode (batch
statistics and the updated running statistics). Whole runs must evaluate on
either backend.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from sslspec_jax import JaxBackend  # noqa: E402
from sslspec_jax import networks as jax_networks  # noqa: E402
from sslspec_jax.trainer import JaxTrainer  # noqa: E402
from sslspec_torch import TorchBackend  # noqa: E402
from sslspec_torch import networks as torch_networks  # noqa: E402
from sslspec_torch.trainer import TorchTrainer  # noqa: E402

from sslspec import networks as spec  # noqa: E402
from sslspec.config import AugmentConfig, PretrainConfig  # noqa: E402
from sslspec.networks import HeadSizes  # noqa: E402

# Absolute and relative tolerance for float32 outputs of networks a few layers
# deep, whose values are of order 1.
RTOL = 1e-5
ATOL = 1e-5

NETWORKS = {
    "mlp": spec.MLP(10, (16, 12), 8, batch_norm=True, output_activation=True),
    "conv": spec.ConvEncoder(2, (8, 8), (4, 6, 8)),
    "vit": spec.ViTEncoder(
        2, (8, 8), 2, embed_dim=16, depth=2, num_heads=4, mlp_ratio=2.0
    ),
    "decoder": spec.MAEDecoder(
        16, 8, encoder_dim=16, decoder_dim=8, depth=2, num_heads=2, mlp_ratio=2.0
    ),
}
BATCH = 6


@pytest.fixture(scope="module")
def torch_backend() -> TorchBackend:
    return TorchBackend()


@pytest.fixture(scope="module")
def jax_backend() -> JaxBackend:
    return JaxBackend()


def torch_parameters(description, seed: int) -> dict[str, np.ndarray]:
    """Return the canonical parameters of a freshly initialised PyTorch module,
    with running statistics moved away from their initial values."""
    torch.manual_seed(seed)
    module = torch_networks.build_module(description)
    state = torch_networks.canonical_state(module, description)
    params = {name: tensor.detach().numpy().copy() for name, tensor in state.items()}
    return with_random_buffers(params, seed)


def jax_parameters(description, seed: int) -> dict[str, np.ndarray]:
    """Return the canonical parameters of a freshly initialised Flax module, with
    running statistics moved away from their initial values."""
    model = jax_networks.build_network(description, rngs=seed)
    return with_random_buffers(jax_networks.to_canonical(model), seed)


def with_random_buffers(params, seed):
    rng = np.random.default_rng(seed)
    params = dict(params)
    for name, value in params.items():
        if name.endswith("running_mean"):
            params[name] = (0.3 * rng.standard_normal(value.shape)).astype(np.float32)
        elif name.endswith("running_var"):
            params[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return params


def network_inputs(kind: str, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return inputs and the index options that ``apply_network`` takes."""
    rng = np.random.default_rng(seed)
    description = NETWORKS[kind]
    if kind == "mlp":
        return rng.standard_normal((BATCH, 10)).astype(np.float32), {}
    if kind in ("conv", "vit"):
        images = rng.standard_normal((BATCH, 2, 8, 8)).astype(np.float32)
        if kind == "conv":
            return images, {}
        ids_keep = np.argsort(rng.uniform(size=(BATCH, 16)), axis=1)[:, :5]
        return images, {"ids_keep": ids_keep}
    latent = rng.standard_normal((BATCH, 5, description.encoder_dim))
    ids_restore = np.argsort(np.argsort(rng.uniform(size=(BATCH, 16)), axis=1), axis=1)
    return latent.astype(np.float32), {"ids_restore": ids_restore}


SOURCES = {"torch": torch_parameters, "jax": jax_parameters}
CASES = [
    (kind, source, train)
    for kind in NETWORKS
    for source in SOURCES
    for train in (False, True)
]


@pytest.mark.parametrize(
    "kind, source, train",
    CASES,
    ids=[f"{k}-from-{s}-{'train' if t else 'eval'}" for k, s, t in CASES],
)
def test_same_output_on_both_backends(torch_backend, jax_backend, kind, source, train):
    description = NETWORKS[kind]
    params = SOURCES[source](description, seed=3)
    inputs, options = network_inputs(kind, seed=4)
    expected = torch_backend.apply_network(
        description, params, inputs, train=train, **options
    )
    output = jax_backend.apply_network(
        description, params, inputs, train=train, **options
    )
    assert output.shape == expected.shape
    np.testing.assert_allclose(output, expected, rtol=RTOL, atol=ATOL)


def test_vit_without_mask_on_both_backends(torch_backend, jax_backend):
    description = NETWORKS["vit"]
    params = torch_parameters(description, seed=5)
    images, _ = network_inputs("vit", seed=6)
    expected = torch_backend.apply_network(description, params, images)
    output = jax_backend.apply_network(description, params, images)
    assert output.shape == (BATCH, 16, 16)
    np.testing.assert_allclose(output, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_running_statistics_update_alike(kind):
    """A training-mode forward pass moves the running statistics the same way."""
    description = NETWORKS[kind]
    params = torch_parameters(description, seed=7)
    inputs, _ = network_inputs(kind, seed=8)

    module = torch_networks.build_module(description)
    torch_networks.load_canonical(module, description, params)
    module.train()
    with torch.no_grad():
        module(torch.from_numpy(inputs))
    expected = {
        name: tensor.detach().numpy()
        for name, tensor in torch_networks.canonical_state(module, description).items()
    }

    model = jax_networks.from_canonical(description, params)
    model.train()
    model(jnp.asarray(inputs))
    updated = jax_networks.to_canonical(model)
    for name in spec.buffer_names(description):
        assert not np.allclose(updated[name], params[name]), name
        np.testing.assert_allclose(
            updated[name], expected[name], rtol=RTOL, atol=1e-6, err_msg=name
        )


# Trainers.

SIZES = HeadSizes(
    projector_hidden=32,
    projector_out=16,
    predictor_hidden=32,
    conv_channels=(4, 8),
)


def trainer_config(backend: str, **changes) -> PretrainConfig:
    # The networks and schedule of the driver test of the JAX backend (3 epochs of
    # 5 steps on 200 digits), so a test session compiles the JAX training step
    # once for all of these tests.
    values = {
        "method": "byol",
        "backend": backend,
        "epochs": 3,
        "batch_size": 32,
        "warmup_epochs": 1,
        "steps_per_epoch": 5,
        "total_steps": 15,
        "device": "cpu",
        "sizes": SIZES,
        "augment": AugmentConfig(erase_probability=0.0),
    }
    return PretrainConfig(**(values | changes))


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:96] / 16.0).astype(np.float32)[:, None]


def test_torch_trainer_state_loads_into_jax(digits):
    torch_trainer = TorchTrainer(
        trainer_config("torch"), sample_shape=(1, 8, 8), device="cpu"
    )
    for start in (0, 32, 64):
        torch_trainer.train_step(digits[start : start + 32])
    state = torch_trainer.state_dict()

    jax_trainer = JaxTrainer(trainer_config("jax"), sample_shape=(1, 8, 8))
    jax_trainer.load_state_dict(state)
    np.testing.assert_allclose(
        jax_trainer.encode(digits), torch_trainer.encode(digits), rtol=RTOL, atol=ATOL
    )
    assert jax_trainer.step == 3
    loaded = jax_trainer.state_dict()
    for name, value in state.items():
        if name.startswith("rng."):
            continue
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_jax_trainer_state_loads_into_torch(digits):
    jax_trainer = JaxTrainer(trainer_config("jax"), sample_shape=(1, 8, 8))
    for start in (0, 32, 64):
        jax_trainer.train_step(digits[start : start + 32])
    state = jax_trainer.state_dict()

    torch_trainer = TorchTrainer(
        trainer_config("torch"), sample_shape=(1, 8, 8), device="cpu"
    )
    # The random state is specific to each framework, but the optimiser state is
    # shared.
    torch_trainer.load_state_dict(
        {name: value for name, value in state.items() if not name.startswith("rng.")}
    )
    np.testing.assert_allclose(
        torch_trainer.encode(digits), jax_trainer.encode(digits), rtol=RTOL, atol=ATOL
    )
    assert torch_trainer.step == 3
    loaded = torch_trainer.state_dict()
    for name, value in state.items():
        if name.startswith("rng."):
            continue
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


# Run folders.


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    images = (digits.images[:200] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=images, y=digits.target[:200])
    return str(path)


def run_config(data: str, backend: str) -> PretrainConfig:
    # The driver fills in steps_per_epoch and total_steps from the data.
    return trainer_config(backend, data=data, steps_per_epoch=0, total_steps=0)


@pytest.mark.parametrize("trained, evaluated", [("torch", "jax"), ("jax", "torch")])
def test_evaluate_on_other_backend(tmp_path, digits_file, trained, evaluated):
    from sslspec.pretrain import evaluate_run, pretrain

    run_dir = tmp_path / "run"
    original = pretrain(run_config(digits_file, trained), out_dir=run_dir)
    again = evaluate_run(run_dir, backend=evaluated)
    assert again["backend"] == evaluated
    assert again["trained_with_backend"] == trained
    assert again["loss_history"] == original["loss_history"]
    assert again["knn_accuracy"] == original["knn_accuracy"]
    assert again["linear_probe_accuracy"] == pytest.approx(
        original["linear_probe_accuracy"], abs=1e-9
    )
