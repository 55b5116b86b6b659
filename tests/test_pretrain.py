"""Tests of the pretraining driver: run folders, resume, errors and evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from sslspec_torch.trainer import TorchTrainer  # noqa: E402

from sslspec.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from sslspec.config import AugmentConfig, PretrainConfig  # noqa: E402
from sslspec.data import DataError  # noqa: E402
from sslspec.networks import METHODS, HeadSizes  # noqa: E402
from sslspec.pretrain import (  # noqa: E402
    METHOD_DEFAULTS,
    TrainingError,
    default_config,
    evaluate_run,
    pretrain,
    resume_run,
)

SMALL_SIZES = HeadSizes(
    projector_hidden=64,
    projector_out=32,
    predictor_hidden=64,
    conv_channels=(8, 16),
    vit={"embed_dim": 16, "depth": 1, "num_heads": 2},
    decoder={"decoder_dim": 16, "depth": 1, "num_heads": 2},
)
METRIC_KEYS = {
    "method",
    "backend",
    "device",
    "nproc_per_node",
    "epochs",
    "train_seconds",
    "final_loss",
    "loss_history",
    "knn_accuracy",
    "linear_probe_accuracy",
    "baseline_knn_accuracy",
    "baseline_linear_probe_accuracy",
    "raw_knn_accuracy",
    "raw_linear_probe_accuracy",
}


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    images = (digits.images[:200] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=images, y=digits.target[:200])
    return str(path)


def small_config(data, method="simclr", **changes):
    values = {
        "method": method,
        "data": data,
        "epochs": 2,
        "batch_size": 32,
        "warmup_epochs": 1,
        "device": "cpu",
        "sizes": SMALL_SIZES,
        "augment": AugmentConfig(erase_probability=0.0),
    }
    return PretrainConfig(**(values | changes))


def test_default_configs_cover_every_method():
    assert set(METHOD_DEFAULTS) == set(METHODS)
    for method in METHODS:
        config = default_config(method)
        assert config.method == method
    assert default_config("simclr", epochs=None, lr=0.5).lr == 0.5
    assert (
        default_config("simclr", epochs=None).epochs
        == METHOD_DEFAULTS["simclr"]["epochs"]
    )


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_writes_run_folder(tmp_path, digits_file, method):
    run_dir = tmp_path / "run"
    metrics = pretrain(small_config(digits_file, method), out_dir=run_dir)
    for name in (
        "config.json",
        "checkpoint.safetensors",
        "metrics.json",
        "loss.png",
        "spectrum.png",
        "pca.png",
    ):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved)
    assert saved["method"] == method
    assert saved["device"] == "cpu"
    assert saved["nproc_per_node"] == 1
    assert len(saved["loss_history"]) == 2
    assert saved["final_loss"] == saved["loss_history"][-1]
    for key in METRIC_KEYS:
        if key.endswith("accuracy"):
            assert 0.0 <= saved[key] <= 1.0, key
    assert metrics["run_dir"] == str(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["steps_per_epoch"] == 5
    assert config["total_steps"] == 10
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert checkpoint.epoch == 2
    assert checkpoint.step == 10


def test_resume_after_crash_matches_uninterrupted(tmp_path, digits_file, monkeypatch):
    config = small_config(digits_file, "byol", epochs=3)
    expected = pretrain(config, out_dir=tmp_path / "full")["loss_history"]

    original = TorchTrainer.train_step
    calls = {"count": 0}

    def crash_in_second_epoch(self, batch):
        calls["count"] += 1
        if calls["count"] == 7:
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(TorchTrainer, "train_step", crash_in_second_epoch)
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(config, out_dir=run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert checkpoint.epoch == 1
    assert checkpoint.loss_history == expected[:1]

    monkeypatch.setattr(TorchTrainer, "train_step", original)
    resumed = resume_run(run_dir)
    assert resumed["loss_history"] == expected
    assert load_checkpoint(run_dir / "checkpoint.safetensors").step == 15


def test_resume_can_extend_epochs(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)
    metrics = resume_run(run_dir, epochs=2)
    assert len(metrics["loss_history"]) == 2
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2
    with pytest.raises(ValueError, match="epochs=1 is below the 2 epochs"):
        resume_run(run_dir, epochs=1)


def test_resume_corrupt_checkpoint(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)
    path = run_dir / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint.safetensors' is corrupt"):
        resume_run(run_dir)
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate_run(run_dir)


def test_resume_mismatched_checkpoint(tmp_path, digits_file):
    first = tmp_path / "first"
    second = tmp_path / "second"
    pretrain(small_config(digits_file, epochs=1), out_dir=first)
    pretrain(small_config(digits_file, "vicreg", epochs=1), out_dir=second)
    (first / "checkpoint.safetensors").write_bytes(
        (second / "checkpoint.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="does not match.*differ in method"):
        resume_run(first)


def test_resume_checkpoint_of_other_networks(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    checkpoint = load_checkpoint(run_dir / "checkpoint.safetensors")
    from sslspec.checkpoint import save_checkpoint

    config["sizes"]["projector_out"] = 16
    (run_dir / "config.json").write_text(json.dumps(config))
    save_checkpoint(
        run_dir / "checkpoint.safetensors",
        checkpoint.tensors,
        config=config,
        backend="torch",
        epoch=1,
        step=5,
        loss_history=checkpoint.loss_history,
        train_seconds=1.0,
    )
    with pytest.raises(CheckpointError, match="does not match the run's networks"):
        resume_run(run_dir)


def test_resume_missing_run(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resume_run(tmp_path / "nothing")


def test_existing_run_folder_is_not_overwritten(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)
    with pytest.raises(FileExistsError, match="already contains a run"):
        pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)


def test_mae_on_feature_vectors_fails_before_training(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 6)))
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"features.npy.*does not suit method 'mae'"):
        pretrain(small_config(str(path), "mae"), out_dir=run_dir)
    assert not run_dir.exists()


def test_bad_data_fails_before_training(tmp_path):
    path = tmp_path / "bad.npy"
    values = np.zeros((40, 6))
    values[3, 2] = np.nan
    np.save(path, values)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="bad.npy.*NaN"):
        pretrain(small_config(str(path)), out_dir=run_dir)
    assert not run_dir.exists()


def test_batch_size_one_is_rejected(tmp_path, digits_file):
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        pretrain(small_config(digits_file, batch_size=1), out_dir=tmp_path / "run")


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "2"])
def test_nproc_per_node_must_be_positive_int(value):
    with pytest.raises(ValueError, match="nproc_per_node must be a positive integer"):
        PretrainConfig(nproc_per_node=value)


def test_batch_size_must_split_over_processes():
    with pytest.raises(
        ValueError, match="batch_size 30 must be a multiple of nproc_per_node 4"
    ):
        PretrainConfig(batch_size=30, nproc_per_node=4)
    assert PretrainConfig(batch_size=32, nproc_per_node=4).nproc_per_node == 4


def test_short_data_batches_must_split_over_processes(tmp_path, digits_file):
    # 200 samples give 160 for training; a batch of 162 is cut to those 160.
    config = small_config(digits_file, batch_size=162, nproc_per_node=3)
    with pytest.raises(ValueError, match="batches of 160 samples"):
        pretrain(config, out_dir=tmp_path / "run")


def test_backend_without_launch_rejects_processes(tmp_path, digits_file, monkeypatch):
    from sslspec_torch.backend import TorchBackend

    monkeypatch.setattr(
        TorchBackend, "capabilities", frozenset({"networks", "training"})
    )
    config = small_config(digits_file, nproc_per_node=2)
    with pytest.raises(ValueError, match="use nproc_per_node 1"):
        pretrain(config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_extra_metrics_of_the_trainer_are_recorded(tmp_path, digits_file, monkeypatch):
    monkeypatch.setattr(
        TorchTrainer,
        "extra_metrics",
        lambda self: {"compile_seconds": 1.5},
        raising=False,
    )
    metrics = pretrain(small_config(digits_file, epochs=1), out_dir=tmp_path / "run")
    assert metrics["compile_seconds"] == 1.5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["compile_seconds"] == 1.5


def test_unavailable_device(tmp_path, digits_file):
    with pytest.raises(ValueError, match="'cuda:7' is not available|not a PyTorch"):
        pretrain(small_config(digits_file, device="cuda:7"), out_dir=tmp_path / "r")


def test_non_finite_loss_keeps_checkpoint(tmp_path, digits_file, monkeypatch):
    original = TorchTrainer.train_step
    calls = {"count": 0}

    def nan_in_second_epoch(self, batch):
        calls["count"] += 1
        loss = original(self, batch)
        return float("nan") if calls["count"] == 6 else loss

    monkeypatch.setattr(TorchTrainer, "train_step", nan_in_second_epoch)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="loss became nan at epoch 2, step 6"):
        pretrain(small_config(digits_file), out_dir=run_dir)
    assert load_checkpoint(run_dir / "checkpoint.safetensors").epoch == 1


def test_unlabelled_data_skips_evaluation(tmp_path, digits_file):
    path = tmp_path / "unlabelled.npy"
    np.save(path, np.load(digits_file)["x"])
    run_dir = tmp_path / "run"
    metrics = pretrain(small_config(str(path), epochs=1), out_dir=run_dir)
    assert metrics["knn_accuracy"] is None
    assert metrics["evaluation"].startswith("skipped")
    assert (
        "needs labels" in metrics["evaluation"]
        or "need labels" in metrics["evaluation"]
    )
    assert (run_dir / "pca.png").is_file()


def test_evaluate_run_reproduces_metrics(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    trained = pretrain(small_config(digits_file, epochs=1), out_dir=run_dir)
    evaluated = evaluate_run(run_dir)
    for key in METRIC_KEYS:
        if key != "train_seconds":
            assert evaluated[key] == trained[key], key


def test_warmup_cosine_schedule():
    from sslspec.schedules import warmup_cosine_lr

    def rate(step):
        return warmup_cosine_lr(step, base_lr=1.0, warmup_steps=4, total_steps=12)

    assert [rate(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert rate(4) == 1.0
    assert rate(8) == pytest.approx(0.5)
    assert rate(11) == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    assert rate(12) == 0.0
    assert rate(50) == 0.0
    assert warmup_cosine_lr(0, base_lr=2.0, warmup_steps=0, total_steps=10) == 2.0
    with pytest.raises(ValueError, match="warmup_steps=5 must not exceed"):
        warmup_cosine_lr(0, base_lr=1.0, warmup_steps=5, total_steps=4)
