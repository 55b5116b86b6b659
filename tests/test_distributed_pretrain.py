"""``sslspec pretrain --nproc-per-node 2`` trains like one process on the whole batch.

Every distributed run is a real ``python -m sslspec pretrain`` with 2 gloo ranks
on 127.0.0.1. It starts in a session of its own, which is killed on timeout, and
no process of that session may survive the command. The single-process references
run in the pytest process through :func:`sslspec.pretrain.pretrain`.

The loss histories agree within a relative 1e-3, not to the last bit. Two ranks
sum the gradients in another order than one process, which changes them by
float32 rounding. AdamW divides each gradient by its own magnitude plus ``eps =
1e-8``, so the rounding noise of a gradient that is near zero (about 1e-9, where
the largest is 1e-2) becomes a step of a sizeable fraction of the learning rate.
After one step of SimCLR on 64 samples, 3 of the 65536 weights of the first
projector layer differed by up to 9e-5, and these differences spread over later
steps. The command-level tests therefore compare the encoders' features with a
tolerance, and ``test_trainer_steps_equal_one_process`` compares the weights of a
few steps with AdamW's ``eps`` raised to 1e-3.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from process_sessions import session_processes, wait_for_session_exit

pytest.importorskip("torch")

from sslspec.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: E402
from sslspec.cli import main  # noqa: E402
from sslspec.data import load_dataset  # noqa: E402
from sslspec.pretrain import default_config, pretrain  # noqa: E402

pytestmark = pytest.mark.distributed

# Starting the command and two ranks that import torch takes 10 to 20 s here.
RUN_TIMEOUT_SECONDS = 150
EPOCHS = 4
BATCH_SIZE = 64
STEPS_PER_EPOCH = 6
LOSS_RTOL = 1e-3
# Relative Frobenius distance between the test features of the 1-process and the
# 2-process encoders after 24 steps. The methods with batch norm drift apart
# through the biases of their batch norms. In one run they differed by 4 to 8 per
# cent, while the losses agreed within 6e-4. The MAE encoders agreed within 2e-7.
FEATURE_RTOL = {"simclr": 0.2, "vicreg": 0.2, "byol": 0.2, "mae": 1e-5}
# The trainer-level check uses AdamW with eps = 1e-3, so that noise in the
# gradients that are zero in exact arithmetic stays below the step size.
CHECK_EPS = 1e-3
CHECK_STEPS = 3
# Largest deviation of a state tensor, relative to its largest element (at least
# 1e-3). One run gave 1.3e-4 for a weight of the first convolution.
# Barlow Twins deviated by 3.6e-2 (the bias of the projector's second batch norm)
# while its losses agreed within 1e-5. Its gradients are about 1000 times those of
# SimCLR (largest 66 against 0.05 at the first step), so their rounding noise is
# not small next to eps = 1e-3.
STATE_RTOL = {
    "simclr": 1e-3,
    "barlow-twins": 0.1,
    "vicreg": 1e-3,
    "byol": 1e-3,
    "mae": 1e-3,
}
CHECK_METHODS = ("simclr", "barlow-twins", "vicreg", "byol", "mae")


def start_command(*arguments: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sslspec", "pretrain", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish_command(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a command started by :func:`start_command`; kill its session on
    timeout, and fail if any process of the session outlives it."""
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"sslspec pretrain timed out; output:\n{output[-4000:]}")
    survivors = wait_for_session_exit(process.pid)
    assert survivors == [], f"processes left after the command: {survivors}"
    return process.returncode, output


def start_after_first_checkpoint(data: str, run_dir: Path) -> subprocess.Popen[str]:
    """Start a 2-process SimCLR run into ``run_dir``; return once its first
    checkpoint exists, with the command still running."""
    process = start_command(
        *common_options(data, "simclr"), "--nproc-per-node", "2", "--out", str(run_dir)
    )
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not (run_dir / CHECKPOINT_NAME).exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def run_command(*arguments: str) -> tuple[int, str]:
    return finish_command(start_command(*arguments))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """The first 480 digits with labels, as a .npz file: 384 for training."""
    dataset = load_dataset("digits")
    path = tmp_path_factory.mktemp("data") / "digits480.npz"
    np.savez(path, x=dataset.x_train[:480], y=dataset.y_train[:480])
    return str(path)


def common_options(data: str, method: str, epochs: int = EPOCHS) -> list[str]:
    return [
        "--method",
        method,
        "--data",
        data,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(BATCH_SIZE),
        "--quiet",
    ]


def single_process_run(data: str, method: str, out: Path) -> dict:
    config = default_config(method, data=data, epochs=EPOCHS, batch_size=BATCH_SIZE)
    return pretrain(config, out_dir=out)


def encoder_features(run_dir: Path, inputs: np.ndarray) -> np.ndarray:
    from sslspec_torch.backend import TorchBackend

    from sslspec.pretrain import read_config

    config = read_config(run_dir).replace(nproc_per_node=1)
    trainer = TorchBackend().create_trainer(config, sample_shape=inputs.shape[1:])
    tensors = load_checkpoint(run_dir / CHECKPOINT_NAME).tensors
    trainer.load_state_dict(
        {k: v for k, v in tensors.items() if not k.startswith(("optimizer.", "rng."))}
    )
    return trainer.encode(inputs)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, small_digits):
    """Run folders of 2-process runs by method, each run once per module."""
    root = tmp_path_factory.mktemp("two")
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = root / method
            status, output = run_command(
                *common_options(small_digits, method),
                "--nproc-per-node",
                "2",
                "--out",
                str(out),
            )
            assert status == 0, output[-4000:]
            runs[method] = out
        return runs[method]

    return run


@pytest.mark.timeout(150)
@pytest.mark.parametrize("method", ["simclr", "vicreg", "byol", "mae"])
def test_two_processes_equal_one(tmp_path, small_digits, two_process_runs, method):
    two_dir = two_process_runs(method)
    two_metrics = json.loads((two_dir / "metrics.json").read_text())
    one_metrics = single_process_run(small_digits, method, tmp_path / "one")
    assert two_metrics["nproc_per_node"] == 2
    assert one_metrics["nproc_per_node"] == 1
    assert two_metrics["steps"] == one_metrics["steps"] == EPOCHS * STEPS_PER_EPOCH
    np.testing.assert_allclose(
        two_metrics["loss_history"], one_metrics["loss_history"], rtol=LOSS_RTOL
    )
    inputs = load_dataset(small_digits).x_test
    features_two = encoder_features(two_dir, inputs)
    features_one = encoder_features(tmp_path / "one", inputs)
    difference = np.linalg.norm(features_two - features_one)
    assert difference <= FEATURE_RTOL[method] * np.linalg.norm(features_one)
    # Both ranks draw the augmentations of the whole batch, as one process does.
    rng_two = load_checkpoint(two_dir / CHECKPOINT_NAME).tensors
    rng_one = load_checkpoint(tmp_path / "one" / CHECKPOINT_NAME).tensors
    np.testing.assert_array_equal(rng_two["rng.augment"], rng_one["rng.augment"])


def trainer_states(nproc_per_node: int) -> dict[str, tuple[list[float], dict]]:
    """Train every method of ``CHECK_METHODS`` for ``CHECK_STEPS`` steps of 64
    digits with AdamW's ``eps = CHECK_EPS``; return the losses and the final
    state of each. A module-level function, so that a launch can run it."""
    from sslspec_torch.backend import TorchBackend

    from sslspec.config import PretrainConfig

    images = load_dataset("digits").x_train
    results = {}
    for method in CHECK_METHODS:
        config = PretrainConfig(
            method=method,
            batch_size=64,
            epochs=1,
            warmup_epochs=0,
            steps_per_epoch=CHECK_STEPS,
            total_steps=CHECK_STEPS,
            nproc_per_node=nproc_per_node,
        )
        trainer = TorchBackend().create_trainer(config, sample_shape=(1, 8, 8))
        for group in trainer.optimizer.param_groups:
            group["eps"] = CHECK_EPS
        losses = [
            trainer.train_step(images[step * 64 : (step + 1) * 64])
            for step in range(CHECK_STEPS)
        ]
        results[method] = (losses, trainer.state_dict())
    return results


@pytest.mark.timeout(150)
def test_trainer_steps_equal_one_process(tmp_path):
    """Every method's trainer on 2 ranks takes the steps of one process on the
    whole batch, when AdamW does not amplify rounding noise."""
    out = tmp_path / "ranks.pkl"
    process = subprocess.Popen(
        [sys.executable, __file__, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    status, output = finish_command(process)
    assert status == 0, output[-4000:]
    ranks = pickle.loads(out.read_bytes())
    single = trainer_states(1)
    deviations = {}
    for method in CHECK_METHODS:
        losses, state = single[method]
        for rank_losses, rank_state in (ranks[0][method], ranks[1][method]):
            np.testing.assert_allclose(rank_losses, losses, rtol=1e-5, err_msg=method)
            for name, value in state.items():
                if name.startswith("optimizer.exp_avg"):
                    continue
                scale = max(float(np.abs(value).max()), 1e-3)
                deviation = float(np.abs(rank_state[name] - value).max()) / scale
                key = f"{method}: {name}"
                deviations[key] = max(deviation, deviations.get(key, 0.0))
    for method in CHECK_METHODS:
        worst = max(
            (value, key) for key, value in deviations.items() if key.startswith(method)
        )
        assert worst[0] < STATE_RTOL[method], worst


def worker_pids(session_id: int) -> list[int]:
    """Return the pids of the rank processes that the launcher spawned in the
    session. Their ``RANK`` is set after the start, so ``/proc`` does not show
    which is which."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session_id and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.timeout(150)
def test_killed_rank_fails_run_and_resume_matches(
    tmp_path, small_digits, two_process_runs
):
    """Kill a rank after the first checkpoint: the command exits 1 naming the
    killed rank, the checkpoint stays loadable, and ``--resume`` completes the
    run with the loss history of the uninterrupted 2-process run."""
    run_dir = tmp_path / "killed"
    process = start_after_first_checkpoint(small_digits, run_dir)
    pids = worker_pids(process.pid)
    assert len(pids) == 2, session_processes(process.pid)
    os.kill(pids[-1], signal.SIGKILL)
    status, output = finish_command(process)
    assert status == 1, output[-4000:]
    # Torch's agent reports the first dead process that it polls. The other rank
    # may die of the broken connection (an exception or SIGABRT) before that poll
    # and be reported instead.
    assert re.search(r"rank \d \(local rank \d\) (failed with|raised)", output)
    assert "is kept; continue with --resume" in output
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert 1 <= checkpoint.epoch < EPOCHS
    assert not (run_dir / "metrics.json").exists()

    status, output = run_command("--resume", str(run_dir), "--quiet")
    assert status == 0, output[-4000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    whole = json.loads((two_process_runs("simclr") / "metrics.json").read_text())
    assert resumed["nproc_per_node"] == 2
    assert resumed["steps"] == whole["steps"]
    np.testing.assert_allclose(
        resumed["loss_history"], whole["loss_history"], rtol=1e-6
    )


@pytest.mark.timeout(150)
def test_ctrl_c_stops_every_rank(tmp_path, small_digits):
    """SIGINT to the whole session, as Ctrl-C sends it, ends a 2-process run like
    a 1-process one: exit status 130, the resume hint, a loadable checkpoint."""
    run_dir = tmp_path / "interrupted"
    process = start_after_first_checkpoint(small_digits, run_dir)
    os.killpg(process.pid, signal.SIGINT)
    status, output = finish_command(process)
    assert status == 130, output[-4000:]
    assert "interrupted; the last completed epoch's checkpoint is kept" in output
    assert "Traceback" not in output
    assert load_checkpoint(run_dir / CHECKPOINT_NAME).epoch >= 1


@pytest.mark.timeout(120)
def test_nan_loss_stops_every_rank(tmp_path, small_digits):
    """An absurd learning rate makes the loss NaN on both ranks, which stop
    together; the command exits 1 with the driver's message."""
    status, output = run_command(
        *common_options(small_digits, "simclr", epochs=3),
        "--lr",
        "1e30",
        "--nproc-per-node",
        "2",
        "--out",
        str(tmp_path / "nan"),
    )
    assert status == 1, output[-4000:]
    assert "the loss became nan" in output
    assert "rank 0 (local rank 0) raised" in output or "rank 1" in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size", "64", "--nproc-per-node", "3"], "multiple of nproc_per_node"),
        (["--backend", "jax", "--nproc-per-node", "2"], "use nproc_per_node 1"),
    ],
)
@pytest.mark.timeout(60)
def test_invalid_process_counts(tmp_path, capsys, arguments, message):
    status = main(["pretrain", "--quiet", "--out", str(tmp_path / "run"), *arguments])
    error = capsys.readouterr().err
    assert status == 1
    assert message in error
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_nproc_per_node_must_be_positive(capsys, value):
    with pytest.raises(SystemExit) as raised:
        main(["pretrain", "--nproc-per-node", value])
    assert raised.value.code == 2
    assert "--nproc-per-node" in capsys.readouterr().err


if __name__ == "__main__":
    from sslspec_torch.backend import TorchBackend

    results = TorchBackend().launch(
        trainer_states, (2,), nproc_per_node=2, device="cpu"
    )
    Path(sys.argv[1]).write_bytes(pickle.dumps(results))
