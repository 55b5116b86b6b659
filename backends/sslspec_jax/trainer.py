"""Pretraining on JAX: the :class:`sslspec.backend.Trainer` of the JAX backend."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sslspec
from sslspec.augment import augment_images, two_views
from sslspec.config import PretrainConfig
from sslspec.distributed import Collective
from sslspec.networks import flat_parameter_shapes, method_networks
from sslspec.schedules import warmup_cosine_lr

from .backend import jax_device, resolve_device
from .distributed import (
    MeshCollective,
    batch_sharding,
    convert_sync_batchnorm,
    data_mesh,
    data_parallel,
)
from .networks import (
    build_network,
    canonical_name,
    canonical_to_state,
    state_to_canonical,
)
from .random import KeyRandom

__all__ = [
    "ENCODE_BATCH_SIZE",
    "JaxTrainer",
    "build_optimizer",
    "inputs_loss",
    "make_encode",
    "make_gradient_step",
    "make_train_step",
    "method_loss",
    "prepare_inputs",
]

logger = logging.getLogger(__name__)

#: Batch size of :meth:`JaxTrainer.encode`.
ENCODE_BATCH_SIZE = 1024

_ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults
_ADAM_EPS = 1e-8
_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch names of Adam's first and second moments
_KEY_NAME = "rng.key"
_STEP_NAME = "optimizer.step"


def prepare_inputs(
    config: PretrainConfig, batch: jax.Array, random: KeyRandom
) -> tuple[jax.Array, ...]:
    """Draw one step's random inputs for the whole batch.

    Returns the two augmented views ``(view_a, view_b)``, or for MAE the augmented
    images, ``ids_keep``, ``ids_restore`` and the mask of
    :func:`sslspec.generate_mask`. Every array has the batch axis first, so a
    data-parallel step can draw them on the global batch (the same numbers as on
    one device) and then shard them.
    """
    if config.method == "mae":
        images = augment_images(batch, random, config.augment)
        encoder = method_networks("mae", tuple(batch.shape[1:]), config.sizes)
        noise = random.uniform((images.shape[0], encoder["encoder"].num_patches))
        mask = sslspec.generate_mask(noise, mask_ratio=config.mask_ratio)
        return images, mask.ids_keep, mask.ids_restore, mask.mask
    return two_views(batch, random, config.augment)


def inputs_loss(
    config: PretrainConfig,
    online: nnx.Module,
    target: nnx.Module | None,
    inputs: Sequence[jax.Array],
    *,
    stop_target_gradient: bool = True,
    collective: Collective | None = None,
) -> jax.Array:
    """Compute the training loss of ``config.method`` on :func:`prepare_inputs`
    output.

    With ``collective`` the inputs are this device's rows of the global batch and
    the loss is that of the global batch (see :mod:`sslspec.distributed`).
    """
    if config.method == "mae":
        return _mae_loss(config, online, inputs, collective)

    view_a, view_b = inputs
    views = jnp.concatenate([view_a, view_b])
    projections = online["projector"](online["encoder"](views))
    z_a, z_b = jnp.split(projections.astype(jnp.float32), 2)

    if config.method == "simclr":
        return sslspec.nt_xent_loss(
            z_a, z_b, temperature=config.temperature, collective=collective
        )
    if config.method == "barlow-twins":
        return sslspec.barlow_twins_loss(
            z_a, z_b, lambda_param=config.lambda_param, collective=collective
        )
    if config.method == "vicreg":
        return sslspec.vicreg_loss(
            z_a,
            z_b,
            invariance_weight=config.invariance_weight,
            variance_weight=config.variance_weight,
            covariance_weight=config.covariance_weight,
            collective=collective,
        )

    predictions = online["predictor"](projections)
    p_a, p_b = jnp.split(predictions.astype(jnp.float32), 2)
    targets = target["target_projector"](target["target_encoder"](views))
    targets = targets.astype(jnp.float32)
    if stop_target_gradient:
        targets = jax.lax.stop_gradient(targets)
    t_a, t_b = jnp.split(targets, 2)
    return sslspec.byol_loss(p_a, t_b, collective=collective) + sslspec.byol_loss(
        p_b, t_a, collective=collective
    )


def method_loss(
    config: PretrainConfig,
    online: nnx.Module,
    target: nnx.Module | None,
    batch: jax.Array,
    random: KeyRandom,
    *,
    stop_target_gradient: bool = True,
) -> jax.Array:
    """Compute the training loss of ``config.method`` on one batch.

    ``online`` (and for BYOL ``target``) is an :class:`flax.nnx.Dict` that maps
    canonical prefixes to networks in training mode, whose batch statistics are
    updated in place. Both augmented views go through the networks as one batch,
    so batch norm normalises with statistics over both views, as the PyTorch
    trainer does. Embeddings are cast to float32 before the loss.

    ``stop_target_gradient=False`` lets gradients flow into BYOL's target
    branch. It exists only so that tests can show that the default blocks them.
    """
    inputs = prepare_inputs(config, batch, random)
    return inputs_loss(
        config, online, target, inputs, stop_target_gradient=stop_target_gradient
    )


def _mae_loss(
    config: PretrainConfig,
    online: nnx.Module,
    inputs: Sequence[jax.Array],
    collective: Collective | None,
) -> jax.Array:
    images, ids_keep, ids_restore, mask = inputs
    encoder = online["encoder"]
    latent = encoder(images, ids_keep)
    prediction = online["decoder"](latent, ids_restore)
    target = sslspec.patchify(images, encoder.description.patch_size)
    return sslspec.reconstruction_loss(
        prediction.astype(jnp.float32),
        target,
        mask,
        norm_pix_loss=config.norm_pix_loss,
        collective=collective,
    )


def _flat_values(state: nnx.State) -> dict[tuple[Any, ...], jax.Array]:
    return {path: variable.get_value() for path, variable in nnx.to_flat_state(state)}


def _with_values(
    state: nnx.State, values: Mapping[tuple[Any, ...], jax.Array]
) -> nnx.State:
    return nnx.from_flat_state(
        [
            (path, variable.replace(values[path]))
            for path, variable in nnx.to_flat_state(state)
        ]
    )


def _learning_rates(config: PretrainConfig) -> np.ndarray:
    """Return :func:`warmup_cosine_lr` at steps ``0 .. total_steps``, float32.

    The warm-up lasts ``warmup_epochs * steps_per_epoch`` steps, capped at
    ``total_steps``. The last entry is the final rate, used for every later step.
    """
    warmup_steps = min(
        config.warmup_epochs * config.steps_per_epoch, config.total_steps
    )
    return np.array(
        [
            warmup_cosine_lr(
                step,
                base_lr=config.lr,
                warmup_steps=warmup_steps,
                total_steps=config.total_steps,
            )
            for step in range(config.total_steps + 1)
        ],
        dtype=np.float32,
    )


def build_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
    """Return AdamW with the warm-up and cosine schedule of ``config``.

    The schedule looks up a table of :func:`warmup_cosine_lr`, so each step uses
    exactly the rate the PyTorch trainer uses. The optimiser state does not
    depend on the schedule.
    """
    table = _learning_rates(config) if config.total_steps > 0 else np.zeros(1)
    table = table.astype(np.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return jnp.asarray(table)[jnp.minimum(count, table.shape[0] - 1)]

    return optax.adamw(
        schedule,
        b1=_ADAM_BETAS[0],
        b2=_ADAM_BETAS[1],
        eps=_ADAM_EPS,
        weight_decay=config.weight_decay,
    )


def make_gradient_step(
    config: PretrainConfig,
    graphdef: nnx.GraphDef,
    target_graphdef: nnx.GraphDef,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[Any, ...]]:
    """Return the pure function that computes one step's loss and gradient.

    ``gradient_step(params, stats, target_params, target_stats, key, batch)``
    returns ``(loss, grads, stats, target_stats, key)``. The key is split once,
    and the sub-key drives the augmentations and MAE's mask (:func:`prepare_inputs`
    on the whole batch). The gradient is taken with respect to the online
    parameters only.

    With ``mesh``, the networks (whose batch norms must be
    :class:`~sslspec_jax.distributed.SyncBatchNorm`) and the loss run under
    :func:`sslspec_jax.distributed.data_parallel`, each device on its rows of the
    random inputs, and the losses get a
    :class:`~sslspec_jax.distributed.MeshCollective`. The parameters enter
    unsharded and ``shard_map``'s variance check is on, so ``jax.grad`` inside the
    mapped function already returns the gradient of the global loss, the same on
    every device and equal to the single-device gradient. Adding a ``pmean`` or
    dividing by the device count would be wrong.
    """
    collective = None if mesh is None else MeshCollective.for_mesh(mesh)

    def local_gradient(
        params: nnx.State,
        stats: nnx.State,
        target_params: nnx.State,
        target_stats: nnx.State,
        inputs: tuple[jax.Array, ...],
    ) -> tuple[Any, ...]:
        def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[nnx.State, ...]]:
            # copy=True gives fresh Variables at this trace level, so batch norm
            # may update them. Flax rejects updates to the Variables of the
            # enclosing jit trace.
            online = nnx.merge(graphdef, params, stats, copy=True)
            target = nnx.merge(target_graphdef, target_params, target_stats, copy=True)
            loss = inputs_loss(config, online, target, inputs, collective=collective)
            new_stats = nnx.state(online, nnx.BatchStat)
            new_target_stats = nnx.state(target, nnx.BatchStat)
            return loss, (new_stats, new_target_stats)

        (loss, (stats, target_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(params)
        return loss, grads, stats, target_stats

    gradient = (
        local_gradient
        if mesh is None
        else data_parallel(local_gradient, mesh, batch_argnums=(4,))
    )

    def gradient_step(
        params: nnx.State,
        stats: nnx.State,
        target_params: nnx.State,
        target_stats: nnx.State,
        key: jax.Array,
        batch: jax.Array,
    ) -> tuple[Any, ...]:
        key, step_key = jax.random.split(key)
        inputs = prepare_inputs(config, batch, KeyRandom(step_key))
        loss, grads, stats, target_stats = gradient(
            params, stats, target_params, target_stats, tuple(inputs)
        )
        return loss, grads, stats, target_stats, key

    return gradient_step


def make_train_step(
    config: PretrainConfig,
    graphdef: nnx.GraphDef,
    target_graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[Any, ...]]:
    """Return the pure training step of ``config.method``.

    ``step(params, stats, target_params, target_stats, opt_state, key, batch)``
    returns ``(params, stats, target_stats, opt_state, key, loss)``: the loss and
    gradient of :func:`make_gradient_step` (data-parallel over ``mesh`` when
    given), then an update of the online parameters by ``optimizer``. Target
    parameters are an input only, so no gradient is taken with respect to them.
    """
    gradient_step = make_gradient_step(config, graphdef, target_graphdef, mesh)

    def step(
        params: nnx.State,
        stats: nnx.State,
        target_params: nnx.State,
        target_stats: nnx.State,
        opt_state: optax.OptState,
        key: jax.Array,
        batch: jax.Array,
    ) -> tuple[Any, ...]:
        loss, grads, stats, target_stats, key = gradient_step(
            params, stats, target_params, target_stats, key, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, stats, target_stats, opt_state, key, loss

    return step


def make_encode(
    method: str, eval_graphdef: nnx.GraphDef, mesh: Mesh | None = None
) -> Callable[[nnx.State, nnx.State, jax.Array], jax.Array]:
    """Return the jitted evaluation-mode encoder ``(params, stats, inputs) ->
    features``.

    With ``mesh`` the features come back replicated on its devices, so every
    host of a multi-host mesh can read them.
    """

    def encode(params: nnx.State, stats: nnx.State, inputs: jax.Array) -> jax.Array:
        encoder = nnx.merge(eval_graphdef, params, stats, copy=True)["encoder"]
        features = encoder.features(inputs) if method == "mae" else encoder(inputs)
        return features.astype(jnp.float32)

    if mesh is None:
        return jax.jit(encode)
    return jax.jit(encode, out_shardings=NamedSharding(mesh, P()))


class _CompileCache:
    """Compiled training steps and encoders shared by trainers of one process.

    Two trainers with the same configuration, sample shape and device (a run and
    its resumed copy, or a run and its random-initialisation baseline) build the
    same graph, so the second reuses the first one's executable. Keys contain the
    configuration as JSON, without the fields that do not change the graph. The
    cache keeps the ``size`` most recent entries.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_CACHE = _CompileCache()
# Config fields that do not change the compiled functions. The seed only sets the
# key and the initial parameters, which are inputs. The epoch count only matters
# through total_steps, which is part of the key.
_GRAPH_INDEPENDENT_OPTIONS = frozenset({"backend", "data", "device", "epochs", "seed"})


class JaxTrainer:
    """One pretraining run of ``config.method`` on every device of one JAX
    platform.

    The networks are :func:`sslspec.networks.method_networks` built as Flax NNX
    modules and kept in functional form (a graph definition plus parameter and
    batch-statistic states) on the device. Initialisation uses PyTorch's default
    distributions (:mod:`sslspec_jax.networks`) with keys derived from
    ``config.seed``. BYOL's target networks start as copies of the online ones and
    follow them with :func:`sslspec.ema_update` after every step.

    The optimiser is :func:`optax.adamw` over every trainable parameter (biases and
    norm parameters included, as ``torch.optim.AdamW``), betas (0.9, 0.999), eps
    1e-8, with the learning rate of :func:`sslspec.schedules.warmup_cosine_lr`:
    linear warm-up over ``warmup_epochs * steps_per_epoch`` steps, then cosine
    decay to zero at ``total_steps``. The schedule is tabulated from that function,
    so both backends use the same rate at every step.

    One training step (augmentations, forward pass, loss, gradient, AdamW update)
    is one function compiled with :func:`jax.jit` ahead of time on the first batch
    and reused for every batch of the same shape. Its random numbers come from a
    JAX key that is split once per step. BYOL's target update runs after the
    compiled step, since :func:`sslspec.ema_update` takes the momentum as a
    Python float.

    With ``precision="bf16"`` linear layers, convolutions and attention compute in
    bfloat16, while parameters, batch norm, layer norm, the optimiser and the
    losses stay in float32.

    Data parallelism: when JAX has more than one device of the platform of
    ``device`` (``jax.devices(platform)``: every local device, or every device
    of every host after ``jax.distributed.initialize()``), the trainer uses all
    of them, and the device index only selects the platform. Every batch norm
    becomes a :class:`~sslspec_jax.distributed.SyncBatchNorm` over the mesh
    axis. Parameters, batch statistics, optimiser state and the key are
    replicated on every device. Each step draws the augmentations and MAE's mask
    for the whole batch with the same key as on one device, shards them along
    the batch axis, and runs the networks and the losses (with a
    :class:`~sslspec_jax.distributed.MeshCollective`) under ``jax.shard_map``.
    The loss, the gradient, the update and BYOL's target update therefore equal
    those of one device on the whole batch, up to float32 rounding.
    ``config.batch_size`` must be a multiple of the device count.

    Parameters
    ----------
    config
        The run's configuration; ``total_steps`` and ``steps_per_epoch`` must be
        set before :meth:`train_step` is called.
    sample_shape
        Shape of one sample, ``(C, H, W)`` or ``(F,)``.
    device
        A device string that :func:`sslspec_jax.backend.resolve_device` accepts;
        ``config.device`` when omitted.
    data_parallel
        Set to ``False`` to train on ``device`` alone even when the platform has
        more devices.

    Raises
    ------
    ValueError
        If the device is not available, or ``config.batch_size`` is not a
        multiple of the number of devices.
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        sample_shape: Sequence[int],
        device: str | None = None,
        data_parallel: bool = True,
    ) -> None:
        self.config = config
        self.sample_shape = tuple(int(size) for size in sample_shape)
        self.device_name = resolve_device(config.device if device is None else device)
        self.device = jax_device(self.device_name)
        #: The devices that train, in mesh order; ``[self.device]`` without a mesh.
        self.devices = [self.device]
        if data_parallel:
            # NOTE: after jax.distributed.initialize() this spans every host.
            # That path has not been run; the tests simulate devices in one
            # process.
            self.devices = list(jax.devices(self.device.platform))
        #: The one-axis mesh over :attr:`devices`, or ``None`` on one device.
        self.mesh = data_mesh(self.devices) if len(self.devices) > 1 else None
        if config.batch_size % len(self.devices):
            raise ValueError(
                f"batch_size {config.batch_size} does not split evenly over the "
                f"{len(self.devices)} {self.device.platform} devices that train "
                f"data-parallel; choose a batch size that is a multiple of "
                f"{len(self.devices)}"
            )
        self.descriptions = method_networks(
            config.method, self.sample_shape, config.sizes
        )
        self.online_prefixes = [
            prefix for prefix in self.descriptions if not prefix.startswith("target_")
        ]
        self.target_prefixes = [
            prefix for prefix in self.descriptions if prefix.startswith("target_")
        ]
        self.compute_dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32

        init_key, augment_key = jax.random.split(jax.random.key(config.seed))
        with jax.default_device(self.device):
            online = nnx.Dict(
                {
                    prefix: self._for_mesh(
                        build_network(
                            self.descriptions[prefix],
                            rngs=nnx.Rngs(params=jax.random.fold_in(init_key, index)),
                            dtype=self.compute_dtype,
                        )
                    )
                    for index, prefix in enumerate(self.online_prefixes)
                }
            )
            target = nnx.Dict(
                {
                    prefix: nnx.clone(online[prefix.removeprefix("target_")])
                    for prefix in self.target_prefixes
                }
            )
        online.train()
        target.train()
        self._graphdef, params, stats = nnx.split(online, nnx.Param, nnx.BatchStat)
        self._target_graphdef, target_params, target_stats = nnx.split(
            target, nnx.Param, nnx.BatchStat
        )
        online.eval()
        self._eval_graphdef = nnx.graphdef(online)

        self._optimizer = build_optimizer(config)
        self._optimizer_config = config
        put = self._put
        self.params = put(params)
        self.batch_stats = put(stats)
        self.target_params = put(target_params)
        self.target_stats = put(target_stats)
        self.opt_state = put(self._optimizer.init(self.params))
        self.key = put(augment_key)
        self.step = 0

        self.compile_seconds: float | None = None

    # Setup

    def _for_mesh(self, network: nnx.Module) -> Any:
        """Return ``network`` with synchronised batch norm when there is a mesh."""
        if self.mesh is None:
            return network
        return convert_sync_batchnorm(network)

    def _placement(self) -> jax.Device | NamedSharding:
        if self.mesh is None:
            return self.device
        return NamedSharding(self.mesh, P())

    def _put(self, tree: Any) -> Any:
        """Return ``tree`` on the trainer's device, or replicated on every device
        of the mesh, in buffers of its own.

        The copy matters because the training step donates its inputs: a buffer
        shared between two arguments (an online parameter and its target copy, or
        a host array aliased by ``device_put``) cannot be donated.
        """
        return jax.tree.map(
            lambda leaf: jnp.array(leaf, copy=True),
            jax.device_put(tree, self._placement()),
        )

    def _cache_key(self, *extra: Any) -> tuple[Any, ...]:
        values = {
            name: value
            for name, value in self.config.to_dict().items()
            if name not in _GRAPH_INDEPENDENT_OPTIONS
        }
        config = json.dumps(values, sort_keys=True, default=str)
        devices = tuple(device.id for device in self.devices)
        return (config, self.sample_shape, self.device_name, devices, *extra)

    # Training

    def _step_arguments(self, batch: jax.Array) -> tuple[Any, ...]:
        return (
            self.params,
            self.batch_stats,
            self.target_params,
            self.target_stats,
            self.opt_state,
            self.key,
            batch,
        )

    def _compiled_step(self, batch: jax.Array) -> Callable[..., Any]:
        """Return the compiled step for this batch shape, compiling it on first
        use (and again if ``self.config`` is replaced)."""
        if self._optimizer_config is not self.config:
            # The schedule depends on the config, but the optimiser state does not.
            self._optimizer = build_optimizer(self.config)
            self._optimizer_config = self.config
        key = self._cache_key("train", tuple(batch.shape), str(batch.dtype))
        compiled = _CACHE.get(key)
        if compiled is None:
            start = time.perf_counter()
            step = make_train_step(
                self.config,
                self._graphdef,
                self._target_graphdef,
                self._optimizer,
                self.mesh,
            )
            if self.mesh is None:
                jitted = jax.jit(step, donate_argnums=(0, 1, 3, 4, 5))
            else:
                # Replicated outputs keep the next step's inputs on the shardings
                # that the executable was compiled for.
                jitted = jax.jit(
                    step,
                    donate_argnums=(0, 1, 3, 4, 5),
                    out_shardings=self._placement(),
                )
            compiled = jitted.lower(*self._step_arguments(batch)).compile()
            seconds = time.perf_counter() - start
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds
            logger.info(
                "compiled the %s training step for batch shape %s on %d devices "
                "in %.2f s",
                self.config.method,
                tuple(batch.shape),
                len(self.devices),
                seconds,
            )
            _CACHE.put(key, compiled)
        elif self.compile_seconds is None:
            self.compile_seconds = 0.0
        return compiled

    def _to_device(self, inputs: np.ndarray | jax.Array) -> jax.Array:
        """Return ``inputs`` as float32 on the device, or split along the batch
        axis over the mesh."""
        host = inputs if isinstance(inputs, jax.Array) else np.asarray(inputs)
        if tuple(host.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"batch must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                f"got {tuple(host.shape)}"
            )
        if self.mesh is None:
            return jax.device_put(jnp.asarray(host, dtype=jnp.float32), self.device)
        count = len(self.devices)
        if host.shape[0] % count:
            raise ValueError(
                f"a batch of {host.shape[0]} samples does not split evenly over the "
                f"{count} devices that train data-parallel; pass a multiple of "
                f"{count} samples"
            )
        values = np.asarray(host, dtype=np.float32)
        # Each device takes its rows from the whole batch, so on a mesh over
        # several hosts every host must pass the same global batch (the driver
        # does, since its batch order depends only on the seed and the epoch).
        return jax.make_array_from_callback(
            values.shape, batch_sharding(self.mesh), lambda index: values[index]
        )

    def train_step(self, batch: np.ndarray) -> float:
        """Run one AdamW step on two augmented views of ``batch``; return the loss.

        For BYOL the loss is symmetrised, ``byol_loss(p_a, t_b) + byol_loss(p_b,
        t_a)``, with the target projections under :func:`jax.lax.stop_gradient`,
        and the target networks are updated after the step.
        """
        if self.config.total_steps < 1:
            raise ValueError(
                "config.total_steps must be set to the run's number of steps before "
                f"training, got {self.config.total_steps}"
            )
        inputs = self._to_device(batch)
        compiled = self._compiled_step(inputs)
        (
            self.params,
            self.batch_stats,
            self.target_stats,
            self.opt_state,
            self.key,
            loss,
        ) = compiled(*self._step_arguments(inputs))
        if self.target_prefixes:
            self._update_targets()
        self.step += 1
        return float(loss)

    def _update_targets(self) -> None:
        config = self.config
        momentum = sslspec.momentum_schedule(
            self.step,
            config.total_steps,
            base_momentum=config.base_momentum,
            final_momentum=config.final_momentum,
        )
        online = _flat_values(self.params)
        target = _flat_values(self.target_params)
        updated: dict[tuple[Any, ...], jax.Array] = {}
        for prefix in self.target_prefixes:
            source = prefix.removeprefix("target_")
            online_group = {
                path[1:]: value for path, value in online.items() if path[0] == source
            }
            target_group = {
                path[1:]: value for path, value in target.items() if path[0] == prefix
            }
            moved = sslspec.ema_update(online_group, target_group, momentum=momentum)
            updated |= {(prefix, *path): value for path, value in moved.items()}
        self.target_params = _with_values(self.target_params, updated)

    def loss_and_gradients(self, batch: np.ndarray) -> tuple[float, dict[str, Any]]:
        """Return the loss and the gradient that the next :meth:`train_step` would
        take, without changing any state.

        The gradient maps canonical parameter names to NumPy arrays in the
        canonical layout. With a mesh it is the gradient of the global loss and
        equals the single-device gradient up to float32 rounding. The function is
        compiled on every call, so this is for tests and debugging.
        """
        inputs = self._to_device(batch)
        gradient_step = make_gradient_step(
            self.config, self._graphdef, self._target_graphdef, self.mesh
        )
        loss, grads, _, _, _ = jax.jit(gradient_step)(
            self.params,
            self.batch_stats,
            self.target_params,
            self.target_stats,
            self.key,
            inputs,
        )
        return float(loss), state_to_canonical(grads)

    def extra_metrics(self) -> dict[str, float | int]:
        """Return backend-specific figures for ``metrics.json``: the number of
        devices that train (``devices``) and the seconds spent compiling the
        training step (``compile_seconds``), once known."""
        metrics: dict[str, float | int] = {"devices": len(self.devices)}
        if self.compile_seconds is not None:
            metrics["compile_seconds"] = self.compile_seconds
        return metrics

    # Evaluation

    def _encoder(self) -> Callable[..., jax.Array]:
        key = self._cache_key("encode")
        encode = _CACHE.get(key)
        if encode is None:
            encode = make_encode(self.config.method, self._eval_graphdef, self.mesh)
            _CACHE.put(key, encode)
        return encode

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Return the encoder's features ``(N, D)`` as float32, in evaluation mode.

        Batch norm uses its running statistics. The MAE encoder takes every patch
        (no mask) and its normed tokens are averaged. Inputs go through in batches of
        :data:`ENCODE_BATCH_SIZE`; the last one is zero-padded to that size, so
        one compiled function serves every batch (padding cannot change other
        rows, since nothing mixes samples in evaluation mode). With a mesh each
        batch is split over the devices and padded to a multiple of their count.
        """
        count = len(inputs)
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        size = min(ENCODE_BATCH_SIZE, count)
        size = -(-size // len(self.devices)) * len(self.devices)
        encode = self._encoder()
        features = []
        for start in range(0, count, size):
            chunk = np.asarray(inputs[start : start + size], dtype=np.float32)
            rows = len(chunk)
            if rows < size:
                padding = np.zeros((size - rows, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, padding])
            output = encode(self.params, self.batch_stats, self._to_device(chunk))
            features.append(np.asarray(output)[:rows])
        return np.concatenate(features)

    # State

    def _network_arrays(self) -> dict[str, np.ndarray]:
        canonical = {}
        for state in (
            self.params,
            self.batch_stats,
            self.target_params,
            self.target_stats,
        ):
            canonical |= state_to_canonical(state)
        return {
            name: canonical[name] for name in flat_parameter_shapes(self.descriptions)
        }

    def _adam_state(self) -> optax.ScaleByAdamState:
        adam = self.opt_state[0]
        if not isinstance(adam, optax.ScaleByAdamState):
            raise TypeError(
                f"expected optax.adamw's state to start with ScaleByAdamState, got "
                f"{type(adam).__name__}"
            )
        return adam

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return networks, optimiser and random state as NumPy arrays.

        Names follow the PyTorch trainer, so both backends read each other's
        optimiser state. The entries are:

        - ``{network}.{canonical name}`` for every parameter and buffer, BYOL's
          target networks included;
        - ``optimizer.exp_avg.{parameter}`` and ``optimizer.exp_avg_sq.{parameter}``,
          AdamW's first and second moments in the canonical layout;
        - ``optimizer.step``, the number of steps taken (int64);
        - ``rng.key``, the raw data of the JAX key (uint32).
        """
        state = self._network_arrays()
        adam = self._adam_state()
        for key, moment in zip(_MOMENTS, (adam.mu, adam.nu), strict=True):
            for name, value in state_to_canonical(moment).items():
                state[f"optimizer.{key}.{name}"] = value
        state[_STEP_NAME] = np.array(self.step, dtype=np.int64)
        state[_KEY_NAME] = np.asarray(jax.random.key_data(self.key)).copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output, or a PyTorch trainer's.

        The ``optimizer.`` group is optional as a whole and must be complete when
        present, so a state with only network tensors loads the weights and keeps
        the optimiser. ``rng.key`` restores the JAX key. Random state of another
        backend (``rng.`` entries without ``rng.key``) cannot seed a JAX key, so it
        is skipped with a log message.

        Raises
        ------
        ValueError
            Naming every missing, unexpected or misshapen entry.
        """
        problems = []
        network = {
            name: value
            for name, value in state.items()
            if not name.startswith(("optimizer.", "rng."))
        }
        expected = flat_parameter_shapes(self.descriptions)
        missing = [name for name in expected if name not in network]
        unexpected = sorted(set(network) - set(expected))
        if missing:
            problems.append("missing " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected " + ", ".join(unexpected))
        problems += _shape_problems(network, expected)

        trainable = {
            canonical_name(path): expected[canonical_name(path)]
            for path, _ in nnx.to_flat_state(self.params)
        }
        optimizer_expected = {
            f"optimizer.{key}.{name}": shape
            for key in _MOMENTS
            for name, shape in trainable.items()
        }
        optimizer_expected[_STEP_NAME] = ()
        optimizer_given = [name for name in state if name.startswith("optimizer.")]
        if optimizer_given:
            problems += _group_problems(state, "optimizer.", optimizer_expected)

        key_shape = tuple(jax.random.key_data(self.key).shape)
        rng_given = [name for name in state if name.startswith("rng.")]
        load_key = _KEY_NAME in state
        if load_key:
            problems += _group_problems(state, "rng.", {_KEY_NAME: key_shape})
        elif rng_given:
            logger.info(
                "random state %s comes from another backend; keeping the JAX key "
                "seeded from config.seed",
                ", ".join(sorted(rng_given)),
            )
        if problems:
            raise ValueError(
                "state does not match this trainer: " + "; ".join(problems)
            )

        self._load_networks(network)
        if optimizer_given:
            self._load_optimizer(state)
        if load_key:
            data = np.asarray(state[_KEY_NAME], dtype=np.uint32)
            self.key = self._put(jax.random.wrap_key_data(jnp.asarray(data)))

    def _load_networks(self, network: Mapping[str, np.ndarray]) -> None:
        def load(state: nnx.State) -> nnx.State:
            return self._put(canonical_to_state(state, network, strict=False))

        self.params = load(self.params)
        self.batch_stats = load(self.batch_stats)
        self.target_params = load(self.target_params)
        self.target_stats = load(self.target_stats)

    def _load_optimizer(self, state: Mapping[str, np.ndarray]) -> None:
        step = int(np.asarray(state[_STEP_NAME]))
        moments = []
        for key in _MOMENTS:
            prefix = f"optimizer.{key}."
            values = {
                name.removeprefix(prefix): value
                for name, value in state.items()
                if name.startswith(prefix)
            }
            moments.append(self._put(canonical_to_state(self.params, values)))
        adam = self._adam_state()

        def count() -> jax.Array:
            # A separate buffer per counter, since the step donates each one.
            return self._put(jnp.asarray(step, dtype=adam.count.dtype))

        rest = tuple(
            part._replace(count=count())
            if isinstance(part, optax.ScaleByScheduleState)
            else part
            for part in self.opt_state[1:]
        )
        adam = adam._replace(count=count(), mu=moments[0], nu=moments[1])
        self.opt_state = (adam, *rest)
        self.step = step


def _shape_problems(
    state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    return [
        f"{name} has shape {tuple(np.shape(state[name]))}, expected {shape}"
        for name, shape in expected.items()
        if name in state and tuple(np.shape(state[name])) != tuple(shape)
    ]


def _group_problems(
    state: Mapping[str, np.ndarray],
    group: str,
    expected: Mapping[str, tuple[int, ...]],
) -> list[str]:
    problems = []
    missing = [name for name in expected if name not in state]
    unexpected = [
        name for name in state if name.startswith(group) and name not in expected
    ]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(sorted(unexpected)))
    return problems + _shape_problems(state, expected)
