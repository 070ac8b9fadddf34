"""The control tree under ``MNT/.control``: files a shell can read and write.

    .control/README                what every file here does, with examples
    .control/pid                   the daemon's process id (``blockfs umount`` reads it)
    .control/events                newline-delimited JSON events, oldest first (bounded)
    .control/images/NAME/info      JSON: the image and its backing chain
    .control/images/NAME/stats     JSON: QEMU's blockstats counters
    .control/images/NAME/inject    error-injection rules (only with the image option inject=on)
    .control/jobs/backup           write a spec here to start a backup
    .control/jobs/ID/status        JSON status of one job
    .control/jobs/ID/ctl           write a verb: pause resume cancel complete dismiss speed=N

The names are a contract with users and scripts; ``fs.py`` only maps inodes to these objects.
A write of a spec answers with the new job's ID (read the same open file to see it) or fails
with an errno, and a read of the same open file then returns the one-line reason. Files that
reveal host paths (events, info, status) are readable by the mount's owner only.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from blockfs.control.tree import (
    MAX_CONTROL_BYTES,
    MAX_CONTROL_HANDLES,
    TextFile,
    VDir,
    VFile,
)
from blockfs.errors import BlockfsError, JobError, UsageError
from blockfs.info import export_info
from blockfs.jobs.job import EventLog, Job, JobState
from blockfs.nodes.inject import InjectFilter, find_inject_filter
from blockfs.nodes.opener import check_shared_files, close_chain
from blockfs.values import MAX_SPEC_BYTES, parse_size

if TYPE_CHECKING:
    from blockfs.daemon import Daemon
    from blockfs.export import Export

CONTROL_DIR = ".control"

_LIMIT_MIB = MAX_CONTROL_BYTES >> 20

README = f"""\
blockfs control files
=====================

Everything blockfs can do while mounted is done by reading and writing the files here;
`blockfs job ...` is a thin client of the same files.

pid                     the daemon's process id
events                  one JSON event per line, oldest first (the last 1000); an event
                        equal (name and data) to one of the last 8 is not added again:
                        that entry moves to the end with "count" and the latest timestamp
images/NAME/info        JSON: format, virtual-size, filename, read-only, backing-chain
images/NAME/stats       JSON: rd_bytes, wr_bytes, rd_operations, wr_operations, ...
images/NAME/inject      (image option inject=on only) write error-injection rules; read
                        them as JSON, with how often each fired
jobs/backup             write a spec to start a backup job
jobs/ID/status          JSON: id, type, device, state, offset, len, speed, ready,
                        io-status, error
jobs/ID/ctl             write one verb: pause | resume | cancel | complete | dismiss | speed=N

events, info and status name host paths: only the mount's owner may read them (mode 0400).
Image files show their image file's owner, group and mode (a read-only image without write
bits) unless the mount was made with --uid, --gid or --mode.

A spec is key=value words or one JSON object. Sizes take K, M, G suffixes.

What is written to one open file is gathered and acted on when it is whole:
  - key=value words (and ctl verbs): at the first write that ends with a newline;
  - a JSON object: as soon as the text gathered parses as one object (or, at a write ending
    with a newline, when no more text could make it parse);
  - otherwise: at close. A spec acted on at close fails close() with its errno.
At most {MAX_SPEC_BYTES} bytes are gathered per open file (EINVAL beyond).

Limits per user (uid): at most {MAX_CONTROL_HANDLES} open files here at once and {_LIMIT_MIB} MiB held by
them (what each open file read at open, shared while the file has not changed, and what was
written but not acted on yet). Beyond them open() fails with EMFILE, write() with EDQUOT.

Error injection, for tests (image spec option inject=on): each line written to
images/NAME/inject is `clear` or a rule of key=value words: op (read|write|flush|discard|any,
default any; write includes write-zeroes), event (the rule waits for the qcow2 node to announce
a metadata write: l1_update, l2_update, l2_alloc, refblock_update, refblock_alloc,
reftable_update, reftable_grow, header_update, cluster_alloc), errno (EIO|ENOSPC), nth (the
Nth matching request fails; default 1), once (on, the default: that request only; off: it and
every later match), land (on: the request is carried out, then reported failed). A qcow2 image whose metadata write or flush failed then refuses writes
with EIO (reads go on) until it is mounted again; a failed fsync keeps failing until then.
    echo "op=write event=l2_update errno=ENOSPC" > MNT/.control/images/disk0/inject

Backup keys: device (required), target (required, a path), format (qcow2|raw; default qcow2),
mode (new|existing), sync (full|top|none), speed, on-source-error and on-target-error
(report|ignore|stop|enospc), id (default: the device name), compress (on: compressed qcow2
clusters), view (on: publish MNT/DEVICE@ID, a read-only point-in-time view, while the job runs).

Examples:
    echo "device=disk0 target=/srv/backup.qcow2 sync=full" > MNT/.control/jobs/backup
    cat MNT/.control/jobs/disk0/status
    echo pause > MNT/.control/jobs/disk0/ctl
    echo speed=50M > MNT/.control/jobs/disk0/ctl
    echo dismiss > MNT/.control/jobs/disk0/ctl      # once concluded
    tail -n 5 MNT/.control/events

A bad spec fails the write (EINVAL, ENOENT, EBUSY, EEXIST, ...); read the same open file to
get the reason, e.g.:  exec 3<>MNT/.control/jobs/backup; echo "device=x" >&3; cat <&3
"""


class _WritableFile(VFile):
    writable = True

    def __init__(self, name: str, act: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        super().__init__(name)
        self._act = act

    async def write(self, data: bytes) -> bytes | None:
        return await self._act(data)


class _InjectFile(VFile):
    """``images/NAME/inject``: rules in, rules and their counters out."""

    writable = True

    def __init__(self, injector: InjectFilter) -> None:
        super().__init__("inject")
        self._injector = injector

    async def render(self) -> bytes:
        return (json.dumps(self._injector.describe_rules(), indent=2) + "\n").encode()

    async def write(self, data: bytes) -> bytes | None:
        return self._injector.apply(data).encode()


class ControlTree:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.events = EventLog()
        self.jobs: dict[str, Job] = {}
        self._job_dirs: dict[str, VDir] = {}
        tree = daemon.tree
        self.dir: VDir = tree.mkdirs(tree.root, CONTROL_DIR)
        tree.add(self.dir, TextFile("README", lambda: README, version=lambda: 0))
        tree.add(self.dir, TextFile("pid", lambda: f"{os.getpid()}\n", version=lambda: 0))
        events = self.events
        tree.add(
            self.dir,
            TextFile("events", self._render_events, version=lambda: events.version, private=True),
        )
        self.images_dir = tree.mkdirs(self.dir, "images")
        for export in daemon.exports.values():
            self.add_image(export)
        self.jobs_dir = tree.mkdirs(self.dir, "jobs")
        tree.add(self.jobs_dir, _WritableFile("backup", self._start_backup))

    def add_image(self, export: Export) -> None:
        tree = self.daemon.tree
        d = tree.mkdirs(self.images_dir, export.name)
        tree.add(
            d,
            TextFile(
                "info",
                lambda: export_info(export.name, export.root, export.read_only),
                private=True,
            ),
        )
        tree.add(d, TextFile("stats", lambda: {"device": export.name, **export.stats.as_dict()}))
        injector = find_inject_filter(export.root)
        if injector is not None:
            tree.add(d, _InjectFile(injector))

    def _render_events(self) -> bytes:
        # Small parts joined into one bytes object: no second, transient copy of the whole
        # (a full log is ~1 MB, and handles may hold several renderings of it).
        return b"".join([(json.dumps(e) + "\n").encode() for e in self.events])

    # -- jobs ---------------------------------------------------------------------------------

    def _device(self, name: str) -> Export:
        export = self.daemon.exports.get(name)
        if export is None:
            raise UsageError(f"no device {name!r}", errno=errno.ENOENT)
        for job in self.jobs.values():
            if job.device == name and job.state in _BUSY_STATES:
                raise JobError(f"device {name!r} is busy with job {job.id!r}", errno=errno.EBUSY)
        return export

    def _check_new_id(self, job_id: str) -> None:
        if job_id in self.jobs:
            raise JobError(f"a job with id {job_id!r} exists already", errno=errno.EEXIST)

    async def _start_backup(self, data: bytes) -> bytes:
        from blockfs.jobs.backup import BackupJob, BackupSpec, open_backup_target

        try:
            spec = BackupSpec.parse(data)
            export = self._device(spec.device)
            self._check_new_id(spec.id)
            target, zero_init, tfile = await open_backup_target(spec, export)
            job: BackupJob | None = None
            try:
                # Check again: another spec may have started a job while the target was made.
                # The target file itself must not be a file a mounted image uses (its backing
                # file may be: fleecing reads the device's file through it).
                self._device(spec.device)
                self._check_new_id(spec.id)
                check_shared_files(
                    f"target {spec.target}",
                    target,
                    {n: e.root for n, e in self.daemon.exports.items()},
                    with_backing=False,
                )
                job = BackupJob(
                    spec,
                    self.daemon,
                    export,
                    target,
                    self.events,
                    target_zero_init=zero_init,
                    target_file=tfile,
                )
                self._add_job(job)
                await job.start()
            except BaseException:
                # One cleanup for every way a start can fail: nothing is left behind.
                if job is not None:
                    self._remove_job(job)
                with trio.CancelScope(shield=True):
                    await close_chain(target)
                    tfile.discard(even_named=True)
                    tfile.close()
                raise
        except BlockfsError as exc:
            self.events.emit(
                "JOB_START_FAILED",
                type="backup",
                spec=data.decode(errors="replace").strip()[:1000],
                error=str(exc),
            )
            raise
        assert self.daemon.nursery is not None
        self.daemon.nursery.start_soon(job.main)
        return f"{job.id}\n".encode()

    def _add_job(self, job: Job) -> None:
        tree = self.daemon.tree
        self.jobs[job.id] = job
        d = VDir(job.id)
        tree.add(self.jobs_dir, d)
        tree.add(d, TextFile("status", job.status, private=True))
        tree.add(d, _WritableFile("ctl", functools.partial(self._job_verb, job)))
        self._job_dirs[job.id] = d

    def _remove_job(self, job: Job) -> None:
        d = self._job_dirs.pop(job.id, None)
        if d is not None:
            self.daemon.tree.remove(d)
        self.jobs.pop(job.id, None)

    async def _job_verb(self, job: Job, data: bytes) -> bytes:
        verb = data.decode(errors="replace").strip()
        if verb.startswith("speed="):
            job.set_speed(parse_size(verb[len("speed=") :], "speed"))
        elif verb == "pause":
            job.pause()
        elif verb == "resume":
            job.resume()
        elif verb == "cancel":
            job.cancel()
        elif verb == "complete":
            job.complete()
        elif verb == "dismiss":
            job.dismiss()
            self._remove_job(job)
        else:
            raise UsageError(
                f"unknown verb {verb[:40]!r} (pause, resume, cancel, complete, dismiss, speed=N)"
            )
        return b"ok\n"

    async def aclose(self) -> None:
        """Cancel every live job and wait for each to conclude (filters leave the graph)."""
        for job in list(self.jobs.values()):
            if job.state in _BUSY_STATES:
                try:
                    job.cancel()
                except BlockfsError:
                    pass
        for job in list(self.jobs.values()):
            if job.state is not JobState.NULL and job.state is not JobState.CONCLUDED:
                await job.wait_concluded()


_BUSY_STATES = {
    JobState.CREATED,
    JobState.RUNNING,
    JobState.PAUSED,
    JobState.READY,
    JobState.STANDBY,
    JobState.WAITING,
    JobState.PENDING,
    JobState.ABORTING,
}
