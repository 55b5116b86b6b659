"""Data-parallel training on ``torch.distributed``, equal to one device.

Every rank processes one contiguous slice of each global batch. The losses of
:mod:`sslspec` take a :class:`TorchCollective` and return the global-batch loss on
every rank, and the gradient with respect to a rank's local inputs is
``world_size`` times the global-loss gradient for that slice (the convention of
:mod:`sslspec.distributed`). :class:`~torch.nn.parallel.DistributedDataParallel`
averages parameter gradients over ranks, so after one optimiser step every rank
holds the parameters of a single-device step on the global batch.

The pieces:

- :class:`TorchCollective`, the :class:`sslspec.distributed.Collective` over a
  process group, with autograd-aware all-gather and all-reduce;
- :func:`init_process_group` and :func:`destroy_process_group`, which read the
  environment variables that ``torchrun`` and :func:`launch` set (gloo on the CPU,
  NCCL on CUDA);
- :func:`rank_slice` and :class:`DistributedBatchSampler`, which give each rank a
  disjoint slice of every global batch;
- :class:`SyncBatchNorm` and :func:`convert_sync_batchnorm`, batch norm over the
  global batch on any device (``torch.nn.SyncBatchNorm`` rejects CPU tensors);
- :func:`wrap_ddp`, the ``DistributedDataParallel`` wrapper;
- :func:`launch`, which starts one process per rank through torch's own elastic
  launcher with every socket bound to 127.0.0.1, and raises
  :class:`LaunchError` naming the rank that failed.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslspec.data import epoch_batches
from sslspec.data import steps_per_epoch as count_steps

__all__ = [
    "DEFAULT_TIMEOUT",
    "LOOPBACK_ADDRESS",
    "DistributedBatchSampler",
    "DistributedEnvironment",
    "LaunchError",
    "SyncBatchNorm",
    "TorchCollective",
    "all_gather",
    "all_reduce_sum",
    "convert_sync_batchnorm",
    "current_environment",
    "destroy_process_group",
    "init_process_group",
    "launch",
    "loopback_interface",
    "process_group",
    "rank_slice",
    "resolve_rank_device",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)

#: Address every socket of a single-node launch binds to and connects to.
LOOPBACK_ADDRESS = "127.0.0.1"

#: How long a collective may wait for the other ranks before it raises.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

#: Exit status of a rank stopped by SIGINT, as a shell reports it (128 + 2).
INTERRUPTED_EXIT_CODE = 130

_ENVIRONMENT_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# Backends with a native reduce-scatter. Others get an all-reduce and a slice.
_REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")


# Collectives


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group=group)


class _AllGather(torch.autograd.Function):
    """Concatenate ``x`` from every rank along axis 0. The backward pass sums the
    upstream gradients of all ranks for this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> Any:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(_group_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        group = ctx.group
        world_size = _group_size(group)
        rank = dist.get_rank(group=group)
        grad = grad.contiguous()
        local = grad.shape[0] // world_size
        if dist.get_backend(group) in _REDUCE_SCATTER_BACKENDS:
            output = grad.new_empty((local, *grad.shape[1:]))
            dist.reduce_scatter(output, list(grad.split(local)), group=group)
            return output, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total.narrow(0, rank * local, local), None


class _AllReduceSum(torch.autograd.Function):
    """Sum ``x`` over ranks. The backward pass sums the upstream gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> Any:
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank of ``group`` along axis 0, in rank order.

    The gradient with respect to the local ``x`` is the sum over ranks of the
    upstream gradient for this rank's slice, as :mod:`sslspec.distributed`
    requires.

    Raises
    ------
    ValueError
        If ``x`` is 0-D.
    """
    if x.ndim == 0:
        raise ValueError(
            "x must have at least one axis to gather along axis 0, got a 0-D tensor"
        )
    return _AllGather.apply(x, group)


def all_reduce_sum(
    x: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``group``. The gradient is the sum over ranks of
    the upstream gradient."""
    return _AllReduceSum.apply(x, group)


class TorchCollective:
    """The :class:`sslspec.distributed.Collective` of this rank in a process group.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks that share a global batch; the default group when omitted.

    Raises
    ------
    RuntimeError
        If no process group is initialised.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchCollective needs an initialised process group; call "
                "sslspec_torch.distributed.init_process_group() first"
            )
        self.group = group
        self.world_size = _group_size(group)
        self.rank = dist.get_rank(group=group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather(x, self.group)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x, self.group)

    def __repr__(self) -> str:
        return f"TorchCollective(rank={self.rank}, world_size={self.world_size})"


# Process group


@dataclass(frozen=True)
class DistributedEnvironment:
    """Rank, world size, local rank, backend and device of this process in a
    data-parallel job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the rank that writes files and logs results."""
        return self.rank == 0


def _environment_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"environment variable {name} is not set; start the processes with "
            "sslspec_torch.distributed.launch or torchrun, which set "
            + ", ".join(_ENVIRONMENT_VARIABLES)
        )
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(
            f"environment variable {name} must be an integer, got {value!r}"
        ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """Return the name of the loopback network interface (``lo`` on Linux, ``lo0``
    on macOS), or None if none is found."""
    names = [name for _, name in socket.if_nameindex()]
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    # NOTE: other systems may name it differently; gloo then binds to the address
    # that the host name resolves to.
    return next((name for name in names if name.startswith("lo")), None)


def _bind_gloo_to_loopback() -> None:
    """Make gloo listen on the loopback interface for a single-node job.

    gloo binds its sockets to the address of ``GLOO_SOCKET_IFNAME`` or, when that
    is unset, of the host name. A job whose ``MASTER_ADDR`` is a loopback address
    runs on one machine, so its ranks need nothing beyond loopback.
    """
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if not _is_loopback(os.environ.get("MASTER_ADDR", "")):
        return
    interface = loopback_interface()
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} is not available: no CUDA GPU is visible; use "
                "device='cpu'"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"local rank {local_rank} needs its own GPU, but only {count} CUDA "
                "devices are visible; start at most that many processes per node"
            )
        return torch.device("cuda", local_rank)
    raise ValueError(
        f"device must be 'auto', 'cpu' or 'cuda' for distributed training (each "
        f"rank takes the GPU of its local rank), got {device!r}"
    )


def init_process_group(
    device: str = "auto",
    *,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> DistributedEnvironment:
    """Join the process group described by the ``torchrun`` environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``, as set by :func:`launch` and ``torchrun``. On CUDA, rank
    ``r`` uses GPU ``LOCAL_RANK`` and the backend defaults to NCCL; on the CPU it
    defaults to gloo. When ``MASTER_ADDR`` is a loopback address and
    ``GLOO_SOCKET_IFNAME`` is unset, gloo is bound to the loopback interface.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` picks CUDA when a GPU is visible.
    backend : str, optional
        ``"gloo"``, ``"nccl"`` or another backend of ``torch.distributed``.
    timeout : datetime.timedelta
        How long a collective waits for the other ranks before it raises, so a
        rank that dies makes the others fail instead of hang.

    Returns
    -------
    DistributedEnvironment

    Raises
    ------
    RuntimeError
        If a variable is missing or not an integer, or a process group is already
        initialised.
    ValueError
        If the device is not available.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group is already initialised; call "
            "destroy_process_group() before starting another"
        )
    rank = _environment_int("RANK")
    world_size = _environment_int("WORLD_SIZE")
    local_rank = _environment_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(
                f"environment variable {name} is not set; start the processes with "
                "sslspec_torch.distributed.launch or torchrun"
            )
    torch_device = _resolve_device(device, local_rank)
    if backend is None:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if backend == "gloo":
        _bind_gloo_to_loopback()

    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    logger.info(
        "rank %d of %d joined the %s process group on %s",
        rank,
        world_size,
        backend,
        torch_device,
    )
    return DistributedEnvironment(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=torch_device,
    )


def resolve_rank_device(device: str = "auto") -> torch.device:
    """Return the device of this rank: the CPU, or the GPU of its ``LOCAL_RANK``.

    ``device`` is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Each rank
    takes its own GPU, so the index of ``"cuda:N"`` is replaced by the local rank.

    Raises
    ------
    ValueError
        If the device is not available or not one of these.
    """
    if device.startswith("cuda:"):
        device = "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return _resolve_device(device, local_rank)


def current_environment(device: str = "auto") -> DistributedEnvironment:
    """Return the :class:`DistributedEnvironment` of this process in the
    initialised default process group, with the device of
    :func:`resolve_rank_device`.

    Raises
    ------
    RuntimeError
        If no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "no torch.distributed process group is initialised; call "
            "init_process_group() first"
        )
    return DistributedEnvironment(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
        device=resolve_rank_device(device),
    )


def _exit_interrupted(signum: int, frame: Any) -> None:
    os._exit(INTERRUPTED_EXIT_CODE)


def run_in_process_group(
    function: Callable[..., Any], device: str, args: Sequence[Any]
) -> Any:
    """Run ``function(*args)`` inside :func:`process_group` on ``device``.

    A module-level function that :func:`launch` can start, so that a caller
    which does not import torch gets ranks that have joined the group.

    On SIGINT the rank exits at once with status 130, skipping Python's exit
    handlers. Ctrl-C reaches every process of the terminal's process group, and
    a rank that unwinds a ``KeyboardInterrupt`` through torch's exit handlers
    prints tracebacks that hide the launcher's message. Checkpoints are written
    to a temporary file and renamed, so an abrupt exit cannot corrupt one.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    with process_group(device):
        return function(*args)


def destroy_process_group() -> None:
    """Leave and destroy the default process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        logger.info("rank %d left the process group", rank)


@contextlib.contextmanager
def process_group(
    device: str = "auto",
    *,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> Iterator[DistributedEnvironment]:
    """Run a block inside :func:`init_process_group`, destroying the group after."""
    environment = init_process_group(device, backend=backend, timeout=timeout)
    try:
        yield environment
    finally:
        destroy_process_group()


# Batches


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """Return the rows of a global batch that ``rank`` processes.

    Rank ``r`` takes the contiguous rows ``[r * n, (r + 1) * n)`` with ``n =
    global_batch_size // world_size``, so concatenating the slices in rank order
    gives the global batch, which is the order the losses' all-gather assumes.

    Raises
    ------
    ValueError
        If ``world_size`` does not divide ``global_batch_size`` or ``rank`` is not
        in ``[0, world_size)``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if global_batch_size % world_size:
        raise ValueError(
            f"the global batch of {global_batch_size} samples must split evenly over "
            f"{world_size} ranks; choose a batch size that is a multiple of "
            f"{world_size}"
        )
    local = global_batch_size // world_size
    return slice(rank * local, (rank + 1) * local)


class DistributedBatchSampler:
    """Local sample indices of each step: this rank's slice of every global batch.

    The global batches are those of :func:`sslspec.data.epoch_batches` for
    ``(seed, epoch)``, which are the batches of a single-process run, and rank
    ``r`` takes :func:`rank_slice` of each. Call :meth:`set_epoch` before each
    epoch, as with ``torch.utils.data.DistributedSampler``.

    Parameters
    ----------
    num_samples : int
        Size of the training set.
    batch_size : int
        Global batch size; reduced to ``num_samples`` when larger, as
        :func:`~sslspec.data.epoch_batches` does. ``world_size`` must divide the
        result.
    seed : int
        Seed of the shuffling.
    rank, world_size : int
        This rank and the number of ranks.

    Raises
    ------
    ValueError
        If the global batch does not split evenly over the ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.num_samples = num_samples
        self.global_batch_size = min(batch_size, num_samples)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.slice = rank_slice(self.global_batch_size, rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return count_steps(self.num_samples, self.global_batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        batches = epoch_batches(
            self.num_samples, self.global_batch_size, seed=self.seed, epoch=self.epoch
        )
        for batch in batches:
            yield batch[self.slice]


# Batch norm


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics cover the global batch.

    In training mode, with more than one rank, the mean and the biased variance of
    each channel are computed over the samples (and spatial positions) of every
    rank with :func:`all_reduce_sum`, in two passes (mean, then mean squared
    deviation). The input is normalised with the biased variance plus ``eps``, and
    the running statistics move as ``running = (1 - momentum) * running +
    momentum * batch_stat`` with the unbiased variance, as
    ``torch.nn.BatchNorm1d`` does on one device. Gradients flow through both
    all-reduces. In evaluation mode, or without a process group of more than one
    rank, it computes what ``torch.nn.BatchNorm1d`` and ``BatchNorm2d`` compute.

    Unlike ``torch.nn.SyncBatchNorm``, it runs on any device and backend,
    including CPU tensors on gloo. Statistics are computed in float32 at least,
    and the output has the input's dtype. Parameter and buffer names are those
    of ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` of an input ``(N, C)`` or ``(N, C, ...)``.
    eps, momentum, affine, track_running_stats
        As for ``torch.nn.BatchNorm1d``; ``momentum=None`` uses a cumulative
        average.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks to synchronise; the default group when omitted.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm expects input of shape (N, C) or (N, C, ...), got "
                f"shape {tuple(input.shape)}"
            )

    def _synchronised(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and _group_size(self.process_group) > 1
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._synchronised():
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm has {self.num_features} features, got input of shape "
                f"{tuple(input.shape)}"
            )

        compute_dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(compute_dtype)
        axes = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = x.numel() // x.shape[1]

        # First pass: the global mean, from per-channel sums and the global count.
        sums = torch.cat([x.sum(dim=axes), x.new_full((1,), float(local_count))], dim=0)
        sums = all_reduce_sum(sums, self.process_group)
        count = sums[-1]
        # NOTE: reading the count on the host waits for the device, once per layer
        # and step. Summing it supports ranks with different local batch sizes.
        global_count = int(count.detach().round().item())
        if global_count < 2:
            raise ValueError(
                "SyncBatchNorm in training mode needs more than one value per "
                f"channel over all ranks, got {global_count} for input of shape "
                f"{tuple(input.shape)}"
            )
        mean = sums[:-1] / count
        centred = x - mean.reshape(shape)
        # Second pass: the biased variance from the squared deviations.
        squares = all_reduce_sum((centred * centred).sum(dim=axes), self.process_group)
        variance = squares / count

        self._update_running_stats(mean, variance, global_count)
        output = centred * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.affine:
            output = output * self.weight.reshape(shape) + self.bias.reshape(shape)
        return output.to(input.dtype)

    def _update_running_stats(
        self, mean: torch.Tensor, variance: torch.Tensor, count: int
    ) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            unbiased = variance * (count / (count - 1))
            self.running_mean.mul_(1 - factor).add_(
                mean.to(self.running_mean.dtype), alpha=factor
            )
            self.running_var.mul_(1 - factor).add_(
                unbiased.to(self.running_var.dtype), alpha=factor
            )


def convert_sync_batchnorm(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Replace every batch norm of ``module`` by a :class:`SyncBatchNorm`.

    The new layers share the old ones' parameters and buffers, so canonical names,
    values and optimiser references are kept. Children are replaced in place; the
    return value is ``module`` itself unless ``module`` is a batch norm.
    ``torch.nn.SyncBatchNorm`` layers are replaced too, since they reject CPU
    tensors.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


# Data-parallel wrapper


def wrap_ddp(
    module: nn.Module, environment: DistributedEnvironment, **options: Any
) -> nn.parallel.DistributedDataParallel:
    """Wrap ``module`` (already on ``environment.device``) in
    ``DistributedDataParallel``.

    DDP copies rank 0's parameters and buffers to every rank and averages
    gradients over ranks during the backward pass. Only calls through the
    wrapper's ``forward`` are synchronised, so put the whole computation that uses
    the parameters in that ``forward``. Buffers are not broadcast again before
    each forward pass, because :class:`SyncBatchNorm` keeps them equal on every
    rank. ``options`` override this and any other ``DistributedDataParallel``
    argument.
    """
    if environment.device.type == "cuda":
        options.setdefault("device_ids", [environment.device.index])
    if not {"broadcast_buffers", "forward_sync_buffers"} & set(options):
        parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers.
        if "forward_sync_buffers" in parameters:
            options["forward_sync_buffers"] = False
        else:
            options["broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(module, **options)


# Launching


class LaunchError(RuntimeError):
    """Raised by :func:`launch` when a rank fails; ``ranks`` lists the failed
    ranks, first failure first."""

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = list(ranks)


def _failure_message(rank: int, failure: Any) -> str:
    exitcode = failure.exitcode
    if exitcode is not None and exitcode < 0:
        try:
            cause = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            cause = f"killed by signal {-exitcode}"
    else:
        cause = f"exit code {exitcode}"
    detail = failure.message
    if isinstance(detail, dict):
        detail = detail.get("message", "")
    if getattr(failure, "recovered", False):
        text = f"rank {rank} (local rank {failure.local_rank}) raised"
    else:
        text = f"rank {rank} (local rank {failure.local_rank}) failed with {cause}"
    if detail:
        text += f": {detail}"
    return text


def _all_failures(reported: dict[int, Any], log_dir: str) -> list[tuple[int, Any]]:
    """Return every rank's failure, root causes first.

    The elastic agent reports only the first failed process it polls. When rank 1
    raises while rank 0 waits in a collective, rank 0 often dies of the broken
    connection at the same moment and is the one reported. Every rank that raised
    a Python exception left an ``error.json`` under ``log_dir``, so those ranks are
    added here. Failures are ordered by time, and at equal times a recorded
    exception comes before a process that died without one.
    """
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failures = dict(reported)
    for error_file in sorted(Path(log_dir).glob("*/attempt_*/*/error.json")):
        local_rank = int(error_file.parent.name)
        if local_rank in failures:
            continue
        try:
            failure = ProcessFailure(
                local_rank=local_rank, pid=-1, exitcode=1, error_file=str(error_file)
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        failure.recovered = True
        failures[local_rank] = failure

    def order(item: tuple[int, Any]) -> tuple[int, bool, float]:
        # Timestamps are whole seconds; within one second the error files'
        # modification times order the ranks that raised.
        failure = item[1]
        try:
            written = os.stat(str(failure.error_file)).st_mtime
        except OSError:
            return (failure.timestamp or 0, True, math.inf)
        return (failure.timestamp or 0, False, written)

    return sorted(failures.items(), key=order)


@contextlib.contextmanager
def _environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the variables of ``values`` that are unset, for the block's duration.

    The workers that the elastic agent spawns inherit this process's environment.
    """
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _loopback_store() -> tuple[int, dist.TCPStore]:
    """Start the rendezvous store on a socket bound to 127.0.0.1.

    torch's rendezvous code creates its ``TCPStore`` servers without a bind
    address, so they listen on every interface. A server created here with
    ``multi_tenant=True`` on a socket bound to loopback is reused by the static
    rendezvous, which requests a multi-tenant store on the same host and port.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK_ADDRESS, 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        LOOPBACK_ADDRESS,
        port,
        None,
        True,
        multi_tenant=True,
        master_listen_fd=listener.fileno(),
    )
    # The store's server now owns the socket and closes it.
    listener.detach()
    return port, store


def launch(
    function: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    nproc_per_node: int,
    monitor_interval: float = 0.1,
    start_method: str = "spawn",
    threads_per_process: int | None = None,
    name: str | None = None,
) -> list[Any]:
    """Run ``function(*args)`` in ``nproc_per_node`` processes on this machine.

    The processes are started by torch's elastic launcher
    (:func:`torch.distributed.launcher.api.elastic_launch`), which sets the
    ``torchrun`` environment variables, so ``function`` calls
    :func:`init_process_group` to join the group. The rendezvous store and gloo
    listen on 127.0.0.1 only. When any rank fails, the launcher stops the others
    and this function raises :class:`LaunchError` naming the failed rank.

    Parameters
    ----------
    function : callable
        A module-level function, since the ``spawn`` start method pickles it by
        name.
    args : sequence
        Picklable positional arguments, the same for every rank.
    nproc_per_node : int
        Number of processes (ranks), at least 1.
    monitor_interval : float
        Seconds between the launcher's checks of its workers.
    start_method : {"spawn", "forkserver", "fork"}
        How the workers are started.
    threads_per_process : int, optional
        ``OMP_NUM_THREADS`` of each worker, unless already set; by default the
        CPU count divided by ``nproc_per_node``, at least 1.
    name : str, optional
        Name of the work in log lines and in :class:`LaunchError`; by default the
        qualified name of ``function``.

    Returns
    -------
    list
        The return value of every rank, in rank order.

    Raises
    ------
    LaunchError
        If a rank raises or exits with a non-zero code.
    ValueError
        If ``nproc_per_node`` is below 1.
    """
    from torch.distributed.elastic.multiprocessing.api import (
        DefaultLogsSpecs,
        SignalException,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int):
        raise TypeError(
            f"nproc_per_node must be an int, got {type(nproc_per_node).__name__}"
        )
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
    if threads_per_process is None:
        threads_per_process = max(1, (os.cpu_count() or 1) // nproc_per_node)

    port, store = _loopback_store()
    log_dir = tempfile.mkdtemp(prefix="sslspec-launch-")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"sslspec-{uuid.uuid4().hex[:12]}",
        rdzv_backend="static",
        rdzv_endpoint=f"{LOOPBACK_ADDRESS}:{port}",
        rdzv_configs={"rank": 0},
        max_restarts=0,
        monitor_interval=monitor_interval,
        start_method=start_method,
        local_addr=LOOPBACK_ADDRESS,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )
    defaults = {"OMP_NUM_THREADS": str(threads_per_process)}
    interface = loopback_interface()
    if interface is not None:
        defaults["GLOO_SOCKET_IFNAME"] = interface
    if name is None:
        name = getattr(function, "__qualname__", repr(function))
    logger.info(
        "starting %d processes running %s, rendezvous at %s:%d",
        nproc_per_node,
        name,
        LOOPBACK_ADDRESS,
        port,
    )
    try:
        with _environment_defaults(defaults):
            results = elastic_launch(config, function)(*args)
    except SignalException as error:
        # The agent stops the workers before it raises. Ctrl-C becomes the usual
        # KeyboardInterrupt, so callers handle it as in one process.
        signal_name = signal.Signals(error.sigval).name
        logger.warning("distributed run of %s stopped by %s", name, signal_name)
        if error.sigval == signal.SIGINT:
            raise KeyboardInterrupt from error
        raise LaunchError(
            f"distributed run of {name} on {nproc_per_node} processes was stopped "
            f"by {signal_name}",
            [],
        ) from error
    except ChildFailedError as error:
        failures = _all_failures(error.failures, log_dir)
        if all(
            failure.exitcode in (INTERRUPTED_EXIT_CODE, -signal.SIGINT)
            for _, failure in failures
        ):
            # Every rank saw Ctrl-C before the launcher handled its own SIGINT.
            logger.warning("distributed run of %s stopped by SIGINT", name)
            raise KeyboardInterrupt from error
        ranks = [rank for rank, _ in failures]
        lines = [_failure_message(rank, failure) for rank, failure in failures]
        logger.error("distributed run of %s failed: %s", name, "; ".join(lines))
        raise LaunchError(
            f"distributed run of {name} on {nproc_per_node} processes failed: "
            + "; ".join(lines),
            ranks,
        ) from error
    finally:
        # Dropping the last reference stops the store's server.
        del store
        shutil.rmtree(log_dir, ignore_errors=True)
    return [results[rank] for rank in range(nproc_per_node)]
