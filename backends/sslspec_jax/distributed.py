"""Data-parallel training over a JAX device mesh, equal to one device.

The global batch is sharded along the named mesh axis :data:`DATA_AXIS`, and the
training step runs once per device under :func:`jax.shard_map`. Inside it,
:class:`MeshCollective` lets the losses of :mod:`sslspec` compute the global-batch
loss with ``jax.lax.all_gather`` and ``jax.lax.psum``, and :class:`SyncBatchNorm`
normalises with statistics over the global batch.

How the gradient comes out right: ``jax.shard_map`` checks by default
(``check_vma=True``) which values vary across the mesh axis. A loss that ends in
``psum`` is the same on every device, and so are parameters passed unsharded
(``PartitionSpec()``). Take ``jax.grad`` of such a loss with respect to such
parameters inside the mapped function: JAX transposes the implicit broadcast of
the parameters into a ``psum`` of the per-device contributions, so every device
receives the gradient of the global loss itself. There is no ``world_size``
factor and no ``pmean`` to add. ``jax.grad`` of the whole ``shard_map`` taken
outside it gives the same gradient. Without the check (``check_vma=False``, or
``jax.pmap``), the transpose of ``psum`` is another ``psum``, so a gradient taken
inside is this device's share in :mod:`sslspec.distributed`'s convention
(``world_size`` times the share of its slice) and needs a ``pmean``. The tests
show that skipping it changes the step, and :func:`data_parallel` keeps the check
on.

Multi-host: call ``jax.distributed.initialize()`` at the start of every host
process (it reads the coordinator address, process count and process id from the
cluster environment, or takes them as arguments), build the mesh over
``jax.devices()`` (every device of every host) and give each host its part of the
batch with ``jax.make_array_from_process_local_data``. The rest is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .networks import BatchNorm

__all__ = [
    "DATA_AXIS",
    "MeshCollective",
    "SyncBatchNorm",
    "batch_sharding",
    "convert_sync_batchnorm",
    "data_mesh",
    "data_parallel",
    "rank_key",
    "replicate",
    "shard_batch",
]

#: Default name of the mesh axis that the batch is sharded along.
DATA_AXIS = "data"


class MeshCollective:
    """The :class:`sslspec.distributed.Collective` of a device inside
    ``jax.shard_map`` (or ``jax.pmap``) over the mesh axis ``axis_name``.

    The rank is ``jax.lax.axis_index``, a traced 0-D integer array, so it can be
    read only inside the mapped function. NOTE: ``isinstance(collective,
    Collective)`` reads it on Python before 3.12, so run that check (and the
    losses, which make it) inside the mapped function too.

    Parameters
    ----------
    world_size : int
        Number of devices along ``axis_name``, for example
        ``mesh.shape[axis_name]``.
    axis_name : str
        Name of the mesh axis that the batch is sharded along.
    """

    def __init__(self, world_size: int, axis_name: str = DATA_AXIS) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int):
            raise TypeError(
                f"world_size must be an int, got {type(world_size).__name__}"
            )
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.axis_name = axis_name

    @classmethod
    def for_mesh(cls, mesh: Mesh, axis_name: str = DATA_AXIS) -> MeshCollective:
        """Return the collective over ``axis_name`` of ``mesh``."""
        return cls(int(mesh.shape[axis_name]), axis_name)

    @property
    def rank(self) -> jax.Array:
        return jax.lax.axis_index(self.axis_name)

    def all_gather(self, x: jax.Array) -> jax.Array:
        return jax.lax.all_gather(x, self.axis_name, tiled=True)

    def all_reduce_sum(self, x: jax.Array) -> jax.Array:
        return jax.lax.psum(x, self.axis_name)

    def __repr__(self) -> str:
        return (
            f"MeshCollective(world_size={self.world_size}, "
            f"axis_name={self.axis_name!r})"
        )


# Meshes and shardings


def data_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS
) -> Mesh:
    """Return a one-axis mesh over ``devices`` (``jax.local_devices()`` by default;
    pass ``jax.devices()`` after ``jax.distributed.initialize()`` to span hosts).

    Raises
    ------
    ValueError
        If ``devices`` is empty.
    """
    if devices is None:
        devices = jax.local_devices()
    devices = list(devices)
    if not devices:
        raise ValueError("devices must contain at least one device, got none")
    return Mesh(np.array(devices), (axis_name,))


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Return the sharding that splits axis 0 of an array along ``axis_name``."""
    return NamedSharding(mesh, P(axis_name))


def _check_divisible(size: int, mesh: Mesh, axis_name: str) -> None:
    devices = int(mesh.shape[axis_name])
    if size % devices:
        raise ValueError(
            f"the global batch of {size} samples must split evenly over the "
            f"{devices} devices of mesh axis {axis_name!r}; choose a batch size "
            f"that is a multiple of {devices}"
        )


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Place every array of ``batch`` (a pytree) on ``mesh``, split along axis 0.

    Device ``r`` of the axis receives rows ``[r * n, (r + 1) * n)``, so the
    all-gather of :class:`MeshCollective` restores the global order.

    Raises
    ------
    ValueError
        If an array's leading axis does not split evenly over the devices.
    """
    for leaf in jax.tree.leaves(batch):
        if np.ndim(leaf) == 0:
            raise ValueError("every array of batch must have a batch axis, got 0-D")
        _check_divisible(int(np.shape(leaf)[0]), mesh, axis_name)
    return jax.device_put(batch, batch_sharding(mesh, axis_name))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of every array of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def rank_key(key: jax.Array, axis_name: str = DATA_AXIS) -> jax.Array:
    """Return a key for this device's own random numbers inside ``shard_map``.

    A key passed unsharded is the same on every device, so draws from it would
    repeat on every shard. Folding in ``axis_index`` gives each device its own
    stream.
    """
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def data_parallel(
    function: Callable[..., Any],
    mesh: Mesh,
    *,
    batch_argnums: Sequence[int],
    axis_name: str = DATA_AXIS,
) -> Callable[..., Any]:
    """Map ``function`` over the devices of ``mesh`` with the batch sharded.

    The positional arguments listed in ``batch_argnums`` (pytrees whose arrays
    have a batch axis 0) are split along ``axis_name``. Every other argument and
    every output is the same on all devices (``PartitionSpec()``).
    ``shard_map``'s variance check stays on, so an output that still differs
    between devices (a local loss, a batch statistic without ``psum``, a gradient
    of a local loss) raises an error at trace time instead of returning one
    device's value. Wrap the result in ``jax.jit``.

    Inside ``function``, pass :class:`MeshCollective` to the losses, use
    :class:`SyncBatchNorm` (see :func:`convert_sync_batchnorm`), and take
    ``jax.grad`` as on one device: the gradient of the global loss with respect
    to unsharded parameters is the single-device gradient (see the module
    docstring).
    """
    batch_positions = frozenset(int(index) for index in batch_argnums)

    def mapped(*args: Any) -> Any:
        for index in batch_positions:
            if not 0 <= index < len(args):
                raise ValueError(
                    f"batch_argnums contains {index}, but the function was called "
                    f"with {len(args)} positional arguments"
                )
            for leaf in jax.tree.leaves(args[index]):
                _check_divisible(int(np.shape(leaf)[0]), mesh, axis_name)
        in_specs = tuple(
            P(axis_name) if index in batch_positions else P()
            for index in range(len(args))
        )
        return jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=P())(
            *args
        )

    return mapped


# Batch norm


class SyncBatchNorm(BatchNorm):
    """:class:`sslspec_jax.networks.BatchNorm` with statistics over a mesh axis.

    In training mode the mean and the biased variance of each feature are
    averaged over the devices of ``axis_name`` with ``jax.lax.psum``, in two
    passes (mean, then mean squared deviation). Every device then normalises with
    the global-batch statistics and pushes the same running statistics, with the
    unbiased global variance as in the canonical batch norm. Training mode must
    run inside ``shard_map`` or ``pmap`` over that axis, with the same local batch
    size on every device. Evaluation mode uses the running statistics and needs
    no axis. Variables and their paths are those of ``BatchNorm``, so
    checkpoints are unchanged.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis_name: str = DATA_AXIS,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        use_running_average: bool = False,
    ) -> None:
        super().__init__(
            num_features,
            momentum=momentum,
            epsilon=epsilon,
            use_running_average=use_running_average,
        )
        self.axis_name = axis_name

    @classmethod
    def from_batch_norm(
        cls, norm: BatchNorm, axis_name: str = DATA_AXIS
    ) -> SyncBatchNorm:
        """Return a synchronised copy of ``norm`` that shares its variables."""
        converted = cls(
            norm.num_features,
            axis_name=axis_name,
            momentum=norm.momentum,
            epsilon=norm.epsilon,
            use_running_average=norm.use_running_average,
        )
        converted.scale = norm.scale
        converted.bias = norm.bias
        converted.mean = norm.mean
        converted.var = norm.var
        return converted

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            return super().__call__(x)
        x = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        devices = jax.lax.axis_size(self.axis_name)
        count = math.prod(x.shape[:-1]) * devices
        if count < 2:
            raise ValueError(
                f"batch norm in training mode needs more than one value per feature "
                f"over all devices, got input of shape {x.shape} on each of "
                f"{devices} devices"
            )
        mean = jax.lax.psum(jnp.mean(x, axis=axes), self.axis_name) / devices
        centred = x - mean
        squares = jnp.mean(jnp.square(centred), axis=axes)
        var = jax.lax.psum(squares, self.axis_name) / devices
        unbiased = var * (count / (count - 1))
        self.mean[...] = self.momentum * self.mean[...] + (
            1 - self.momentum
        ) * jax.lax.stop_gradient(mean)
        self.var[...] = self.momentum * self.var[...] + (
            1 - self.momentum
        ) * jax.lax.stop_gradient(unbiased)
        inverse = jax.lax.rsqrt(var + self.epsilon)
        return centred * inverse * self.scale[...] + self.bias[...]


def convert_sync_batchnorm(module: nnx.Module, axis_name: str = DATA_AXIS) -> Any:
    """Replace every :class:`~sslspec_jax.networks.BatchNorm` inside ``module``
    by a :class:`SyncBatchNorm` over ``axis_name`` that shares its variables.

    Children are replaced in place; the return value is ``module`` itself unless
    ``module`` is a batch norm. Variable paths do not change, so states split
    from the module before and after conversion have the same structure, while
    the graph definition changes.
    """
    if isinstance(module, BatchNorm) and not isinstance(module, SyncBatchNorm):
        return SyncBatchNorm.from_batch_norm(module, axis_name)
    targets = [
        (path, node)
        for path, node in nnx.iter_modules(module)
        if path and isinstance(node, BatchNorm) and not isinstance(node, SyncBatchNorm)
    ]
    for path, node in targets:
        parent: Any = module
        for part in path[:-1]:
            parent = _child(parent, part)
        converted = SyncBatchNorm.from_batch_norm(node, axis_name)
        if isinstance(parent, Mapping | MutableSequence):
            parent[path[-1]] = converted
        else:
            setattr(parent, path[-1], converted)
    return module


def _child(parent: Any, key: Any) -> Any:
    if isinstance(parent, Mapping | Sequence):
        return parent[key]
    return getattr(parent, key)
