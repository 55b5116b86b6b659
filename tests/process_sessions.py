"""Processes of a POSIX session, for tests that start commands in a new session.

A command started with ``start_new_session=True`` leads a session whose id is the
command's pid. Every process it starts, and theirs, stays in that session unless
it creates its own, so listing the session finds any process left behind.
"""

from __future__ import annotations

import time
from pathlib import Path

#: How long the processes of a finished command may take to exit.
SESSION_EXIT_SECONDS = 10


def session_processes(session_id: int) -> list[str]:
    """Return ``pid: command`` of every live process in session ``session_id``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, session, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            found.append(f"{entry.name}: {command.decode(errors='replace')}")
    return found


def wait_for_session_exit(session_id: int) -> list[str]:
    """Wait up to :data:`SESSION_EXIT_SECONDS` for session ``session_id`` to
    empty; return the processes still alive."""
    deadline = time.monotonic() + SESSION_EXIT_SECONDS
    survivors = session_processes(session_id)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = session_processes(session_id)
    return survivors
