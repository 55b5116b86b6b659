"""Worker code for the data-parallel tests, run in processes of their own.

``test_distributed_torch.py`` and ``test_distributed_jax.py`` run this file as a
script, so that process groups and simulated JAX devices never touch the pytest
process:

- ``torch-checks OUT`` launches 2 gloo ranks with
  :func:`sslspec_torch.distributed.launch`. Each rank computes every loss case and
  one training step per loss and optimiser, with the correct collective and with
  each faulty one, and the launcher pickles the ranks' results to OUT.
- ``torch-fail`` launches 2 ranks. Rank 1 raises while rank 0 waits in an
  all-reduce, and the script exits with status 1 after printing the launcher's
  error.
- ``jax-checks OUT`` forces 2 host CPU devices before importing JAX, then
  computes the same results under ``jax.shard_map`` and on one device.
- ``report TORCH_OUT JAX_OUT`` prints a Markdown table of the largest deviations
  from the single-process results in those two pickles.

The ``*_mismatches`` functions at the end compare distributed results with
single-process references and return one line per mismatch, each starting with
the loss case or step it concerns. The tests assert that the correct collective
gives none and that every faulty collective gives one for each case it affects.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from loss_cases import LOSS_CASES, LossCase

import sslspec
from sslspec.distributed import Collective
from sslspec.networks import MLP

WORLD_SIZE = 2
SEED = 0

#: Collectives of the checks: the correct one, then deliberate mistakes.
#: ``scaled_gradient`` computes correct sums but multiplies the gradient of every
#: all-reduce by the world size. ``wrong_rank`` reports rank 0 on every rank, so
#: the other ranks mask the wrong columns as their own samples.
#: ``detached_gather`` gathers without gradient and puts back only the local
#: slice, so a rank's samples get no gradient from their use as negatives on the
#: other ranks.
FAULTS = ("scaled_gradient", "wrong_rank", "detached_gather")
VARIANTS = ("correct", *FAULTS)

STEP_LOSSES = ("nt_xent", "byol", "barlow_twins", "vicreg", "reconstruction")
OPTIMIZERS = ("sgd", "adamw")

#: The loss cases and training steps each variant runs: every loss with the
#: correct collective, and for a fault the cases it affects. Each training step
#: costs a compilation in JAX, so the steps cover every loss with SGD, AdamW on
#: two losses, and each fault on the fewest steps that show it. AdamW's first
#: step moves each parameter by about the learning rate whatever the gradient's
#: scale, so it cannot see a scaled gradient.
LOSS_PLAN = {
    "correct": [case.name for case in LOSS_CASES],
    "scaled_gradient": [case.name for case in LOSS_CASES],
    "wrong_rank": ["nt_xent", "nt_xent_cold"],
    "detached_gather": ["nt_xent", "nt_xent_cold"],
}
STEP_PLAN = {
    "correct": [(loss, "sgd") for loss in STEP_LOSSES]
    + [("nt_xent", "adamw"), ("vicreg", "adamw")],
    "scaled_gradient": [("nt_xent", "sgd"), ("barlow_twins", "sgd")],
    "wrong_rank": [("nt_xent", "sgd")],
    "detached_gather": [("nt_xent", "sgd")],
}
#: Steps under ``shard_map`` without the variance check, which give wrong updates.
UNCHECKED_PLAN = [("nt_xent", "sgd")]

STEP_BATCH = 8
STEP_FEATURES = 12
ENCODER = MLP(STEP_FEATURES, (16,), 16, batch_norm=True, output_activation=True)
PROJECTOR = MLP(16, (16,), 8, batch_norm=True)
PATCHES = (2, 4)  # reconstruction: the projector's 8 outputs as 2 patches of 4
SGD_LEARNING_RATE = 0.1
ADAMW_LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-2
# AdamW's first step moves a parameter by lr * g / (|g| + eps), which amplifies a
# change of a near-zero gradient g by lr / eps. Some gradients are zero in exact
# arithmetic, such as that of a bias whose shift the next batch norm removes. In
# float32 they come out as rounding noise of about 1e-7 of the typical gradient,
# and that noise differs between one batch and its shards. With torch's default
# eps of 1e-8 it would move such a parameter by up to the learning rate, while
# eps = lr keeps the difference at rounding size.
ADAMW_EPS = 1e-2

LOSS_RELATIVE_TOLERANCE = 1e-12
GRADIENT_RELATIVE_TOLERANCE = 1e-9
GRADIENT_ABSOLUTE_TOLERANCE = 1e-12
# One float32 step: sums over ranks round differently from sums over one batch.
STEP_RELATIVE_TOLERANCE = 1e-4
STEP_ABSOLUTE_TOLERANCE = 1e-5

#: Seconds a collective waits for the other rank before it raises.
COLLECTIVE_TIMEOUT_SECONDS = 60


# Inputs shared by both frameworks


def case_by_name(name: str) -> LossCase:
    return next(case for case in LOSS_CASES if case.name == name)


def loss_inputs(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return the float64 global-batch inputs and fixed inputs of a loss case."""
    index = [case.name for case in LOSS_CASES].index(name)
    rng = np.random.default_rng([SEED, index])
    case = LOSS_CASES[index]
    return case.make_inputs(rng), case.make_fixed(rng)


def step_data() -> dict[str, np.ndarray]:
    """Return the float32 global batch of the training-step checks."""
    rng = np.random.default_rng([SEED, 1000])
    x = rng.standard_normal((STEP_BATCH, STEP_FEATURES)).astype(np.float32)
    noise = rng.standard_normal((2, STEP_BATCH, STEP_FEATURES)).astype(np.float32)
    mask = (rng.random((STEP_BATCH, PATCHES[0])) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    width = PATCHES[0] * PATCHES[1]
    return {
        "view_a": x + 0.3 * noise[0],
        "view_b": x + 0.3 * noise[1],
        "target": x[:, :width].reshape(STEP_BATCH, *PATCHES),
        "mask": mask,
    }


def shard(array: np.ndarray, rank: int, world_size: int = WORLD_SIZE) -> np.ndarray:
    return np.split(array, world_size, axis=0)[rank]


def step_loss(
    name: str,
    z_a: Any,
    z_b: Any,
    target: Any,
    mask: Any,
    stop_gradient: Callable[[Any], Any],
    collective: Any,
) -> Any:
    """Return the loss ``name`` of a training step on projections ``z_a``, ``z_b``."""
    if name == "nt_xent":
        return sslspec.nt_xent_loss(z_a, z_b, temperature=0.5, collective=collective)
    if name == "byol":
        return sslspec.byol_loss(
            z_a, stop_gradient(z_b), collective=collective
        ) + sslspec.byol_loss(z_b, stop_gradient(z_a), collective=collective)
    if name == "barlow_twins":
        return sslspec.barlow_twins_loss(z_a, z_b, collective=collective)
    if name == "vicreg":
        return sslspec.vicreg_loss(z_a, z_b, collective=collective)
    if name == "reconstruction":
        prediction = z_a.reshape((z_a.shape[0], *PATCHES))
        return sslspec.reconstruction_loss(
            prediction, target, mask, collective=collective
        )
    raise ValueError(f"unknown step loss {name!r}")


# PyTorch


def torch_collective(variant: str) -> Any:
    """Return the collective of this rank for ``variant`` of :data:`VARIANTS`."""
    import torch
    import torch.distributed as dist
    from sslspec_torch.distributed import TorchCollective

    class ScaledGradientCollective(TorchCollective):
        def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
            total = super().all_reduce_sum(x)
            scale = self.world_size
            # Exact for world size 2: 2t - t == t in floating point.
            return total * scale - (total * (scale - 1)).detach()

    class WrongRankCollective(TorchCollective):
        def __init__(self) -> None:
            super().__init__()
            self.rank = 0

    class DetachedGatherCollective(TorchCollective):
        def all_gather(self, x: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.detach().contiguous())
            parts[self.rank] = x
            return torch.cat(parts)

    classes = {
        "correct": TorchCollective,
        "scaled_gradient": ScaledGradientCollective,
        "wrong_rank": WrongRankCollective,
        "detached_gather": DetachedGatherCollective,
    }
    return classes[variant]()


def torch_losses(
    names: list[str], collective: Any = None, rank: int = 0, world_size: int = 1
) -> dict[str, dict[str, Any]]:
    """Return each loss case's value and gradients with respect to the local
    inputs, in float64, on this rank's slice (the whole batch without a
    collective)."""
    import torch

    results = {}
    for name in names:
        case = case_by_name(name)
        inputs, fixed = loss_inputs(name)
        local_inputs = [
            torch.tensor(shard(x, rank, world_size), requires_grad=True) for x in inputs
        ]
        local_fixed = [torch.tensor(shard(x, rank, world_size)) for x in fixed]
        if collective is None:
            value = case(local_inputs, local_fixed)
        else:
            value = case(local_inputs, local_fixed, collective=collective)
        value.backward()
        results[name] = {
            "value": float(value.detach()),
            "gradients": [x.grad.numpy().copy() for x in local_inputs],
        }
    return results


def _torch_step_model() -> Any:
    """Return an encoder and projector from the torch backend, seeded, whose
    ``forward`` embeds both views as one batch, so that DDP synchronises every
    use of the parameters."""
    import torch
    from sslspec_torch.networks import build_module
    from torch import nn

    class StepModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = build_module(ENCODER)
            self.projector = build_module(PROJECTOR)

        def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> Any:
            views = torch.cat([view_a, view_b])
            return self.projector(self.encoder(views)).chunk(2)

    torch.manual_seed(SEED)
    return StepModel()


def torch_step(
    loss_name: str,
    optimizer_name: str,
    collective: Any = None,
    environment: Any = None,
) -> dict[str, np.ndarray]:
    """Run one training step and return the canonical parameters and buffers.

    Without a collective it is the single-process step on the whole batch. With
    one, the batch norms are synchronised, the model is wrapped in DDP and the
    step runs on this rank's slice.
    """
    import torch
    from sslspec_torch.distributed import convert_sync_batchnorm, wrap_ddp
    from sslspec_torch.networks import canonical_state

    model = _torch_step_model()
    rank, world_size = 0, 1
    network = model
    if collective is not None:
        rank, world_size = environment.rank, environment.world_size
        model = convert_sync_batchnorm(model)
        network = wrap_ddp(model, environment)
    model.train()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LEARNING_RATE)
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=ADAMW_LEARNING_RATE,
            eps=ADAMW_EPS,
            weight_decay=WEIGHT_DECAY,
        )
    data = {
        key: torch.from_numpy(shard(value, rank, world_size))
        for key, value in step_data().items()
    }
    z_a, z_b = network(data["view_a"], data["view_b"])
    loss = step_loss(
        loss_name,
        z_a,
        z_b,
        data["target"],
        data["mask"],
        lambda z: z.detach(),
        collective,
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    state = {"loss": np.array(float(loss.detach()))}
    for prefix, description in (("encoder", ENCODER), ("projector", PROJECTOR)):
        tensors = canonical_state(getattr(model, prefix), description)
        for name, tensor in tensors.items():
            state[f"{prefix}.{name}"] = tensor.detach().numpy().copy()
    return state


def listening_addresses(pid: int) -> list[str] | None:
    """Return ``address:port`` of every TCP socket that process ``pid`` listens
    on, read from /proc (None where /proc is missing)."""
    proc = Path("/proc", str(pid))
    if not proc.is_dir():
        return None
    inodes = set()
    for descriptor in (proc / "fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = proc / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            # /proc prints each 32-bit word of the address in host byte order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return addresses


def torch_rank_checks() -> dict[Any, Any]:
    """Run every planned loss case and step on this rank of a launched job."""
    import torch
    from sslspec_torch.distributed import destroy_process_group, init_process_group

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS)
    environment = init_process_group("cpu", timeout=timeout)
    try:
        results: dict[Any, Any] = {
            "is_collective": isinstance(torch_collective("correct"), Collective),
            # This rank's sockets, and those of the launcher that started it.
            "listening": [
                listening_addresses(os.getpid()),
                listening_addresses(os.getppid()),
            ],
        }
        for variant in VARIANTS:
            collective = torch_collective(variant)
            results["loss", variant] = torch_losses(
                LOSS_PLAN[variant],
                collective,
                environment.rank,
                environment.world_size,
            )
            for loss_name, optimizer_name in STEP_PLAN[variant]:
                results["step", variant, loss_name, optimizer_name] = torch_step(
                    loss_name, optimizer_name, collective, environment
                )
        return results
    finally:
        destroy_process_group()


def torch_failing_rank() -> None:
    """Raise on rank 1 while rank 0 waits for it in an all-reduce."""
    import torch
    import torch.distributed as dist
    from sslspec_torch.distributed import init_process_group

    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS)
    environment = init_process_group("cpu", timeout=timeout)
    if environment.rank == 1:
        raise RuntimeError("deliberate failure in a test worker")
    dist.all_reduce(torch.ones(1))


# JAX


def jax_collective(variant: str, world_size: int) -> Any:
    """Return the mesh collective of ``variant`` of :data:`VARIANTS`."""
    import jax
    from sslspec_jax.distributed import MeshCollective

    class ScaledGradientCollective(MeshCollective):
        def all_reduce_sum(self, x: Any) -> Any:
            total = super().all_reduce_sum(x)
            scale = self.world_size
            return total * scale - jax.lax.stop_gradient(total) * (scale - 1)

    class WrongRankCollective(MeshCollective):
        @property
        def rank(self) -> Any:
            return 0

    class DetachedGatherCollective(MeshCollective):
        def all_gather(self, x: Any) -> Any:
            gathered = super().all_gather(jax.lax.stop_gradient(x))
            start = self.rank * x.shape[0]
            return jax.lax.dynamic_update_slice_in_dim(gathered, x, start, axis=0)

    classes = {
        "correct": MeshCollective,
        "scaled_gradient": ScaledGradientCollective,
        "wrong_rank": WrongRankCollective,
        "detached_gather": DetachedGatherCollective,
    }
    return classes[variant](world_size)


def jax_losses(
    names: list[str], collective: Any = None, mesh: Any = None
) -> list[dict[str, dict[str, Any]]]:
    """Return each loss case's value and gradients per device (one entry for a
    single device without a collective).

    Every device returns the distributed value. The gradient is that of the
    mean of the devices' values with respect to the global input, cut into the
    devices' slices. All cases run in one compiled function.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    world_size = 1 if mesh is None else collective.world_size
    cases = [case_by_name(name) for name in names]
    arrays = [loss_inputs(name) for name in names]
    inputs = [[jnp.asarray(x) for x in case_inputs] for case_inputs, _ in arrays]
    fixed = [[jnp.asarray(x) for x in case_fixed] for _, case_fixed in arrays]

    def case_values(case: LossCase, xs: list[Any], fs: list[Any]) -> Any:
        if mesh is None:
            return case(xs, fs)[None]
        axis = P(collective.axis_name)

        def per_device(xs: list[Any], fs: list[Any]) -> Any:
            return case(xs, fs, collective=collective)[None]

        mapped = jax.shard_map(
            per_device, mesh=mesh, in_specs=(axis, axis), out_specs=axis
        )
        return mapped(xs, fs)

    def objective(all_inputs: list[list[Any]]) -> Any:
        values = [
            case_values(case, xs, fs)
            for case, xs, fs in zip(cases, all_inputs, fixed, strict=True)
        ]
        # The cases share no inputs, so the gradient of the sum is each case's own.
        return sum(jnp.mean(value) for value in values), values

    (_, values), gradients = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        inputs
    )
    results: list[dict[str, dict[str, Any]]] = [{} for _ in range(world_size)]
    for name, case_values_, case_gradients in zip(
        names, values, gradients, strict=True
    ):
        for rank in range(world_size):
            results[rank][name] = {
                "value": float(np.asarray(case_values_)[rank]),
                "gradients": [
                    shard(np.asarray(g), rank, world_size) for g in case_gradients
                ],
            }
    return results


def jax_steps(
    plan: list[tuple[str, str]],
    collective: Any = None,
    mesh: Any = None,
    *,
    check_vma: bool = True,
) -> dict[tuple[str, str], list[dict[str, np.ndarray]]]:
    """Run one training step per ``(loss, optimizer)`` of ``plan``, each from the
    same initial networks. Return each device's canonical parameters, batch
    statistics and loss, with one entry on a single device.

    Without a collective these are single-device steps on the whole batch. With
    one, the batch norms are synchronised and the steps run under
    :func:`sslspec_jax.distributed.data_parallel`; ``check_vma=False`` runs them
    under a plain ``jax.shard_map`` without the variance check instead. All steps
    run in one compiled function.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from sslspec_jax.distributed import (
        convert_sync_batchnorm,
        data_parallel,
        replicate,
        shard_batch,
    )
    from sslspec_jax.networks import build_network, state_to_canonical

    model = nnx.Dict(
        {
            "encoder": build_network(ENCODER, rngs=nnx.Rngs(params=SEED)),
            "projector": build_network(PROJECTOR, rngs=nnx.Rngs(params=SEED + 1)),
        }
    )
    if collective is not None:
        convert_sync_batchnorm(model, collective.axis_name)
    model.train()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    optimizers = {
        "sgd": optax.sgd(SGD_LEARNING_RATE),
        "adamw": optax.adamw(
            ADAMW_LEARNING_RATE, eps=ADAMW_EPS, weight_decay=WEIGHT_DECAY
        ),
    }
    opt_states = {name: optimizers[name].init(params) for name in OPTIMIZERS}

    def one_step(loss_name, optimizer_name, params, stats, opt_state, batch):
        view_a, view_b, target, mask = batch

        def loss_fn(params: Any) -> Any:
            network = nnx.merge(graphdef, params, stats, copy=True)
            views = jnp.concatenate([view_a, view_b])
            z_a, z_b = jnp.split(network["projector"](network["encoder"](views)), 2)
            loss = step_loss(
                loss_name, z_a, z_b, target, mask, jax.lax.stop_gradient, collective
            )
            return loss, nnx.state(network, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        optimizer = optimizers[optimizer_name]
        updates, _ = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, loss

    def steps(params, stats, opt_states, batch):
        return {
            f"{loss_name}/{optimizer_name}": one_step(
                loss_name,
                optimizer_name,
                params,
                stats,
                opt_states[optimizer_name],
                batch,
            )
            for loss_name, optimizer_name in plan
        }

    data = step_data()
    batch = [jnp.asarray(data[key]) for key in ("view_a", "view_b", "target", "mask")]
    if mesh is None:
        run = jax.jit(steps)
        devices = 1
    else:
        devices = collective.world_size
        params, stats, opt_states = replicate((params, stats, opt_states), mesh)
        batch = shard_batch(batch, mesh, collective.axis_name)
        if check_vma:
            run = jax.jit(data_parallel(steps, mesh, batch_argnums=(3,)))
        else:
            run = jax.jit(
                jax.shard_map(
                    steps,
                    mesh=mesh,
                    in_specs=(P(), P(), P(), P(collective.axis_name)),
                    out_specs=P(),
                    check_vma=False,
                )
            )
    outputs = run(params, stats, opt_states, batch)

    results = {}
    for loss_name, optimizer_name in plan:
        new_params, new_stats, loss = outputs[f"{loss_name}/{optimizer_name}"]
        states = []
        for rank in range(devices):

            def on_device(leaf: Any, rank: int = rank) -> np.ndarray:
                if mesh is None:
                    return np.asarray(leaf)
                return np.asarray(leaf.addressable_shards[rank].data)

            state = state_to_canonical(jax.tree.map(on_device, new_params))
            state |= state_to_canonical(jax.tree.map(on_device, new_stats))
            state["loss"] = on_device(loss)
            states.append(state)
        results[loss_name, optimizer_name] = states
    return results


def jax_checks() -> dict[Any, Any]:
    """Run every planned case and step on 2 devices, and the references on one."""
    import jax
    from sslspec_jax.distributed import data_mesh

    jax.config.update("jax_enable_x64", True)
    devices = jax.devices()
    if len(devices) < WORLD_SIZE:
        raise RuntimeError(
            f"expected {WORLD_SIZE} JAX devices from XLA_FLAGS, got {devices}"
        )
    mesh = data_mesh(devices[:WORLD_SIZE])
    results: dict[Any, Any] = {
        ("loss", "reference"): jax_losses(LOSS_PLAN["correct"])[0]
    }
    for (loss_name, optimizer_name), states in jax_steps(STEP_PLAN["correct"]).items():
        results["step", "reference", loss_name, optimizer_name] = states[0]
    for variant in VARIANTS:
        collective = jax_collective(variant, WORLD_SIZE)
        results["loss", variant] = jax_losses(LOSS_PLAN[variant], collective, mesh)
        steps = jax_steps(STEP_PLAN[variant], collective, mesh)
        for (loss_name, optimizer_name), states in steps.items():
            results["step", variant, loss_name, optimizer_name] = states
    correct = jax_collective("correct", WORLD_SIZE)
    unchecked = jax_steps(UNCHECKED_PLAN, correct, mesh, check_vma=False)
    for (loss_name, optimizer_name), states in unchecked.items():
        results["step", "unchecked", loss_name, optimizer_name] = states
    return results


# Checks


def loss_value_mismatches(
    ranks: list[dict[str, dict[str, Any]]], reference: dict[str, dict[str, Any]]
) -> list[str]:
    """Return a line for each rank's loss value that differs from the reference."""
    lines = []
    for rank, results in enumerate(ranks):
        for name, result in results.items():
            expected = reference[name]["value"]
            value = result["value"]
            if not math.isclose(value, expected, rel_tol=LOSS_RELATIVE_TOLERANCE):
                lines.append(
                    f"{name}: rank {rank} loss {value!r}, single process {expected!r}"
                )
    return lines


def gradient_mismatches(
    ranks: list[dict[str, dict[str, Any]]],
    reference: dict[str, dict[str, Any]],
    *,
    scale: float,
) -> list[str]:
    """Return a line for each rank's input gradient that is not ``scale`` times the
    reference gradient of its slice."""
    world_size = len(ranks)
    lines = []
    for rank, results in enumerate(ranks):
        for name, result in results.items():
            pairs = zip(result["gradients"], reference[name]["gradients"], strict=True)
            for index, (local, whole) in enumerate(pairs):
                expected = scale * shard(whole, rank, world_size)
                if not np.allclose(
                    local,
                    expected,
                    rtol=GRADIENT_RELATIVE_TOLERANCE,
                    atol=GRADIENT_ABSOLUTE_TOLERANCE,
                ):
                    difference = np.max(np.abs(local - expected))
                    lines.append(
                        f"{name}: rank {rank} gradient of input {index} differs by "
                        f"up to {difference:.3e}"
                    )
    return lines


def step_mismatches(
    label: str, ranks: list[dict[str, np.ndarray]], reference: dict[str, np.ndarray]
) -> list[str]:
    """Return a line for each parameter, buffer or loss of each rank that differs
    from the single-process step."""
    lines = []
    for rank, state in enumerate(ranks):
        if sorted(state) != sorted(reference):
            lines.append(f"{label}: rank {rank} has entries {sorted(state)}")
            continue
        for name, expected in reference.items():
            value = state[name]
            if not np.allclose(
                value,
                expected,
                rtol=STEP_RELATIVE_TOLERANCE,
                atol=STEP_ABSOLUTE_TOLERANCE,
            ):
                difference = np.max(np.abs(value - expected))
                lines.append(
                    f"{label}: rank {rank} {name} differs by up to {difference:.3e}"
                )
    return lines


# Report


def _largest_deviations(
    loss_ranks: list[dict[str, dict[str, Any]]],
    loss_reference: dict[str, dict[str, Any]],
    scale: float,
) -> tuple[float, float]:
    """Return the largest relative loss deviation and the largest absolute input
    gradient deviation over the ranks and cases."""
    value_deviation = 0.0
    gradient_deviation = 0.0
    world_size = len(loss_ranks)
    for rank, results in enumerate(loss_ranks):
        for name, result in results.items():
            expected = loss_reference[name]
            value_deviation = max(
                value_deviation,
                abs(result["value"] - expected["value"]) / abs(expected["value"]),
            )
            for local, whole in zip(
                result["gradients"], expected["gradients"], strict=True
            ):
                expected_local = scale * shard(whole, rank, world_size)
                gradient_deviation = max(
                    gradient_deviation, float(np.max(np.abs(local - expected_local)))
                )
    return value_deviation, gradient_deviation


def _largest_step_deviation(
    ranks: list[dict[str, np.ndarray]], reference: dict[str, np.ndarray]
) -> float:
    return max(
        float(np.max(np.abs(state[name] - expected)))
        for state in ranks
        for name, expected in reference.items()
    )


def report(torch_path: str | None, jax_path: str | None) -> str:
    """Return a Markdown table of the largest deviations from the single-process
    results, per framework and collective, from the pickles of ``torch-checks``
    and ``jax-checks``."""
    lines = [
        "| framework | collective | loss value (relative) | input gradient "
        "(absolute) | step parameters (absolute) |",
        "|---|---|---|---|---|",
    ]
    sources = []
    if torch_path:
        ranks = pickle.loads(Path(torch_path).read_bytes())
        loss_reference = torch_losses(LOSS_PLAN["correct"])
        step_reference = {
            key: torch_step(*key) for key in STEP_PLAN["correct"] + UNCHECKED_PLAN
        }

        def torch_results(*key: Any) -> Any:
            return [results[key] for results in ranks]

        sources.append(
            ("torch", torch_results, loss_reference, step_reference, WORLD_SIZE)
        )
    if jax_path:
        results = pickle.loads(Path(jax_path).read_bytes())
        step_reference = {
            key[2:]: value
            for key, value in results.items()
            if key[:2] == ("step", "reference")
        }

        def jax_results(*key: Any) -> Any:
            return results[key]

        sources.append(
            ("jax", jax_results, results["loss", "reference"], step_reference, 1.0)
        )
    for framework, lookup, loss_reference, step_reference, scale in sources:
        for variant in VARIANTS:
            value, gradient = _largest_deviations(
                lookup("loss", variant), loss_reference, scale
            )
            step = max(
                _largest_step_deviation(
                    lookup("step", variant, *key), step_reference[key]
                )
                for key in STEP_PLAN[variant]
            )
            lines.append(
                f"| {framework} | {variant} | {value:.1e} | {gradient:.1e} | "
                f"{step:.1e} |"
            )
        if framework == "jax":
            step = max(
                _largest_step_deviation(
                    lookup("step", "unchecked", *key), step_reference[key]
                )
                for key in UNCHECKED_PLAN
            )
            lines.append(f"| jax | correct, check_vma=False | | | {step:.1e} |")
    return "\n".join(lines)


# Entry point


def _write(path: str, results: Any) -> None:
    Path(path).write_bytes(pickle.dumps(results))


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "jax-checks":
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={WORLD_SIZE}"
        ).strip()
        _write(argv[1], jax_checks())
        return 0

    if command == "report":
        print(report(argv[1] or None, argv[2] or None))
        return 0

    import distributed_workers
    from sslspec_torch.distributed import LaunchError, launch

    if command == "torch-checks":
        ranks = launch(distributed_workers.torch_rank_checks, nproc_per_node=2)
        _write(argv[1], ranks)
        return 0
    if command == "torch-fail":
        try:
            launch(distributed_workers.torch_failing_rank, nproc_per_node=2)
        except LaunchError as error:
            print(f"LaunchError: {error}", file=sys.stderr)
            print(f"failed ranks: {error.ranks}", file=sys.stderr)
            return 1
        print("the failing worker did not fail", file=sys.stderr)
        return 2
    print(
        "usage: distributed_workers.py {torch-checks OUT | torch-fail | "
        "jax-checks OUT | report TORCH_OUT JAX_OUT}",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
