"""Processes the test fixtures start (sshd, glusterd and its bricks): seen by pid *and* start
time, so a pid the kernel has handed to another process since is never signalled.

Imported by ``tests/sshd.py`` and ``tests/glusterd.py`` (and, through them, by the benchmarks,
which load those fixtures from their files with this folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, starttime)`` of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 of proc(5)
    return fields[0], int(fields[1]), int(fields[19])


def alive(pid: int, start: int) -> bool:
    """``pid`` runs and is still the process that started at ``start`` (not a zombie)."""
    st = proc_stat(pid)
    return st is not None and st[2] == start and st[0] != "Z"


def signal_if_same(pid: int, start: int, sig: int) -> None:
    """Signal ``pid`` only if it is still the process we saw (same start time)."""
    if alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_dead(procs: Iterable[tuple[int, int]], timeout: float) -> bool:
    """Wait until none of ``(pid, starttime)`` runs; False if some still do at ``timeout``."""
    deadline = time.monotonic() + timeout
    procs = list(procs)
    while any(alive(pid, start) for pid, start in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """preexec_fn: SIGTERM the child when pytest dies, so a crash leaves no server behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def preexec() -> Callable[[], None] | None:
    """The ``preexec_fn`` for a server's Popen. PDEATHSIG fires when the forking *thread*
    ends: it is only safe from the main thread, elsewhere there is none."""
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None
