"""Run every method's default pretraining on the digits and check the quality targets.

Usage::

    python benchmarks/quality_run.py [--methods simclr byol ...] [--backend torch]
        [--out runs/quality] [-- extra sslspec pretrain options]

Each method runs as ``python -m sslspec pretrain --method M --backend B --out
OUT/M --quiet`` in its own process, so the wall time includes start-up, training
and evaluation. The script prints a Markdown table of the results and exits with
status 1 if a target is missed:

- SimCLR, BYOL, Barlow Twins and VICReg: k-NN and linear-probe accuracy of at
  least 0.97, and k-NN accuracy above both the random-initialisation baseline and
  the raw pixels;
- MAE: linear-probe accuracy above its random-initialisation baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("simclr", "byol", "barlow-twins", "vicreg", "mae")
THRESHOLD = 0.97


def check_targets(method: str, metrics: dict) -> list[str]:
    """Return the targets that ``metrics`` misses."""
    misses = []
    if method == "mae":
        if (
            not metrics["linear_probe_accuracy"]
            > metrics["baseline_linear_probe_accuracy"]
        ):
            misses.append("linear probe not above random init")
        return misses
    for key in ("knn_accuracy", "linear_probe_accuracy"):
        if metrics[key] < THRESHOLD:
            misses.append(f"{key} {metrics[key]:.4f} < {THRESHOLD}")
    for baseline in ("baseline_knn_accuracy", "raw_knn_accuracy"):
        if not metrics["knn_accuracy"] > metrics[baseline]:
            misses.append(f"knn_accuracy not above {baseline}")
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--out", default="runs/quality", help="parent run folder")
    parser.add_argument("extra", nargs="*", help="options passed to sslspec pretrain")
    args = parser.parse_args()

    rows = []
    failed = False
    for method in args.methods:
        run_dir = Path(args.out) / f"{method}-{args.backend}-{int(time.time())}"
        command = [
            sys.executable,
            "-m",
            "sslspec",
            "pretrain",
            "--method",
            method,
            "--backend",
            args.backend,
            "--out",
            str(run_dir),
            "--quiet",
            *args.extra,
        ]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            rows.append(f"| {method} | failed with status {result.returncode} |")
            failed = True
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        misses = check_targets(method, metrics)
        failed |= bool(misses)
        display = " ".join(["sslspec", *(shlex.quote(part) for part in command[3:])])
        rows.append(
            f"| {method} | {metrics['epochs']} | {wall:.0f} | "
            f"{metrics['train_seconds']:.0f} | {metrics['knn_accuracy']:.4f} | "
            f"{metrics['linear_probe_accuracy']:.4f} | "
            f"{metrics['baseline_knn_accuracy']:.4f} | "
            f"{metrics['baseline_linear_probe_accuracy']:.4f} | "
            f"{metrics['raw_knn_accuracy']:.4f} | "
            f"{metrics['raw_linear_probe_accuracy']:.4f} | "
            f"{'; '.join(misses) or 'met'} | `{display}` |"
        )
        print(
            f"{method}: {wall:.0f} s, {', '.join(misses) or 'targets met'}",
            file=sys.stderr,
            flush=True,
        )

    print(f"Python {platform.python_version()} on {platform.platform()}")
    print()
    print(
        "| method | epochs | wall s | train s | k-NN | linear | random-init k-NN | "
        "random-init linear | raw k-NN | raw linear | targets | command |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
