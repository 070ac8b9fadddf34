"""The control tree under ``MNT/.control``: files a shell can read and write.

    .control/README                what every file here does, with examples
    .control/pid                   the daemon's process id (``blockfs umount`` reads it)
    .control/events                newline-delimited JSON events, oldest first (bounded)
    .control/images/NAME/info      JSON: the image and its backing chain
    .control/images/NAME/stats     JSON: QEMU's blockstats counters
    .control/images/NAME/inject    error-injection rules (only with the image option inject=on)
    .control/images/NAME/ctl       write snapshot=NEW.qcow2: an external snapshot, live
    .control/images/NAME/snapshots JSON: the internal snapshot table; write create|delete|apply TAG
    .control/images/NAME/map       JSON: qemu-img map's extents of the image
    .control/images/add            write NAME=SPEC: open another image while mounted
    .control/images/remove         write NAME: flush and close an image nothing uses
    .control/jobs/backup           write a spec here to start a backup
    .control/jobs/mirror           write a spec here to start a mirror
    .control/jobs/commit           write a spec here to start a commit
    .control/jobs/stream           write a spec here to start a stream
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
from collections.abc import Awaitable, Callable, Mapping

from blockfs.control.stats import StatsFile
from blockfs.control.tree import (
    MAX_CONTROL_BYTES,
    MAX_CONTROL_HANDLES,
    TextFile,
    VDir,
    VFile,
    VirtualTree,
)
from blockfs.errors import UsageError
from blockfs.export import Export
from blockfs.info import export_info
from blockfs.jobs.chain import external_snapshot
from blockfs.jobs.internal import internal_snapshot, parse_verb, snapshot_table
from blockfs.jobs.job import EventLog, Job
from blockfs.jobs.registry import JobRegistry
from blockfs.mapping import map_image, map_json
from blockfs.nodes.inject import InjectFilter, find_inject_filter
from blockfs.values import MAX_SPEC_BYTES, parse_size

CONTROL_DIR = ".control"
#: most extents the map file renders (~100 bytes each): a larger map is refused (EFBIG)
MAX_MAP_ENTRIES = 200_000

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
images/NAME/info        JSON: qemu-img info's fields of the image's live chain (each
                        layer under the one above as "backing-image"); under "blockfs":
                        device, read-only, the jobs on it
images/NAME/map         JSON: qemu-img map --output json's extents (start, length, depth,
                        present, zero, data, offset)
images/NAME/snapshots   JSON: the internal snapshot table of a qcow2 image (qemu-img info's
                        fields and disk-size); write `create TAG`, `delete TAG` or
                        `apply TAG`: done live, guest requests wait the instant it takes;
                        refused (EBUSY) while a job runs on the image
images/add              write NAME=SPEC (mount's syntax, an absolute path) to open one more
                        image; its file appears under the mountpoint
images/remove           write NAME: flush and close it; refused (EBUSY) while a job uses it
                        or anyone holds the file open
images/NAME/stats       JSON: QEMU's blockstats counters (rd_bytes, wr_operations, ...);
                        rd_, wr_ and flush_latency_histogram ({{boundaries, bins}}, ns;
                        bin i counts [boundaries[i-1], boundaries[i]); by default
                        10us 100us 1ms 10ms 100ms 1s); nodes: per layer of the chain,
                        top first, the I/O its storage did (metadata, reads falling
                        through to a backing file). The owner may write `clear` (bins
                        to zero) or boundaries=N,N,... (ns; all three histograms),
                        boundaries-read=, boundaries-write=, boundaries-flush= (one
                        each): new boundaries start their bins from zero
images/NAME/inject      (image option inject=on only) write error-injection rules; read
                        them as JSON, with how often each fired
images/NAME/ctl         write snapshot=NEW.qcow2 (format=qcow2|vhdx): an external
                        snapshot: NEW, over the image's active layer, becomes the active
                        layer (a relative NEW is in the active layer's folder); refused
                        (EBUSY) while a job runs on the image
jobs/backup             write a spec to start a backup job
jobs/mirror             write a spec to start a mirror job
jobs/commit             write a spec to start a commit job
jobs/stream             write a spec to start a stream job
jobs/ID/status          JSON: id, type, device, state, offset, len, speed, ready,
                        io-status, error (a mirror adds target, target-state, sync,
                        copy-mode, granularity)
jobs/ID/ctl             write one verb: pause | resume | cancel | cancel force |
                        complete | dismiss | speed=N

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
reftable_update, reftable_grow, header_update, cluster_alloc; or the vhdx node: log_write,
bat_update, bitmap_update, metadata_update, header_update, block_alloc), errno (EIO|ENOSPC), nth (the
Nth matching request fails; default 1), once (on, the default: that request only; off: it and
every later match), land (on: the request is carried out, then reported failed). A qcow2 or vhdx image whose metadata write or flush failed then refuses writes
with EIO (reads go on) until it is mounted again (a vhdx image replays its log then); a failed
fsync keeps failing until then.
    echo "op=write event=l2_update errno=ENOSPC" > MNT/.control/images/disk0/inject

Backup keys: device (required), target (required, a path), format (qcow2|raw|vhdx; default
qcow2),
mode (new|existing), sync (full|top|none), speed, on-source-error and on-target-error
(report|ignore|stop|enospc), id (default: the device name), compress (on: compressed qcow2
clusters), view (on: publish MNT/DEVICE@ID, a read-only point-in-time view, while the job runs).

Mirror keys: device (required), target (required, a path), format (qcow2|raw|vhdx; default
qcow2), mode (new|existing), sync (full|top|none: none and top give the target the
source's image or backing file as its backing file), granularity (dirty-tracking unit, a
power of two from 512 to 64M; default the target's cluster size or 64K), buf-size (data in
flight, default 4M), speed, copy-mode (background: copy what writes dirty; write-blocking:
each write reaches both before it completes), on-source-error, on-target-error, id.
A mirror copies, then is ready (BLOCK_JOB_READY) and keeps the target in sync:
  complete       the device switches over to the target (same file, open handles keep
                 working); the old image is left as it was at the switch
  cancel         before ready: stops, the target is incomplete (a new one is removed);
                 when ready: the target is made equal to the source at that point and
                 kept, the device keeps its source (BLOCK_JOB_COMPLETED)
  cancel force   stops at once, in any state

Commit keys: device (required), top (default: the active layer), base (default: the
bottom of the chain), backing-file (the name the image above top records for base; default
relative where its old name was), speed, on-error (report|ignore|stop|enospc), id. Layers
are named by depth (0 = the active layer, 1 its backing file, ...) or by file name (as
images/NAME/info shows it, or a base name only one layer has).
  top below the active layer: what top and the layers down to base hold is written into
  base; the image above top then names base as its backing file; the layers between leave
  the chain (their files stay as they were). The job ends on its own.
  top = the active layer (an active commit): like a mirror into base: ready, then
  complete switches the device to base and drops the layers above it; cancel when ready
  leaves the chain as it was.
Stream keys: device (required), base (default: none, the whole chain), backing-file,
speed, on-error, id. What the active layer reads from the layers above base is copied into
it, then it names base (or no backing file) and those layers leave the chain.

Examples:
    echo "device=disk0 target=/srv/backup.qcow2 sync=full" > MNT/.control/jobs/backup
    echo "device=disk0 target=/new/disk0.qcow2" > MNT/.control/jobs/mirror
    echo complete > MNT/.control/jobs/disk0/ctl     # once "ready": true
    cat MNT/.control/jobs/disk0/status
    echo pause > MNT/.control/jobs/disk0/ctl
    echo speed=50M > MNT/.control/jobs/disk0/ctl
    echo dismiss > MNT/.control/jobs/disk0/ctl      # once concluded
    tail -n 5 MNT/.control/events
    echo "snapshot=disk0-snap1.qcow2" > MNT/.control/images/disk0/ctl
    echo "create before-upgrade" > MNT/.control/images/disk0/snapshots
    echo "disk1=/srv/disk1.qcow2,read-only=on" > MNT/.control/images/add
    echo disk1 > MNT/.control/images/remove
    echo "device=disk0 top=disk0-snap1.qcow2 base=disk0.qcow2" > MNT/.control/jobs/commit
    echo "device=disk0 base=disk0.qcow2" > MNT/.control/jobs/stream

A bad spec fails the write (EINVAL, ENOENT, EBUSY, EEXIST, ...); read the same open file to
get the reason, e.g.:  exec 3<>MNT/.control/jobs/backup; echo "device=x" >&3; cat <&3
"""


class _WritableFile(VFile):
    writable = True

    def __init__(
        self, name: str, act: Callable[[bytes], Awaitable[bytes | None]], *, private: bool = False
    ) -> None:
        super().__init__(name, private=private)
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


class _SnapshotsFile(VFile):
    """``images/NAME/snapshots``: the internal snapshot table in, verbs out."""

    writable = True

    def __init__(self, export: Export, control: ControlTree) -> None:
        super().__init__("snapshots")
        self._export = export
        self._control = control

    async def render(self) -> bytes:
        return (json.dumps(snapshot_table(self._export), indent=2) + "\n").encode()

    async def write(self, data: bytes) -> bytes | None:
        verb, tag = parse_verb(data)
        export = self._export
        self._control.registry.device(export.name)  # EBUSY while a job holds it
        entry = await internal_snapshot(export, verb, tag)
        event = {"create": "SNAPSHOT_CREATED", "delete": "SNAPSHOT_DELETED",
                 "apply": "SNAPSHOT_APPLIED"}[verb]  # fmt: skip
        self._control.events.emit(event, device=export.name, id=entry["id"], name=entry["name"])
        return (json.dumps(entry) + "\n").encode()


class ControlTree:
    """The files under ``MNT/.control``. Job files route to the :class:`JobRegistry`; the tree
    knows nothing of the daemon."""

    def __init__(
        self,
        tree: VirtualTree,
        exports: Mapping[str, Export],
        events: EventLog,
        jobs: JobRegistry,
        *,
        add_image: Callable[[bytes], Awaitable[bytes]] | None = None,
        remove_image: Callable[[bytes], Awaitable[bytes]] | None = None,
    ) -> None:
        """``add_image`` and ``remove_image`` act on writes to ``images/add`` and
        ``images/remove`` (the daemon's hot add and remove); without them the files are
        absent."""
        self.tree = tree
        self.events = events
        self.registry = jobs
        self._job_dirs: dict[str, VDir] = {}
        self.dir: VDir = tree.mkdirs(tree.root, CONTROL_DIR)
        tree.add(self.dir, TextFile("README", lambda: README, version=lambda: 0))
        tree.add(self.dir, TextFile("pid", lambda: f"{os.getpid()}\n", version=lambda: 0))
        tree.add(
            self.dir,
            TextFile("events", self._render_events, version=lambda: events.version, private=True),
        )
        self.images_dir = tree.mkdirs(self.dir, "images")
        self._image_dirs: dict[str, VDir] = {}
        if add_image is not None:
            tree.add(self.images_dir, _WritableFile("add", add_image, private=True))
        if remove_image is not None:
            tree.add(self.images_dir, _WritableFile("remove", remove_image, private=True))
        for export in exports.values():
            self.add_image(export)
        self.jobs_dir = tree.mkdirs(self.dir, "jobs")
        for kind in jobs.kinds:
            tree.add(self.jobs_dir, _WritableFile(kind, functools.partial(self._start_job, kind)))
        jobs.on_added = self._add_job
        jobs.on_removed = self._remove_job

    @property
    def jobs(self) -> dict[str, Job]:
        return self.registry.jobs

    def add_image(self, export: Export) -> None:
        tree = self.tree
        d = tree.mkdirs(self.images_dir, export.name)
        self._image_dirs[export.name] = d
        tree.add(
            d,
            TextFile(
                "info",
                lambda: export_info(
                    export.name, export.root, export.read_only, self._jobs_on(export.name)
                ),
                private=True,
            ),
        )
        tree.add(d, StatsFile(export))
        tree.add(d, _WritableFile("ctl", functools.partial(self._image_verb, export)))
        tree.add(d, TextFile("map", functools.partial(self._render_map, export), private=True))
        tree.add(d, _SnapshotsFile(export, self))
        injector = find_inject_filter(export.root)
        if injector is not None:
            tree.add(d, _InjectFile(injector))

    def remove_image(self, name: str) -> None:
        """Take ``images/NAME`` away (the image was closed); open handles keep working."""
        d = self._image_dirs.pop(name, None)
        if d is not None:
            self.tree.remove(d)

    async def _render_map(self, export: Export) -> bytes:
        try:
            entries = await map_image(export.root, max_entries=MAX_MAP_ENTRIES)
        except OverflowError:
            raise UsageError(
                f"the map of {export.name} has more than {MAX_MAP_ENTRIES} extents; "
                "run blockfs map on the image file",
                errno=errno.EFBIG,
            ) from None
        return map_json(entries).encode()

    def _jobs_on(self, device: str) -> list[dict[str, object]]:
        return [
            {"id": job.id, "type": job.type, "status": job.state.value}
            for job in self.jobs.values()
            if job.device == device
        ]

    async def _image_verb(self, export: Export, data: bytes) -> bytes:
        """``images/NAME/ctl``: ``snapshot=NEW [format=F]`` (the only verb so far)."""
        self.registry.device(export.name)  # EBUSY while a job holds it
        overlay = await external_snapshot(export, data)
        self.events.emit(
            "BLOCK_SNAPSHOT_CREATED", device=export.name, filename=overlay.filename,
            format=overlay.format_name,
        )  # fmt: skip
        return f"{overlay.filename}\n".encode()

    def _render_events(self) -> bytes:
        # Small parts joined into one bytes object: no second, transient copy of the whole
        # (a full log is ~1 MB, and handles may hold several renderings of it).
        return b"".join([(json.dumps(e) + "\n").encode() for e in self.events])

    # -- jobs: routed to the registry ---------------------------------------------------------

    async def _start_job(self, kind: str, data: bytes) -> bytes:
        job = await self.registry.start(kind, data)
        return f"{job.id}\n".encode()

    def _add_job(self, job: Job) -> None:
        tree = self.tree
        d = VDir(job.id)
        tree.add(self.jobs_dir, d)
        tree.add(d, TextFile("status", job.status, private=True))
        tree.add(d, _WritableFile("ctl", functools.partial(self._job_verb, job)))
        self._job_dirs[job.id] = d

    def _remove_job(self, job: Job) -> None:
        d = self._job_dirs.pop(job.id, None)
        if d is not None:
            self.tree.remove(d)

    async def _job_verb(self, job: Job, data: bytes) -> bytes:
        verb = data.decode(errors="replace").strip()
        if verb.startswith("speed="):
            job.set_speed(parse_size(verb[len("speed=") :], "speed"))
        elif verb == "pause":
            job.pause()
        elif verb == "resume":
            job.resume()
        elif verb in ("cancel", "cancel force"):
            job.cancel(force=verb == "cancel force")
        elif verb == "complete":
            job.complete()
        elif verb == "dismiss":
            self.registry.dismiss(job)
        else:
            raise UsageError(
                f"unknown verb {verb[:40]!r} (pause, resume, cancel, cancel force, complete, "
                "dismiss, speed=N)"
            )
        return b"ok\n"
