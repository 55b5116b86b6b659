"""Backend plugins: the protocol a framework implements, and their discovery.

A backend supplies what the Array API standard lacks: networks, device placement,
random numbers, autodiff and optimisers, and collectives. Backends register an
object (or a zero-argument callable returning one) under the entry-point group
``sslspec.backends``::

    [project.entry-points."sslspec.backends"]
    mybackend = "my_package:MyBackend"

:func:`load_backend` instantiates one by name; :func:`list_backends` reports every
installed one, with the reason for any that cannot load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ENTRY_POINT_GROUP",
    "CAPABILITIES",
    "Backend",
    "Trainer",
    "BackendInfo",
    "BackendUnavailableError",
    "list_backends",
    "load_backend",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sslspec.backends"

#: Capabilities a backend may declare, and the methods each one promises.
CAPABILITIES = {
    "autodiff": "value_and_grad",
    "jit": "jit",
    "networks": "apply_network",
    "training": "create_trainer",
    "distributed": "launch or collective support for multi-device training",
}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is not installed or fails to load."""


@runtime_checkable
class Trainer(Protocol):
    """One pretraining run of one method on one backend.

    The driver (:mod:`sslspec.pretrain`) owns data, batching, epochs, checkpoints
    and evaluation; a trainer owns the networks, the optimiser, random numbers, the
    two augmented views and the loss. All arrays that cross this interface are
    NumPy arrays, so the driver never imports a framework.
    """

    def train_step(self, batch: np.ndarray) -> float:
        """Run one optimisation step on a batch of raw samples; return the loss."""
        ...

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Return encoder features (before any projection head) in evaluation mode."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """Return everything needed to resume: canonical parameters and buffers
        (``prefix.name`` from :func:`sslspec.networks.flat_parameter_shapes`),
        optimiser state under ``optimizer.`` and random state under ``rng.``.
        """
        ...

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output; raise ``ValueError`` naming any
        missing, unexpected or misshapen entry."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A framework plugin. ``capabilities`` lists which optional methods work.

    A backend with the ``distributed`` capability provides collectives for
    data-parallel training, and may also provide a method that ``sslspec pretrain
    --nproc-per-node N`` uses to start its processes. It is not part of this
    protocol, so that ``isinstance`` accepts backends without it::

        def launch(self, function, args=(), *, nproc_per_node, device="auto"):
            ...

    It runs the module-level ``function(*args)`` in ``nproc_per_node`` processes
    on this machine, each of which has joined the framework's process group on
    ``device``, and returns the return values in rank order. When a process
    fails it stops the others and raises a ``RuntimeError`` that names the failed
    rank. A trainer that it creates with ``config.nproc_per_node > 1`` trains its
    share of each global batch, returns the global loss, and has an int ``rank``
    attribute; rank 0 writes the checkpoints. ``sslspec_torch`` implements it.
    """

    name: str
    capabilities: frozenset[str]

    def version(self) -> str:
        """Return the framework's version string."""
        ...

    def devices(self) -> list[str]:
        """Return the devices available now, as strings ``--device`` accepts."""
        ...

    def namespace(self) -> Any:
        """Return the Array API namespace of this backend's arrays."""
        ...

    def resolve_device(self, device: str) -> str:
        """Map ``"auto"`` or a user string to a concrete device, or raise
        ``ValueError`` naming the device and the available ones."""
        ...

    def dtypes(self) -> tuple[str, ...]:
        """Return the floating dtypes supported, by name (``"float32"``, ...)."""
        ...

    def asarray(
        self, array: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> Any:
        """Convert a NumPy array to this backend, optionally cast and placed."""
        ...

    def to_numpy(self, array: Any) -> np.ndarray:
        """Convert one of this backend's arrays to NumPy (float64 for bfloat16)."""
        ...

    def device_of(self, array: Any) -> str:
        """Return the device of an array as a string ``resolve_device`` accepts."""
        ...

    # "autodiff"
    def value_and_grad(
        self, fn: Callable[..., Any], *arrays: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        """Return ``fn(*arrays)`` (a scalar) and its gradient for each array."""
        ...

    # "jit"
    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``fn`` compiled with the framework's compiler."""
        ...

    # "networks"
    def apply_network(
        self,
        description: Any,
        params: Mapping[str, np.ndarray],
        inputs: Any,
        *,
        ids_restore: np.ndarray | None = None,
        ids_keep: np.ndarray | None = None,
        train: bool = False,
    ) -> np.ndarray:
        """Build ``description`` natively with the canonical ``params`` and return
        its output on ``inputs`` as NumPy. ``ids_keep`` selects visible tokens of a
        :class:`~sslspec.networks.ViTEncoder`; ``ids_restore`` is required by a
        :class:`~sslspec.networks.MAEDecoder`. ``train`` selects batch statistics
        in batch norm."""
        ...

    # "training"
    def create_trainer(self, config: Any, *, sample_shape: Sequence[int]) -> Trainer:
        """Return a :class:`Trainer` for ``config`` (a
        :class:`sslspec.pretrain.PretrainConfig`)."""
        ...


@dataclass(frozen=True)
class BackendInfo:
    """What ``sslspec backends`` reports for one installed backend."""

    name: str
    version: str | None = None
    devices: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    error: str | None = None
    target: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.error is None


def _entry_points() -> dict[str, Any]:
    found = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name, entry_point)
    return found


def backend_names() -> list[str]:
    """Return the names of every registered backend, loadable or not."""
    return sorted(_entry_points())


def load_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises
    ------
    BackendUnavailableError
        If no backend has that name, or if importing it fails (for instance when the
        framework is not installed); the message gives the cause and the fix.
    """
    registered = _entry_points()
    if name not in registered:
        known = ", ".join(sorted(registered)) or "none"
        raise BackendUnavailableError(
            f"backend {name!r} is not registered; registered backends: {known} "
            f"(`sslspec backends` shows which of them can load)"
        )
    entry_point = registered[name]
    try:
        target = entry_point.load()
        backend = target() if callable(target) else target
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend {name!r} ({entry_point.value}) cannot be imported: {error}. "
            f"Install its framework, for example `pip install 'sslspec[{name}]'`."
        ) from error
    except Exception as error:
        raise BackendUnavailableError(
            f"backend {name!r} ({entry_point.value}) failed to load: "
            f"{type(error).__name__}: {error}"
        ) from error
    return backend


def list_backends() -> list[BackendInfo]:
    """Report every registered backend: version, devices and capabilities, or the
    reason it cannot load."""
    infos = []
    for name, entry_point in sorted(_entry_points().items()):
        try:
            backend = load_backend(name)
            info = BackendInfo(
                name=name,
                version=backend.version(),
                devices=tuple(backend.devices()),
                capabilities=tuple(sorted(backend.capabilities)),
                target=entry_point.value,
            )
        except BackendUnavailableError as error:
            logger.debug("backend %s unavailable: %s", name, error)
            info = BackendInfo(name=name, error=str(error), target=entry_point.value)
        infos.append(info)
    return infos
