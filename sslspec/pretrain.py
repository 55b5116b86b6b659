"""The pretraining driver: data, epochs, checkpoints, evaluation and the run folder.

The driver never imports a framework. It loads the data as NumPy and gets a
:class:`~sslspec.backend.Trainer` from the backend named in the config. It feeds the
trainer batches in an order that depends only on ``(seed, epoch)`` and writes an
atomic checkpoint of the trainer's state after every epoch. A run folder holds:

- ``config.json``: the :class:`~sslspec.config.PretrainConfig`;
- ``checkpoint.safetensors``: the state after the last completed epoch
  (:mod:`sslspec.checkpoint`);
- ``metrics.json``: training time, loss history and the evaluation accuracies;
- ``loss.png``, ``spectrum.png`` and ``pca.png`` (:mod:`sslspec.plots`).

A resumed run (``resume_run``) reloads the trainer state, including the optimiser
and the random generator, and continues at the next epoch, so it reproduces the
loss history of an uninterrupted run with the same seed on the same device.

With ``nproc_per_node > 1`` the backend's ``launch`` (capability
``distributed``) starts that many processes, each running :func:`train_rank`.
Every rank gets the same global batches and trains its share of each one. The
loss is the global loss, equal on every rank, so every rank checks it and all
stop at the same step. Rank 0 alone writes the checkpoints. This process then
evaluates the final checkpoint on its own, as :func:`evaluate_run` does.
``batch_size`` stays the global batch, so the run's losses and weights do not
depend on the number of processes, up to float32 rounding that AdamW amplifies
(docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Backend, BackendUnavailableError, Trainer, load_backend
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)
from .config import AugmentConfig, PretrainConfig
from .data import MIN_BATCH_SIZE, DataError, Dataset, epoch_batches, load_dataset
from .data import steps_per_epoch as count_steps
from .evaluation import evaluate_features
from .networks import METHODS, flat_parameter_shapes, method_networks

__all__ = [
    "PretrainConfig",
    "METHOD_DEFAULTS",
    "CONFIG_NAME",
    "METRICS_NAME",
    "RESUMABLE_OPTIONS",
    "TrainingError",
    "default_config",
    "default_run_dir",
    "pretrain",
    "resume_run",
    "evaluate_run",
    "read_config",
    "train_rank",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
#: Options that may differ from the saved configuration when a run is resumed.
RESUMABLE_OPTIONS = ("epochs", "device", "nproc_per_node")

_IMAGE_AUGMENT = AugmentConfig(
    crop_scale=(0.5, 1.0),
    max_rotation_degrees=15.0,
    max_translation=0.1,
    noise_std=0.05,
    erase_probability=0.0,
)

#: Per-method settings that override :class:`PretrainConfig`'s defaults, tuned so
#: that each method's default run on the digits takes one to two minutes on two
#: CPU cores (see docs/results.md for the measured accuracies).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 2e-3,
        "temperature": 0.2,
        "augment": _IMAGE_AUGMENT,
    },
    "byol": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 2e-3,
        "base_momentum": 0.99,
        "augment": _IMAGE_AUGMENT,
    },
    "barlow-twins": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 2e-3,
        "lambda_param": 0.005,
        "augment": _IMAGE_AUGMENT,
    },
    "vicreg": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 2e-3,
        "augment": _IMAGE_AUGMENT,
    },
    "mae": {
        "epochs": 100,
        "batch_size": 256,
        "lr": 2e-3,
        "mask_ratio": 0.75,
        "augment": AugmentConfig(
            crop_scale=(0.8, 1.0),
            max_rotation_degrees=5.0,
            max_translation=0.05,
            noise_std=0.0,
            erase_probability=0.0,
        ),
    },
}


class TrainingError(RuntimeError):
    """Raised when training cannot go on, for example when the loss is not finite."""


def default_config(method: str = "simclr", **overrides: Any) -> PretrainConfig:
    """Return the tuned configuration of ``method`` with ``overrides`` applied.

    Overrides that are ``None`` are ignored, so command-line options that were not
    given keep the method's defaults.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values: dict[str, Any] = dict(METHOD_DEFAULTS[method])
    values |= {key: value for key, value in overrides.items() if value is not None}
    return PretrainConfig(method=method, **values)


def default_run_dir(
    method: str, backend: str, *, root: str | os.PathLike[str] = "runs"
) -> Path:
    """Return ``root/<method>-<backend>-<YYYYmmdd-HHMMSS>``, with a numeric suffix
    if that folder exists."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{method}-{backend}-{stamp}"
    candidate = base
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def read_config(run_dir: str | os.PathLike[str]) -> PretrainConfig:
    """Read ``config.json`` of a run folder.

    Raises
    ------
    CheckpointError
        If the folder or its ``config.json`` is missing or invalid.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_NAME
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} not found")
    try:
        values = json.loads(path.read_text())
        return PretrainConfig.from_dict(values)
    except FileNotFoundError:
        raise CheckpointError(
            f"{str(path)!r} not found: {str(run_dir)!r} is not an sslspec run folder"
        ) from None
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r} is invalid: {error}") from error


def _write_json(path: Path, values: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(values, indent=2, sort_keys=False) + "\n").encode())


def _load_backend(name: str) -> Backend:
    backend = load_backend(name)
    missing = {"training", "networks"} - set(backend.capabilities)
    if missing:
        raise BackendUnavailableError(
            f"backend {name!r} cannot pretrain: it lacks the capabilities "
            f"{', '.join(sorted(missing))}"
        )
    return backend


def _check_fit(config: PretrainConfig, dataset: Dataset) -> None:
    """Raise ``DataError`` if the data does not suit the method's networks."""
    try:
        networks = method_networks(config.method, dataset.sample_shape, config.sizes)
        flat_parameter_shapes(networks)
    except ValueError as error:
        raise DataError(
            f"data {dataset.source!r} (samples of shape {dataset.sample_shape}) does "
            f"not suit method {config.method!r}: {error}"
        ) from error
    if config.batch_size < MIN_BATCH_SIZE:
        raise ValueError(
            f"batch_size must be at least {MIN_BATCH_SIZE}, because batch norm and "
            f"the losses' batch statistics need two samples, got {config.batch_size}"
        )
    batch_size = min(config.batch_size, len(dataset.x_train))
    if batch_size % config.nproc_per_node:
        raise ValueError(
            f"batches of {batch_size} samples (the {len(dataset.x_train)} training "
            f"samples of {dataset.source}) must be a multiple of nproc_per_node "
            f"{config.nproc_per_node}"
        )
    if config.batch_size > len(dataset.x_train):
        logger.warning(
            "batch size %d exceeds the %d training samples of %s; batches will "
            "have %d samples",
            config.batch_size,
            len(dataset.x_train),
            dataset.source,
            len(dataset.x_train),
        )


def _check_launch(config: PretrainConfig, backend: Backend) -> None:
    """Raise ``ValueError`` if the backend cannot start ``nproc_per_node``
    processes."""
    if config.nproc_per_node == 1:
        return
    if "distributed" not in backend.capabilities or not callable(
        getattr(backend, "launch", None)
    ):
        raise ValueError(
            f"nproc_per_node {config.nproc_per_node} needs a backend that starts "
            f"one process per device, and backend {config.backend!r} does not (it "
            f"has no launch method); use nproc_per_node 1 with it. A backend that "
            f"uses every local device from one process, such as jax, needs no "
            f"extra processes"
        )


def _with_schedule(config: PretrainConfig, dataset: Dataset) -> PretrainConfig:
    steps = count_steps(len(dataset.x_train), config.batch_size)
    return config.replace(steps_per_epoch=steps, total_steps=steps * config.epochs)


def _absolute_data(config: PretrainConfig) -> PretrainConfig:
    if config.data == "digits":
        return config
    return config.replace(data=str(Path(config.data).expanduser().resolve()))


def pretrain(
    config: PretrainConfig,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Pretrain from scratch, evaluate, and write the run folder.

    Parameters
    ----------
    config
        The run's configuration; ``steps_per_epoch`` and ``total_steps`` are
        computed here from the data.
    out_dir
        Run folder to create (default :func:`default_run_dir`). It may exist
        but must not contain a ``config.json`` already.
    progress
        Show a tqdm progress bar on standard error.

    Returns
    -------
    dict
        The metrics also written to ``metrics.json``, plus ``run_dir``.

    Raises
    ------
    DataError
        If the data is unusable; raised before training starts.
    ValueError
        If the device is not available or an option is invalid.
    TrainingError
        If the loss becomes NaN or infinite.
    """
    config = _absolute_data(config)
    backend = _load_backend(config.backend)
    _check_launch(config, backend)
    device = backend.resolve_device(config.device)
    dataset = load_dataset(config.data)
    _check_fit(config, dataset)
    config = _with_schedule(config, dataset)

    run_dir = (
        Path(out_dir)
        if out_dir is not None
        else default_run_dir(config.method, config.backend)
    )
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(
            f"--out {str(run_dir)!r} is a file; give a new or existing folder"
        )
    if (run_dir / CONFIG_NAME).exists():
        raise FileExistsError(
            f"{str(run_dir)!r} already contains a run; resume it with --resume or "
            f"choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / CONFIG_NAME, config.to_dict())

    logger.info(
        "training %s on %s with backend %s (%s, processes: %d) for %d epochs of %d "
        "steps; run folder %s",
        config.method,
        dataset.source,
        config.backend,
        device,
        config.nproc_per_node,
        config.epochs,
        config.steps_per_epoch,
        run_dir,
    )
    state = _RunState(epoch=0, step=0, loss_history=[], train_seconds=0.0)
    if config.nproc_per_node > 1:
        return _train_distributed_and_finish(
            config, backend, device, dataset, run_dir, state, progress
        )
    trainer = backend.create_trainer(config, sample_shape=dataset.sample_shape)
    return _train_and_finish(
        config, backend, device, dataset, trainer, run_dir, state, progress
    )


def resume_run(
    run_dir: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    device: str | None = None,
    nproc_per_node: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Continue a run from its last checkpoint, then evaluate it.

    ``epochs`` may raise the run's epoch count. The learning-rate and momentum
    schedules then stretch over the new total, so the loss history differs from
    that of a run started with the new count. ``device`` may move the run to
    another device, and ``nproc_per_node`` may change the number of processes,
    since the global batch and the random state do not depend on it.

    Raises
    ------
    CheckpointError
        If the folder, its config or checkpoint is missing, corrupt, or does not
        match the run (other method, backend, data or network shapes).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    saved = PretrainConfig.from_dict(checkpoint.config)
    if saved.to_dict() != config.to_dict():
        differing = [
            key
            for key, value in config.to_dict().items()
            if saved.to_dict().get(key) != value
        ]
        raise CheckpointError(
            f"checkpoint {str(run_dir / CHECKPOINT_NAME)!r} does not match "
            f"{str(run_dir / CONFIG_NAME)!r}: they differ in "
            f"{', '.join(differing)}"
        )
    if checkpoint.backend != config.backend:
        raise CheckpointError(
            f"checkpoint {str(run_dir / CHECKPOINT_NAME)!r} was written by backend "
            f"{checkpoint.backend!r} but the run uses {config.backend!r}"
        )
    changes: dict[str, Any] = {}
    if epochs is not None:
        if epochs < checkpoint.epoch:
            raise ValueError(
                f"epochs={epochs} is below the {checkpoint.epoch} epochs that "
                f"{str(run_dir)!r} has completed"
            )
        changes["epochs"] = epochs
    if device is not None:
        changes["device"] = device
    if nproc_per_node is not None:
        changes["nproc_per_node"] = nproc_per_node
    config = config.replace(**changes)

    backend = _load_backend(config.backend)
    _check_launch(config, backend)
    resolved_device = backend.resolve_device(config.device)
    dataset = load_dataset(config.data)
    _check_fit(config, dataset)
    steps = count_steps(len(dataset.x_train), config.batch_size)
    if steps != saved.steps_per_epoch:
        raise CheckpointError(
            f"data {config.data!r} now gives {steps} steps per epoch, but the run in "
            f"{str(run_dir)!r} was trained with {saved.steps_per_epoch}; the data "
            f"changed since the run started"
        )
    config = _with_schedule(config, dataset)

    # The whole state is loaded here even for a distributed run, so that a
    # mismatch is reported before any process starts.
    trainer = backend.create_trainer(
        config.replace(nproc_per_node=1), sample_shape=dataset.sample_shape
    )
    try:
        trainer.load_state_dict(checkpoint.tensors)
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {str(run_dir / CHECKPOINT_NAME)!r} does not match the "
            f"run's networks: {error}"
        ) from error
    _write_json(run_dir / CONFIG_NAME, config.to_dict())
    logger.info(
        "resuming %s from epoch %d of %d (step %d)",
        run_dir,
        checkpoint.epoch,
        config.epochs,
        checkpoint.step,
    )
    state = _RunState(
        epoch=checkpoint.epoch,
        step=checkpoint.step,
        loss_history=list(checkpoint.loss_history),
        train_seconds=checkpoint.train_seconds,
    )
    if config.nproc_per_node > 1:
        return _train_distributed_and_finish(
            config, backend, resolved_device, dataset, run_dir, state, progress
        )
    return _train_and_finish(
        config, backend, resolved_device, dataset, trainer, run_dir, state, progress
    )


@dataclasses.dataclass
class _RunState:
    epoch: int
    step: int
    loss_history: list[float]
    train_seconds: float


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        logger.warning("tqdm is not installed, so no progress bar is shown")
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _train_and_finish(
    config: PretrainConfig,
    backend: Backend,
    device: str,
    dataset: Dataset,
    trainer: Trainer,
    run_dir: Path,
    state: _RunState,
    progress: bool,
) -> dict[str, Any]:
    _train(config, dataset, trainer, run_dir, state, progress)
    return _finish(config, backend, device, dataset, trainer, run_dir, state)


def train_rank(
    config_values: dict[str, Any],
    run_dir: str,
    state_values: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Train one rank of a distributed run; the function that ``backend.launch``
    starts in every process.

    The process has joined the backend's process group. It builds its trainer,
    loads the run's checkpoint when ``state_values`` records completed epochs,
    and trains the remaining epochs. Rank 0 writes the checkpoints and shows the
    progress bar. Returns the final ``epoch``, ``step``, ``loss_history`` and
    ``train_seconds``, which are equal on every rank but for the time.
    """
    config = PretrainConfig.from_dict(config_values)
    backend = _load_backend(config.backend)
    dataset = load_dataset(config.data)
    trainer = backend.create_trainer(config, sample_shape=dataset.sample_shape)
    state = _RunState(**state_values)
    path = Path(run_dir)
    if state.epoch:
        trainer.load_state_dict(load_checkpoint(path / CHECKPOINT_NAME).tensors)
    main = getattr(trainer, "rank", 0) == 0
    _train(config, dataset, trainer, path, state, progress and main, save=main)
    return dataclasses.asdict(state)


def _train_distributed_and_finish(
    config: PretrainConfig,
    backend: Backend,
    device: str,
    dataset: Dataset,
    run_dir: Path,
    state: _RunState,
    progress: bool,
) -> dict[str, Any]:
    """Train in ``config.nproc_per_node`` processes, then evaluate the final
    checkpoint in this process."""
    launch = backend.launch  # type: ignore[attr-defined]
    try:
        results = launch(
            train_rank,
            (config.to_dict(), str(run_dir), dataclasses.asdict(state), progress),
            nproc_per_node=config.nproc_per_node,
            device=config.device,
        )
    except RuntimeError as error:
        checkpoint_path = run_dir / CHECKPOINT_NAME
        if checkpoint_path.exists():
            next_step = (
                f"the checkpoint of the last completed epoch, "
                f"{str(checkpoint_path)!r}, is kept; continue with --resume"
            )
        else:
            next_step = "no epoch was completed"
        raise TrainingError(f"{error}; {next_step}") from error
    state = _RunState(**results[0])
    if state.epoch:
        logger.info(
            "trained %d epochs on %d processes in %.1f s; final loss %.5f",
            state.epoch,
            config.nproc_per_node,
            state.train_seconds,
            state.loss_history[-1],
        )
    single = config.replace(nproc_per_node=1)
    trainer = backend.create_trainer(single, sample_shape=dataset.sample_shape)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    trainer.load_state_dict(checkpoint.tensors)
    return _finish(config, backend, device, dataset, trainer, run_dir, state)


def _finish(
    config: PretrainConfig,
    backend: Backend,
    device: str,
    dataset: Dataset,
    trainer: Trainer,
    run_dir: Path,
    state: _RunState,
) -> dict[str, Any]:
    """Evaluate the trained trainer, draw the plots and write ``metrics.json``."""
    single = config.replace(nproc_per_node=1)
    metrics = _evaluate_and_plot(
        single, backend, dataset, trainer, run_dir, state.loss_history
    )
    metrics = {
        "method": config.method,
        "backend": config.backend,
        "backend_version": backend.version(),
        "device": device,
        "nproc_per_node": config.nproc_per_node,
        "data": config.data,
        "seed": config.seed,
        "epochs": config.epochs,
        "steps": state.step,
        "train_seconds": round(state.train_seconds, 3),
        "final_loss": state.loss_history[-1] if state.loss_history else None,
        "loss_history": state.loss_history,
        **metrics,
    }
    extra_metrics = getattr(trainer, "extra_metrics", None)
    if callable(extra_metrics):
        metrics |= extra_metrics()
    _write_json(run_dir / METRICS_NAME, metrics)
    logger.info("finished %s; metrics written to %s", run_dir, run_dir / METRICS_NAME)
    return {**metrics, "run_dir": str(run_dir)}


def _train(
    config: PretrainConfig,
    dataset: Dataset,
    trainer: Trainer,
    run_dir: Path,
    state: _RunState,
    progress: bool,
    *,
    save: bool = True,
) -> None:
    """Train the remaining epochs; write a checkpoint after each one if ``save``."""
    batch_size = min(config.batch_size, len(dataset.x_train))
    bar = _progress_bar(config.total_steps, state.step, progress)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    try:
        for epoch in range(state.epoch, config.epochs):
            started = time.perf_counter()
            losses = []
            batches = epoch_batches(
                len(dataset.x_train), batch_size, seed=config.seed, epoch=epoch
            )
            for indices in batches:
                loss = trainer.train_step(dataset.x_train[indices])
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss} at epoch {epoch + 1}, step "
                        f"{state.step + 1}; {_nan_hint(config)}. The checkpoint "
                        f"of epoch {epoch} in {str(run_dir)!r} is kept"
                    )
                losses.append(loss)
                state.step += 1
                if bar is not None:
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(
                        epoch=epoch + 1,
                        loss=f"{np.mean(losses):.4f}",
                        samples_per_s=f"{len(losses) * batch_size / elapsed:.0f}",
                        refresh=False,
                    )
                    bar.update(1)
            state.train_seconds += time.perf_counter() - started
            state.loss_history.append(float(np.mean(losses)))
            state.epoch = epoch + 1
            if not save:
                continue
            save_checkpoint(
                checkpoint_path,
                trainer.state_dict(),
                config=config.to_dict(),
                backend=config.backend,
                epoch=state.epoch,
                step=state.step,
                loss_history=state.loss_history,
                train_seconds=state.train_seconds,
            )
            logger.debug(
                "epoch %d/%d: loss %.5f, checkpoint %s",
                state.epoch,
                config.epochs,
                state.loss_history[-1],
                checkpoint_path,
            )
    finally:
        if bar is not None:
            bar.close()
    if state.epoch and save:
        logger.info(
            "trained %d epochs in %.1f s; final loss %.5f; checkpoint %s",
            state.epoch,
            state.train_seconds,
            state.loss_history[-1],
            checkpoint_path,
        )


def _nan_hint(config: PretrainConfig) -> str:
    """Return what to change after a non-finite loss."""
    hint = f"lower --lr (now {config.lr})"
    if config.precision != "fp32":
        hint += f" or use --precision fp32 (now {config.precision})"
    return hint


def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)


def _evaluate_and_plot(
    config: PretrainConfig,
    backend: Backend,
    dataset: Dataset,
    trainer: Trainer,
    run_dir: Path,
    loss_history: list[float],
) -> dict[str, Any]:
    """Evaluate the trained encoder, its random initialisation and the raw inputs,
    and draw the plots; return the accuracy entries of ``metrics.json``."""
    from . import plots

    baseline = backend.create_trainer(config, sample_shape=dataset.sample_shape)
    test_features = trainer.encode(dataset.x_test)
    baseline_test = baseline.encode(dataset.x_test)
    results: dict[str, Any] = {
        "knn_accuracy": None,
        "linear_probe_accuracy": None,
        "baseline_knn_accuracy": None,
        "baseline_linear_probe_accuracy": None,
        "raw_knn_accuracy": None,
        "raw_linear_probe_accuracy": None,
        "evaluation": "done",
    }
    if dataset.has_labels:
        feature_sets = {
            "": (trainer.encode(dataset.x_train), test_features),
            "baseline_": (baseline.encode(dataset.x_train), baseline_test),
            "raw_": (_flatten(dataset.x_train), _flatten(dataset.x_test)),
        }
        for prefix, (train_features, features) in feature_sets.items():
            scores = evaluate_features(
                train_features, dataset.y_train, features, dataset.y_test
            )
            for key, value in scores.items():
                results[prefix + key] = value
    else:
        results["evaluation"] = (
            f"skipped: {dataset.source} has no labels, and k-NN and the linear "
            f"probe need labels"
        )
        logger.warning("evaluation %s", results["evaluation"])

    plots.plot_loss(loss_history, run_dir / "loss.png", title=f"{config.method} loss")
    plots.plot_spectrum(
        {"pretrained": test_features, "random init": baseline_test},
        run_dir / "spectrum.png",
    )
    plots.plot_pca(
        test_features,
        dataset.y_test,
        run_dir / "pca.png",
        class_names=dataset.classes,
        title=f"{config.method} test embeddings, 2-D PCA",
    )
    return results


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    backend: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint, rewrite its ``metrics.json`` and plots.

    Parameters
    ----------
    run_dir
        A folder written by :func:`pretrain`.
    backend
        Backend to rebuild the networks with (default: the run's). Checkpoints
        use canonical names, so any backend with the ``networks`` and
        ``training`` capabilities can load any other's weights.
    device
        Device for the networks (default: the run's setting).

    Raises
    ------
    CheckpointError
        If the run folder, its config or checkpoint is missing or corrupt, or the
        weights do not fit the networks.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    changes = {"backend": backend, "device": device}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    nproc_per_node = config.nproc_per_node
    # Evaluation runs in this process, whatever the number of training processes.
    config = config.replace(nproc_per_node=1)
    loaded_backend = _load_backend(config.backend)
    resolved_device = loaded_backend.resolve_device(config.device)
    dataset = load_dataset(config.data)
    _check_fit(config, dataset)

    trainer = loaded_backend.create_trainer(config, sample_shape=dataset.sample_shape)
    weights = {
        name: value
        for name, value in checkpoint.tensors.items()
        if not name.startswith(("optimizer.", "rng."))
    }
    try:
        trainer.load_state_dict(weights)
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {str(run_dir / CHECKPOINT_NAME)!r} does not fit the "
            f"networks of the run's config: {error}"
        ) from error
    logger.info(
        "evaluating %s (epoch %d) with backend %s on %s",
        run_dir,
        checkpoint.epoch,
        config.backend,
        resolved_device,
    )
    results = _evaluate_and_plot(
        config, loaded_backend, dataset, trainer, run_dir, checkpoint.loss_history
    )
    metrics = {
        "method": config.method,
        "backend": config.backend,
        "backend_version": loaded_backend.version(),
        "device": resolved_device,
        "nproc_per_node": nproc_per_node,
        "data": config.data,
        "seed": config.seed,
        "epochs": checkpoint.epoch,
        "steps": checkpoint.step,
        "train_seconds": round(checkpoint.train_seconds, 3),
        "final_loss": checkpoint.loss_history[-1] if checkpoint.loss_history else None,
        "loss_history": checkpoint.loss_history,
        **results,
    }
    if checkpoint.backend != config.backend:
        metrics["trained_with_backend"] = checkpoint.backend
    _write_json(run_dir / METRICS_NAME, metrics)
    return {**metrics, "run_dir": str(run_dir)}
