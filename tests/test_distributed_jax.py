"""Data-parallel training under jax.shard_map equals one device on the whole batch.

Two simulated CPU devices (``--xla_force_host_platform_device_count=2``, which
must be set before JAX starts) run every check in a process of its own (see
``distributed_workers.py``), together with the single-device references. Each
device's loss must equal the single-device loss of the global batch, the
gradient of the replicated loss with respect to the sharded batch must be the
single-device gradient, and one training step under
:func:`sslspec_jax.distributed.data_parallel` with synchronised batch norm must
leave every device with the single-device parameters and batch statistics. The
same checks must flag each deliberately faulty collective, and a ``shard_map``
without the variance check.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import distributed_workers as workers  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from sslspec_jax.distributed import (  # noqa: E402
    MeshCollective,
    SyncBatchNorm,
    convert_sync_batchnorm,
    data_mesh,
    data_parallel,
    rank_key,
    shard_batch,
)
from sslspec_jax.networks import BatchNorm, build_network  # noqa: E402

from sslspec.distributed import Collective  # noqa: E402
from sslspec.networks import MLP, ConvEncoder  # noqa: E402

WORKERS = Path(workers.__file__)
# Starting JAX and compiling about 30 small steps and losses takes about 30 s
# of CPU time.
CHECKS_TIMEOUT_SECONDS = 300

FAULT_CHECKS = {
    "scaled_gradient": "gradient",
    "wrong_rank": "value",
    "detached_gather": "gradient",
}


@pytest.fixture(scope="module")
def device_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("jax_devices") / "results.pkl"
    process = subprocess.Popen(
        [sys.executable, str(WORKERS), "jax-checks", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=CHECKS_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"jax-checks timed out after {CHECKS_TIMEOUT_SECONDS} s; output:\n"
            f"{output[-4000:]}"
        )
    assert process.returncode == 0, f"jax-checks failed:\n{output[-4000:]}"
    return pickle.loads(path.read_bytes())


# Two simulated devices, correct collective


@pytest.mark.distributed
@pytest.mark.timeout(CHECKS_TIMEOUT_SECONDS + 60)
def test_device_losses_equal_global_loss(device_results):
    devices = device_results["loss", "correct"]
    reference = device_results["loss", "reference"]
    assert len(devices) == workers.WORLD_SIZE
    assert sorted(devices[0]) == sorted(workers.LOSS_PLAN["correct"])
    assert workers.loss_value_mismatches(devices, reference) == []


@pytest.mark.distributed
def test_sharded_gradient_is_global_gradient(device_results):
    # Under shard_map with the variance check, the gradient of the replicated
    # loss is the single-device gradient, without the world-size factor of
    # torch's per-rank convention.
    devices = device_results["loss", "correct"]
    reference = device_results["loss", "reference"]
    assert workers.gradient_mismatches(devices, reference, scale=1.0) == []


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("loss", "optimizer"),
    workers.STEP_PLAN["correct"],
    ids=[f"{loss}-{optimizer}" for loss, optimizer in workers.STEP_PLAN["correct"]],
)
def test_data_parallel_step_equals_single_device(device_results, loss, optimizer):
    devices = device_results["step", "correct", loss, optimizer]
    reference = device_results["step", "reference", loss, optimizer]
    assert len(devices) == workers.WORLD_SIZE
    assert workers.step_mismatches(f"{loss}/{optimizer}", devices, reference) == []


# Faulty collectives and an unchecked shard_map


@pytest.mark.distributed
@pytest.mark.parametrize("fault", workers.FAULTS)
def test_loss_checks_flag_fault(device_results, fault):
    devices = device_results["loss", fault]
    reference = device_results["loss", "reference"]
    if FAULT_CHECKS[fault] == "value":
        mismatches = workers.loss_value_mismatches(devices, reference)
    else:
        mismatches = workers.gradient_mismatches(devices, reference, scale=1.0)
    for name in workers.LOSS_PLAN[fault]:
        assert any(line.startswith(f"{name}:") for line in mismatches), name


@pytest.mark.distributed
@pytest.mark.parametrize("fault", [*workers.FAULTS, "unchecked"])
def test_step_checks_flag_fault(device_results, fault):
    plan = workers.UNCHECKED_PLAN if fault == "unchecked" else workers.STEP_PLAN[fault]
    for loss, optimizer in plan:
        devices = device_results["step", fault, loss, optimizer]
        reference = device_results["step", "reference", loss, optimizer]
        mismatches = workers.step_mismatches(f"{loss}/{optimizer}", devices, reference)
        assert mismatches, (loss, optimizer)


# Single-device units


def test_mesh_collective_is_collective():
    # The rank exists only inside the mapped function, and isinstance reads it
    # (before Python 3.12), so the check runs under jax.vmap with the axis bound.
    collective = MeshCollective(2)
    checks = []

    def rank(x):
        checks.append(isinstance(collective, Collective))
        return x

    jax.vmap(rank, axis_name="data")(jnp.zeros(2))
    assert checks == [True]


def test_mesh_collective_rejects_empty_world():
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        MeshCollective(0)


def test_data_mesh_rejects_no_devices():
    with pytest.raises(ValueError, match="at least one device"):
        data_mesh([])


def test_shard_batch_rejects_scalar():
    with pytest.raises(ValueError, match="batch axis"):
        shard_batch(jnp.zeros(()), data_mesh(jax.devices()[:1]))


def test_data_parallel_rejects_missing_batch_argument():
    mapped = data_parallel(
        lambda x: x, data_mesh(jax.devices()[:1]), batch_argnums=(1,)
    )
    with pytest.raises(ValueError, match="batch_argnums contains 1"):
        mapped(jnp.zeros((2, 3)))


def test_data_parallel_rejects_local_loss():
    mapped = data_parallel(
        lambda w, x: jnp.mean(x * w), data_mesh(jax.devices()[:1]), batch_argnums=(1,)
    )
    with pytest.raises(ValueError, match="replicated"):
        jax.jit(mapped)(jnp.ones(()), jnp.ones((4,)))


@pytest.mark.parametrize("synchronised", [False, True], ids=["local", "synced"])
def test_data_parallel_needs_sync_batch_norm(synchronised):
    norm = SyncBatchNorm(3) if synchronised else BatchNorm(3)
    graphdef, state = nnx.split(norm)

    def statistics(state, x):
        module = nnx.merge(graphdef, state, copy=True)
        module(x)
        return nnx.state(module)

    mapped = jax.jit(
        data_parallel(statistics, data_mesh(jax.devices()[:1]), batch_argnums=(1,))
    )
    x = jnp.arange(12.0).reshape(4, 3)
    if synchronised:
        mapped(state, x)
    else:
        with pytest.raises(ValueError, match="replicated"):
            mapped(state, x)


def _batch_norm_outputs(norm, shards, axis_name):
    """Run ``norm`` in training mode on each shard as a rank of ``jax.vmap``;
    return the outputs and the running mean and variance."""
    graphdef, state = nnx.split(norm)

    def rank(x):
        module = nnx.merge(graphdef, state, copy=True)
        output = module(x)
        return output, module.mean[...], module.var[...]

    return jax.vmap(rank, axis_name=axis_name)(shards)


@pytest.mark.parametrize("shape", [(8, 3), (4, 2, 2, 3)], ids=["features", "nhwc"])
def test_sync_batch_norm_equals_global_batch_norm(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 2.0 + 1.0, dtype=jnp.float32)
    reference = BatchNorm(3)
    expected = reference(x)

    synced = SyncBatchNorm(3, axis_name="ranks")
    shards = jnp.stack(jnp.split(x, 2))
    outputs, means, variances = _batch_norm_outputs(synced, shards, "ranks")
    np.testing.assert_allclose(
        np.concatenate(list(outputs)), expected, rtol=1e-5, atol=1e-6
    )
    for rank in range(2):
        np.testing.assert_allclose(means[rank], reference.mean[...], rtol=1e-6)
        np.testing.assert_allclose(variances[rank], reference.var[...], rtol=1e-6)


def test_sync_batch_norm_evaluation_needs_no_axis():
    norm = SyncBatchNorm(3)
    norm.eval()
    x = jnp.ones((2, 3))
    np.testing.assert_allclose(norm(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize(
    "description",
    [
        MLP(5, (6, 7), 3, batch_norm=True),
        ConvEncoder(in_channels=1, image_size=(8, 8), channels=(4, 8)),
    ],
    ids=["mlp", "conv"],
)
def test_convert_sync_batchnorm_keeps_state(description):
    # Built abstractly: only the structure and the variable objects matter here.
    module = nnx.eval_shape(lambda: build_network(description))
    before = [path for path, _ in nnx.to_flat_state(nnx.state(module))]
    norms = {
        path: node
        for path, node in nnx.iter_modules(module)
        if isinstance(node, BatchNorm)
    }
    assert norms
    convert_sync_batchnorm(module, "ranks")
    after = [path for path, _ in nnx.to_flat_state(nnx.state(module))]
    assert after == before
    converted = dict(nnx.iter_modules(module))
    for path, old in norms.items():
        new = converted[path]
        assert isinstance(new, SyncBatchNorm), path
        assert new.axis_name == "ranks"
        for name in ("scale", "bias", "mean", "var"):
            assert getattr(new, name) is getattr(old, name), (path, name)


def test_rank_key_differs_between_ranks():
    key = jax.random.key(0)
    keys = jax.vmap(lambda _: rank_key(key, "ranks"), axis_name="ranks")(jnp.arange(2))
    draws = jax.vmap(lambda k: jax.random.uniform(k, (4,)))(keys)
    assert not np.allclose(draws[0], draws[1])
