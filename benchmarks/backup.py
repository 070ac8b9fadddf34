"""A full backup of the exposed image, on each side, driven the way a user would drive it.

qemu: ``blockdev-add`` of a new qcow2 target (made by ``qemu-img create``), then
``blockdev-backup sync=full`` over QMP, watched with ``query-jobs``.
blockfs: a spec written to ``MNT/.control/jobs/backup``, watched through
``MNT/.control/jobs/ID/status``. Until blockfs has that file, its backup lines are "n/a".
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass

from benchmarks import procstat
from benchmarks.exposures import BlockfsMount, QsdExport
from benchmarks.fio import LATENCY_DURING_BACKUP, mean_latency_us, run_fio

POLL_INTERVAL = 0.02
#: fio runs this long before the backup starts
FIO_HEAD_START = 0.5


class BackupUnavailable(Exception):
    """This side cannot run a backup (yet); the message says why."""


class BackupFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class BackupTiming:
    wall_s: float
    cpu_s: float  # the daemon's CPU time during the job


class QsdBackup:
    JOB_ID = "bk0"
    NODE = "bk-target"

    def __init__(self, export: QsdExport, target: str, size: int) -> None:
        self.export = export
        self.target = target
        self.size = size
        self._added = False

    def prepare(self) -> None:
        if os.path.exists(self.target):
            os.unlink(self.target)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", self.target, str(self.size)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.export.qmp(
            "blockdev-add",
            **{
                "driver": "qcow2",
                "node-name": self.NODE,
                "file": {"driver": "file", "filename": self.target},
            },
        )
        self._added = True

    def start(self) -> None:
        self.export.qmp(
            "blockdev-backup",
            **{
                "job-id": self.JOB_ID,
                "device": "fmt0",
                "target": self.NODE,
                "sync": "full",
                "auto-dismiss": False,
            },
        )

    def done(self) -> bool:
        """:raise BackupFailed: the job concluded with an error."""
        for job in self.export.qmp("query-jobs"):
            if job["id"] == self.JOB_ID and job["status"] == "concluded":
                if job.get("error"):
                    raise BackupFailed(f"qemu backup failed: {job['error']}")
                return True
        return False

    def close(self) -> None:
        try:
            if any(j["id"] == self.JOB_ID for j in self.export.qmp("query-jobs")):
                self.export.qmp("job-dismiss", id=self.JOB_ID)
            if self._added:
                self.export.qmp("blockdev-del", **{"node-name": self.NODE})
        finally:
            self._added = False
            if os.path.exists(self.target):
                os.unlink(self.target)


class BlockfsBackup:
    JOB_ID = "disk"  # a job's ID defaults to its device's name

    def __init__(self, mount: BlockfsMount, target: str, size: int) -> None:
        self.mount = mount
        self.target = target
        self.size = size
        self.jobs = os.path.join(mount.control, "jobs")

    def prepare(self) -> None:
        """:raise BackupUnavailable: this blockfs has no backup job."""
        if not os.path.exists(os.path.join(self.jobs, "backup")):
            raise BackupUnavailable("blockfs has no backup job yet (.control/jobs/backup absent)")
        if os.path.exists(self.target):
            os.unlink(self.target)

    def start(self) -> None:
        spec = f"device=disk target={self.target} sync=full\n"
        with open(os.path.join(self.jobs, "backup"), "r+") as f:
            try:
                f.write(spec)
                f.flush()
            except OSError as exc:
                f.seek(0)
                reason = f.read().strip() or exc.strerror
                raise BackupFailed(f"blockfs refused the backup: {reason}") from None

    def _status(self) -> dict[str, object] | None:
        try:
            with open(os.path.join(self.jobs, self.JOB_ID, "status")) as f:
                return json.load(f)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def done(self) -> bool:
        status = self._status()
        if status is None or status.get("state") != "concluded":
            return False
        if status.get("error"):
            raise BackupFailed(f"blockfs backup failed: {status['error']}")
        return True

    def close(self) -> None:
        try:
            ctl = os.path.join(self.jobs, self.JOB_ID, "ctl")
            if os.path.exists(ctl):
                with open(ctl, "w") as f:
                    f.write("dismiss\n")
        finally:
            if os.path.exists(self.target):
                os.unlink(self.target)


Backup = QsdBackup | BlockfsBackup


def _wait_done(backup: Backup, deadline: float) -> None:
    while not backup.done():
        if time.monotonic() > deadline:
            raise BackupFailed("the backup did not conclude in time")
        time.sleep(POLL_INTERVAL)


def timed_backup(backup: Backup, pid: int, timeout: float) -> BackupTiming:
    """Run one backup with nothing else going on; its wall time and the daemon's CPU time.

    :raise BackupUnavailable, BackupFailed:
    """
    backup.prepare()
    try:
        cpu0 = procstat.cpu_seconds(pid)
        t0 = time.monotonic()
        backup.start()
        _wait_done(backup, t0 + timeout)
        wall = time.monotonic() - t0
        cpu = procstat.cpu_seconds(pid) - cpu0
    finally:
        backup.close()
    return BackupTiming(wall, cpu)


def latency_during_backup(backup: Backup, filename: str, timeout: float, workdir: str) -> float:
    """The guest's mean 4 KiB random-write latency (µs, queue depth 1) while a backup runs.

    fio starts first and logs each write's completion time and latency; the backup starts a
    moment later; fio is interrupted when the backup concludes. Only the writes that completed
    between the backup's start and its conclusion count.

    :raise BackupUnavailable, BackupFailed, FioError:
    """
    backup.prepare()
    prefix = os.path.join(workdir, "during-backup")
    window: list[float] = []
    try:

        def start() -> None:
            window.append(time.time() * 1000)
            backup.start()

        def concluded() -> bool:
            if len(window) == 1 and backup.done():
                window.append(time.time() * 1000)
            return len(window) == 2

        run_fio(
            LATENCY_DURING_BACKUP,
            filename,
            timeout,
            0,
            after_ramp=start,
            after=FIO_HEAD_START,
            stop_when=concluded,
            extra_args=(f"--write_lat_log={prefix}", "--log_unix_epoch=1"),
        )
        if not window:
            raise BackupFailed("fio ended before the backup could start")
        if len(window) == 1:  # fio's time ran out first
            _wait_done(backup, time.monotonic() + timeout)
            window.append(time.time() * 1000)
        mean, count = mean_latency_us(f"{prefix}_clat.1.log", window[0], window[1])
        if not count:
            raise BackupFailed("no guest write completed during the backup")
        return mean
    finally:
        if len(window) == 1:
            # Started, and fio failed before the job concluded (a guest write refused, say; the
            # start comes even when fio ends before its head start): a running job cannot be
            # dismissed, so it is let finish first, and fio's error is the one that is raised.
            with contextlib.suppress(Exception):
                _wait_done(backup, time.monotonic() + timeout)
        backup.close()
        for kind in ("clat", "lat", "slat"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}_{kind}.1.log")
