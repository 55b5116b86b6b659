"""Checkpoint files: safetensors with run metadata, written atomically.

A checkpoint stores the trainer's state (canonical parameters and buffers, optimiser
state under ``optimizer.``, random-generator state under ``rng.``) as safetensors
tensors, and the run's progress as string metadata:

========================  =====================================================
``format``                ``"sslspec-checkpoint"``
``format_version``        :data:`FORMAT_VERSION`
``backend``               backend that wrote it (the tensors load in any backend)
``method``                pretraining method
``config``                the run's :class:`~sslspec.config.PretrainConfig`, JSON
``epoch``                 number of epochs completed
``step``                  number of optimisation steps completed
``loss_history``          mean training loss of each completed epoch, JSON list
``train_seconds``         training time so far, excluding evaluation
``sha256``                digest of every tensor's name, dtype, shape and bytes
========================  =====================================================

:func:`save_checkpoint` writes to a temporary file in the destination folder,
flushes and fsyncs it, then renames it over the destination with ``os.replace``, so
a crash at any moment leaves either the previous checkpoint or the new one, never a
partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CHECKPOINT_NAME",
    "Checkpoint",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "write_atomic",
]

logger = logging.getLogger(__name__)

FORMAT = "sslspec-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """Raised when a checkpoint is missing, corrupt or does not match the run."""


@dataclass(frozen=True)
class Checkpoint:
    """Contents of a checkpoint file."""

    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    backend: str
    method: str
    epoch: int
    step: int
    loss_history: list[float]
    train_seconds: float


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file.

    The bytes go to a temporary file in the same folder (so the rename stays on
    one file system), which is flushed, fsynced and renamed over ``path`` with
    ``os.replace``. The folder is fsynced afterwards where the platform allows.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    config: Mapping[str, Any],
    backend: str,
    epoch: int,
    step: int,
    loss_history: list[float],
    train_seconds: float,
) -> None:
    """Write a checkpoint atomically (see the module documentation)."""
    from safetensors.numpy import save

    arrays = {name: np.asarray(value, order="C") for name, value in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "backend": backend,
        "method": str(config.get("method", "")),
        "config": json.dumps(dict(config), sort_keys=True),
        "epoch": str(epoch),
        "step": str(step),
        "loss_history": json.dumps([float(value) for value in loss_history]),
        "train_seconds": repr(float(train_seconds)),
        "sha256": _digest(arrays),
    }
    write_atomic(path, save(arrays, metadata=metadata))
    logger.debug("wrote checkpoint %s (epoch %d, step %d)", path, epoch, step)


def _read_metadata(path: Path, data: bytes) -> dict[str, str]:
    """Parse the safetensors header: an 8-byte little-endian length, then JSON."""
    if len(data) < 8:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated ({len(data)} bytes); it is not a "
            f"safetensors file"
        )
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt: its header claims "
            f"{header_length} bytes but the file has {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its header is not valid JSON "
            f"({error})"
        ) from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an sslspec checkpoint (no format={FORMAT!r} in "
            f"its safetensors metadata)"
        )
    return metadata


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify a checkpoint.

    Raises
    ------
    CheckpointError
        If the file is missing, truncated, fails its digest, is not an sslspec
        checkpoint, or has an unsupported format version.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} not found") from None
    except OSError as error:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {error}"
        ) from None

    metadata = _read_metadata(path, data)
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version}, but this "
            f"sslspec reads version {FORMAT_VERSION}"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OverflowError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: {error}"
        ) from error
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its tensors do not match the "
            f"SHA-256 digest stored when it was written"
        )
    try:
        return Checkpoint(
            tensors=tensors,
            config=json.loads(metadata["config"]),
            backend=metadata["backend"],
            method=metadata["method"],
            epoch=int(metadata["epoch"]),
            step=int(metadata["step"]),
            loss_history=[
                float(value) for value in json.loads(metadata["loss_history"])
            ],
            train_seconds=float(metadata["train_seconds"]),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has invalid metadata ({type(error).__name__}: "
            f"{error})"
        ) from error
