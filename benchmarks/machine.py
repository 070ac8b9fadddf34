"""A description of the machine and the tools, stored beside every set of results."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


def _first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def describe_machine() -> dict[str, object]:
    from blockfs import __version__ as blockfs_version

    qemu = _first_line(["qemu-storage-daemon", "--version"])
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "os": _pretty_os(),
        "python": sys.version.split()[0],
        "qemu": qemu.replace("qemu-storage-daemon version ", ""),
        "fio": _first_line(["fio", "--version"]),
        "blockfs": blockfs_version,
        # the tree the daemons ran from ("-dirty": with uncommitted changes)
        "blockfs_commit": _first_line(
            ["git", "-C", os.path.dirname(__file__), "describe", "--always", "--dirty"]
        ),
    }


def _pretty_os() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()
