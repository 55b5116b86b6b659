"""Pytest plugin that runs the conformance suite on one backend.

Installed through the ``pytest11`` entry point, so pytest loads it in every run of
a project that has sslspec installed. It then only adds its command-line options:
the suite's tests run when they are collected, which ``--pyargs
sslspec_conformance`` does, and they need ``--backend``::

    pytest --pyargs sslspec_conformance --backend numpy
    pytest --pyargs sslspec_conformance --backend mybackend \\
        --conformance-profile thorough --xfails-file my-xfails.txt

Without ``--backend`` collected conformance tests are skipped with that reason, and
tests of other projects see no fixture, marker or setting of this plugin except the
``sslspec_function`` marker and the ``conformance`` fixture, which are used only here.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ConformanceState", "PACKAGE"]

PACKAGE = "sslspec_conformance"
_STATE = pytest.StashKey["ConformanceState"]()
_ITEM_INFO = pytest.StashKey[dict]()


@dataclass
class ConformanceState:
    """State of one conformance run: its backend, settings and results."""

    backend: Any
    backend_name: str
    device: str
    dtypes: tuple[str, ...]
    profile: str
    expectations: list = field(default_factory=list)
    unknown_dtypes: tuple[str, ...] = ()
    results: dict[str, dict] = field(default_factory=dict)
    report_path: str | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sslspec-conformance", "sslspec conformance suite")
    group.addoption(
        "--backend",
        default=None,
        metavar="NAME",
        help="sslspec backend to check, by its entry-point name in the group "
        "sslspec.backends; the conformance tests run only with this option",
    )
    group.addoption(
        "--conformance-profile",
        default="ci",
        choices=["ci", "thorough"],
        help="Hypothesis profile: ci (derandomised, minutes) or thorough "
        "(thousands of examples per check); default ci",
    )
    group.addoption(
        "--conformance-device",
        default=None,
        metavar="DEVICE",
        help="device to run on; default: the first device of the backend that is "
        "not its default device for new arrays, else the default",
    )
    group.addoption(
        "--skips-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file of test id patterns to skip, one per line with '# reason'",
    )
    group.addoption(
        "--xfails-file",
        action="append",
        default=[],
        metavar="FILE",
        help="file of test id patterns expected to fail, one per line with '# reason'",
    )
    group.addoption(
        "--conformance-report",
        default=None,
        metavar="FILE",
        help="write the results of the conformance run to FILE as JSON",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sslspec_function(name): the sslspec function a conformance test checks",
    )
    name = config.getoption("--backend", default=None)
    if not name:
        return

    from sslspec.backend import BackendUnavailableError, load_backend
    from sslspec_conformance import expectations, profiles
    from sslspec_conformance.tolerances import TOLERANCES

    try:
        backend = load_backend(name)
    except BackendUnavailableError as error:
        raise pytest.UsageError(f"--backend {name}: {error}") from None

    profile = config.getoption("--conformance-profile")
    profiles.load(profile)
    device = _choose_device(backend, config.getoption("--conformance-device"))
    declared = tuple(backend.dtypes())
    dtypes = tuple(d for d in declared if d in TOLERANCES)
    unknown = tuple(d for d in declared if d not in TOLERANCES)

    try:
        entries = expectations.builtin(name)
        for path in config.getoption("--skips-file"):
            entries += expectations.load_file(path, kind="skip")
        for path in config.getoption("--xfails-file"):
            entries += expectations.load_file(path, kind="xfail")
    except expectations.ExpectationError as error:
        raise pytest.UsageError(str(error)) from None

    config.stash[_STATE] = ConformanceState(
        backend=backend,
        backend_name=name,
        device=device,
        dtypes=dtypes,
        profile=profile,
        expectations=entries,
        unknown_dtypes=unknown,
        report_path=config.getoption("--conformance-report"),
    )


def _choose_device(backend: Any, requested: str | None) -> str:
    """Return the device to test on, as ``backend.device_of`` names it."""
    import numpy as np

    probe = np.zeros(1)
    if requested:
        try:
            resolved = backend.resolve_device(requested)
        except ValueError as error:
            raise pytest.UsageError(f"--conformance-device: {error}") from None
        return backend.device_of(backend.asarray(probe, device=resolved))
    default = backend.device_of(backend.asarray(probe))
    for device in backend.devices():
        placed = backend.device_of(backend.asarray(probe, device=device))
        if placed != default:
            return placed
    return default


def _state(config: pytest.Config) -> ConformanceState | None:
    return config.stash.get(_STATE, None)


def _is_conformance_item(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and module.__name__.startswith(f"{PACKAGE}.test_")


def _is_conformance_module(module: Any) -> bool:
    return module is not None and module.__name__.startswith(f"{PACKAGE}.test_")


def expectation_id(item: pytest.Item) -> str:
    """Return the id that expectation patterns match: ``file.py::name[params]``."""
    return f"{Path(str(item.path)).name}::{item.name}"


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = _state(config)
    if state is None:
        return None
    backend = state.backend
    lines = [
        f"sslspec conformance: backend {state.backend_name} {backend.version()} on "
        f"device {state.device}, dtypes {', '.join(state.dtypes)}, capabilities "
        f"{', '.join(sorted(backend.capabilities)) or 'none'}, profile {state.profile}"
    ]
    if state.unknown_dtypes:
        lines.append(
            "sslspec conformance: no tolerance for dtypes "
            f"{', '.join(state.unknown_dtypes)}; they are not checked"
        )
    return lines


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not _is_conformance_module(metafunc.module):
        return
    if "dtype" not in metafunc.fixturenames:
        return
    state = _state(metafunc.config)
    dtypes = state.dtypes if state is not None else ("float32",)
    metafunc.parametrize("dtype", dtypes)


@pytest.fixture(scope="session")
def conformance(request: pytest.FixtureRequest):
    """Return the :class:`~sslspec_conformance.harness.Harness` of the backend
    under test."""
    state = _state(request.config)
    if state is None:
        pytest.skip("the sslspec conformance suite needs --backend NAME")
    from sslspec_conformance.harness import Harness

    return Harness(state.backend, state.device)


def _attribution(item: pytest.Item) -> dict[str, str]:
    """Return the function and dtype a conformance test checks, for reports."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    marker = item.get_closest_marker("sslspec_function")
    if "function" in params:
        function = str(params["function"])
    elif marker is not None:
        function = str(marker.args[0])
    else:
        function = item.originalname
    dtype = str(
        params.get("dtype", marker.kwargs.get("dtype", "any") if marker else "any")
    )
    check = getattr(item, "originalname", item.name)
    return {"function": function, "dtype": dtype, "check": check}


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    state = _state(config)
    for item in items:
        if not _is_conformance_item(item):
            continue
        item.stash[_ITEM_INFO] = _attribution(item)
        if state is None:
            item.add_marker(
                pytest.mark.skip(reason="the sslspec conformance suite needs --backend")
            )
            continue
        identifier = expectation_id(item)
        for entry in state.expectations:
            if not entry.matches(identifier):
                continue
            entry.matched.append(identifier)
            reason = f"{entry.reason} ({entry.source}:{entry.line})"
            if entry.kind == "skip":
                item.add_marker(pytest.mark.skip(reason=reason))
            else:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
            break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _is_conformance_item(item) or _state(item.config) is None:
        yield
        return
    from sslspec_conformance import harness

    harness.begin_recording()
    try:
        yield
    finally:
        item.stash[_ITEM_INFO]["measured"] = harness.end_recording()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not _is_conformance_item(item):
        return
    state = _state(item.config)
    if state is None:
        return
    report = outcome.get_result()
    info = item.stash.get(_ITEM_INFO, {})
    entry = state.results.setdefault(
        item.nodeid,
        {
            "id": expectation_id(item),
            "function": info.get("function"),
            "dtype": info.get("dtype"),
            "check": info.get("check"),
            "outcome": None,
            "worst_ratio": None,
            "message": None,
            "seconds": 0.0,
        },
    )
    entry["seconds"] += float(getattr(report, "duration", 0.0))
    measured = info.get("measured", {})
    if measured.get("worst_ratio") is not None:
        entry["worst_ratio"] = measured["worst_ratio"]
    status = _status(report)
    if status is None:
        return
    # A run has up to three reports (setup, call and teardown). The most severe
    # one decides, so a teardown error after a pass makes the test an error.
    current = entry["outcome"]
    if current is None or _SEVERITY[status] < _SEVERITY[current]:
        entry["outcome"] = status
        entry["message"] = _message(report)


_SEVERITY = {"error": 0, "fail": 0, "xfail": 1, "pass": 2, "skip": 3}


def _status(report: pytest.TestReport) -> str | None:
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            return "xfail" if report.skipped else "fail"
        if report.passed:
            return "pass"
        if report.skipped:
            return "skip"
        return "fail"
    if report.failed:
        return "error"
    if report.skipped:
        return "xfail" if hasattr(report, "wasxfail") else "skip"
    return None


def _message(report: pytest.TestReport) -> str | None:
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail) or None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return crash.message
        return str(report.longrepr)[-2000:]
    return None


STATUS_ORDER = ("fail", "error", "xfail", "pass", "skip")


def build_report(state: ConformanceState) -> dict[str, Any]:
    """Return the JSON-serialisable report of a run: header, summary, table, tests."""
    import hypothesis

    backend = state.backend
    header = {
        "backend": state.backend_name,
        "backend_version": backend.version(),
        "device": state.device,
        "sslspec_version": _sslspec_version(),
        "hypothesis_profile": state.profile,
        "hypothesis_version": hypothesis.__version__,
        "dtypes": list(state.dtypes),
        "unchecked_dtypes": list(state.unknown_dtypes),
        "capabilities": sorted(backend.capabilities),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    tests = sorted(state.results.values(), key=lambda t: t["id"])
    summary: dict[str, int] = defaultdict(int)
    for test in tests:
        summary[test["outcome"] or "error"] += 1

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for test in tests:
        key = (test["function"], test["dtype"])
        cell = cells.setdefault(
            key,
            {"function": key[0], "dtype": key[1], "status": None, "worst_ratio": None}
            | {status: 0 for status in STATUS_ORDER},
        )
        outcome = test["outcome"] or "error"
        cell[outcome] += 1
        ratio = test["worst_ratio"]
        if ratio is not None and outcome in ("pass", "fail"):
            if cell["worst_ratio"] is None or not ratio <= cell["worst_ratio"]:
                cell["worst_ratio"] = ratio
    for cell in cells.values():
        cell["status"] = next(s for s in STATUS_ORDER if cell[s])
        if cell["status"] == "error":
            cell["status"] = "fail"

    unused = [
        {"source": e.source, "line": e.line, "kind": e.kind, "pattern": e.pattern}
        for e in state.expectations
        if not e.matched
    ]
    return {
        "header": header,
        "summary": dict(summary),
        "table": sorted(cells.values(), key=lambda c: (c["function"], c["dtype"])),
        "tests": tests,
        "unused_expectations": unused,
    }


def _sslspec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sslspec")
    except PackageNotFoundError:
        return "unknown"


def _finite(value: Any) -> Any:
    """Replace infinite ratios by the string "inf", which JSON can hold."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _state(session.config)
    if state is None or not state.report_path:
        return
    report = build_report(state)
    report["header"]["pytest_exit_status"] = int(exitstatus)
    path = Path(state.report_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=2) + "\n", encoding="utf-8")


def pytest_terminal_summary(
    terminalreporter: Any, exitstatus: int, config: Any
) -> None:
    state = _state(config)
    if state is None:
        return
    unused = [e for e in state.expectations if not e.matched]
    if unused:
        terminalreporter.section("sslspec conformance: unused expectations")
        for entry in unused:
            terminalreporter.write_line(
                f"{entry.source}:{entry.line}: {entry.kind} {entry.pattern} matched "
                "no test"
            )
    if not state.results:
        return
    print_table = config.getoption("verbose", 0) >= 0
    if print_table:
        from sslspec_conformance.cli import format_table

        terminalreporter.section("sslspec conformance")
        for line in format_table(_finite(build_report(state))).splitlines():
            terminalreporter.write_line(line)
