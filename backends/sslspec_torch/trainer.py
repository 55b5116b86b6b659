"""Pretraining on PyTorch: the :class:`sslspec.backend.Trainer` of the torch backend."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

import sslspec
from sslspec.augment import augment_images, two_views
from sslspec.config import PretrainConfig
from sslspec.networks import method_networks
from sslspec.schedules import warmup_cosine_lr

from .networks import build_module, canonical_state, check_canonical, load_canonical

__all__ = ["TorchRandomSource", "TorchTrainer"]

logger = logging.getLogger(__name__)

#: Batch size of :meth:`TorchTrainer.encode`.
ENCODE_BATCH_SIZE = 1024


class TorchRandomSource:
    """:class:`sslspec.augment.RandomSource` drawing from a ``torch.Generator``.

    Numbers are drawn directly on the generator's device in ``dtype``, so the
    augmentations never leave the device.
    """

    def __init__(
        self, generator: torch.Generator, *, dtype: torch.dtype = torch.float32
    ) -> None:
        self.generator = generator
        self.dtype = dtype

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(
            shape,
            generator=self.generator,
            device=self.generator.device,
            dtype=self.dtype,
        )

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(
            shape,
            generator=self.generator,
            device=self.generator.device,
            dtype=self.dtype,
        )


class _OnlineForward(nn.Module):
    """The online networks' forward pass of one method, as one module.

    ``DistributedDataParallel`` averages the gradients of the parameters used in
    calls through its wrapper's ``forward``, so every trainable network of a step
    runs here: encoder and projector (and BYOL's predictor), or MAE's encoder and
    decoder. BYOL's target networks have no trainable parameters and run outside.
    """

    def __init__(self, networks: nn.ModuleDict, prefixes: Sequence[str], method: str):
        super().__init__()
        self.online = nn.ModuleDict({prefix: networks[prefix] for prefix in prefixes})
        self.method = method

    def forward(
        self,
        inputs: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        ids_restore: torch.Tensor | None = None,
    ) -> Any:
        if self.method == "mae":
            latent = self.online["encoder"](inputs, ids_keep)
            return self.online["decoder"](latent, ids_restore)
        projections = self.online["projector"](self.online["encoder"](inputs))
        if self.method == "byol":
            return projections, self.online["predictor"](projections)
        return projections


class TorchTrainer:
    """One pretraining run of ``config.method`` on one PyTorch device.

    The networks are :func:`sslspec.networks.method_networks` built as PyTorch
    modules, initialised from PyTorch's generator seeded with ``config.seed``
    (the global generator is forked, so its state is left untouched). BYOL's
    target networks start as copies of the online ones and follow them with
    :func:`sslspec.ema_update` after every step.

    The optimiser is AdamW on the trainable parameters, with the learning rate of
    :func:`sslspec.schedules.warmup_cosine_lr` set before every step (linear
    warm-up over ``warmup_epochs * steps_per_epoch`` steps, then cosine decay to
    zero at ``total_steps``). Augmentations and MAE's mask noise draw from a
    ``torch.Generator`` on the device, seeded with ``config.seed``.

    With ``precision="bf16"`` the networks run under ``torch.autocast`` in
    bfloat16, while the parameters, the optimiser and the losses stay in float32.

    With ``config.nproc_per_node > 1`` the trainer is one rank of a data-parallel
    run and needs an initialised process group of that many ranks
    (:func:`sslspec_torch.distributed.init_process_group`). ``device`` is then
    ``"auto"``, ``"cpu"`` or ``"cuda"``, and a CUDA rank takes the GPU of its local
    rank. Every rank receives the same global batch in :meth:`train_step` and draws
    the augmentations and masks of the whole batch from its generator, so the
    generators of all ranks stay equal to that of a single-process run. It then
    keeps the rows :func:`~sslspec_torch.distributed.rank_slice` gives it. Batch
    norms are :class:`~sslspec_torch.distributed.SyncBatchNorm`, the losses get a
    :class:`~sslspec_torch.distributed.TorchCollective`, and the online networks
    run through one ``DistributedDataParallel`` module, which averages the
    gradients over ranks. The loss, the weights and the optimiser state are then
    those of a single-process step on the whole batch, within float32 rounding,
    and equal on every rank.

    Parameters
    ----------
    config
        The run's configuration; ``total_steps`` and ``steps_per_epoch`` must be
        set before :meth:`train_step` is called.
    sample_shape
        Shape of one sample, ``(C, H, W)`` or ``(F,)``.
    device
        A concrete device string such as ``"cpu"`` or ``"cuda:0"``.
    """

    def __init__(
        self, config: PretrainConfig, *, sample_shape: Sequence[int], device: str
    ) -> None:
        self.config = config
        self.sample_shape = tuple(int(size) for size in sample_shape)
        self.rank = 0
        self.world_size = 1
        self.collective: Any = None
        if config.nproc_per_node > 1:
            from .distributed import TorchCollective, resolve_rank_device

            self.collective = TorchCollective()
            if self.collective.world_size != config.nproc_per_node:
                raise ValueError(
                    f"config.nproc_per_node is {config.nproc_per_node}, but the "
                    f"process group has {self.collective.world_size} ranks"
                )
            self.rank = self.collective.rank
            self.world_size = self.collective.world_size
            self.device = resolve_rank_device(device)
        else:
            self.device = torch.device(device)
        self.descriptions = method_networks(
            config.method, self.sample_shape, config.sizes
        )
        self.online_prefixes = [
            prefix for prefix in self.descriptions if not prefix.startswith("target_")
        ]
        self.target_prefixes = [
            prefix for prefix in self.descriptions if prefix.startswith("target_")
        ]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            modules = {
                prefix: build_module(self.descriptions[prefix])
                for prefix in self.online_prefixes
            }
        for prefix in self.target_prefixes:
            target = copy.deepcopy(modules[prefix.removeprefix("target_")])
            target.requires_grad_(False)
            modules[prefix] = target
        self.networks = nn.ModuleDict(modules)
        if self.world_size > 1:
            from .distributed import convert_sync_batchnorm

            convert_sync_batchnorm(self.networks)
        self.networks.to(self.device)
        self.networks.train()
        forward = _OnlineForward(self.networks, self.online_prefixes, config.method)
        if self.world_size > 1:
            from .distributed import current_environment, wrap_ddp

            self.forward: nn.Module = wrap_ddp(
                forward, current_environment(str(self.device.type))
            )
        else:
            self.forward = forward

        parameters = [
            parameter
            for prefix in self.online_prefixes
            for parameter in self.networks[prefix].parameters()
        ]
        self.optimizer = torch.optim.AdamW(
            parameters, lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.random = TorchRandomSource(self.generator)
        self.step = 0

    # Training

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _learning_rate(self) -> float:
        config = self.config
        warmup_steps = min(
            config.warmup_epochs * config.steps_per_epoch, config.total_steps
        )
        return warmup_cosine_lr(
            self.step,
            base_lr=config.lr,
            warmup_steps=warmup_steps,
            total_steps=config.total_steps,
        )

    def _to_device(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            tensor = batch
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        tensor = tensor.to(device=self.device, dtype=torch.float32)
        expected = self.sample_shape
        if tuple(tensor.shape[1:]) != expected:
            raise ValueError(
                f"batch must have shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(tensor.shape)}"
            )
        return tensor

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return this rank's rows of a tensor that covers the global batch."""
        if self.world_size == 1:
            return tensor
        from .distributed import rank_slice

        return tensor[rank_slice(len(tensor), self.rank, self.world_size)]

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.method == "mae":
            return self._mae_loss(batch)

        view_a, view_b = two_views(batch, self.random, config.augment)
        # Both views go through the networks as one batch, so batch norm
        # normalises with statistics over both views.
        views = torch.cat([self._local(view_a), self._local(view_b)])
        collective = self.collective
        with self._autocast():
            outputs = self.forward(views)
        if config.method != "byol":
            z_a, z_b = outputs.float().chunk(2)
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

        _, predictions = outputs
        p_a, p_b = predictions.float().chunk(2)
        with torch.no_grad():
            with self._autocast():
                targets = self.networks["target_projector"](
                    self.networks["target_encoder"](views)
                )
            t_a, t_b = targets.float().chunk(2)
        return sslspec.byol_loss(p_a, t_b, collective=collective) + sslspec.byol_loss(
            p_b, t_a, collective=collective
        )

    def _mae_loss(self, batch: torch.Tensor) -> torch.Tensor:
        config = self.config
        encoder = self.networks["encoder"]
        images = augment_images(batch, self.random, config.augment)
        noise = self.random.uniform((images.shape[0], encoder.description.num_patches))
        mask = sslspec.generate_mask(noise, mask_ratio=config.mask_ratio)
        images = self._local(images)
        with self._autocast():
            prediction = self.forward(
                images, self._local(mask.ids_keep), self._local(mask.ids_restore)
            )
        target = sslspec.patchify(images, encoder.description.patch_size)
        return sslspec.reconstruction_loss(
            prediction.float(),
            target,
            self._local(mask.mask),
            norm_pix_loss=config.norm_pix_loss,
            collective=self.collective,
        )

    def _update_targets(self) -> None:
        config = self.config
        momentum = sslspec.momentum_schedule(
            self.step,
            config.total_steps,
            base_momentum=config.base_momentum,
            final_momentum=config.final_momentum,
        )
        with torch.no_grad():
            for prefix in self.target_prefixes:
                online = dict(
                    self.networks[prefix.removeprefix("target_")].named_parameters()
                )
                target = dict(self.networks[prefix].named_parameters())
                updated = sslspec.ema_update(online, target, momentum=momentum)
                for name, tensor in target.items():
                    tensor.copy_(updated[name])

    def train_step(self, batch: np.ndarray) -> float:
        """Run one AdamW step on two augmented views of ``batch``; return the loss.

        In a data-parallel run ``batch`` is the global batch, the same on every
        rank, and the loss is that of the global batch. For BYOL the loss is
        symmetrised, ``byol_loss(p_a, t_b) + byol_loss(p_b, t_a)``, with the target
        network's projections ``t`` computed without gradient, and the target
        networks are updated after the step.
        """
        if self.config.total_steps < 1:
            raise ValueError(
                "config.total_steps must be set to the run's number of steps before "
                f"training, got {self.config.total_steps}"
            )
        inputs = self._to_device(batch)
        learning_rate = self._learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

        loss = self._loss(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.target_prefixes:
            self._update_targets()
        self.step += 1
        return float(loss.detach())

    # Evaluation

    def _batches(self, inputs: np.ndarray) -> Iterator[torch.Tensor]:
        for start in range(0, len(inputs), ENCODE_BATCH_SIZE):
            yield self._to_device(inputs[start : start + ENCODE_BATCH_SIZE])

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Return the encoder's features ``(N, D)`` as float32, in evaluation mode.

        Batch norm uses its running statistics. The MAE encoder receives every patch
        and its normed tokens are averaged.
        """
        encoder = self.networks["encoder"]
        was_training = encoder.training
        encoder.eval()
        features = []
        try:
            with torch.no_grad():
                for batch in self._batches(inputs):
                    if self.config.method == "mae":
                        output = encoder.features(batch)
                    else:
                        output = encoder(batch)
                    features.append(output.float().cpu().numpy())
        finally:
            encoder.train(was_training)
        if not features:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(features)

    # State

    def _network_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for prefix, description in self.descriptions.items():
            for name, tensor in canonical_state(
                self.networks[prefix], description
            ).items():
                tensors[f"{prefix}.{name}"] = tensor
        return tensors

    def _parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        parameters = {}
        for prefix in self.online_prefixes:
            for name, parameter in self.networks[prefix].named_parameters():
                parameters[f"{prefix}.{name}"] = parameter
        return parameters

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return networks, optimiser and random state as NumPy arrays.

        Names: ``{network}.{canonical name}`` for every parameter and buffer
        (BYOL's target networks included), ``optimizer.exp_avg.{parameter}`` and
        ``optimizer.exp_avg_sq.{parameter}`` (AdamW's first and second moments,
        zero before the first step), ``optimizer.step`` (steps taken, int64) and
        ``rng.augment`` (the ``torch.Generator`` state, uint8).
        """
        state = {
            name: tensor.detach().cpu().numpy().copy()
            for name, tensor in self._network_tensors().items()
        }
        for name, parameter in self._parameters_by_name().items():
            moments = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                value = moments.get(key)
                state[f"optimizer.{key}.{name}"] = (
                    value.detach().cpu().numpy().copy()
                    if value is not None
                    else np.zeros(tuple(parameter.shape), dtype=np.float32)
                )
        state["optimizer.step"] = np.array(self.step, dtype=np.int64)
        state["rng.augment"] = self.generator.get_state().numpy().copy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output.

        The ``optimizer.`` group is optional as a whole, so a state with only
        network tensors (for example for evaluation) loads the weights and leaves
        the optimiser as it is; a group that is present must be complete.
        ``rng.augment`` restores the generator. Random state of another backend
        (``rng.`` entries without ``rng.augment``) cannot seed a
        ``torch.Generator``, so it is ignored with a warning.

        Raises
        ------
        ValueError
            Naming every missing, unexpected or misshapen entry.
        """
        problems = []
        network_state = {
            name: value
            for name, value in state.items()
            if not name.startswith(("optimizer.", "rng."))
        }
        known_prefixes = tuple(f"{prefix}." for prefix in self.descriptions)
        unexpected = [
            name for name in network_state if not name.startswith(known_prefixes)
        ]
        if unexpected:
            problems.append("unexpected " + ", ".join(sorted(unexpected)))
        for prefix, description in self.descriptions.items():
            params = {
                name.removeprefix(f"{prefix}."): value
                for name, value in network_state.items()
                if name.startswith(f"{prefix}.")
            }
            try:
                check_canonical(params, description, prefix=f"{prefix}.")
            except ValueError as error:
                problems.append(f"{prefix}: {error}")

        parameters = self._parameters_by_name()
        optimizer_names = {
            f"optimizer.{key}.{name}": tuple(parameter.shape)
            for name, parameter in parameters.items()
            for key in ("exp_avg", "exp_avg_sq")
        }
        optimizer_names["optimizer.step"] = ()
        given = {name for name in state if name.startswith("optimizer.")}
        if given:
            problems += _group_problems(state, optimizer_names)
        rng_shape = tuple(self.generator.get_state().shape)
        if "rng.augment" in state and np.shape(state["rng.augment"]) != rng_shape:
            problems.append(
                f"rng.augment has shape {np.shape(state['rng.augment'])}, expected "
                f"{rng_shape}; the generator state of a {self.device.type} device "
                f"cannot be restored from another kind of device"
            )
        foreign = [
            name for name in state if name.startswith("rng.") and name != "rng.augment"
        ]
        if foreign and "rng.augment" not in state:
            logger.warning(
                "random state %s is not a torch.Generator state, so the generator "
                "keeps its current state",
                ", ".join(foreign),
            )
        if problems:
            raise ValueError(
                "state does not match this trainer: " + "; ".join(problems)
            )

        for prefix, description in self.descriptions.items():
            params = {
                name.removeprefix(f"{prefix}."): value
                for name, value in network_state.items()
                if name.startswith(f"{prefix}.")
            }
            load_canonical(self.networks[prefix], description, params)
        if given:
            step = int(np.asarray(state["optimizer.step"]))
            for name, parameter in parameters.items():
                self.optimizer.state[parameter] = {
                    "step": torch.tensor(float(step), dtype=torch.float32),
                    "exp_avg": _tensor_like(
                        state[f"optimizer.exp_avg.{name}"], parameter
                    ),
                    "exp_avg_sq": _tensor_like(
                        state[f"optimizer.exp_avg_sq.{name}"], parameter
                    ),
                }
            self.step = step
        if "rng.augment" in state:
            self.generator.set_state(
                torch.from_numpy(np.array(state["rng.augment"], dtype=np.uint8))
            )


def _group_problems(
    state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    group = expected and next(iter(expected)).split(".", 1)[0] + "."
    problems = []
    missing = [name for name in expected if name not in state]
    unexpected = [
        name for name in state if name.startswith(group) and name not in expected
    ]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    for name, shape in expected.items():
        if name in state and tuple(np.shape(state[name])) != shape:
            problems.append(
                f"{name} has shape {tuple(np.shape(state[name]))}, expected {shape}"
            )
    return problems


def _tensor_like(value: np.ndarray, parameter: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(value)).to(
        device=parameter.device, dtype=parameter.dtype
    )
