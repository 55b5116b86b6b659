"""The JAX backend: device placement, dtypes, autodiff, jit and networks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslspec import networks as spec

from . import networks

__all__ = ["JaxBackend", "device_name", "jax_device", "list_devices"]

logger = logging.getLogger(__name__)

# jax.Device.platform -> the prefix used in device strings. JAX calls CUDA and
# ROCm devices "gpu", and they are named "cuda" here, as PyTorch names both.
_PLATFORM_NAMES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "cuda"}
_ACCELERATOR_ALIASES = {"cuda": "cuda", "gpu": "cuda", "tpu": "tpu"}


def device_name(device: jax.Device) -> str:
    """Return ``device`` as a string ``--device`` accepts, such as ``"cuda:0"``."""
    prefix = _PLATFORM_NAMES.get(device.platform, device.platform)
    return f"{prefix}:{device.id}"


def list_devices() -> list[jax.Device]:
    """Return the devices of the default JAX platform, then the CPU devices if the
    default platform is an accelerator."""
    found = list(jax.devices())
    if all(device.platform != "cpu" for device in found):
        try:
            found += jax.devices("cpu")
        except RuntimeError:
            logger.debug("JAX has no CPU platform alongside %s", found[0].platform)
    return found


def jax_device(name: str) -> jax.Device:
    """Return the :class:`jax.Device` for a resolved device string."""
    for device in list_devices():
        if device_name(device) == name:
            return device
    available = ", ".join(device_name(device) for device in list_devices())
    raise ValueError(f"device {name!r} not found; available devices: {available}")


def resolve_device(device: str) -> str:
    """Resolve ``auto``, ``cpu``, ``cuda``/``gpu`` and ``tpu`` (optionally with
    ``:N``) to a concrete device string."""
    if not isinstance(device, str):
        raise ValueError(
            f"device must be a string such as 'auto' or 'cuda:0', got {device!r}"
        )
    names = [device_name(d) for d in list_devices()]
    request = device.strip().lower()
    if request == "auto":
        accelerators = [name for name in names if not name.startswith("cpu")]
        return (accelerators or names)[0]
    kind, _, index = request.partition(":")
    kind = _ACCELERATOR_ALIASES.get(kind, kind)
    if index and not index.isdigit():
        raise ValueError(
            f"device index must be a non-negative integer, got {device!r}; expected "
            "'auto', 'cpu', 'cuda', 'cuda:N', 'gpu', 'gpu:N' or one of: "
            + ", ".join(names)
        )
    candidate = f"{kind}:{int(index) if index else 0}"
    if candidate not in names:
        raise ValueError(
            f"device {device!r} is not available; available devices: "
            f"{', '.join(names)} (or 'auto')"
        )
    return candidate


_DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
}


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _jax_dtype(dtype: str | Any) -> Any:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if name == "float64" and not _x64_enabled():
        raise ValueError(
            "dtype 'float64' needs 64-bit JAX; set JAX_ENABLE_X64=1 or call "
            "jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    return _DTYPES[name]


class JaxBackend:
    """JAX backend: ``jax.numpy`` arrays, Flax NNX networks and optax training.

    Devices are named ``cpu:N`` and ``cuda:N`` (every JAX GPU device, CUDA or
    ROCm) or ``tpu:N``. float64 is offered only when 64-bit mode is enabled
    (``JAX_ENABLE_X64=1``).
    """

    name = "jax"
    capabilities = frozenset({"autodiff", "jit", "networks", "training"})

    def version(self) -> str:
        return jax.__version__

    def devices(self) -> list[str]:
        return [device_name(device) for device in list_devices()]

    def namespace(self) -> Any:
        return jnp

    def resolve_device(self, device: str) -> str:
        return resolve_device(device)

    def dtypes(self) -> tuple[str, ...]:
        names = ("float32", "float16", "bfloat16")
        return ("float64", *names) if _x64_enabled() else names

    def asarray(
        self,
        array: np.ndarray,
        *,
        dtype: str | None = None,
        device: str | None = None,
    ) -> jax.Array:
        """Convert ``array`` to a JAX array with :func:`jax.device_put`.

        Without ``dtype``, a float64 array becomes float32 unless 64-bit mode is
        enabled, as everywhere in JAX.
        """
        target = jax_device(resolve_device(device)) if device is not None else None
        if isinstance(array, jax.Array):
            converted = array if dtype is None else array.astype(_jax_dtype(dtype))
            return converted if target is None else jax.device_put(converted, target)
        host = np.asarray(array)
        if dtype is not None:
            host = host.astype(_jax_dtype(dtype))
        return jax.device_put(host, target)

    def to_numpy(self, array: Any) -> np.ndarray:
        host = np.asarray(jax.device_get(array))
        if host.dtype == jnp.bfloat16:
            return host.astype(np.float64)
        return host

    def device_of(self, array: Any) -> str:
        devices = array.devices()
        if len(devices) != 1:
            raise ValueError(
                f"array is sharded over {len(devices)} devices; expected one device"
            )
        return device_name(next(iter(devices)))

    def value_and_grad(
        self, fn: Callable[..., Any], *arrays: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        if not arrays:
            raise ValueError("value_and_grad needs at least one array to differentiate")
        argnums = tuple(range(len(arrays)))
        value, grads = jax.value_and_grad(fn, argnums=argnums)(*arrays)
        return value, tuple(grads)

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return jax.jit(fn)

    def apply_network(
        self,
        description: spec.NetworkDescription,
        params: Mapping[str, np.ndarray],
        inputs: Any,
        *,
        ids_restore: np.ndarray | None = None,
        ids_keep: np.ndarray | None = None,
        train: bool = False,
    ) -> np.ndarray:
        """Build ``description`` as an NNX module holding the canonical ``params``
        and return its output on ``inputs`` as NumPy.

        Matrix products run at full float32 precision
        (``jax.default_matmul_precision("highest")``), so that outputs agree with
        other backends to float32 rounding on GPUs that would otherwise use TF32.
        A :class:`~sslspec.networks.ViTEncoder` returns its normed tokens
        ``(B, K, D)``.
        """
        if isinstance(description, spec.MAEDecoder) and ids_restore is None:
            raise ValueError("ids_restore is required to apply an MAEDecoder, got None")
        device = self._input_device(inputs)
        model = networks.from_canonical(description, params, device=device)
        if train:
            model.train()
        else:
            model.eval()
        x = jax.device_put(jnp.asarray(inputs), device)
        with jax.default_matmul_precision("highest"):
            if isinstance(description, spec.MAEDecoder):
                output = model(x, jax.device_put(jnp.asarray(ids_restore), device))
            elif isinstance(description, spec.ViTEncoder):
                keep = None if ids_keep is None else jnp.asarray(ids_keep)
                output = model(x, keep)
            else:
                output = model(x)
        return self.to_numpy(output)

    def _input_device(self, inputs: Any) -> jax.Device:
        if isinstance(inputs, jax.Array):
            devices = inputs.devices()
            if len(devices) == 1:
                return next(iter(devices))
        return jax_device(resolve_device("auto"))

    def create_trainer(self, config: Any, *, sample_shape: Sequence[int]) -> Any:
        """Return a :class:`~sslspec_jax.trainer.JaxTrainer` on the device that
        ``config.device`` resolves to."""
        from .trainer import JaxTrainer

        device = self.resolve_device(config.device)
        return JaxTrainer(config, sample_shape=tuple(sample_shape), device=device)
