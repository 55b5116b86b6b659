"""Skip and expected-failure files: which tests a backend deliberately fails.

An entry names tests by a pattern over test ids such as
``test_losses.py::test_loss_value[nt_xent_loss-float16]`` (the file name, ``::``,
and the test name with its parameters), where ``*`` matches any run of characters
and every other character matches itself. Each entry must give its reason after
``#``::

    # Lines starting with # are comments.
    xfail test_losses.py::test_loss_jit[*-bfloat16]  # reason shown in the report
    skip test_networks.py::*  # reason shown in the report

A backend's own file, ``expected/<backend>.txt`` in this package, starts each entry
with ``skip`` or ``xfail``. In the files given to ``--skips-file`` and
``--xfails-file`` the option sets the kind, and the keyword may be left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["Expectation", "ExpectationError", "parse", "load_file", "builtin"]

KINDS = ("skip", "xfail")


class ExpectationError(ValueError):
    """Raised for a malformed entry; the message names the file and line."""


@dataclass
class Expectation:
    """One entry: tests matching ``pattern`` are skipped or expected to fail."""

    kind: str
    pattern: str
    reason: str
    source: str
    line: int
    matched: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = (re.escape(part) for part in self.pattern.split("*"))
        self._regex = re.compile(".*".join(parts))

    def matches(self, test_id: str) -> bool:
        """Return whether ``test_id`` matches the whole pattern."""
        return self._regex.fullmatch(test_id) is not None


def parse(text: str, *, source: str, kind: str | None = None) -> list[Expectation]:
    """Parse expectation entries.

    Parameters
    ----------
    text
        File contents.
    source
        Name of the file, for messages.
    kind
        ``"skip"`` or ``"xfail"`` for every entry, or None when each entry starts
        with its kind.

    Raises
    ------
    ExpectationError
        If an entry has no reason, an unknown kind, or contradicts ``kind``.
    """
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body, hash_sign, reason = line.partition("#")
        reason = reason.strip()
        if not hash_sign or not reason:
            raise ExpectationError(
                f"{source}:{number}: entry {line!r} has no reason; write the reason "
                "after '#'"
            )
        words = body.split()
        entry_kind = kind
        if words and words[0] in KINDS:
            if kind is not None and words[0] != kind:
                raise ExpectationError(
                    f"{source}:{number}: entry of kind {words[0]!r} in a file of "
                    f"{kind} entries"
                )
            entry_kind = words.pop(0)
        if entry_kind is None:
            raise ExpectationError(
                f"{source}:{number}: entry {line!r} must start with 'skip' or 'xfail'"
            )
        if len(words) != 1:
            raise ExpectationError(
                f"{source}:{number}: expected one test id pattern before '#', got "
                f"{body.strip()!r}"
            )
        entries.append(Expectation(entry_kind, words[0], reason, source, number))
    return entries


def load_file(path: str | Path, *, kind: str | None) -> list[Expectation]:
    """Read and parse one expectation file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ExpectationError(
            f"cannot read expectation file {path}: {error}"
        ) from None
    return parse(text, source=str(path), kind=kind)


def builtin(backend_name: str) -> list[Expectation]:
    """Return the entries shipped for ``backend_name``, or none if it has no file."""
    resource = (
        resources.files("sslspec_conformance") / "expected" / f"{backend_name}.txt"
    )
    if not resource.is_file():
        return []
    return parse(
        resource.read_text(encoding="utf-8"), source=f"expected/{backend_name}.txt"
    )
