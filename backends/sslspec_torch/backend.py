"""The PyTorch backend: device placement, arrays, autodiff, networks and training."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sslspec.networks import MAEDecoder, NetworkDescription, ViTEncoder

from .networks import build_module, load_canonical
from .trainer import TorchTrainer

__all__ = ["TorchBackend"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NUMPY_DTYPES = {
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
}
_CUDA_PATTERN = re.compile(r"cuda(?::(\d+))?")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


class TorchBackend:
    """Backend plugin for PyTorch (entry point ``torch``).

    Devices are ``cpu``, ``cuda:N`` and ``mps``. ``auto`` picks the first CUDA
    device, then MPS, then the CPU. With the ``distributed`` capability,
    :meth:`launch` runs a function in several processes that have joined one
    ``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA).
    """

    name = "torch"
    capabilities = frozenset({"autodiff", "distributed", "jit", "networks", "training"})

    def version(self) -> str:
        return torch.__version__

    def devices(self) -> list[str]:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        if _mps_available():
            devices.append("mps")
        return devices

    def namespace(self) -> Any:
        import array_api_compat.torch

        return array_api_compat.torch

    def resolve_device(self, device: str) -> str:
        """Map ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` to an available
        device; ``cuda`` means ``cuda:0``.

        Raises
        ------
        ValueError
            If the string is not a device name or the device is not available;
            the message lists the available devices.
        """
        available = self.devices()
        if device == "auto":
            for candidate in available:
                if candidate.startswith("cuda"):
                    return candidate
            return "mps" if "mps" in available else "cpu"
        if device == "cpu":
            return "cpu"
        match = _CUDA_PATTERN.fullmatch(device)
        if match:
            index = int(match.group(1) or 0)
            if not torch.cuda.is_available():
                reason = (
                    "this PyTorch build has no CUDA support"
                    if torch.version.cuda is None
                    else "no CUDA GPU is visible"
                )
                raise ValueError(
                    f"device {device!r} is not available: {reason} (PyTorch "
                    f"{torch.__version__}); available devices: {', '.join(available)}"
                )
            if index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {device!r} is not available: there are "
                    f"{torch.cuda.device_count()} CUDA devices; available devices: "
                    f"{', '.join(available)}"
                )
            return f"cuda:{index}"
        if device in ("mps", "mps:0"):
            if not _mps_available():
                raise ValueError(
                    f"device {device!r} is not available: MPS needs Apple silicon "
                    f"and a PyTorch build with MPS; available devices: "
                    f"{', '.join(available)}"
                )
            return "mps"
        raise ValueError(
            f"device {device!r} is not a PyTorch device; use auto, cpu, cuda, "
            f"cuda:N or mps (available here: {', '.join(available)})"
        )

    def dtypes(self) -> tuple[str, ...]:
        return tuple(_DTYPES)

    def asarray(
        self,
        array: np.ndarray,
        *,
        dtype: str | None = None,
        device: str | None = None,
    ) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            tensor = array
        else:
            tensor = torch.from_numpy(np.array(array))
        target_dtype = None
        if dtype is not None:
            if dtype not in _DTYPES:
                raise ValueError(
                    f"dtype {dtype!r} is not supported by the torch backend; use one "
                    f"of {', '.join(_DTYPES)}"
                )
            target_dtype = _DTYPES[dtype]
        target_device = None if device is None else self.resolve_device(device)
        return tensor.to(device=target_device, dtype=target_dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        if not isinstance(array, torch.Tensor):
            return np.asarray(array)
        tensor = array.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float64)
        return tensor.cpu().numpy()

    def device_of(self, array: Any) -> str:
        device = array.device
        if device.type == "cuda":
            return f"cuda:{device.index or 0}"
        return device.type

    def value_and_grad(
        self, fn: Callable[..., Any], *arrays: Any
    ) -> tuple[Any, tuple[Any, ...]]:
        """Return ``fn(*arrays)`` and its gradient with respect to each array.

        The inputs are detached copies that require gradients, so the caller's
        tensors are not modified. An input that ``fn`` does not use gets a zero
        gradient.
        """
        inputs = [
            (array if isinstance(array, torch.Tensor) else torch.as_tensor(array))
            .detach()
            .clone()
            .requires_grad_(True)
            for array in arrays
        ]
        value = fn(*inputs)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(
                f"fn must return a scalar tensor, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )
        gradients = torch.autograd.grad(value, inputs, allow_unused=True)
        gradients = tuple(
            torch.zeros_like(tensor) if gradient is None else gradient
            for tensor, gradient in zip(inputs, gradients, strict=True)
        )
        return value.detach(), gradients

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``torch.compile(fn)``; compilation happens on the first call."""
        return torch.compile(fn)

    def apply_network(
        self,
        description: NetworkDescription,
        params: Mapping[str, np.ndarray],
        inputs: Any,
        *,
        ids_restore: np.ndarray | None = None,
        ids_keep: np.ndarray | None = None,
        train: bool = False,
    ) -> np.ndarray:
        """Build ``description`` with the canonical ``params`` and run it on the CPU.

        The module takes the dtype of the parameters (float32 unless they are
        float64). A :class:`~sslspec.networks.ViTEncoder` returns its normed
        tokens ``(B, K, D)``: the visible ones selected by ``ids_keep``, or all
        ``L`` without it. A :class:`~sslspec.networks.MAEDecoder` takes the
        visible tokens ``(B, K, encoder_dim)`` and needs ``ids_restore``. With
        ``train=True`` batch norm normalises with batch statistics.
        """
        module = build_module(description)
        first = next(iter(params.values()), None)
        dtype = _NUMPY_DTYPES.get(np.asarray(first).dtype, torch.float32)
        module = module.to(dtype)
        load_canonical(module, description, params)
        module.train(train)
        tensor = self.asarray(inputs).to(dtype)

        with torch.no_grad():
            if isinstance(description, ViTEncoder):
                keep = None if ids_keep is None else self.asarray(ids_keep).long()
                output = module(tensor, keep)
            elif isinstance(description, MAEDecoder):
                if ids_restore is None:
                    raise ValueError("ids_restore is required to apply an MAEDecoder")
                output = module(tensor, self.asarray(ids_restore).long())
            else:
                output = module(tensor)
        return self.to_numpy(output)

    def create_trainer(
        self, config: Any, *, sample_shape: Sequence[int]
    ) -> TorchTrainer:
        """Return a :class:`~sslspec_torch.trainer.TorchTrainer` on the device that
        ``config.device`` resolves to.

        With ``config.nproc_per_node > 1`` this must run in a process started by
        :meth:`launch`; the trainer is then this process's rank, on the CPU or on
        the GPU of its local rank.
        """
        if getattr(config, "nproc_per_node", 1) > 1:
            return TorchTrainer(config, sample_shape=sample_shape, device=config.device)
        device = self.resolve_device(config.device)
        return TorchTrainer(config, sample_shape=sample_shape, device=device)

    def launch(
        self,
        function: Callable[..., Any],
        args: Sequence[Any] = (),
        *,
        nproc_per_node: int,
        device: str = "auto",
    ) -> list[Any]:
        """Run ``function(*args)`` in ``nproc_per_node`` processes on this machine.

        Each process joins a process group on ``device`` (``"auto"``, ``"cpu"`` or
        ``"cuda"``, one GPU per process) before it calls ``function`` and leaves it
        after. ``function`` and ``args`` must be picklable, so ``function`` is a
        module-level function. Every socket is bound to 127.0.0.1
        (:func:`sslspec_torch.distributed.launch`).

        Returns
        -------
        list
            The return value of every rank, in rank order.

        Raises
        ------
        sslspec_torch.distributed.LaunchError
            A ``RuntimeError`` naming the rank that failed first and its
            exception, after every process has stopped.
        ValueError
            If ``device`` cannot be used by several processes.
        """
        from .distributed import launch, run_in_process_group

        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(
                f"device {device!r} cannot be shared by several processes; use "
                f"auto, cpu or cuda (each process takes the GPU of its local rank)"
            )
        if device.startswith("cuda"):
            device = "cuda"
        return launch(
            run_in_process_group,
            (function, device, tuple(args)),
            nproc_per_node=nproc_per_node,
            name=getattr(function, "__qualname__", repr(function)),
        )
