"""The ways an image becomes a file: a blockfs mount, qemu-storage-daemon's FUSE export, and
the floor (the thinnest pyfuse3 file system, raw images only).

Each is a context manager that starts its daemon, waits until the file is there, and on exit
stops the daemon and unmounts whatever happened (a failed unmount ends in a lazy
``fusermount3 -u -z``). Only processes started here are ever signalled, by their pid.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from benchmarks import procstat

#: how long a daemon may take to come up or to go away
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class ExposureError(RuntimeError):
    """The image could not be exposed; the message says why (it goes into the report)."""


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _lazy_unmount(path: str) -> None:
    if is_mounted(path):
        subprocess.run(
            ["fusermount3", "-u", "-z", path], capture_output=True, timeout=60, check=False
        )


def _wait_exit(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        else:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return True
            except OSError:
                return True
        time.sleep(0.02)
    return False


def end_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Give a daemon asked to stop ``timeout`` seconds to go, then SIGTERM, then as long again
    and SIGKILL; it is reaped either way."""
    if not _wait_exit(proc.pid, timeout, proc):
        proc.terminate()
        if not _wait_exit(proc.pid, timeout, proc):
            proc.kill()
    proc.wait(timeout=30)


class BlockfsMount:
    """``blockfs mount MNT disk=IMAGE,format=FMT``; the file is MNT/disk."""

    side = "blockfs"

    def __init__(
        self,
        image: str,
        fmt: str,
        workdir: str,
        io_mode: str | None,
        fuse_threads: int | None = None,
    ) -> None:
        self.image = image
        self.fuse_threads = fuse_threads
        self.fmt = fmt
        self.mountpoint = os.path.join(workdir, "mnt")
        self.path = os.path.join(self.mountpoint, "disk")
        self.control = os.path.join(self.mountpoint, ".control")
        self.log = os.path.join(workdir, "blockfs.log")
        self.io_mode = io_mode
        self.pid = 0

    def __enter__(self) -> Self:
        os.makedirs(self.mountpoint, exist_ok=True)
        env = dict(os.environ)
        if self.io_mode:
            env["BLOCKFS_IO_MODE"] = self.io_mode
        cmd = [
            sys.executable,
            "-m",
            "blockfs",
            "mount",
            "--log",
            self.log,
            *(() if self.fuse_threads is None else (f"--fuse-threads={self.fuse_threads}",)),
            self.mountpoint,
            f"disk={self.image},format={self.fmt}",
        ]
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=env,
                check=False,
                timeout=START_TIMEOUT + 30,
            )
        except subprocess.TimeoutExpired:
            _lazy_unmount(self.mountpoint)
            raise ExposureError("blockfs mount did not return in time") from None
        if res.returncode != 0:
            _lazy_unmount(self.mountpoint)
            reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "no message"
            raise ExposureError(f"blockfs mount failed: {reason}")
        try:
            with open(os.path.join(self.control, "pid")) as f:
                self.pid = int(f.read())
            info_path = os.path.join(self.control, "images", "disk", "info")
            with open(info_path) as f:
                shown = json.load(f).get("format")
            if shown != self.fmt:
                raise ExposureError(f"blockfs shows the image as {shown!r}, not {self.fmt}")
        except BaseException:
            self._unmount()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unmount()

    def _unmount(self) -> None:
        try:
            res = subprocess.run(
                [sys.executable, "-m", "blockfs", "umount", self.mountpoint],
                capture_output=True,
                text=True,
                timeout=STOP_TIMEOUT + 30,
                check=False,
            )
            ok = res.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok:
            _lazy_unmount(self.mountpoint)
            if self.pid and not _wait_exit(self.pid, 10):
                os.kill(self.pid, signal.SIGTERM)
                if not _wait_exit(self.pid, 10):
                    os.kill(self.pid, signal.SIGKILL)

    def peak_rss_mib(self) -> float:
        return procstat.peak_rss_mib(self.pid)


class QsdExport:
    """qemu-storage-daemon exporting IMAGE (format FMT) over FUSE on a regular file, with QMP."""

    side = "qemu"

    def __init__(self, image: str, fmt: str, workdir: str) -> None:
        self.image = image
        self.fmt = fmt
        self.path = os.path.join(workdir, "qsd-export")
        self.socket = os.path.join(workdir, "qmp.sock")
        self.log = os.path.join(workdir, "qsd.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._qmp: Any = None
        #: the daemon's environment (None: this process's)
        self.env: dict[str, str] | None = None

    def blockdevs(self) -> list[str]:
        """The ``--blockdev`` options, the node to export last (``fmt0``)."""
        return [
            f"driver=file,node-name=file0,filename={self.image},cache.direct=off",
            f"driver={self.fmt},node-name=fmt0,file=file0",
        ]

    def __enter__(self) -> Self:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        with open(self.path, "a"):  # the FUSE export's mountpoint must be an existing file
            pass
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        cmd = [
            "qemu-storage-daemon",
            *(arg for blockdev in self.blockdevs() for arg in ("--blockdev", blockdev)),
            "--export",
            f"type=fuse,id=exp0,node-name=fmt0,mountpoint={self.path},writable=on",
            "--chardev",
            f"socket,path={self.socket},server=on,wait=off,id=qmp0",
            "--monitor",
            "chardev=qmp0",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (os.path.exists(self.socket) and is_mounted(self.path)):
                if self.proc.poll() is not None:
                    raise ExposureError(
                        f"qemu-storage-daemon exited {self.proc.returncode}: {self._log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise ExposureError("qemu-storage-daemon did not export in time")
                time.sleep(0.02)
            self._qmp = QEMUMonitorProtocol(self.socket)
            self._qmp.connect()
            self._qmp.settimeout(60)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run one QMP command and return its result. :raise qemu.qmp.ExecuteError:"""
        return self._qmp.cmd(command, **arguments)

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if self._qmp is not None:
            # The daemon may hang up before it answers "quit"; if it does not go, a signal follows.
            with contextlib.suppress(Exception):
                self._qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        end_process(proc, STOP_TIMEOUT / 2)
        _lazy_unmount(self.path)
        self.proc = None

    def peak_rss_mib(self) -> float:
        return procstat.peak_rss_mib(self.pid)


class FloorMount:
    """The floor (:mod:`benchmarks.floorfs`): the thinnest pyfuse3 file system over a raw
    image; the file is MNT/disk."""

    side = "floor"

    def __init__(self, image: str, workdir: str) -> None:
        self.image = image
        self.mountpoint = os.path.join(workdir, "floor")
        self.path = os.path.join(self.mountpoint, "disk")
        self.log = os.path.join(workdir, "floor.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def __enter__(self) -> Self:
        os.makedirs(self.mountpoint, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.floorfs", self.image, self.mountpoint],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (is_mounted(self.mountpoint) and os.path.exists(self.path)):
                if self.proc.poll() is not None:
                    raise ExposureError(f"floorfs exited {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise ExposureError("floorfs did not mount in time")
                time.sleep(0.02)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        subprocess.run(
            ["fusermount3", "-u", self.mountpoint], capture_output=True, timeout=60, check=False
        )
        end_process(proc, STOP_TIMEOUT / 2)
        _lazy_unmount(self.mountpoint)
        self.proc = None

    def peak_rss_mib(self) -> float:
        return procstat.peak_rss_mib(self.pid)


def load_fixture(path: Path, unavailable: type[Exception]) -> ModuleType:
    """A fixture module of the tests (``tests/sshd.py``, ``tests/glusterd.py``), loaded from its
    file: the servers the benchmarks run are the tests' own. :raise unavailable: it is missing
    or cannot be imported."""
    if not path.exists():
        raise unavailable(f"{path} is missing")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)  # the fixture imports its helpers (tests/procs.py) by name
    spec = importlib.util.spec_from_file_location(f"blockfs_bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise unavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise unavailable(f"{path.name} cannot be loaded: {exc}") from None
    return module


def first_line(exc: BaseException) -> str:
    """One line of an exception (pytest's skip of a fixture included)."""
    text = str(getattr(exc, "msg", "") or exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
