"""The ``sslspec`` command: ``pretrain``, ``evaluate``, ``backends`` and
``conformance``.

See docs/cli.md for every option. The command prints results and errors; progress
goes to standard error through tqdm and :mod:`logging`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["main", "build_parser"]

logger = logging.getLogger("sslspec.cli")

_PRETRAIN_OPTIONS = (
    "method",
    "backend",
    "data",
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "device",
    "precision",
    "nproc_per_node",
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``sslspec`` command."""
    from .config import PRECISIONS
    from .networks import METHODS

    parser = argparse.ArgumentParser(
        prog="sslspec",
        allow_abbrev=False,
        description="Self-supervised pretraining with losses written once against "
        "the Python Array API.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    pretrain = commands.add_parser(
        "pretrain",
        allow_abbrev=False,
        help="pretrain an encoder, evaluate it and write a run folder",
        description="Pretrain an encoder with a self-supervised method, evaluate it "
        "with k-NN and a linear probe, and write a run folder. Options that are not "
        "given take the method's tuned defaults (see docs/cli.md).",
    )
    pretrain.add_argument(
        "--method", choices=METHODS, default="simclr", help="method (default simclr)"
    )
    pretrain.add_argument(
        "--backend", default=None, help="backend to train with (default torch)"
    )
    pretrain.add_argument(
        "--data",
        default=None,
        help="'digits' (default), a .npy/.npz/.csv file, or a folder of images with "
        "one subfolder per class",
    )
    pretrain.add_argument(
        "--epochs", type=_positive_int, default=None, help="number of epochs"
    )
    pretrain.add_argument(
        "--batch-size", type=_positive_int, default=None, help="samples per batch"
    )
    pretrain.add_argument(
        "--lr", type=_positive_float, default=None, help="peak AdamW learning rate"
    )
    pretrain.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of initialisation, shuffling and augmentations (default 0)",
    )
    pretrain.add_argument(
        "--device",
        default=None,
        help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps",
    )
    pretrain.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32 (default) or bf16 (autocast; losses stay in float32)",
    )
    pretrain.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train in N processes on this machine, each on its share of every "
        "batch; --batch-size stays the global batch and must be a multiple of N "
        "(default 1; torch backend)",
    )
    pretrain.add_argument(
        "--out",
        default=None,
        help="run folder to create (default runs/<method>-<backend>-<timestamp>)",
    )
    pretrain.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its last checkpoint; only --epochs, "
        "--device and --nproc-per-node may differ from the run's settings",
    )
    pretrain.add_argument(
        "--quiet", action="store_true", help="no progress bar and no log messages"
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a run's checkpoint again",
        description="Rebuild a run's networks, load its checkpoint, and rewrite its "
        "metrics.json and plots.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a pretraining run folder")
    evaluate.add_argument(
        "--backend",
        default=None,
        help="backend to load the weights into (default: the run's)",
    )
    evaluate.add_argument("--device", default=None, help="device (default: the run's)")
    evaluate.add_argument("--quiet", action="store_true", help="no log messages")

    commands.add_parser(
        "backends",
        help="list installed backends",
        description="List every installed backend with its version, devices and "
        "capabilities, or the reason it cannot load.",
    )
    commands.add_parser(
        "conformance",
        help="run the backend conformance suite (options: sslspec conformance -h)",
        add_help=False,
    )
    return parser


def _configure_logging(quiet: bool) -> None:
    """Log warnings of every library, and sslspec's progress unless ``quiet``."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("sslspec").setLevel(logging.WARNING if quiet else logging.INFO)


@contextlib.contextmanager
def _logging_around_progress(enabled: bool) -> Iterator[None]:
    """Route log records through tqdm while a bar is shown, so they do not break it."""
    if not enabled:
        yield
        return
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield
        return
    with logging_redirect_tqdm():
        yield


def _format_accuracy(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _processes(metrics: dict[str, Any]) -> str:
    count = metrics.get("nproc_per_node", 1)
    return f", {count} processes" if count > 1 else ""


def format_metrics(metrics: dict[str, Any]) -> str:
    """Return the summary table that ``pretrain`` and ``evaluate`` print."""
    lines = [
        f"run folder   {metrics['run_dir']}",
        f"method       {metrics['method']}  (backend {metrics['backend']}, device "
        f"{metrics['device']}{_processes(metrics)})",
        f"epochs       {metrics['epochs']}  ({metrics['train_seconds']:.1f} s of "
        f"training)",
    ]
    if metrics.get("final_loss") is not None:
        lines.append(f"final loss   {metrics['final_loss']:.5f}")
    if metrics.get("evaluation", "done") != "done":
        lines.append(f"evaluation   {metrics['evaluation']}")
        return "\n".join(lines)
    lines += [
        "",
        f"{'features':<22}{'k-NN':>8}{'linear probe':>15}",
        f"{'pretrained encoder':<22}{_format_accuracy(metrics['knn_accuracy']):>8}"
        f"{_format_accuracy(metrics['linear_probe_accuracy']):>15}",
        f"{'random init':<22}{_format_accuracy(metrics['baseline_knn_accuracy']):>8}"
        f"{_format_accuracy(metrics['baseline_linear_probe_accuracy']):>15}",
        f"{'raw inputs':<22}{_format_accuracy(metrics['raw_knn_accuracy']):>8}"
        f"{_format_accuracy(metrics['raw_linear_probe_accuracy']):>15}",
    ]
    return "\n".join(lines)


def _run_pretrain(args: argparse.Namespace, given: set[str]) -> int:
    from .pretrain import (
        RESUMABLE_OPTIONS,
        default_config,
        pretrain,
        read_config,
        resume_run,
    )

    progress = not args.quiet
    if args.resume is not None:
        if args.out is not None:
            print(
                "error: give either --resume RUN_DIR or --out, not both; a resumed "
                "run writes into RUN_DIR",
                file=sys.stderr,
            )
            return 2
        saved = read_config(args.resume)
        for option in sorted(given - set(RESUMABLE_OPTIONS)):
            value = getattr(args, option)
            if value != getattr(saved, option):
                flag = "--" + option.replace("_", "-")
                allowed = ", ".join(
                    "--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS
                )
                print(
                    f"error: {flag} {value} differs from the run's saved value "
                    f"{getattr(saved, option)}; a resumed run keeps its settings, "
                    f"and only {allowed} may change",
                    file=sys.stderr,
                )
                return 2
        with _logging_around_progress(progress):
            metrics = resume_run(
                args.resume,
                epochs=args.epochs,
                device=args.device,
                nproc_per_node=args.nproc_per_node,
                progress=progress,
            )
    else:
        overrides = {option: getattr(args, option) for option in _PRETRAIN_OPTIONS}
        method = overrides.pop("method")
        config = default_config(method, **overrides)
        out_dir = args.out
        if out_dir is None:
            from .pretrain import default_run_dir

            out_dir = default_run_dir(config.method, config.backend)
        print(f"run folder: {out_dir}", flush=True)
        with _logging_around_progress(progress):
            metrics = pretrain(config, out_dir=out_dir, progress=progress)
    print(format_metrics(metrics))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .pretrain import evaluate_run

    metrics = evaluate_run(args.run_dir, backend=args.backend, device=args.device)
    print(format_metrics(metrics))
    return 0


def _run_backends() -> int:
    from .backend import list_backends

    infos = list_backends()
    if not infos:
        print("no backends are installed")
        return 1
    for info in infos:
        if info.available:
            print(f"{info.name}  {info.version}  ({info.target})")
            print(f"    devices:      {', '.join(info.devices) or '-'}")
            print(f"    capabilities: {', '.join(info.capabilities) or '-'}")
        else:
            print(f"{info.name}  unavailable  ({info.target})")
            print(f"    reason: {info.error}")
    return 0


def _run_conformance(argv: Sequence[str]) -> int:
    try:
        from sslspec_conformance.cli import main as conformance_main
    except ImportError as error:
        print(
            f"error: the conformance suite is not installed ({error}); install "
            f"sslspec with its conformance package, for example `pip install -e .` "
            f"from a source checkout",
            file=sys.stderr,
        )
        return 2
    result = conformance_main(list(argv))
    return int(result or 0)


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Return the destinations of the pretrain options present on the command line."""
    given = set()
    for option in _PRETRAIN_OPTIONS:
        flag = "--" + option.replace("_", "-")
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
            given.add(option)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sslspec`` command and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "conformance":
        return _run_conformance(argv[1:])

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "backends":
        _configure_logging(quiet=True)
        return _run_backends()

    _configure_logging(args.quiet)
    from .backend import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .pretrain import TrainingError

    try:
        if args.command == "pretrain":
            return _run_pretrain(args, _given_options(parser, argv))
        return _run_evaluate(args)
    except (
        BackendUnavailableError,
        CheckpointError,
        DataError,
        TrainingError,
        FileExistsError,
        ValueError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted; the last completed epoch's checkpoint is kept, continue "
            "with --resume",
            file=sys.stderr,
        )
        return 130
