"""The ``sslspec conformance`` command: run the suite on one backend and report.

The command runs pytest in this process on the package ``sslspec_conformance``
with the plugin's options. It then prints a table of function by dtype with the
outcome and the worst error relative to the tolerance, writes the report as JSON
if asked to, and exits with 1 on any failure. Pytest runs with an empty
configuration of its own, so the settings of the project in the current directory
do not apply.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "format_table"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``sslspec conformance``."""
    parser = argparse.ArgumentParser(
        prog="sslspec conformance",
        description="Check that an sslspec backend computes what the spec defines, "
        "against a float64 NumPy reference.",
    )
    parser.add_argument(
        "backend",
        help="backend name, as registered in the entry-point group "
        "sslspec.backends (see `sslspec backends`)",
    )
    parser.add_argument(
        "--profile",
        choices=["ci", "thorough"],
        default="ci",
        help="Hypothesis profile: ci (derandomised, minutes) or thorough "
        "(thousands of examples per check); default ci",
    )
    parser.add_argument(
        "--report", metavar="FILE", help="also write the report to FILE as JSON"
    )
    parser.add_argument(
        "--device",
        help="device to run on; default: a device other than the backend's default "
        "for new arrays where there is one",
    )
    parser.add_argument(
        "--skips-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file of test id patterns to skip, each with '# reason' (repeatable)",
    )
    parser.add_argument(
        "--xfails-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file of test id patterns expected to fail, each with '# reason' "
        "(repeatable)",
    )
    parser.add_argument(
        "-k",
        dest="keyword",
        metavar="EXPRESSION",
        help="run only tests whose names match the pytest -k expression",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="list every test as pytest runs it",
    )
    return parser


def _pytest_arguments(args: argparse.Namespace, report: Path, ini: Path) -> list[str]:
    arguments = [
        "-c",
        str(ini),
        "--rootdir",
        str(ini.parent),
        "-p",
        "no:cacheprovider",
        "--pyargs",
        "sslspec_conformance",
        "--backend",
        args.backend,
        "--conformance-profile",
        args.profile,
        "--conformance-report",
        str(report),
        "-v" if args.verbose else "-q",
        "-rfE",
    ]
    if args.device:
        arguments += ["--conformance-device", args.device]
    for path in args.skips_file:
        arguments += ["--skips-file", str(Path(path).resolve())]
    for path in args.xfails_file:
        arguments += ["--xfails-file", str(Path(path).resolve())]
    if args.keyword:
        arguments += ["-k", args.keyword]
    return arguments


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    status = cell["status"]
    label = "FAIL" if status == "fail" else status
    ratio = cell.get("worst_ratio")
    if ratio is None:
        return label
    if isinstance(ratio, str):
        return f"{label} {ratio}"
    return f"{label} {ratio:.2g}"


def format_table(report: dict[str, Any]) -> str:
    """Return the report as text: the header, the function by dtype table, and
    the summary counts."""
    header = report["header"]
    lines = [
        f"backend {header['backend']} {header['backend_version']} on device "
        f"{header['device']}; sslspec {header['sslspec_version']}; Hypothesis "
        f"profile {header['hypothesis_profile']} (hypothesis "
        f"{header['hypothesis_version']})",
        f"capabilities: {', '.join(header['capabilities']) or 'none'}",
        "cells: outcome and worst error relative to the tolerance (at most 1 passes)",
        "",
    ]
    table = report["table"]
    columns = list(header["dtypes"])
    columns += sorted({c["dtype"] for c in table} - set(columns))
    functions = sorted({c["function"] for c in table})
    cells = {(c["function"], c["dtype"]): c for c in table}
    rows = [["function", *columns]]
    for function in functions:
        rows.append([function, *(_cell(cells.get((function, d))) for d in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append(
            "  ".join(
                text.ljust(width) for text, width in zip(row, widths, strict=True)
            )
        )
    summary = report["summary"]
    counts = ", ".join(f"{summary[k]} {k}" for k in sorted(summary))
    lines += ["", f"tests: {counts or 'none'}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conformance suite as ``sslspec conformance``; return the exit code.

    Returns 0 when every check passed or failed as an expectation file lists, 1 on
    any failure, and pytest's own code (2 to 5) when the run could not start or
    collected nothing.
    """
    import pytest

    args = build_parser().parse_args(None if argv is None else list(argv))
    with tempfile.TemporaryDirectory(prefix="sslspec-conformance-") as scratch:
        ini = Path(scratch) / "pytest.ini"
        ini.write_text("[pytest]\n", encoding="utf-8")
        report_path = (
            Path(args.report).resolve()
            if args.report
            else Path(scratch) / "report.json"
        )
        code = int(pytest.main(_pytest_arguments(args, report_path, ini)))
        if not report_path.is_file():
            return code or 1
        report = json.loads(report_path.read_text(encoding="utf-8"))

    print()
    print(format_table(report))
    failed = any(cell["status"] == "fail" for cell in report["table"])
    if code == 0 and failed:
        return 1
    return code
