"""``sslspec pretrain --backend jax`` on two devices equals the run on one device.

Each run happens in a process of its own, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (which must be set before
JAX starts) and ``JAX_PLATFORMS=cpu``: this file run as a script trains every
method with :func:`sslspec.pretrain.pretrain` on a slice of the digits. The
2-device runs train data-parallel over a mesh of both devices, and their loss
histories, final weights and accuracies must match the 1-device runs. The
2-device process also compares the gradient of one step with the gradient that a
trainer restricted to one device computes, and checks that a batch size that
does not split over the devices is rejected.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

METHODS = ("simclr", "byol", "barlow-twins", "vicreg", "mae")
EPOCHS = 2
BATCH_SIZE = 32
SAMPLES = 200
# Methods whose gradient the 2-device process compares with one device's.
GRADIENT_METHODS = ("byol", "mae")
# The 1-device process took about 40 s of CPU time and the 2-device process,
# which also compiles 4 gradient functions, about 65 s, on a 2-core machine.
RUN_TIMEOUT_SECONDS = 240

# Width of the ViT encoder and of the MAE decoder in these runs.
EMBED_DIM = 16
WHOLE = slice(None)
# Entries whose gradient is zero in exact arithmetic, by name and the slice of
# axis 0 concerned. Their float32 gradient is rounding noise that differs
# between one batch and its shards, and AdamW (eps 1e-8) turns it into steps of
# about the learning rate. So these parameters, their EMA copies and the batch
# norm statistics right after them are checked only against that bound, and
# their optimiser moments are not compared.
SHIFT_INVARIANT = {
    "simclr": {},
    # The projector's output bias shifts the input of the predictor's first
    # linear layer by a constant, which the batch norm after it removes.
    "byol": {
        "projector.layers.1.bias": WHOLE,
        "target_projector.layers.1.bias": WHOLE,
        "predictor.norms.0.running_mean": WHOLE,
    },
    # Both losses standardise or centre every embedding dimension over the batch.
    "barlow-twins": {"projector.layers.2.bias": WHOLE},
    "vicreg": {"projector.layers.2.bias": WHOLE},
    # The key bias adds the same value to every score of a query, which the
    # softmax removes. The fused qkv bias contains it in its second third.
    "mae": {
        "encoder.blocks.0.attn.qkv.bias": slice(EMBED_DIM, 2 * EMBED_DIM),
        "decoder.blocks.0.attn.qkv.bias": slice(EMBED_DIM, 2 * EMBED_DIM),
    },
}


def small_config(method: str, data: str, **changes):
    from sslspec.networks import HeadSizes
    from sslspec.pretrain import default_config

    sizes = HeadSizes(
        projector_hidden=32,
        projector_out=16,
        predictor_hidden=32,
        conv_channels=(4, 8),
        vit={"embed_dim": EMBED_DIM, "depth": 1, "num_heads": 2},
        decoder={"decoder_dim": EMBED_DIM, "depth": 1, "num_heads": 2},
    )
    values = {
        "backend": "jax",
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "data": data,
        "warmup_epochs": 1,
        "device": "cpu",
        "sizes": sizes,
    }
    return default_config(method, **(values | changes))


def write_digits(path: Path) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:SAMPLES] / 16.0).astype(np.float32)[:, None]
    np.savez(path, x=images, y=digits.target[:SAMPLES])
    return str(path)


# The worker: python tests/test_jax_multidevice_pretrain.py OUT


def gradient_check(method: str, data: str) -> dict:
    """Return one step's loss and gradient on all devices and on device 0 alone."""
    from sslspec_jax.trainer import JaxTrainer

    from sslspec.data import load_dataset

    dataset = load_dataset(data)
    config = small_config(method, data, steps_per_epoch=6, total_steps=12)
    batch = dataset.x_train[:BATCH_SIZE]
    results = {}
    for name, data_parallel in (("mesh", True), ("single", False)):
        trainer = JaxTrainer(
            config, sample_shape=dataset.sample_shape, data_parallel=data_parallel
        )
        loss, gradients = trainer.loss_and_gradients(batch)
        results[name] = {
            "devices": len(trainer.devices),
            "loss": loss,
            "gradients": gradients,
        }
    return results


def run_worker(out: Path) -> None:
    import jax
    from sslspec_jax.trainer import JaxTrainer

    from sslspec.pretrain import pretrain

    data = write_digits(out / "digits.npz")
    results: dict = {"device_count": jax.device_count(), "gradients": {}}
    for method in METHODS:
        pretrain(small_config(method, data), out_dir=out / method)
    if jax.device_count() > 1:
        for method in GRADIENT_METHODS:
            results["gradients"][method] = gradient_check(method, data)
        try:
            JaxTrainer(
                small_config("simclr", data, batch_size=BATCH_SIZE - 1),
                sample_shape=(1, 8, 8),
            )
        except ValueError as error:
            results["indivisible_error"] = str(error)
    (out / "results.pkl").write_bytes(pickle.dumps(results))


# The tests


def start_run(out: Path, devices: int) -> subprocess.Popen:
    out.mkdir(parents=True)
    environment = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, __file__, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        start_new_session=True,
    )


def finish_run(process: subprocess.Popen, out: Path, devices: int) -> dict:
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"the {devices}-device runs timed out after {RUN_TIMEOUT_SECONDS} s; "
            f"output:\n{output[-4000:]}"
        )
    assert process.returncode == 0, (
        f"the {devices}-device runs failed:\n{output[-4000:]}"
    )
    return pickle.loads((out / "results.pkl").read_bytes())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every method on 1 and on 2 devices, both processes at once; return
    ``{devices: (root folder, worker results)}``."""
    pytest.importorskip("jax")
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("jax_multidevice")
    processes = {devices: start_run(root / str(devices), devices) for devices in (1, 2)}
    try:
        return {
            devices: (
                root / str(devices),
                finish_run(process, root / str(devices), devices),
            )
            for devices, process in processes.items()
        }
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()


def read_run(root: Path, method: str) -> tuple[dict, dict]:
    from sslspec.checkpoint import load_checkpoint

    metrics = json.loads((root / method / "metrics.json").read_text())
    checkpoint = load_checkpoint(root / method / "checkpoint.safetensors")
    return metrics, checkpoint.tensors


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
def test_processes_see_device_counts(runs):
    assert runs[1][1]["device_count"] == 1
    assert runs[2][1]["device_count"] == 2


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("method", METHODS)
def test_metrics_record_devices(runs, method):
    for devices in (1, 2):
        metrics, _ = read_run(runs[devices][0], method)
        assert metrics.get("devices") == devices, metrics.keys()


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("method", METHODS)
def test_loss_history_matches_one_device(runs, method):
    single, _ = read_run(runs[1][0], method)
    mesh, _ = read_run(runs[2][0], method)
    assert len(mesh["loss_history"]) == EPOCHS
    np.testing.assert_allclose(
        mesh["loss_history"], single["loss_history"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("method", METHODS)
def test_final_weights_match_one_device(runs, method):
    single_metrics, single = read_run(runs[1][0], method)
    _, mesh = read_run(runs[2][0], method)
    assert set(mesh) == set(single)
    # AdamW moves a parameter by at most about lr per step.
    bound = 2 * small_config(method, "digits").lr * single_metrics["steps"]
    for name in sorted(single):
        if name.startswith("rng."):
            continue
        expected = np.array(single[name], dtype=np.float64, ndmin=1)
        actual = np.array(mesh[name], dtype=np.float64, ndmin=1)
        parameter = name.removeprefix("optimizer.exp_avg_sq.")
        parameter = parameter.removeprefix("optimizer.exp_avg.")
        invariant = SHIFT_INVARIANT[method].get(parameter)
        if invariant is not None:
            if name == parameter:
                difference = np.abs(actual[invariant] - expected[invariant])
                assert np.max(difference) <= bound, name
            expected[invariant] = 0.0
            actual[invariant] = 0.0
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(
            actual, expected, rtol=1e-3, atol=1e-3 * scale + 1e-7, err_msg=name
        )


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_is_single_device_gradient(runs, method):
    result = runs[2][1]["gradients"][method]
    mesh, single = result["mesh"], result["single"]
    assert mesh["devices"] == 2
    assert single["devices"] == 1
    np.testing.assert_allclose(mesh["loss"], single["loss"], rtol=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in single["gradients"].values())
    for name, expected in single["gradients"].items():
        np.testing.assert_allclose(
            mesh["gradients"][name],
            expected,
            rtol=1e-4,
            atol=1e-5 * scale,
            err_msg=name,
        )
    # A gradient scaled by the device count (or by its inverse) fails here.
    expected = np.concatenate([g.ravel() for g in single["gradients"].values()])
    actual = np.concatenate(
        [mesh["gradients"][name].ravel() for name in single["gradients"]]
    )
    ratio = float(actual @ expected / (expected @ expected))
    assert ratio == pytest.approx(1.0, abs=1e-4)


@pytest.mark.distributed
@pytest.mark.timeout(2 * RUN_TIMEOUT_SECONDS + 60)
def test_indivisible_batch_rejected(runs):
    message = runs[2][1].get("indivisible_error")
    assert message is not None, "a batch of 31 samples on 2 devices was accepted"
    assert f"batch_size {BATCH_SIZE - 1}" in message
    assert "2 cpu devices" in message


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]))
