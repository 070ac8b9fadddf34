"""Backup: a point-in-time copy of a disk in use.

At start a :class:`CopyBeforeWriteFilter` goes above the device's root node (at a quiescent
point). From then on every write, write_zeroes and discard that reaches the device first has the
old contents of the clusters it touches copied to the target (the :class:`BlockCopy` engine makes
sure each cluster is copied once: a write over a cluster a worker is copying waits for it).
Meanwhile the job's workers copy the remaining clusters in order, skipping what reads as zero
(or, with ``sync=top``, what the top image does not hold). With ``sync=none`` nothing is copied
in the background: the target only receives what guest writes would destroy ("fleecing").

Guest writes come first: when the target fails, the old data goes to a bounded in-memory stash
(``stop``/``ignore`` policies: the job pauses or carries on, and writes the stash out when it can)
or the job fails and the filter steps aside (``report``); a guest write never fails because of the
backup. ``view=on`` publishes ``MNT/DEVICE@ID``, a read-only file of the point-in-time view.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from blockfs.errors import BlockfsError, ReadOnlyError, UnsupportedFeature, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import (
    BlockCopy,
    SourceError,
    TargetError,
    fill_bytes,
    job_cluster_size,
)
from blockfs.jobs.job import ErrorAction, EventLog, Job, JobFailed, RateLimiter
from blockfs.jobs.target import TargetFile
from blockfs.nodes.base import Extent, Node, Status, chain_block_status
from blockfs.nodes.file import FileNode
from blockfs.nodes.filter import FilterNode
from blockfs.nodes.opener import OpenPolicy, close_chain, open_format, protocol_file
from blockfs.values import bool_value, choice, job_id, parse_words, size_value

if TYPE_CHECKING:
    from blockfs.daemon import Daemon
    from blockfs.fs import ImageFile

log = logging.getLogger(__name__)

BACKUP_KEYS = (
    "device",
    "target",
    "format",
    "mode",
    "sync",
    "speed",
    "on-source-error",
    "on-target-error",
    "id",
    "compress",
    "view",
)
#: the most old data kept in memory while the target cannot take it
MAX_STASH_BYTES = 256 * 1024 * 1024
#: background copies in flight at once
WORKERS = 4
#: the longest a start-up step runs before it lets other tasks (other disks' requests) in
_SLICE_SECONDS = 0.002
_ACTIONS = [a.value for a in ErrorAction]


@dataclass(frozen=True)
class BackupSpec:
    device: str
    target: str
    format: str | None
    mode: str
    sync: str
    speed: int
    on_source_error: ErrorAction
    on_target_error: ErrorAction
    id: str
    compress: bool
    view: bool

    @classmethod
    def parse(cls, text: bytes | str) -> BackupSpec:
        """:raise UsageError: any unknown key or bad value."""
        w = parse_words(text, BACKUP_KEYS)
        for key in ("device", "target"):
            if not w.get(key):
                raise UsageError(f"{key}= is required")
        return cls(
            device=w["device"],
            target=w["target"],
            format=choice(w, "format", ["qcow2", "raw", "vhdx"], "qcow2")
            if "format" in w
            else None,
            mode=choice(w, "mode", ["new", "existing"], "new"),
            sync=choice(w, "sync", ["full", "top", "none"], "full"),
            speed=size_value(w, "speed"),
            on_source_error=ErrorAction(choice(w, "on-source-error", _ACTIONS, "report")),
            on_target_error=ErrorAction(choice(w, "on-target-error", _ACTIONS, "report")),
            id=job_id(w, w["device"]),
            compress=bool_value(w, "compress"),
            view=bool_value(w, "view"),
        )


class CopyBeforeWriteFilter(FilterNode):
    """Above the device while a backup runs: old data reaches the target before new data
    reaches the device."""

    passes_through = frozenset({"read", "flush", "block_status", "allocated_bytes"})

    def __init__(self, child: Node, job: BackupJob) -> None:
        super().__init__(child)
        self.job = job
        self.active = True

    async def write(self, offset: int, data: bytes) -> None:
        if self.active:
            await self.job.before_write(offset, len(data))
        await self.child.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self.active:
            await self.job.before_write(offset, length)
        await self.child.write_zeroes(offset, length, may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        if self.active:
            await self.job.before_write(offset, length)
        await self.child.discard(offset, length)

    async def truncate(self, size: int) -> None:
        raise BlockfsError("cannot resize a disk while a backup runs", errno=errno.EBUSY)

    async def aclose(self) -> None:
        await self.child.aclose()


class BackupViewNode(Node):
    """The point-in-time view of a running backup, read-only: copied clusters from the target
    (or the stash), the rest from the device below the filter."""

    format_name = "raw"

    def __init__(self, job: BackupJob) -> None:
        self.job = job
        self.size = job.copy.size
        self.read_only = True
        self.filename = f"{job.export.name}@{job.id}"

    def _where(self, i: int) -> int:
        """0: target, 1: source (not copied yet), 2: stash, 3: below the top (sync=top)."""
        job = self.job
        if i in job.stash:
            return 2
        if job.copy.bitmap.get(i) or job.copy.is_inflight(i):
            return 1
        if job.outside is not None and job.outside[i]:
            return 3
        return 0

    async def read(self, offset: int, length: int) -> bytes:
        job = self.job
        cs = job.copy.cluster_size
        parts: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            i = pos // cs
            where = self._where(i)
            j = i + 1
            while j * cs < end and self._where(j) == where and where != 2:
                j += 1
            run_end = min(end, j * cs)
            parts.append(await self._read_run(where, pos, run_end - pos, i))
            pos = run_end
        return b"".join(parts)

    async def _read_run(self, where: int, offset: int, length: int, i: int) -> bytes:
        job = self.job
        cs = job.copy.cluster_size
        if where == 2:
            data = job.stash[i]
            return data[offset - i * cs : offset - i * cs + length]
        if where == 0:
            return await job.target.read(offset, length)
        if where == 3:
            below = job.source.backing
            if below is None or offset >= below.size:
                return bytes(length)
            n = min(length, below.size - offset)
            return await below.read(offset, n) + bytes(length - n)
        data = await job.source.read(offset, length)
        # A guest write may have copied these clusters and overwritten the source while we
        # read: any cluster no longer "not copied" is read again from where it went.
        first, last = offset // cs, (offset + length - 1) // cs
        if any(self._where(k) != 1 for k in range(first, last + 1)):
            await job.copy.wait_inflight(first, last)
            return await self.read(offset, length)
        return data

    async def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyError("a backup view is read-only")

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def aclose(self) -> None:
        pass


class BackupJob(Job):
    type = "backup"

    def __init__(
        self,
        spec: BackupSpec,
        daemon: Daemon,
        export: Export,
        target: Node,
        events: EventLog,
        *,
        target_zero_init: bool,
        target_file: TargetFile | None = None,
    ) -> None:
        super().__init__(spec.id, export.name, events)
        self.spec = spec
        self.daemon = daemon
        self.export = export
        self.target = target
        #: the file under the target: renamed into place on success, removed on failure
        self.target_file = target_file
        self.speed = spec.speed
        self.source: Node = export.root
        cs = job_cluster_size(
            self.source.size,
            max(65536, target.limits.cluster_size if target.format_name != "raw" else 0),
        )
        self.copy = BlockCopy(
            self.source, target, cs, target_zero_init=target_zero_init, compress=spec.compress
        )
        self.copy.on_progress = self._progress
        self.len = self.source.size
        self.filter: CopyBeforeWriteFilter | None = None
        self.stash: dict[int, bytes] = {}
        self.stash_bytes = 0
        self.outside: bytearray | None = None  # sync=top: clusters the top did not hold
        self.view_file: ImageFile | None = None
        self._stash_lock = trio.Lock()

    def _progress(self, nbytes: int) -> None:
        self.offset = min(self.len, self.offset + nbytes)

    # -- start: insert the filter at a quiescent point ------------------------------------------

    async def start(self) -> None:
        async with self.export.quiesced():
            self.source = self.export.root
            self.copy.source = self.source
            await self._initial_bitmap()
            self.filter = CopyBeforeWriteFilter(self.source, self)
            self.export.root = self.filter
        if self.spec.view:
            view = Export(f"{self.export.name}@{self.id}", BackupViewNode(self), read_only=True)
            self.view_file = self.daemon.ops.add_image(self.daemon.tree.root, view)

    async def _initial_bitmap(self) -> None:
        """Mark what the job copies. Built in slices with checkpoints between them, so a
        backup of a huge disk never holds the event loop (other disks keep being served)."""
        bitmap, cs = self.copy.bitmap, self.copy.cluster_size
        if self.spec.sync != "top":
            await bitmap.set_all()
            return
        # sync=top: only what the top image holds; the rest stays in the backing chain.
        self.outside = bytearray(self.copy.clusters)
        await fill_bytes(self.outside, 0, self.copy.clusters, 1)
        size, pos = self.source.size, 0
        deadline = trio.current_time() + _SLICE_SECONDS
        while pos < size:
            ext = await self.source.block_status(pos, size - pos)
            if ext.status & Status.ALLOCATED:
                first, last = pos // cs, (pos + ext.length - 1) // cs
                bitmap.set_range(first, last + 1 - first)
                self.outside[first : last + 1] = bytes(last + 1 - first)
            pos += max(ext.length, 1)
            if trio.current_time() > deadline:  # block_status of cached tables never yields
                await trio.lowlevel.checkpoint()
                deadline = trio.current_time() + _SLICE_SECONDS
        self.offset = (self.copy.clusters - bitmap.count) * cs
        self.offset = min(self.offset, self.len)

    # -- the copy-before-write hook --------------------------------------------------------------

    async def before_write(self, offset: int, length: int) -> None:
        """Copy the old contents of every cluster in the range that is not copied yet."""
        copy = self.copy
        first, last = copy.clusters_of(offset, length)
        for _ in range(1000):  # each round copies or waits for progress; bounded anyway
            filt = self.filter
            if filt is None or not filt.active:
                return
            i = first
            while i <= last:
                if copy.bitmap.get(i) and not copy.is_inflight(i):
                    start, n = copy.claim_run(i, last - i + 1)
                    await self._cbw_copy(start, n)
                    i = start + n
                else:
                    i += 1
            await copy.wait_inflight(first, last)
            if all(not copy.bitmap.get(k) for k in range(first, last + 1)):
                return
        self._break("copy-before-write made no progress")

    async def _cbw_copy(self, first: int, count: int) -> None:
        try:
            await self.copy.copy_claimed(first, count)
        except TargetError as exc:
            action = self.spec.on_target_error.decide(exc.cause)
            self.report_error("write", action)
            if action is ErrorAction.REPORT:
                self._break(str(exc))
                return
            # Keep the old data in memory; the guest write goes on, the target gets it later.
            if not self._stash_put(first, count, exc.data):
                self._break(f"{exc}; more than {MAX_STASH_BYTES >> 20} MiB waits for the target")
                return
            if action is ErrorAction.STOP:
                self.pause_for_error(exc.cause)
        except SourceError as exc:
            self.report_error("read", ErrorAction.REPORT)
            self._break(f"copy-before-write: {exc}")

    def _stash_put(self, first: int, count: int, data: bytes) -> bool:
        """Keep clusters [first, first+count) in memory (no await: the claim is atomic)."""
        cs = self.copy.cluster_size
        nbytes = min(count * cs, self.copy.size - first * cs)
        if self.stash_bytes + nbytes > MAX_STASH_BYTES:
            return False
        for k in range(count):
            i = first + k
            chunk = data[k * cs : (k + 1) * cs]
            self.stash[i] = chunk
            self.stash_bytes += len(chunk)
            self.copy.bitmap.clear(i)
        return True

    def _break(self, reason: str) -> None:
        """The point-in-time copy cannot be kept: step aside and fail the job."""
        if self.filter is not None:
            self.filter.active = False
        if self.error is None:
            self.error = reason
        self._scope.cancel()

    async def _drain_stash(self) -> None:
        """Write the stash to the target; leaves entries that fail (policy decides)."""
        async with self._stash_lock:
            cs = self.copy.cluster_size
            for i in sorted(self.stash):
                data = self.stash[i]
                try:
                    await self.copy.write_target(i * cs, data)
                except BlockfsError as exc:
                    await self._target_failed(exc)
                    return
                del self.stash[i]
                self.stash_bytes -= len(data)
                self._progress(len(data))

    async def _target_failed(self, exc: BlockfsError) -> None:
        action = self.spec.on_target_error.decide(exc)
        self.report_error("write", action)
        if action is ErrorAction.REPORT:
            raise JobFailed(f"target write failed: {exc}", errno=exc.errno)
        if action is ErrorAction.STOP:
            self.pause_for_error(exc)
        await trio.sleep(0.05)  # ignore: do not spin on a failing target

    # -- the background copy ---------------------------------------------------------------------

    async def run(self) -> None:
        if self.spec.sync == "none":
            # Nothing to copy in the background: serve copy-before-write until told to stop.
            while not self._complete_requested:
                kick = self.kick
                await self.checkpoint()
                if self.stash:
                    await self._drain_stash()
                if not self._complete_requested and not self._paused:
                    await kick.wait()
            await self._drain_stash()
            await self.target.flush()
            return
        limiter = RateLimiter(self)
        cursor = [0]
        failures = [0]
        for _ in range(100):  # passes; a pass only repeats for ranges that failed
            cursor[0] = 0
            try:
                self.body_tasks = WORKERS
                async with trio.open_nursery() as nursery:
                    for _w in range(WORKERS):
                        nursery.start_soon(self._worker, cursor, limiter, failures)
            except BaseExceptionGroup as group:
                # Several workers may fail at once on the same cause: report the first.
                first = _first_blockfs_error(group)
                if first is None:
                    raise
                raise first from None
            finally:
                self.body_tasks = 1
            if self.copy.bitmap.count == 0:
                await self.copy.wait_idle()  # copy-before-write copies still under way
            await self.checkpoint()
            if self.stash:
                await self._drain_stash()
            if self.copy.bitmap.count == 0 and not self.stash and not self.copy.busy:
                break
            if failures[0] > 10 * self.copy.clusters + 100:
                raise JobFailed("the same ranges keep failing")
        else:
            raise JobFailed("copy did not converge")
        try:
            await self.target.flush()
        except BlockfsError as exc:
            raise JobFailed(f"flushing the target failed: {exc}", errno=exc.errno) from None

    async def _worker(self, cursor: list[int], limiter: RateLimiter, failures: list[int]) -> None:
        chunk = self.copy.max_run * self.copy.cluster_size
        while True:
            await self.checkpoint()
            if self.stash:
                await self._drain_stash()
            await limiter.reserve(chunk)
            moved = await self._copy_next(cursor, failures)
            if moved < 0:
                self.body_tasks -= 1  # this worker is done: the others may all be parked
                self.update_paused_state()
                return
            limiter.refund(chunk - moved)

    async def _copy_next(self, cursor: list[int], failures: list[int]) -> int:
        """Copy (or skip) the next run of dirty clusters. Returns the bytes read and written,
        or -1 when no dirty cluster is left for this pass."""
        copy = self.copy
        cs = copy.cluster_size
        i = copy.bitmap.next_dirty(cursor[0])
        while i >= 0 and copy.is_inflight(i):
            i = copy.bitmap.next_dirty(i + 1)
        if i < 0:
            return -1
        first, n = copy.claim_run(i, copy.max_run)
        cursor[0] = first + n
        offset = first * cs
        length = min(n * cs, copy.size - offset)
        # What reads as zeroes is not read: written as zeroes, or not at all on a new target.
        try:
            ext = await chain_block_status(self.source, offset, length)
        except BlockfsError:
            ext = None
        if ext is not None and ext.status & Status.ZERO:
            k = n if ext.length >= length else ext.length // cs
            if k > 0:
                zero_len = min(k * cs, copy.size - offset)
                try:
                    await copy.zero_target(offset, zero_len)
                except BlockfsError as exc:
                    copy.release_claim(first, n)
                    failures[0] += 1
                    await self._target_failed(exc)
                    return 0
                copy.mark_done(first, k)
                self._progress(zero_len)
                if k < n:
                    copy.release_claim(first + k, n - k)
                    cursor[0] = first + k
                return 0
        try:
            return await copy.copy_claimed(first, n)
        except TargetError as exc:
            failures[0] += 1
            cursor[0] = min(cursor[0], first)
            await self._target_failed(exc.cause)
        except SourceError as exc:
            failures[0] += 1
            action = self.spec.on_source_error.decide(exc.cause)
            self.report_error("read", action)
            if action is ErrorAction.REPORT:
                raise JobFailed(str(exc), errno=exc.errno) from None
            if action is ErrorAction.STOP:
                self.pause_for_error(exc.cause)
                cursor[0] = min(cursor[0], first)
            else:
                await trio.sleep(0.05)
        return 0

    # -- the end -------------------------------------------------------------------------------

    def complete(self) -> None:
        # sync=none runs until told to stop; complete ends it successfully.
        if self.spec.sync == "none" and self.state.value in ("running", "paused"):
            self._complete_requested = True
            self._kick()
            return
        super().complete()

    async def finalize(self, ok: bool) -> None:
        filt = self.filter
        if filt is not None:
            filt.active = False
            async with self.export.quiesced():
                if self.export.root is filt:
                    self.export.root = filt.child
            self.filter = None
        if self.view_file is not None:
            self.daemon.ops.remove_image(self.view_file)
            self.view_file = None
        if self.stash and ok:
            log.error(
                "job %s: %d bytes of old data never reached the target", self.id, self.stash_bytes
            )
        try:
            await self.target.flush()
        except BlockfsError as exc:
            if ok:
                self.error = f"flushing the target failed: {exc}"
                ok = False
            log.warning("job %s: flushing the target failed: %s", self.id, exc)
        finally:
            await close_chain(self.target)
            self._settle_target_file(ok)

    def _settle_target_file(self, ok: bool) -> None:
        """A new target gets its name only when the copy is whole; otherwise it goes."""
        tfile = self.target_file
        if tfile is None:
            return
        self.target_file = None
        try:
            if ok:
                tfile.publish()
            else:
                tfile.discard()
        except BlockfsError as exc:
            self.error = str(exc)
            log.error("job %s: %s", self.id, exc)
        except OSError as exc:
            log.error("job %s: removing the unfinished target failed: %s", self.id, exc)
        finally:
            tfile.close()

    def status(self) -> dict[str, object]:
        st = super().status()
        if self.target_file is not None and self.target_file.partial_path:
            st["target"] = self.target_file.path
            st["partial-target"] = self.target_file.partial_path
        return st


async def open_backup_target(
    spec: BackupSpec, device: Export
) -> tuple[Node, bool, TargetFile]:
    """Create (mode=new) or open (mode=existing) the target, as :mod:`blockfs.jobs.target`
    says: no second open by name, no symlink of another user's, no FIFO. A new target is
    made under a temporary name (but with sync=none, whose target is read while the job runs)
    with the source's permission bits. Returns (node, zero_init, file).

    :raise UsageError: EEXIST, ENOENT, EACCES, EINVAL, EFBIG as fits.
    """
    size = device.root.size
    fmt = spec.format
    job_cluster_size(size, 65536)  # EFBIG before anything is made
    if spec.mode == "new":
        fmt = fmt or "qcow2"
        if fmt == "vhdx":
            raise UnsupportedFeature("VHDX targets are not supported yet", errno=errno.EINVAL)
        if spec.compress and fmt != "qcow2":
            raise UsageError("compress=on needs a qcow2 target")
        if fmt == "raw" and spec.sync == "none":
            raise UsageError("sync=none needs a qcow2 target (backed by the device)")
        source = protocol_file(device.root)
        perm = stat.S_IMODE(os.fstat(source.fd).st_mode) & 0o666 if source else 0o600
        tfile = TargetFile.create(spec.target, perm, temporary=spec.sync != "none")
    else:
        tfile = TargetFile.open_existing(spec.target)
    child: FileNode | None = None
    node: Node | None = None
    try:
        if spec.mode == "new":
            from blockfs.nodes.qcow2_create import create_qcow2, create_raw

            if fmt == "raw":
                await create_raw(tfile.path, size, fd=tfile.fd)
            else:
                backing, backing_fmt = _target_backing(spec, device)
                await create_qcow2(
                    tfile.path,
                    size,
                    cluster_size=65536,
                    backing=backing,
                    backing_fmt=backing_fmt,
                    fd=tfile.fd,
                )
        child = FileNode.from_fd(tfile.fd, tfile.path)
        policy = OpenPolicy.for_paths([tfile.path])
        node = await open_format(child, fmt=fmt, read_only=False, policy=policy)
        if node.size != size:
            raise UsageError(f"target is {node.size} bytes, the device {size}")
        if spec.compress and not getattr(node, "supports_compressed_writes", False):
            raise UsageError(f"compress=on needs a qcow2 target, not {node.format_name}")
    except BaseException:
        with trio.CancelScope(shield=True):
            if node is not None:
                await close_chain(node)
            elif child is not None:
                await child.aclose()
            else:
                os.close(tfile.fd)
            tfile.discard(even_named=True)
            tfile.close()
        raise
    # A new target reads as zeroes where nothing was written: zeroes need not be copied.
    # (Not so with a backing file: there, unwritten clusters read from the backing.)
    zero_init = spec.mode == "new" and node.backing is None
    return node, zero_init, tfile


def _first_blockfs_error(group: BaseExceptionGroup[BaseException]) -> BlockfsError | None:
    for exc in group.exceptions:
        if isinstance(exc, BlockfsError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_blockfs_error(exc)
            if found is not None:
                return found
    return None


def _target_backing(spec: BackupSpec, device: Export) -> tuple[str | None, str | None]:
    top = device.root
    while isinstance(top, FilterNode):
        top = top.child
    if spec.sync == "none":
        return top.filename, top.format_name
    if spec.sync == "top" and top.backing is not None:
        return top.backing.filename, top.backing.format_name
    return None, None
