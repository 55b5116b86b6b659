"""Tests of the ``sslspec`` command, end to end and in process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sslspec.cli import main


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits160.npz"
    images = (digits.images[:160] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=images, y=digits.target[:160])
    return str(path)


def run_command(*arguments, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "sslspec", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_pretrain_end_to_end(tmp_path, digits_file):
    run_dir = tmp_path / "run"
    result = run_command(
        "pretrain",
        "--data",
        digits_file,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        str(run_dir),
    )
    assert result.returncode == 0, result.stderr
    assert f"run folder: {run_dir}" in result.stdout
    assert "pretrained encoder" in result.stdout
    assert "raw inputs" in result.stdout
    assert "training simclr" in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert metrics["method"] == "simclr"
    assert metrics["backend"] == "torch"
    assert (run_dir / "checkpoint.safetensors").is_file()

    evaluated = run_command("evaluate", str(run_dir), "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "pretrained encoder" in evaluated.stdout
    assert evaluated.stderr == ""


def test_backends_lists_torch():
    result = run_command("backends")
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout
    assert (
        "capabilities: autodiff, distributed, jit, networks, training" in result.stdout
    )
    assert "devices:      cpu" in result.stdout


def test_quiet_run_and_resume(tmp_path, digits_file, capsys):
    run_dir = tmp_path / "run"
    common = ["--data", digits_file, "--batch-size", "32", "--method", "vicreg"]
    assert (
        main(["pretrain", *common, "--epochs", "1", "--out", str(run_dir), "--quiet"])
        == 0
    )
    captured = capsys.readouterr()
    assert "pretrained encoder" in captured.out
    assert captured.err == ""

    assert main(["pretrain", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["loss_history"]) == 2

    status = main(["pretrain", "--resume", str(run_dir), "--lr", "0.5", "--quiet"])
    assert status == 2
    error = capsys.readouterr().err
    assert "--lr 0.5 differs from the run's saved value" in error
    assert "--epochs, --device, --nproc-per-node may change" in error

    status = main(["pretrain", "--resume", str(run_dir), "--out", "x", "--quiet"])
    assert status == 2
    assert "either --resume RUN_DIR or --out" in capsys.readouterr().err


def test_bad_data_is_an_error(tmp_path, capsys):
    path = tmp_path / "broken.csv"
    path.write_text("a,b\n1,2\n3,oops\n")
    status = main(
        ["pretrain", "--data", str(path), "--out", str(tmp_path / "r"), "--quiet"]
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "error:" in error
    assert "broken.csv" in error
    assert "'oops' is not a number" in error


def test_missing_data_is_an_error(tmp_path, capsys):
    status = main(["pretrain", "--data", str(tmp_path / "none.npz"), "--quiet"])
    assert status == 1
    assert "none.npz' not found" in capsys.readouterr().err


def test_unavailable_device_is_an_error(tmp_path, digits_file, capsys):
    pytest.importorskip("torch")
    status = main(
        [
            "pretrain",
            "--data",
            digits_file,
            "--device",
            "cuda:9",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert status == 1
    assert "cuda:9" in capsys.readouterr().err


def test_evaluate_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing"), "--quiet"]) == 1
    assert "not found" in capsys.readouterr().err


def test_invalid_option_values(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--epochs", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--method", "moco"])
    assert "invalid choice: 'moco'" in capsys.readouterr().err


def test_out_file_is_an_error(tmp_path, digits_file, capsys):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    status = main(["pretrain", "--data", digits_file, "--out", str(path), "--quiet"])
    assert status == 1
    assert f"--out {str(path)!r} is a file" in capsys.readouterr().err


def test_infinite_lr_is_an_error(tmp_path, digits_file, capsys):
    out = str(tmp_path / "run")
    status = main(["pretrain", "--data", digits_file, "--lr", "inf", "--out", out])
    assert status == 1
    assert "lr must be positive and finite, got inf" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "pretrain" in capsys.readouterr().out


def test_conformance_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sslspec_conformance.cli", None)
    assert main(["conformance", "--backend", "torch"]) == 2
    assert "conformance suite is not installed" in capsys.readouterr().err


def test_conformance_passes_arguments(monkeypatch):
    import types

    received = []
    module = types.ModuleType("sslspec_conformance.cli")
    module.main = lambda argv: received.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sslspec_conformance.cli", module)
    assert main(["conformance", "--backend", "torch", "-x"]) == 0
    assert received == [["--backend", "torch", "-x"]]
