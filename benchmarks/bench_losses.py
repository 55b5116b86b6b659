"""Time sslspec's losses against hand-written PyTorch versions of the same equations.

Each measurement is one forward and backward pass on CPU in float32. The spec and
the native version alternate, so that a change in machine load affects both alike,
and the script prints the median time of each, their ratio (spec / native), and
the ratio of the minimum times.

Run from the repository root::

    python benchmarks/bench_losses.py
    python benchmarks/bench_losses.py --repeats 50 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import sslspec


def native_nt_xent(
    z_i: torch.Tensor, z_j: torch.Tensor, temperature: float
) -> torch.Tensor:
    z = F.normalize(torch.cat([z_i, z_j]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    count = z_i.shape[0]
    labels = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    return F.cross_entropy(logits, labels)


def native_off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    size = matrix.shape[0]
    return matrix.flatten()[:-1].view(size - 1, size + 1)[:, 1:]


def native_barlow_twins(
    z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float
) -> torch.Tensor:
    count = z_a.shape[0]
    a = F.batch_norm(z_a, None, None, training=True, eps=1e-5)
    b = F.batch_norm(z_b, None, None, training=True, eps=1e-5)
    c = a.T @ b / count
    on_diagonal = (torch.diagonal(c) - 1.0).pow(2).sum()
    off_diagonal = native_off_diagonal(c).pow(2).sum()
    return on_diagonal + lambda_param * off_diagonal


def native_vicreg(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    count, dim = z_a.shape
    invariance = F.mse_loss(z_a, z_b)
    a = z_a - z_a.mean(dim=0)
    b = z_b - z_b.mean(dim=0)
    std_a = torch.sqrt(a.var(dim=0) + 1e-4)
    std_b = torch.sqrt(b.var(dim=0) + 1e-4)
    variance = (F.relu(1.0 - std_a).mean() + F.relu(1.0 - std_b).mean()) / 2.0
    covariance_a = a.T @ a / (count - 1)
    covariance_b = b.T @ b / (count - 1)
    covariance = (
        native_off_diagonal(covariance_a).pow(2).sum() / dim
        + native_off_diagonal(covariance_b).pow(2).sum() / dim
    )
    return 25.0 * invariance + 25.0 * variance + 1.0 * covariance


def time_forward_backward(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z_a: torch.Tensor,
    z_b: torch.Tensor,
) -> float:
    a = z_a.detach().requires_grad_(True)
    b = z_b.detach().requires_grad_(True)
    start = time.perf_counter()
    loss(a, b).backward()
    return time.perf_counter() - start


def compare(
    name: str,
    spec: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    native: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    warmup: int,
    repeats: int,
) -> float:
    generator = torch.Generator().manual_seed(0)
    z_a = torch.randn(shape, generator=generator)
    z_b = z_a + 0.5 * torch.randn(shape, generator=generator)
    torch.testing.assert_close(spec(z_a, z_b), native(z_a, z_b), rtol=1e-4, atol=1e-4)

    for _ in range(warmup):
        time_forward_backward(spec, z_a, z_b)
        time_forward_backward(native, z_a, z_b)
    spec_times = []
    native_times = []
    for _ in range(repeats):
        spec_times.append(time_forward_backward(spec, z_a, z_b))
        native_times.append(time_forward_backward(native, z_a, z_b))

    spec_median = statistics.median(spec_times)
    native_median = statistics.median(native_times)
    ratio = spec_median / native_median
    # The minimum is the time least disturbed by other processes on a busy machine.
    min_ratio = min(spec_times) / min(native_times)
    print(
        f"{name:<18} {str(shape):<12} {1e3 * spec_median:>10.2f} "
        f"{1e3 * native_median:>10.2f} {ratio:>7.3f} {min_ratio:>9.3f}"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5, help="untimed passes each")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes each")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, float32, "
        f"median of {args.repeats} forward+backward passes"
    )
    print(
        f"{'loss':<18} {'shape':<12} {'spec ms':>10} {'native ms':>10} "
        f"{'ratio':>7} {'min ratio':>9}"
    )
    compare(
        "nt_xent_loss",
        lambda a, b: sslspec.nt_xent_loss(a, b, temperature=0.5),
        lambda a, b: native_nt_xent(a, b, 0.5),
        (1024, 128),
        args.warmup,
        args.repeats,
    )
    compare(
        "barlow_twins_loss",
        lambda a, b: sslspec.barlow_twins_loss(a, b, lambda_param=0.005),
        lambda a, b: native_barlow_twins(a, b, 0.005),
        (256, 2048),
        args.warmup,
        args.repeats,
    )
    compare(
        "vicreg_loss",
        sslspec.vicreg_loss,
        native_vicreg,
        (256, 2048),
        args.warmup,
        args.repeats,
    )


if __name__ == "__main__":
    main()
