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

import sslspec
from sslspec.augment import augment_images, two_views
from sslspec.config import PretrainConfig
from sslspec.networks import flat_parameter_shapes, method_networks
from sslspec.schedules import warmup_cosine_lr

from .backend import jax_device, resolve_device
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
    "make_encode",
    "make_train_step",
    "method_loss",
]

logger = logging.getLogger(__name__)

#: Batch size of :meth:`JaxTrainer.encode`.
ENCODE_BATCH_SIZE = 1024

_ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults
_ADAM_EPS = 1e-8
_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch names of Adam's first and second moments
_KEY_NAME = "rng.key"
_STEP_NAME = "optimizer.step"


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
    if config.method == "mae":
        return _mae_loss(config, online, batch, random)

    view_a, view_b = two_views(batch, random, config.augment)
    views = jnp.concatenate([view_a, view_b])
    projections = online["projector"](online["encoder"](views))
    z_a, z_b = jnp.split(projections.astype(jnp.float32), 2)

    if config.method == "simclr":
        return sslspec.nt_xent_loss(z_a, z_b, temperature=config.temperature)
    if config.method == "barlow-twins":
        return sslspec.barlow_twins_loss(z_a, z_b, lambda_param=config.lambda_param)
    if config.method == "vicreg":
        return sslspec.vicreg_loss(
            z_a,
            z_b,
            invariance_weight=config.invariance_weight,
            variance_weight=config.variance_weight,
            covariance_weight=config.covariance_weight,
        )

    predictions = online["predictor"](projections)
    p_a, p_b = jnp.split(predictions.astype(jnp.float32), 2)
    targets = target["target_projector"](target["target_encoder"](views))
    targets = targets.astype(jnp.float32)
    if stop_target_gradient:
        targets = jax.lax.stop_gradient(targets)
    t_a, t_b = jnp.split(targets, 2)
    return sslspec.byol_loss(p_a, t_b) + sslspec.byol_loss(p_b, t_a)


def _mae_loss(
    config: PretrainConfig, online: nnx.Module, batch: jax.Array, random: KeyRandom
) -> jax.Array:
    encoder = online["encoder"]
    images = augment_images(batch, random, config.augment)
    noise = random.uniform((images.shape[0], encoder.description.num_patches))
    mask = sslspec.generate_mask(noise, mask_ratio=config.mask_ratio)
    latent = encoder(images, mask.ids_keep)
    prediction = online["decoder"](latent, mask.ids_restore)
    target = sslspec.patchify(images, encoder.description.patch_size)
    return sslspec.reconstruction_loss(
        prediction.astype(jnp.float32),
        target,
        mask.mask,
        norm_pix_loss=config.norm_pix_loss,
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


def make_train_step(
    config: PretrainConfig,
    graphdef: nnx.GraphDef,
    target_graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[Any, ...]]:
    """Return the pure training step of ``config.method``.

    ``step(params, stats, target_params, target_stats, opt_state, key, batch)``
    returns ``(params, stats, target_stats, opt_state, key, loss)``: the key is
    split once, the sub-key drives the augmentations and MAE's mask, and AdamW
    updates the online parameters. Target parameters are an input only, so no
    gradient is taken with respect to them.
    """

    def step(
        params: nnx.State,
        stats: nnx.State,
        target_params: nnx.State,
        target_stats: nnx.State,
        opt_state: optax.OptState,
        key: jax.Array,
        batch: jax.Array,
    ) -> tuple[Any, ...]:
        key, step_key = jax.random.split(key)

        def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple[nnx.State, ...]]:
            # copy=True gives fresh Variables at this trace level, so batch norm
            # may update them. Flax rejects updates to the Variables of the
            # enclosing jit trace.
            online = nnx.merge(graphdef, params, stats, copy=True)
            target = nnx.merge(target_graphdef, target_params, target_stats, copy=True)
            loss = method_loss(config, online, target, batch, KeyRandom(step_key))
            new_stats = nnx.state(online, nnx.BatchStat)
            new_target_stats = nnx.state(target, nnx.BatchStat)
            return loss, (new_stats, new_target_stats)

        (loss, (stats, target_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, stats, target_stats, opt_state, key, loss

    return step


def make_encode(
    method: str, eval_graphdef: nnx.GraphDef
) -> Callable[[nnx.State, nnx.State, jax.Array], jax.Array]:
    """Return the jitted evaluation-mode encoder ``(params, stats, inputs) ->
    features``."""

    def encode(params: nnx.State, stats: nnx.State, inputs: jax.Array) -> jax.Array:
        encoder = nnx.merge(eval_graphdef, params, stats, copy=True)["encoder"]
        features = encoder.features(inputs) if method == "mae" else encoder(inputs)
        return features.astype(jnp.float32)

    return jax.jit(encode)


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
    """One pretraining run of ``config.method`` on one JAX device.

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
    """

    def __init__(
        self,
        config: PretrainConfig,
        *,
        sample_shape: Sequence[int],
        device: str | None = None,
    ) -> None:
        self.config = config
        self.sample_shape = tuple(int(size) for size in sample_shape)
        self.device_name = resolve_device(config.device if device is None else device)
        self.device = jax_device(self.device_name)
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
                    prefix: build_network(
                        self.descriptions[prefix],
                        rngs=nnx.Rngs(params=jax.random.fold_in(init_key, index)),
                        dtype=self.compute_dtype,
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

    def _put(self, tree: Any) -> Any:
        """Return ``tree`` on the trainer's device in buffers of its own.

        The copy matters because the training step donates its inputs: a buffer
        shared between two arguments (an online parameter and its target copy, or
        a host array aliased by ``device_put``) cannot be donated.
        """
        return jax.tree.map(
            lambda leaf: jnp.array(leaf, copy=True), jax.device_put(tree, self.device)
        )

    def _cache_key(self, *extra: Any) -> tuple[Any, ...]:
        values = {
            name: value
            for name, value in self.config.to_dict().items()
            if name not in _GRAPH_INDEPENDENT_OPTIONS
        }
        config = json.dumps(values, sort_keys=True, default=str)
        return (config, self.sample_shape, self.device_name, *extra)

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
                self.config, self._graphdef, self._target_graphdef, self._optimizer
            )
            jitted = jax.jit(step, donate_argnums=(0, 1, 3, 4, 5))
            compiled = jitted.lower(*self._step_arguments(batch)).compile()
            seconds = time.perf_counter() - start
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds
            logger.info(
                "compiled the %s training step for batch shape %s in %.2f s",
                self.config.method,
                tuple(batch.shape),
                seconds,
            )
            _CACHE.put(key, compiled)
        elif self.compile_seconds is None:
            self.compile_seconds = 0.0
        return compiled

    def _to_device(self, inputs: np.ndarray | jax.Array) -> jax.Array:
        host = inputs if isinstance(inputs, jax.Array) else np.asarray(inputs)
        if tuple(host.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"batch must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                f"got {tuple(host.shape)}"
            )
        return jax.device_put(jnp.asarray(host, dtype=jnp.float32), self.device)

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

    def extra_metrics(self) -> dict[str, float]:
        """Return backend-specific figures for ``metrics.json``: the seconds spent
        compiling the training step (``compile_seconds``), once known."""
        if self.compile_seconds is None:
            return {}
        return {"compile_seconds": self.compile_seconds}

    # Evaluation

    def _encoder(self) -> Callable[..., jax.Array]:
        key = self._cache_key("encode")
        encode = _CACHE.get(key)
        if encode is None:
            encode = make_encode(self.config.method, self._eval_graphdef)
            _CACHE.put(key, encode)
        return encode

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Return the encoder's features ``(N, D)`` as float32, in evaluation mode.

        Batch norm uses its running statistics. The MAE encoder takes every patch
        (no mask) and its normed tokens are averaged. Inputs go through in batches of
        :data:`ENCODE_BATCH_SIZE`; the last one is zero-padded to that size, so
        one compiled function serves every batch (padding cannot change other
        rows, since nothing mixes samples in evaluation mode).
        """
        count = len(inputs)
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        size = min(ENCODE_BATCH_SIZE, count)
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
