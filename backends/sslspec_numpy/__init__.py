"""Array-only backends for NumPy and array-api-strict.

These backends run the spec functions of :mod:`sslspec` on NumPy arrays and on
``array_api_strict`` arrays. They declare no capabilities: they have no autodiff,
no compiler and no networks, so they serve the losses, masks and patch utilities
and the conformance suite.

``array-api-strict`` rejects anything outside the Array API standard, so running the
suite on it proves that the spec uses only the standard. It also has a second device,
``"device1"``, on which the suite runs to catch results placed on the default device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NumPyBackend", "ArrayAPIStrictBackend"]


def _reject_device(device: str, available: list[str]) -> ValueError:
    return ValueError(
        f"device {device!r} is not available; available devices: "
        f"{', '.join(available)} (or 'auto')"
    )


class NumPyBackend:
    """NumPy arrays on the CPU, through the ``array_api_compat.numpy`` namespace."""

    name = "numpy"
    capabilities: frozenset[str] = frozenset()

    def version(self) -> str:
        """Return NumPy's version string."""
        return np.__version__

    def devices(self) -> list[str]:
        """Return ``["cpu"]``, NumPy's only device."""
        return ["cpu"]

    def namespace(self) -> Any:
        """Return ``array_api_compat.numpy``, the Array API view of NumPy."""
        import array_api_compat.numpy

        return array_api_compat.numpy

    def resolve_device(self, device: str) -> str:
        """Map ``"auto"`` or ``"cpu"`` to ``"cpu"``; raise ValueError otherwise."""
        if device in ("auto", "cpu"):
            return "cpu"
        raise _reject_device(device, self.devices())

    def dtypes(self) -> tuple[str, ...]:
        """Return the floating dtypes NumPy supports."""
        return ("float64", "float32", "float16")

    def asarray(
        self, array: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> np.ndarray:
        """Return a copy of ``array`` as a NumPy array, cast to ``dtype`` if given."""
        if device is not None:
            self.resolve_device(device)
        if dtype is not None and dtype not in self.dtypes():
            raise ValueError(
                f"dtype {dtype!r} is not supported by the numpy backend; supported: "
                f"{', '.join(self.dtypes())}"
            )
        return np.array(array, dtype=dtype, copy=True)

    def to_numpy(self, array: Any) -> np.ndarray:
        """Return ``array`` as a NumPy array of the same dtype."""
        return np.asarray(array)

    def device_of(self, array: Any) -> str:
        """Return ``"cpu"``."""
        return "cpu"


class ArrayAPIStrictBackend:
    """``array_api_strict`` arrays on its default device or on ``"device1"``."""

    name = "array-api-strict"
    capabilities: frozenset[str] = frozenset()

    _DEVICES = ("CPU_DEVICE", "device1")

    def __init__(self) -> None:
        import array_api_strict

        self._xp = array_api_strict

    def version(self) -> str:
        """Return array-api-strict's version string."""
        return self._xp.__version__

    def devices(self) -> list[str]:
        """Return ``["CPU_DEVICE", "device1"]``; the first is the default."""
        return list(self._DEVICES)

    def namespace(self) -> Any:
        """Return the ``array_api_strict`` module."""
        return self._xp

    def resolve_device(self, device: str) -> str:
        """Map ``"auto"`` to ``"CPU_DEVICE"``; accept either device by name."""
        if device == "auto":
            return self._DEVICES[0]
        if device in self._DEVICES:
            return device
        raise _reject_device(device, self.devices())

    def dtypes(self) -> tuple[str, ...]:
        """Return the floating dtypes of the Array API standard."""
        return ("float64", "float32")

    def asarray(
        self, array: np.ndarray, *, dtype: str | None = None, device: str | None = None
    ) -> Any:
        """Convert a NumPy array, cast to ``dtype`` and placed on ``device``."""
        xp = self._xp
        target = xp.Device(self.resolve_device(device or "auto"))
        if dtype is not None and dtype not in self.dtypes():
            raise ValueError(
                f"dtype {dtype!r} is not supported by the array-api-strict backend; "
                f"supported: {', '.join(self.dtypes())}"
            )
        result = xp.asarray(np.array(array, copy=True), device=target)
        if dtype is not None:
            result = xp.astype(result, getattr(xp, dtype))
        return result

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy ``array`` to the default device and return it as NumPy."""
        xp = self._xp
        on_cpu = array.to_device(xp.Device(self._DEVICES[0]))
        return np.array(np.from_dlpack(on_cpu), copy=True)

    def device_of(self, array: Any) -> str:
        """Return the name of the device that stores ``array``."""
        xp = self._xp
        for name in self._DEVICES:
            if array.device == xp.Device(name):
                return name
        raise ValueError(
            f"array is on {array.device}, which this backend does not expose; "
            f"exposed devices: {', '.join(self._DEVICES)}"
        )
