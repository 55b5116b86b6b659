"""Losses with a collective equal the global-batch loss on every rank.

W ranks each own one shard of the batch. Every rank's value must equal the loss of
the whole batch on one device. Each rank's gradient with respect to its shard must
be W times the whole-batch gradient for that slice.
"""

from __future__ import annotations

import numpy as np
import pytest
from array_helpers import asarray, library_name, to_float
from loss_cases import LOSS_CASE_IDS, LOSS_CASES
from simulated_collectives import (
    ThreadedCollective,
    ThreadGroup,
    VmapCollective,
    run_threaded_ranks,
)

import sslspec
from sslspec.distributed import Collective

WORLD_SIZES = [1, 2, 4]


def shard(array: np.ndarray, world_size: int) -> list[np.ndarray]:
    return np.split(array, world_size, axis=0)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_threaded_ranks_match_global_loss(xp, case, world_size):
    if library_name(xp) == "jax":
        pytest.skip("JAX ranks run under jax.vmap in test_vmap_ranks_match_global")
    rng = np.random.default_rng(0)
    inputs = case.make_inputs(rng)
    fixed = case.make_fixed(rng)
    expected = to_float(
        case([asarray(xp, x) for x in inputs], [asarray(xp, x) for x in fixed])
    )

    arrays = [*inputs, *fixed]
    shards = [
        [asarray(xp, shard(array, world_size)[rank]) for array in arrays]
        for rank in range(world_size)
    ]
    values = run_threaded_ranks(xp, case.function, shards, **case.kwargs)
    for value in values:
        assert to_float(value) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_threaded_ranks_scale_torch_gradient(case, world_size):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    rng = np.random.default_rng(1)
    inputs = case.make_inputs(rng)
    fixed = case.make_fixed(rng)

    whole = [torch.tensor(x, requires_grad=True) for x in inputs]
    case(whole, [torch.tensor(x) for x in fixed]).backward()

    shards = [
        [torch.tensor(shard(x, world_size)[rank], requires_grad=True) for x in inputs]
        + [torch.tensor(shard(x, world_size)[rank]) for x in fixed]
        for rank in range(world_size)
    ]
    values = run_threaded_ranks(xp, case.function, shards, **case.kwargs)
    # In a real run each rank runs backward on its own loss and the collectives'
    # backward passes sum over ranks. One backward pass through the sum of the
    # losses takes the same sum.
    torch.stack(values).sum().backward()

    for index, whole_input in enumerate(whole):
        expected = shard(whole_input.grad.numpy(), world_size)
        for rank in range(world_size):
            local = shards[rank][index].grad.numpy()
            np.testing.assert_allclose(
                local, world_size * expected[rank], rtol=1e-10, atol=1e-14
            )


@pytest.mark.parametrize("world_size", [4])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_CASE_IDS)
def test_vmap_ranks_match_global(case, world_size):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(2)
    inputs = case.make_inputs(rng)
    fixed = [jnp.asarray(x) for x in case.make_fixed(rng)]
    stacked_fixed = [jnp.stack(shard(np.asarray(x), world_size)) for x in fixed]
    collective = VmapCollective("ranks", world_size)

    def per_rank(local_inputs, local_fixed):
        return case(local_inputs, local_fixed, collective=collective)

    def all_ranks(stacked_inputs):
        return jax.vmap(per_rank, axis_name="ranks")(stacked_inputs, stacked_fixed)

    stacked_inputs = [jnp.stack(shard(x, world_size)) for x in inputs]
    values = jax.jit(all_ranks)(stacked_inputs)
    expected = float(jax.jit(case)([jnp.asarray(x) for x in inputs], fixed))
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-12)

    whole_gradients = jax.jit(jax.grad(lambda xs: case(xs, fixed)))(
        [jnp.asarray(x) for x in inputs]
    )
    rank_gradients = jax.jit(jax.grad(lambda xs: jnp.sum(all_ranks(xs))))(
        stacked_inputs
    )
    for whole, ranks in zip(whole_gradients, rank_gradients, strict=True):
        expected_ranks = world_size * np.stack(shard(np.asarray(whole), world_size))
        np.testing.assert_allclose(
            np.asarray(ranks), expected_ranks, rtol=1e-10, atol=1e-14
        )


def test_threaded_collective_satisfies_protocol():
    import array_api_compat.numpy as xp

    assert isinstance(ThreadedCollective(xp, ThreadGroup(1), 0), Collective)


def test_local_batch_of_one_allowed_with_collective(xp):
    # Two ranks of one sample each form a global batch of 2.
    if library_name(xp) == "jax":
        pytest.skip("JAX ranks run under jax.vmap in test_vmap_ranks_match_global")
    rng = np.random.default_rng(3)
    z_a = rng.standard_normal((2, 3))
    z_b = rng.standard_normal((2, 3))
    expected = to_float(sslspec.vicreg_loss(asarray(xp, z_a), asarray(xp, z_b)))
    shards = [
        [asarray(xp, z_a[r : r + 1]), asarray(xp, z_b[r : r + 1])] for r in range(2)
    ]
    for value in run_threaded_ranks(xp, sslspec.vicreg_loss, shards):
        assert to_float(value) == pytest.approx(expected, rel=1e-12)
