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
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

from qemu.qmp import ExecuteError, QMPError

from benchmarks import procstat
from benchmarks.exposures import START_TIMEOUT, STOP_TIMEOUT, BlockfsMount, QsdExport, is_mounted
from benchmarks.fio import FioError, FioJob, FioResult, mean_latency_us, run_fio

POLL_INTERVAL = 0.02
#: fio runs this long before the mirror starts
FIO_HEAD_START = 0.5
#: how long a job may take to conclude once completed or cancelled
CONCLUDE_TIMEOUT = 60.0

#: the guest's write latency while a (speed-limited) mirror copies
LATENCY_DURING_MIRROR = FioJob(
    "rand write 4k qd1 latency during mirror", "randwrite", "4k", 1, "µs"
)
#: the steady guest load under which a mirror must reach READY (fio ``--rate``, MiB/s)
WRITE_LOAD_MIB_S = 20
WRITE_LOAD = FioJob(f"rand write 4k at {WRITE_LOAD_MIB_S} MiB/s", "randwrite", "4k", 8, "MB/s")

#: QsdExport's names: its FUSE export and the format node it exports
QSD_EXPORT_ID = "exp0"
QSD_SOURCE = "fmt0"


class MirrorUnavailable(Exception):
    """This side cannot run a mirror (yet); the message says why."""


class MirrorFailed(RuntimeError):
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

    def prepare(self) -> None:
        if self.read_only_export:  # the same file, exported read-only
            _drop_fuse_export(self.export)
            self.export.qmp(
                "block-export-add",
                **{
                    "type": "fuse",
                    "id": QSD_EXPORT_ID,
                    "node-name": QSD_SOURCE,
                    "mountpoint": self.export.path,
                    "writable": False,
                },
            )
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

    def _job(self) -> dict[str, object]:
        for job in self.export.qmp("query-jobs"):
            if job["id"] == self.JOB_ID:
                return job  # type: ignore[no-any-return]
        raise MirrorFailed("the qemu mirror job disappeared")

    def ready(self) -> bool:
        """:raise MirrorFailed: the job ended before it was ready."""
        job = self._job()
        if job["status"] == "ready":
            return True
        if job["status"] in ("aborting", "concluded", "null"):
            raise MirrorFailed(f"qemu mirror ended before ready: {job.get('error', 'no error')}")
        return False

    def set_speed(self, speed: int) -> None:
        self.export.qmp("block-job-set-speed", device=self.JOB_ID, speed=speed)

    def complete(self) -> None:
        self.export.qmp("job-complete", id=self.JOB_ID)

    def concluded(self) -> bool:
        """:raise MirrorFailed: the job concluded with an error."""
        job = self._job()
        if job["status"] != "concluded":
            return False
        if job.get("error"):
            raise MirrorFailed(f"qemu mirror failed: {job['error']}")
        return True

    def close(self) -> None:
        """Cancel the job if it is still going, dismiss it, delete the target. The daemon is
        stopped right after, so a failure here only loses the tidying."""
        try:
            jobs = {j["id"]: j for j in self.export.qmp("query-jobs")}
            job = jobs.get(self.JOB_ID)
            if job is not None and job["status"] != "concluded":
                self.export.qmp("job-cancel", id=self.JOB_ID)
                _wait(self._ended, time.monotonic() + CONCLUDE_TIMEOUT, "cancel")
            if job is not None:
                self.export.qmp("job-dismiss", id=self.JOB_ID)
        except (QMPError, MirrorFailed, OSError):
            pass
        finally:
            if os.path.exists(self.target):
                os.unlink(self.target)

    def _ended(self) -> bool:
        try:
            return self.concluded()
        except MirrorFailed:
            return True


class BlockfsMirror:
    JOB_ID = "disk"  # a job's ID defaults to its device's name

    def __init__(self, mount: BlockfsMount, target: str, size: int) -> None:
        self.mount = mount
        self.target = target
        self.size = size
        self.jobs = os.path.join(mount.control, "jobs")

    def prepare(self) -> None:
        """:raise MirrorUnavailable: this blockfs has no mirror job."""
        if not os.path.exists(os.path.join(self.jobs, "mirror")):
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
        _write_control(os.path.join(self.jobs, "mirror"), spec, "blockfs refused the mirror")

    def _status(self) -> dict[str, object]:
        try:
            with open(os.path.join(self.jobs, self.JOB_ID, "status")) as f:
                return json.load(f)  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise MirrorFailed("the blockfs mirror job disappeared") from None

    def _ctl(self, verb: str) -> None:
        path = os.path.join(self.jobs, self.JOB_ID, "ctl")
        _write_control(path, verb, f"blockfs refused {verb!r}")

    def ready(self) -> bool:
        """:raise MirrorFailed: the job ended before it was ready."""
        status = self._status()
        if status.get("ready") is True:
            return True
        if status.get("state") == "concluded":
            raise MirrorFailed(f"blockfs mirror ended before ready: {status.get('error')}")
        return False

    def set_speed(self, speed: int) -> None:
        self._ctl(f"speed={speed}")

    def complete(self) -> None:
        self._ctl("complete")

    def concluded(self) -> bool:
        """:raise MirrorFailed: the job concluded with an error."""
        status = self._status()
        if status.get("state") != "concluded":
            return False
        if status.get("error"):
            raise MirrorFailed(f"blockfs mirror failed: {status['error']}")
        return True

    def _ended(self) -> bool:
        try:
            return self.concluded()
        except MirrorFailed:
            return True

    def close(self) -> None:
        """Cancel the job if it is still going, dismiss it, delete the target (and a partial
        target a failed job left behind)."""
        try:
            if os.path.exists(os.path.join(self.jobs, self.JOB_ID)):
                if not self._ended():
                    self._ctl("cancel force")
                    _wait(self._ended, time.monotonic() + CONCLUDE_TIMEOUT, "cancel")
                self._ctl("dismiss")
        except (MirrorFailed, OSError):
            pass
        finally:
            folder, name = os.path.split(self.target)
            for path in [self.target, *glob.glob(os.path.join(folder, f".{name}.*.part"))]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


Mirror = QsdMirror | BlockfsMirror


def _write_control(path: str, line: str, refused: str) -> None:
    """Write one line to a blockfs control file, unbuffered: a refusal fails that write, and a
    read of the same open file then gives the reason.

    :raise MirrorFailed: refused (the message starts with ``refused``).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as exc:
            reason = os.read(fd, 4096).decode(errors="replace").strip() or exc.strerror
            raise MirrorFailed(f"{refused}: {reason}") from None
    finally:
        os.close(fd)


def _drop_fuse_export(export: QsdExport) -> None:
    """Remove qemu's FUSE export (its file stays, unmounted); return once it is gone."""
    export.qmp("block-export-del", id=QSD_EXPORT_ID)
    deadline = time.monotonic() + CONCLUDE_TIMEOUT
    while any(e["id"] == QSD_EXPORT_ID for e in export.qmp("query-block-exports")):
        if time.monotonic() > deadline:
            raise MirrorFailed("qemu did not remove its FUSE export in time")
        time.sleep(POLL_INTERVAL)


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
        _drop_fuse_export(self.export)
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
    while not done():
        if time.monotonic() > deadline:
            raise MirrorFailed(f"the mirror did not reach {what} in time")
        time.sleep(POLL_INTERVAL)


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
