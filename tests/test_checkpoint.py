"""Tests of checkpoint writing, verification and atomic replacement."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sslspec.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_atomic,
)

TENSORS = {
    "encoder.layers.0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "optimizer.step": np.array(7, dtype=np.int64),
    "rng.augment": np.arange(16, dtype=np.uint8),
}


def write(path, **overrides):
    arguments = {
        "config": {"method": "simclr", "epochs": 3},
        "backend": "torch",
        "epoch": 2,
        "step": 10,
        "loss_history": [2.5, 2.25],
        "train_seconds": 1.5,
    } | overrides
    save_checkpoint(path, TENSORS, **arguments)


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    write(path)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint.tensors) == set(TENSORS)
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(checkpoint.tensors[name], value)
        assert checkpoint.tensors[name].dtype == value.dtype
    assert checkpoint.config == {"method": "simclr", "epochs": 3}
    assert checkpoint.backend == "torch"
    assert checkpoint.method == "simclr"
    assert checkpoint.epoch == 2
    assert checkpoint.step == 10
    assert checkpoint.loss_history == [2.5, 2.25]
    assert checkpoint.train_seconds == 1.5


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing.safetensors' not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_truncated_file(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_flipped_byte_fails_digest(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    write(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"weight": np.zeros(3, dtype=np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="not an sslspec checkpoint"):
        load_checkpoint(path)


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    write_atomic(path, b"first")
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    write(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write(path, epoch=3)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.safetensors"]
    assert load_checkpoint(path).epoch == 2
