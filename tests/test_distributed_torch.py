"""Data-parallel training on torch.distributed equals one process on the whole batch.

Two gloo ranks on 127.0.0.1 run every check in processes of their own, started
by ``distributed_workers.py``. This file compares their results with the same
computations in the pytest process. Each rank's loss must equal the
single-process loss of the global batch, its gradient with respect to its slice
must be ``world_size`` times the single-process gradient of that slice, and one
DDP training step with synchronised batch norm must leave every rank with the
parameters and running statistics of one single-process step. The same checks
must flag each deliberately faulty collective.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from process_sessions import wait_for_session_exit

torch = pytest.importorskip("torch")

import distributed_workers as workers  # noqa: E402
from sslspec_torch.distributed import (  # noqa: E402
    DistributedBatchSampler,
    LaunchError,
    SyncBatchNorm,
    TorchCollective,
    convert_sync_batchnorm,
    init_process_group,
    launch,
    rank_slice,
)
from sslspec_torch.networks import build_module, canonical_state  # noqa: E402

from sslspec.data import epoch_batches  # noqa: E402
from sslspec.networks import MLP, ConvEncoder  # noqa: E402

WORKERS = Path(workers.__file__)
# Two gloo ranks start in about 10 s on two idle cores; the checks take seconds.
CHECKS_TIMEOUT_SECONDS = 240
# The launcher stops rank 0 within a second of rank 1's failure; the rest is the
# start of three Python processes that import torch.
FAILURE_TIMEOUT_SECONDS = 120
FAILURE_REPORT_SECONDS = 90

#: The check that must flag each faulty collective on the loss cases.
FAULT_CHECKS = {
    "scaled_gradient": "gradient",
    "wrong_rank": "value",
    "detached_gather": "gradient",
}


def run_workers(*arguments: str, timeout: float) -> tuple[int, str, float, int]:
    """Run ``distributed_workers.py`` in a new session; return its exit status,
    output, run time and session id. Kill the whole session on timeout."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(WORKERS), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"distributed_workers.py {' '.join(arguments)} timed out after "
            f"{timeout} s; output:\n{output[-4000:]}"
        )
    return process.returncode, output, time.monotonic() - start, process.pid


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_ranks") / "results.pkl"
    status, output, _, _ = run_workers(
        "torch-checks", str(path), timeout=CHECKS_TIMEOUT_SECONDS
    )
    assert status == 0, f"torch-checks failed:\n{output[-4000:]}"
    return pickle.loads(path.read_bytes())


@pytest.fixture(scope="module")
def loss_reference():
    return workers.torch_losses(workers.LOSS_PLAN["correct"])


@pytest.fixture(scope="module")
def step_references():
    return {
        (loss, optimizer): workers.torch_step(loss, optimizer)
        for loss, optimizer in workers.STEP_PLAN["correct"]
    }


def ranks_of(rank_results, *key):
    return [results[key] for results in rank_results]


# Two gloo ranks, correct collective


@pytest.mark.distributed
@pytest.mark.timeout(CHECKS_TIMEOUT_SECONDS + 60)
def test_rank_losses_equal_global_loss(rank_results, loss_reference):
    ranks = ranks_of(rank_results, "loss", "correct")
    assert len(ranks) == workers.WORLD_SIZE
    assert workers.loss_value_mismatches(ranks, loss_reference) == []


@pytest.mark.distributed
def test_torch_collective_is_collective(rank_results):
    assert [results["is_collective"] for results in rank_results] == [True, True]


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list sockets")
def test_ranks_listen_on_loopback_only(rank_results):
    for rank, results in enumerate(rank_results):
        own, launcher = results["listening"]
        assert own, f"rank {rank} listens on no socket"
        assert launcher, "the launcher listens on no socket"
        for address in own + launcher:
            host = address.rsplit(":", 1)[0]
            assert host in ("127.0.0.1", "::1"), (rank, address)


@pytest.mark.distributed
def test_rank_gradients_scale_global_gradient(rank_results, loss_reference):
    ranks = ranks_of(rank_results, "loss", "correct")
    mismatches = workers.gradient_mismatches(
        ranks, loss_reference, scale=workers.WORLD_SIZE
    )
    assert mismatches == []


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("loss", "optimizer"),
    workers.STEP_PLAN["correct"],
    ids=[f"{loss}-{optimizer}" for loss, optimizer in workers.STEP_PLAN["correct"]],
)
def test_ddp_step_equals_single_process(rank_results, step_references, loss, optimizer):
    ranks = ranks_of(rank_results, "step", "correct", loss, optimizer)
    reference = step_references[loss, optimizer]
    assert workers.step_mismatches(f"{loss}/{optimizer}", ranks, reference) == []


@pytest.mark.distributed
def test_ddp_step_moves_parameters(rank_results, step_references):
    # Guards the step checks against comparing two unchanged networks.
    encoder = workers._torch_step_model().encoder
    initial = encoder.layers[0].weight.detach().numpy()
    for (loss, optimizer), reference in step_references.items():
        moved = np.max(np.abs(reference["encoder.layers.0.weight"] - initial))
        assert moved > 100 * workers.STEP_ABSOLUTE_TOLERANCE, (loss, optimizer)


# Faulty collectives


@pytest.mark.distributed
@pytest.mark.parametrize("fault", workers.FAULTS)
def test_loss_checks_flag_fault(rank_results, loss_reference, fault):
    ranks = ranks_of(rank_results, "loss", fault)
    if FAULT_CHECKS[fault] == "value":
        mismatches = workers.loss_value_mismatches(ranks, loss_reference)
    else:
        mismatches = workers.gradient_mismatches(
            ranks, loss_reference, scale=workers.WORLD_SIZE
        )
    for name in workers.LOSS_PLAN[fault]:
        assert any(line.startswith(f"{name}:") for line in mismatches), name


@pytest.mark.distributed
@pytest.mark.parametrize("fault", workers.FAULTS)
def test_step_checks_flag_fault(rank_results, step_references, fault):
    for loss, optimizer in workers.STEP_PLAN[fault]:
        ranks = ranks_of(rank_results, "step", fault, loss, optimizer)
        reference = step_references[loss, optimizer]
        mismatches = workers.step_mismatches(f"{loss}/{optimizer}", ranks, reference)
        assert mismatches, (loss, optimizer)


# Launch failures


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list processes")
@pytest.mark.timeout(FAILURE_TIMEOUT_SECONDS + 60)
def test_failing_rank_stops_launch():
    status, output, seconds, session = run_workers(
        "torch-fail", timeout=FAILURE_TIMEOUT_SECONDS
    )
    assert status == 1, output[-4000:]
    # Rank 0 may die of the broken all-reduce as rank 1 exits, and the launcher
    # may notice rank 0 first. The rank that raised must still come first.
    assert "failed ranks: [1" in output, output[-4000:]
    assert "rank 1 (local rank 1) " in output
    assert "deliberate failure in a test worker" in output
    assert seconds < FAILURE_REPORT_SECONDS
    assert wait_for_session_exit(session) == []


# Single-process units


def test_rank_slices_partition_batch():
    for world_size in (1, 2, 3, 4):
        rows = np.arange(12)
        parts = [rows[rank_slice(12, rank, world_size)] for rank in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(parts), rows)


def test_rank_slice_rejects_uneven_batch():
    with pytest.raises(ValueError, match="multiple of 3"):
        rank_slice(10, 0, 3)


def test_rank_slice_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        rank_slice(8, 2, 2)


def test_sampler_slices_form_global_batches():
    world_size = 3
    samplers = [
        DistributedBatchSampler(50, 12, seed=4, rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    for sampler in samplers:
        sampler.set_epoch(2)
    expected = list(epoch_batches(50, 12, seed=4, epoch=2))
    slices = list(zip(*samplers, strict=True))
    assert len(slices) == len(expected) == len(samplers[0])
    for parts, batch in zip(slices, expected, strict=True):
        np.testing.assert_array_equal(np.concatenate(parts), batch)


def test_sampler_rejects_uneven_batch():
    with pytest.raises(ValueError, match="12 samples must split evenly over 5"):
        DistributedBatchSampler(50, 12, seed=0, rank=0, world_size=5)


def test_sync_batch_norm_alone_is_batch_norm():
    generator = torch.Generator().manual_seed(0)
    for shape, reference_type in (
        ((6, 4), torch.nn.BatchNorm1d),
        ((6, 4, 3, 3), torch.nn.BatchNorm2d),
    ):
        x = torch.randn(shape, generator=generator)
        reference = reference_type(4)
        synced = SyncBatchNorm(4)
        for train in (True, False):
            reference.train(train)
            synced.train(train)
            torch.testing.assert_close(synced(x), reference(x))
        torch.testing.assert_close(synced.running_var, reference.running_var)


def test_sync_batch_norm_rejects_vector():
    with pytest.raises(ValueError, match=r"shape \(N, C\) or \(N, C, \.\.\.\), got"):
        SyncBatchNorm(3)(torch.zeros(3))


def test_convert_sync_batchnorm_keeps_state():
    for description in (
        MLP(5, (6, 7), 3, batch_norm=True),
        ConvEncoder(in_channels=1, image_size=(8, 8), channels=(4, 8)),
    ):
        module = build_module(description)
        before = canonical_state(module, description)
        converted = convert_sync_batchnorm(module)
        after = canonical_state(converted, description)
        assert list(after) == list(before)
        for name, tensor in after.items():
            assert tensor is before[name], name
        norms = [m for m in converted.modules() if isinstance(m, SyncBatchNorm)]
        assert norms, description
        assert not any(
            type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
            for m in converted.modules()
        )


def test_torch_collective_needs_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchCollective()


def test_init_process_group_names_missing_variable(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="environment variable RANK is not set"):
        init_process_group("cpu")


def test_launch_rejects_zero_processes():
    with pytest.raises(ValueError, match="nproc_per_node must be at least 1, got 0"):
        launch(workers.torch_failing_rank, nproc_per_node=0)


def test_launch_error_lists_ranks():
    error = LaunchError("rank 1 failed", [1])
    assert error.ranks == [1]
