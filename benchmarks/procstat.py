"""What a daemon costs, read from /proc: CPU seconds (all threads) and peak resident memory."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (every thread), in seconds.

    :raise OSError: the process is gone.
    """
    with open(f"/proc/{pid}/stat") as f:
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def peak_rss_mib(pid: int) -> float:
    """VmHWM of process ``pid``: its peak resident set since it started, in MiB.

    :raise OSError: the process is gone.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no VmHWM in /proc/{pid}/status")
