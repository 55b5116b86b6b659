"""The conformance suite run on every backend, through its command and its plugin.

Each installed backend runs the whole suite under the ``ci`` profile in a
subprocess of ``python -m sslspec_conformance``, the code behind
``sslspec conformance``. The runs start together and each test waits for its own.
A minimal third-party backend, registered through an entry point in a temporary
``dist-info`` directory on ``PYTHONPATH``, shows that the suite runs on code
outside this repository, catches a deviation, and honours expectation files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sslspec_conformance import expectations
from sslspec_conformance.cli import format_table
from sslspec_conformance.tolerances import TOLERANCES
from sslspec_conformance.tolerances import format_table as tolerance_table

from sslspec.backend import BackendUnavailableError, load_backend

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "conformance.md"
BACKENDS = ["numpy", "array-api-strict", "torch", "jax"]
SPEC_FUNCTIONS = {
    "nt_xent_loss",
    "byol_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "invariance_loss",
    "variance_loss",
    "covariance_loss",
    "reconstruction_loss",
    "generate_mask",
    "patchify",
    "unpatchify",
    "ema_update",
    "momentum_schedule",
}
# JAX offers float64 only in 64-bit mode, which the suite should check too.
EXTRA_ENVIRONMENT = {"jax": {"JAX_ENABLE_X64": "1"}}


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(extra or {})
    return environment


def _conformance_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "sslspec_conformance", *arguments]


class BackendRuns:
    """Full conformance runs of every loadable backend, started together."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: dict[str, subprocess.Popen] = {}
        self.results: dict[str, tuple[int, str, dict | None]] = {}

    def start(self, name: str) -> None:
        report = self.directory / f"{name}.json"
        log = open(self.directory / f"{name}.log", "w")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(
            _conformance_command(name, "--report", str(report)),
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_environment(EXTRA_ENVIRONMENT.get(name)),
        )

    def result(self, name: str) -> tuple[int, str, dict | None]:
        if name not in self.results:
            code = self.processes[name].wait()
            output = (self.directory / f"{name}.log").read_text()
            report_path = self.directory / f"{name}.json"
            report = (
                json.loads(report_path.read_text()) if report_path.is_file() else None
            )
            self.results[name] = (code, output, report)
        return self.results[name]


def _unavailable_reason(name: str) -> str | None:
    try:
        load_backend(name)
    except BackendUnavailableError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    runs = BackendRuns(tmp_path_factory.mktemp("conformance-runs"))
    for name in BACKENDS:
        if _unavailable_reason(name) is None:
            runs.start(name)
    yield runs
    for process in runs.processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", BACKENDS)
def test_suite_passes_on_backend(backend_runs, name):
    reason = _unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name} cannot be loaded: {reason}")
    code, output, report = backend_runs.result(name)

    assert code == 0, output[-6000:]
    assert report is not None
    failed = [cell for cell in report["table"] if cell["status"] == "fail"]
    assert failed == [], output[-6000:]
    functions = {cell["function"] for cell in report["table"]}
    assert SPEC_FUNCTIONS <= functions
    assert report["summary"].get("pass", 0) > 0


@pytest.mark.timeout(1800)
def test_report_header_and_table(backend_runs):
    code, output, report = backend_runs.result("numpy")
    header = report["header"]

    assert code == 0, output[-6000:]
    assert header["backend"] == "numpy"
    assert header["backend_version"] == load_backend("numpy").version()
    assert header["device"] == "cpu"
    assert header["sslspec_version"]
    assert header["hypothesis_profile"] == "ci"
    assert header["dtypes"] == ["float64", "float32", "float16"]
    assert set(header["dtypes"]) <= set(TOLERANCES)
    for cell in report["table"]:
        assert cell["status"] in ("pass", "fail", "skip", "xfail")
        ratio = cell["worst_ratio"]
        assert ratio is None or ratio <= 1.0
    assert "backend numpy" in output
    assert "nt_xent_loss" in output
    assert format_table(report).splitlines()[0] in output


@pytest.mark.timeout(1800)
def test_strict_backend_runs_on_second_device(backend_runs):
    code, output, report = backend_runs.result("array-api-strict")

    assert code == 0, output[-6000:]
    assert report["header"]["device"] == "device1"
    mixed = [t for t in report["tests"] if "mixed_devices" in t["id"]]
    assert mixed
    assert all(t["outcome"] == "pass" for t in mixed)


# The pytest plugin ------------------------------------------------------------------


def _pytest(*arguments: str, cwd: Path, extra: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_environment(extra),
        timeout=600,
    )


def _empty_project(path: Path) -> Path:
    (path / "pytest.ini").write_text("[pytest]\n")
    return path


def test_plugin_selects_tests_with_k(tmp_path):
    project = _empty_project(tmp_path)
    result = _pytest(
        "--pyargs",
        "sslspec_conformance",
        "--backend",
        "numpy",
        "-k",
        "byol_loss and value",
        cwd=project,
    )

    assert result.returncode == 0, result.stdout[-4000:]
    assert "sslspec conformance: backend numpy" in result.stdout
    assert re.search(r"\b3 passed\b", result.stdout), result.stdout[-2000:]


def test_plugin_without_backend_skips_suite(tmp_path):
    project = _empty_project(tmp_path)
    result = _pytest("--pyargs", "sslspec_conformance", "-q", "-rs", cwd=project)

    assert result.returncode == 0, result.stdout[-4000:]
    assert "needs --backend" in result.stdout
    assert " passed" not in result.stdout


def test_plugin_leaves_other_tests_alone(tmp_path):
    project = _empty_project(tmp_path)
    (project / "test_plain.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.fixture
            def dtype():
                return "mine"

            def test_own_fixture(dtype):
                assert dtype == "mine"

            @pytest.mark.parametrize("function", ["a", "b"])
            def test_parametrized(function):
                assert function in "ab"
            """
        )
    )
    result = _pytest("-q", cwd=project)

    assert result.returncode == 0, result.stdout[-4000:]
    assert "3 passed" in result.stdout


def test_plugin_rejects_unknown_backend(tmp_path):
    project = _empty_project(tmp_path)
    result = _pytest(
        "--pyargs", "sslspec_conformance", "--backend", "no-such-backend", cwd=project
    )

    assert result.returncode == 4
    assert "no-such-backend" in result.stderr


def test_xfails_file_is_strict(tmp_path):
    project = _empty_project(tmp_path)
    xfails = project / "xfails.txt"
    xfails.write_text("test_losses.py::test_loss_value[byol_loss-float64]  # passes\n")
    result = _pytest(
        "--pyargs",
        "sslspec_conformance",
        "--backend",
        "numpy",
        "-k",
        "byol_loss and value",
        "--xfails-file",
        str(xfails),
        cwd=project,
    )

    assert result.returncode == 1, result.stdout[-4000:]
    assert "XPASS(strict)" in result.stdout


def test_skips_file_and_unused_entry(tmp_path):
    project = _empty_project(tmp_path)
    skips = project / "skips.txt"
    skips.write_text(
        "# comment\n"
        "test_losses.py::test_loss_value[byol_loss-*]  # not today\n"
        "test_nothing.py::*  # matches nothing\n"
    )
    result = _pytest(
        "--pyargs",
        "sslspec_conformance",
        "--backend",
        "numpy",
        "-k",
        "byol_loss and value",
        "--skips-file",
        str(skips),
        "-rs",
        cwd=project,
    )

    assert result.returncode == 0, result.stdout[-4000:]
    assert "3 skipped" in result.stdout
    assert "not today" in result.stdout
    assert "test_nothing.py::* matched no test" in result.stdout


def test_malformed_expectation_file_is_a_usage_error(tmp_path):
    project = _empty_project(tmp_path)
    skips = project / "skips.txt"
    skips.write_text("test_losses.py::test_loss_value[*]\n")
    result = _pytest(
        "--pyargs",
        "sslspec_conformance",
        "--backend",
        "numpy",
        "--skips-file",
        str(skips),
        cwd=project,
    )

    assert result.returncode == 4
    assert "has no reason" in result.stderr


def test_expectation_patterns_treat_brackets_literally():
    (entry,) = expectations.parse(
        "xfail test_losses.py::test_loss_jit[*-bfloat16]  # compiler rounds\n",
        source="inline",
    )

    assert entry.kind == "xfail"
    assert entry.reason == "compiler rounds"
    assert entry.matches("test_losses.py::test_loss_jit[nt_xent_loss-bfloat16]")
    assert not entry.matches("test_losses.py::test_loss_jit[nt_xent_loss-float16]")
    assert not entry.matches("test_losses.py::test_loss_jitb")


def test_expectation_kind_is_required_in_backend_files():
    with pytest.raises(expectations.ExpectationError, match="must start with"):
        expectations.parse("test_losses.py::*  # why\n", source="inline")
    with pytest.raises(expectations.ExpectationError, match="of kind"):
        expectations.parse("xfail test_x  # why\n", source="inline", kind="skip")


@pytest.mark.parametrize("name", BACKENDS)
def test_builtin_expectation_files_parse(name):
    for entry in expectations.builtin(name):
        assert entry.reason
        assert "::" in entry.pattern


# A third-party backend registered through an entry point ------------------------------


def _documented_files() -> dict[str, str]:
    """Return the files of the worked example in docs/conformance.md by path.

    Each code block of the example follows a line ``<!-- file: PATH -->``.
    """
    text = DOCS.read_text(encoding="utf-8")
    pattern = re.compile(r"<!-- file: (\S+) -->\s*```[a-z]*\n(.*?)```", re.DOTALL)
    return {path: body for path, body in pattern.findall(text)}


def _install_example(directory: Path, backend_source: str | None = None) -> Path:
    files = _documented_files()
    for relative, body in files.items():
        if relative == "pyproject.toml":
            continue
        if backend_source is not None and relative.endswith("__init__.py"):
            body = backend_source
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    return directory


def test_documented_example_is_complete():
    files = _documented_files()

    assert "minibackend/__init__.py" in files
    assert "minibackend-0.1.dist-info/entry_points.txt" in files
    assert "minibackend-0.1.dist-info/METADATA" in files
    assert (
        "mini = minibackend:MiniBackend"
        in files["minibackend-0.1.dist-info/entry_points.txt"]
    )
    assert 'mini = "minibackend:MiniBackend"' in files["pyproject.toml"]


def test_documented_table_matches_tolerances():
    assert tolerance_table() in DOCS.read_text(encoding="utf-8")


@pytest.mark.timeout(900)
def test_third_party_backend_passes(tmp_path):
    site = _install_example(tmp_path / "site")
    report = tmp_path / "report.json"
    result = subprocess.run(
        _conformance_command("mini", "--report", str(report)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_environment({"PYTHONPATH": str(site)}),
        timeout=900,
    )

    assert result.returncode == 0, result.stdout[-6000:]
    header = json.loads(report.read_text())["header"]
    assert header["backend"] == "mini"
    assert header["backend_version"] == "0.1"
    assert header["dtypes"] == ["float64", "float32"]


def _lossy_backend_source() -> str:
    """The documented backend, but storing float64 requests as float32."""
    source = _documented_files()["minibackend/__init__.py"]
    replaced = source.replace(
        "return np.array(array, dtype=dtype, copy=True)",
        'lossy = "float32" if dtype == "float64" else dtype\n'
        "        return np.array(array, dtype=lossy, copy=True)",
    )
    assert replaced != source
    return replaced


@pytest.mark.timeout(900)
def test_third_party_deviation_fails_then_xfails(tmp_path):
    site = _install_example(tmp_path / "site", _lossy_backend_source())
    environment = {"PYTHONPATH": str(site)}
    selection = ["-k", "byol_loss and value"]

    failing = subprocess.run(
        _conformance_command("mini", *selection),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_environment(environment),
        timeout=900,
    )
    assert failing.returncode == 1, failing.stdout[-6000:]
    assert re.search(r"byol_loss\s+FAIL", failing.stdout), failing.stdout[-3000:]

    xfails = tmp_path / "xfails.txt"
    xfails.write_text(
        "test_losses.py::test_loss_value[*-float64]  # stores float64 as float32\n"
    )
    expected = subprocess.run(
        _conformance_command("mini", *selection, "--xfails-file", str(xfails)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_environment(environment),
        timeout=900,
    )
    assert expected.returncode == 0, expected.stdout[-6000:]
    assert re.search(r"byol_loss\s+xfail\s+pass", expected.stdout), expected.stdout[
        -3000:
    ]
