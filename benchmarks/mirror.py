"""A live mirror of the exposed image to a new qcow2 file, on each side, driven to READY and
then completed (the disk switches over to the copy), the way a user would drive it.

qemu: ``qemu-img create`` of the target, ``blockdev-add`` of it, ``blockdev-mirror sync=full``
of the format node over QMP, ``query-jobs`` polled until ``ready``, ``job-complete``, polled
until ``concluded``, ``job-dismiss``.
blockfs: a spec written to ``MNT/.control/jobs/mirror`` (``mode=new``: blockfs creates the
target), ``MNT/.control/jobs/ID/status`` polled until ``"ready": true``, ``complete`` written to
``MNT/.control/jobs/ID/ctl``, polled until ``concluded``, ``dismiss``. Until blockfs has that
file, or while it refuses the start, its mirror lines are "n/a".

A completed mirror leaves the exposed disk switched over to the target, so each measurement runs
on a daemon of its own (see ``runner.run_mirrors``); the source image is left as it was at the
switch.

qemu-storage-daemon cannot start a mirror of a node under a *writable* FUSE export: the export
holds the RESIZE permission and a mirror job does not share it. So on qemu a mirror with no guest
writes (:func:`timed_mirror`) runs with the export re-added read-only; the steady write load of
:func:`ready_under_load` reaches the daemon through a :class:`QsdRelay`; and the guest's write
latency during a mirror (:func:`latency_during_mirror`) is tried on the writable export as is,
which qemu refuses ("n/a" with the reason).
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

from qemu.qmp import ExecuteError

from benchmarks import procstat
from benchmarks.exposures import START_TIMEOUT, STOP_TIMEOUT, BlockfsMount, QsdExport, is_mounted
from benchmarks.fio import FioError, FioJob, FioResult, mean_latency_us, run_fio
from benchmarks.jobctl import (
    CONCLUDE_TIMEOUT,
    POLL_INTERVAL,
    QSD_SOURCE,
    BlockfsJobFiles,
    JobFailed,
    QmpJob,
    drop_fuse_export,
    export_read_only,
    wait_until,
)

#: fio runs this long before the mirror starts
FIO_HEAD_START = 0.5

#: the guest's write latency while a (speed-limited) mirror copies
LATENCY_DURING_MIRROR = FioJob(
    "rand write 4k qd1 latency during mirror", "randwrite", "4k", 1, "µs"
)
#: the steady guest load under which a mirror must reach READY (fio ``--rate``, MiB/s)
WRITE_LOAD_MIB_S = 20
WRITE_LOAD = FioJob(f"rand write 4k at {WRITE_LOAD_MIB_S} MiB/s", "randwrite", "4k", 8, "MB/s")


class MirrorUnavailable(Exception):
    """This side cannot run a mirror (yet); the message says why."""


class MirrorFailed(JobFailed):
    pass


@dataclass(frozen=True)
class MirrorTiming:
    ready_s: float  # from the start request to READY
    cpu_s: float  # the daemon's CPU time over that period
    switch_s: float  # from the complete request to the job's conclusion


class QsdMirror:
    JOB_ID = "mr0"
    NODE = "mr-target"

    def __init__(
        self, export: QsdExport, target: str, size: int, *, read_only_export: bool = False
    ) -> None:
        self.export = export
        self.target = target
        self.size = size
        self.read_only_export = read_only_export
        self.job = QmpJob(export, self.JOB_ID, "mirror", MirrorFailed)

    def prepare(self) -> None:
        if self.read_only_export:  # the same file, exported read-only
            export_read_only(self.export, MirrorFailed)
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

    def start(self, speed: int = 0, background: bool = False) -> None:
        """``background``: qemu's default copy mode already; nothing to ask for.

        :raise MirrorFailed: qemu refused the job.
        """
        args: dict[str, object] = {
            "job-id": self.JOB_ID,
            "device": QSD_SOURCE,
            "target": self.NODE,
            "sync": "full",
            "auto-finalize": True,
            "auto-dismiss": False,
        }
        if speed:
            args["speed"] = speed
        try:
            self.export.qmp("blockdev-mirror", **args)
        except ExecuteError as exc:
            if "'resize'" in str(exc):  # one wording for every node name qemu reports
                raise MirrorFailed(
                    "qemu-storage-daemon cannot mirror a disk under its writable FUSE export "
                    "(the export holds the RESIZE permission, which blockdev-mirror does not "
                    "share)"
                ) from None
            raise MirrorFailed(f"qemu refused the mirror: {exc}") from None

    def ready(self) -> bool:
        """:raise MirrorFailed: the job ended before it was ready."""
        return self.job.ready()

    def set_speed(self, speed: int) -> None:
        self.export.qmp("block-job-set-speed", device=self.JOB_ID, speed=speed)

    def complete(self) -> None:
        self.job.complete()

    def concluded(self) -> bool:
        """:raise MirrorFailed: the job concluded with an error."""
        return self.job.concluded()

    def close(self) -> None:
        """Cancel the job if it is still going, dismiss it, delete the target. The daemon is
        stopped right after, so a failure here only loses the tidying."""
        try:
            self.job.close()
        finally:
            if os.path.exists(self.target):
                os.unlink(self.target)


class BlockfsMirror:
    def __init__(self, mount: BlockfsMount, target: str, size: int) -> None:
        self.mount = mount
        self.target = target
        self.size = size
        self.job = BlockfsJobFiles(mount, "mirror", "mirror", MirrorFailed)

    def prepare(self) -> None:
        """:raise MirrorUnavailable: this blockfs has no mirror job."""
        if not self.job.available():
            raise MirrorUnavailable("blockfs has no mirror job yet (.control/jobs/mirror absent)")
        if os.path.exists(self.target):  # mode=new refuses an existing target
            os.unlink(self.target)

    def start(self, speed: int = 0, background: bool = False) -> None:
        """:raise MirrorFailed: blockfs refused the start."""
        spec = f"device=disk target={self.target} sync=full mode=new format=qcow2"
        if speed:
            spec += f" speed={speed}"
        if background:
            spec += " copy-mode=background"
        self.job.start(spec)

    def ready(self) -> bool:
        """:raise MirrorFailed: the job ended before it was ready."""
        return self.job.ready()

    def set_speed(self, speed: int) -> None:
        self.job.ctl(f"speed={speed}")

    def complete(self) -> None:
        self.job.ctl("complete")

    def concluded(self) -> bool:
        """:raise MirrorFailed: the job concluded with an error."""
        return self.job.concluded()

    def close(self) -> None:
        """Cancel the job if it is still going, dismiss it, delete the target (and a partial
        target a failed job left behind)."""
        try:
            self.job.close()
        finally:
            folder, name = os.path.split(self.target)
            for path in [self.target, *glob.glob(os.path.join(folder, f".{name}.*.part"))]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


Mirror = QsdMirror | BlockfsMirror


class QsdRelay:
    """Guest writes into a qemu-storage-daemon that mirrors: its FUSE export is replaced by an
    NBD export of the same node, and a second qemu-storage-daemon (NBD client, writable FUSE
    export) shows it as a file. The relay adds a hop to every request, so it serves only a load
    of a fixed rate, which reaches the mirroring daemon unchanged; never a latency figure."""

    def __init__(self, export: QsdExport, workdir: str) -> None:
        self.export = export
        self.path = os.path.join(workdir, "qsd-relay")
        self.socket = os.path.join(workdir, "nbd.sock")
        self.log = os.path.join(workdir, "qsd-relay.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        drop_fuse_export(self.export, MirrorFailed)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.export.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": self.socket}})
        self.export.qmp(
            "block-export-add",
            **{"type": "nbd", "id": "nbd0", "node-name": QSD_SOURCE, "writable": True},
        )
        with open(self.path, "a"):  # the FUSE export's mountpoint must be an existing file
            pass
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=nbd,node-name=relay0,server.type=unix,server.path={self.socket},"
            f"export={QSD_SOURCE}",
            "--export",
            f"type=fuse,id=relay,node-name=relay0,mountpoint={self.path},writable=on",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not is_mounted(self.path):
                if self.proc.poll() is not None:
                    raise MirrorFailed(f"the NBD relay exited {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise MirrorFailed("the NBD relay did not export in time")
                time.sleep(POLL_INTERVAL)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if is_mounted(self.path):  # the relay unmounts on SIGTERM; this is for one that died
            subprocess.run(
                ["fusermount3", "-u", "-z", self.path], capture_output=True, timeout=60, check=False
            )


@contextlib.contextmanager
def guest_file(exposure: BlockfsMount | QsdExport, workdir: str) -> Iterator[str]:
    """The file a guest writes through while the exposed disk is mirrored: the exposed file on
    blockfs, a :class:`QsdRelay` of it on qemu."""
    if isinstance(exposure, BlockfsMount):
        yield exposure.path
        return
    with QsdRelay(exposure, workdir) as relay:
        yield relay.path


def _wait(done: Callable[[], bool], deadline: float, what: str) -> None:
    wait_until(done, deadline, MirrorFailed, f"the mirror did not reach {what} in time")


def _fio_beside(
    job: FioJob,
    filename: str,
    runtime: float,
    start: Callable[[], None],
    stop: Callable[[], bool],
    extra_args: tuple[str, ...] = (),
) -> FioResult:
    """Run fio on ``filename``, call ``start`` FIO_HEAD_START seconds in, poll ``stop`` and
    interrupt fio (SIGINT) once it is true. An exception in either also interrupts fio and is
    raised once fio has ended: raised inside ``run_fio`` it would have fio's main process
    killed, which leaves fio's job process running."""
    errors: list[Exception] = []

    def guarded_start() -> None:
        try:
            start()
        except Exception as exc:
            errors.append(exc)

    def guarded_stop() -> bool:
        if errors:
            return True
        try:
            return stop()
        except Exception as exc:
            errors.append(exc)
            return True

    try:
        result = run_fio(
            job,
            filename,
            runtime,
            0,
            after_ramp=guarded_start,
            after=FIO_HEAD_START,
            stop_when=guarded_stop,
            extra_args=extra_args,
        )
    except FioError:
        if errors:
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    return result


def _finish(mirror: Mirror) -> float:
    """Complete a ready mirror and wait until it concluded without error; the seconds it took.

    :raise MirrorFailed:
    """
    t0 = time.monotonic()
    mirror.complete()
    _wait(mirror.concluded, t0 + CONCLUDE_TIMEOUT, "its conclusion after complete")
    return time.monotonic() - t0


def timed_mirror(mirror: Mirror, pid: int, timeout: float) -> MirrorTiming:
    """Mirror the idle disk: time and daemon CPU from the start request to READY, then the
    switch-over.

    :raise MirrorUnavailable, MirrorFailed:
    """
    try:
        mirror.prepare()
        cpu0 = procstat.cpu_seconds(pid)
        t0 = time.monotonic()
        mirror.start()
        _wait(mirror.ready, t0 + timeout, "READY")
        ready = time.monotonic() - t0
        cpu = procstat.cpu_seconds(pid) - cpu0
        switch = _finish(mirror)
    finally:
        mirror.close()
    return MirrorTiming(ready, cpu, switch)


def latency_during_mirror(
    mirror: Mirror, filename: str, speed: int, window: float, timeout: float, workdir: str
) -> float:
    """The guest's mean 4 KiB random-write latency (µs, queue depth 1) while a mirror copies.

    fio starts first and logs each write's completion time and latency; a mirror limited to
    ``speed`` bytes/s starts a moment later; fio is interrupted ``window`` seconds later (or at
    READY, if that comes first). Only the writes that completed in between count. Then the
    limit is lifted and the mirror is driven to READY and completed.

    :raise MirrorUnavailable, MirrorFailed, FioError:
    """
    prefix = os.path.join(workdir, "during-mirror")
    marks: list[float] = []  # Unix ms: the start request, the end of the window
    try:
        mirror.prepare()

        def start() -> None:
            marks.append(time.time() * 1000)
            mirror.start(speed=speed)

        def window_over() -> bool:
            if len(marks) == 1 and (
                time.time() * 1000 >= marks[0] + window * 1000 or mirror.ready()
            ):
                marks.append(time.time() * 1000)
            return len(marks) == 2

        _fio_beside(
            LATENCY_DURING_MIRROR,
            filename,
            window + timeout,
            start,
            window_over,
            (f"--write_lat_log={prefix}", "--log_unix_epoch=1"),
        )
        if not marks:
            raise MirrorFailed("fio ended before the mirror could start")
        if len(marks) == 1:
            raise MirrorFailed("fio ended before the measuring window did")
        mean, count = mean_latency_us(f"{prefix}_clat.1.log", marks[0], marks[1])
        if not count:
            raise MirrorFailed("no guest write completed during the mirror")
        mirror.set_speed(0)
        _wait(mirror.ready, time.monotonic() + timeout, "READY")
        _finish(mirror)
        return mean
    finally:
        mirror.close()
        for kind in ("clat", "lat", "slat"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}_{kind}.1.log")


def ready_under_load(mirror: Mirror, filename: str, timeout: float) -> tuple[float, float]:
    """Seconds from the start request of a full mirror (background copy mode, no speed limit)
    to READY while fio writes 4 KiB blocks at random at a steady WRITE_LOAD_MIB_S, and the
    write rate fio achieved (MB/s). fio stops at READY; the mirror is then completed.

    :raise MirrorUnavailable, MirrorFailed, FioError:
    """
    marks: list[float] = []  # monotonic: the start request, READY
    try:
        mirror.prepare()

        def start() -> None:
            marks.append(time.monotonic())
            mirror.start(background=True)

        def is_ready() -> bool:
            if len(marks) == 1 and mirror.ready():
                marks.append(time.monotonic())
            return len(marks) == 2

        result = _fio_beside(
            WRITE_LOAD,
            filename,
            FIO_HEAD_START + timeout,
            start,
            is_ready,
            (f"--rate={WRITE_LOAD_MIB_S}m",),
        )
        if not marks:
            raise MirrorFailed("fio ended before the mirror could start")
        if len(marks) == 1:
            raise MirrorFailed(
                f"the mirror was not ready within {timeout:.0f} s under "
                f"{WRITE_LOAD_MIB_S} MiB/s of writes"
            )
        _finish(mirror)
        return marks[1] - marks[0], result.mb_s
    finally:
        mirror.close()
