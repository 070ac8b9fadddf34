"""Backup: a point-in-time copy of a disk in use, a thin driver of the copy engine.

At start a :class:`CopyBeforeWriteFilter` goes above the device's root node
(:meth:`Export.insert_filter`: the start bitmap is built at that same quiescent point). From
then on every write, write_zeroes and discard that reaches the device first has the old contents
of the clusters it touches copied to the target (:meth:`BlockCopy.copy_before_write`: a cluster
is copied once; a write over a cluster a worker is copying waits for it). Meanwhile
:meth:`BlockCopy.run` copies the remaining clusters in order, skipping what reads as zero (with
``sync=top``, the bitmap holds only what the top image holds). With ``sync=none`` nothing is
copied in the background: the target only receives what guest writes would destroy
("fleecing"). Nothing re-dirties a cluster here, so the engine's "not pending" is "copied".

What is backup's own: the stash and the error policy.

Guest writes come first: when the target fails, the old data goes to a bounded in-memory stash
(``stop``/``ignore`` policies: the job pauses or carries on, and writes the stash out when it can)
or the job fails and the filter steps aside (``report``); a guest write never fails because of the
backup. ``view=on`` publishes ``MNT/DEVICE@ID``, a read-only file of the point-in-time view.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio
from bitarray import bitarray

from blockfs.errors import BlockfsError, ReadOnlyError, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import (
    BlockCopy,
    CopyError,
    RateLimiter,
    SourceError,
    TargetError,
    job_cluster_size,
)
from blockfs.jobs.host import JobHost, PublishedFile
from blockfs.jobs.job import ErrorAction, Job, JobFailed
from blockfs.jobs.target import (
    OpenedTarget,
    RemoteTargetFile,
    TargetFile,
    open_job_target,
    parse_target_job,
)
from blockfs.nodes.base import Capability, Extent, Node, Status
from blockfs.nodes.filter import WRITE_HOOK_PASSES, FilterNode
from blockfs.nodes.registry import close_chain
from blockfs.values import bool_value

log = logging.getLogger(__name__)

#: the most old data kept in memory while the target cannot take it
MAX_STASH_BYTES = 256 * 1024 * 1024
#: background copies in flight at once
WORKERS = 4
#: the longest a start-up step runs before it lets other tasks (other disks' requests) in
_SLICE_SECONDS = 0.002


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
        fields, w = parse_target_job(text, ("compress", "view"))
        return cls(**fields, compress=bool_value(w, "compress"), view=bool_value(w, "view"))


class CopyBeforeWriteFilter(FilterNode):
    """Above the device while a backup runs: old data reaches the target before new data
    reaches the device."""

    passes_through = WRITE_HOOK_PASSES

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
        #: set (at a quiescent point of the view) before the job closes its target: a handle
        #: still open on the view then fails its reads instead of reading a closed descriptor
        self.ended = False

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
        if self.ended:
            raise BlockfsError(f"{self.filename}: the backup job has ended", errno=errno.ENODEV)
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
        host: JobHost,
        export: Export,
        target: Node,
        *,
        target_zero_init: bool,
        target_file: TargetFile | RemoteTargetFile | None = None,
        opened: OpenedTarget | None = None,
    ) -> None:
        super().__init__(spec.id, export.name, host.events)
        self.spec = spec
        self.host = host
        self.export = export
        self.target = target
        #: the target as opened (it may share a node of the device's chain: closed apart)
        self.opened = opened
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
        self.outside: bitarray | None = None  # sync=top: clusters the top did not hold
        self.view_file: PublishedFile | None = None
        self.view: Export | None = None
        self._stash_lock = trio.Lock()

    @classmethod
    def make(
        cls, spec: BackupSpec, host: JobHost, export: Export, target: OpenedTarget | None
    ) -> BackupJob:
        """The registry's factory (:data:`blockfs.jobs.registry.JOB_KINDS`)."""
        assert target is not None
        return cls(
            spec,
            host,
            export,
            target.node,
            target_zero_init=target.zero_init,
            target_file=target.file,
            opened=target,
        )

    def _progress(self, nbytes: int) -> None:
        self.offset = min(self.len, self.offset + nbytes)

    # -- start: insert the filter at a quiescent point ------------------------------------------

    async def start(self) -> None:
        self.filter = await self.export.insert_filter(self._make_filter)
        if self.spec.view:
            self.view = Export(
                f"{self.export.name}@{self.id}", BackupViewNode(self), read_only=True
            )
            self.view_file = self.host.publish_view(self.view, like=self.export)

    async def _make_filter(self, root: Node) -> CopyBeforeWriteFilter:
        """Inside the quiesced section: the point in time is now."""
        self.source = self.copy.source = root
        await self._initial_bitmap()
        return CopyBeforeWriteFilter(root, self)

    async def _initial_bitmap(self) -> None:
        """Mark what the job copies: whole-disk marks are one C call on a bit per cluster, and
        the walk of a top image's extents yields every few milliseconds, so a
        backup of a huge disk never holds the event loop (other disks keep being served)."""
        bitmap, cs = self.copy.bitmap, self.copy.cluster_size
        if self.spec.sync != "top":
            bitmap.set_all()
            return
        # sync=top: only what the top image holds; the rest stays in the backing chain.
        self.outside = bitarray(self.copy.clusters)
        self.outside.setall(1)
        size, pos = self.source.size, 0
        deadline = trio.current_time() + _SLICE_SECONDS
        while pos < size:
            ext = await self.source.block_status(pos, size - pos)
            if ext.status & Status.ALLOCATED:
                first, last = pos // cs, (pos + ext.length - 1) // cs
                bitmap.set_range(first, last + 1 - first)
                self.outside[first : last + 1] = 0
            pos += max(ext.length, 1)
            if trio.current_time() > deadline:  # block_status of cached tables never yields
                await trio.lowlevel.checkpoint()
                deadline = trio.current_time() + _SLICE_SECONDS
        self.offset = (self.copy.clusters - bitmap.count) * cs
        self.offset = min(self.offset, self.len)

    # -- the copy-before-write hook --------------------------------------------------------------

    def _cbw_active(self) -> bool:
        filt = self.filter
        return filt is not None and filt.active

    async def before_write(self, offset: int, length: int) -> None:
        """Copy the old contents of every cluster in the range that is not copied yet."""
        if not await self.copy.copy_before_write(
            offset, length, self._cbw_failed, self._cbw_active
        ):
            self._break("copy-before-write made no progress")

    def _cbw_failed(self, exc: CopyError, first: int, count: int) -> None:
        """A copy-before-write copy failed; no ``await`` since: the clusters are still ours."""
        if isinstance(exc, SourceError):
            self.report_error("read", ErrorAction.REPORT)
            self._break(f"copy-before-write: {exc}")
            return
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
        await self.io_error(self.spec.on_target_error, exc, "write", "target write failed")

    # -- the background copy: the engine's, with backup's policy --------------------------------

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
        limiter = RateLimiter(lambda: self.speed)
        for _ in range(100):  # rounds; one only repeats while the stash cannot be written
            await self.copy.run(
                workers=WORKERS,
                limiter=limiter,
                on_error=self._copy_failed,
                checkpoint=self._worker_checkpoint,
                on_workers=self.set_body_tasks,
            )
            await self.checkpoint()
            if self.stash:
                await self._drain_stash()
            if self.copy.dirty_count == 0 and not self.stash and not self.copy.busy:
                break
        else:
            raise JobFailed("copy did not converge")
        try:
            await self.target.flush()
        except BlockfsError as exc:
            raise JobFailed(f"flushing the target failed: {exc}", errno=exc.errno) from None

    async def _worker_checkpoint(self) -> None:
        """Each worker, before each run: the pause point, then old data waiting in memory."""
        await self.checkpoint()
        if self.stash:
            await self._drain_stash()

    async def _copy_failed(self, exc: CopyError) -> bool:
        """Backup's policy for a failed background copy; True: retry the range now."""
        if isinstance(exc, TargetError):
            await self._target_failed(exc.cause)
            return True
        return await self.io_error(
            self.spec.on_source_error, exc.cause, "read", "source read failed"
        )

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
            await self.export.remove_filter(filt)
            self.filter = None
        if self.view_file is not None:
            self.host.withdraw_view(self.view_file)
            self.view_file = None
        if self.view is not None:
            # Reads in flight on the view finish first; later ones fail (ENODEV), so none
            # reaches the target once it is closed.
            async with self.view.quiesced():
                assert isinstance(self.view.root, BackupViewNode)
                self.view.root.ended = True
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
            if self.opened is not None:
                await self.opened.close()
            else:
                await close_chain(self.target)
            await self._settle_target_file(ok)

    async def _settle_target_file(self, ok: bool) -> None:
        """A new target gets its name only when the copy is whole; otherwise it goes."""
        tfile = self.target_file
        if tfile is None:
            return
        self.target_file = None
        try:
            if ok:
                await tfile.publish()
            else:
                await tfile.discard()
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


async def open_backup_target(spec: BackupSpec, device: Export) -> OpenedTarget:
    """The backup's target (:func:`~blockfs.jobs.target.open_job_target`). sync=none (whose
    target is read while the job runs, through the view) reads unwritten clusters from the
    device itself, sync=top from the device's backing file: the target shares those nodes.

    :raise UsageError: EEXIST, ENOENT, EACCES, EINVAL, EFBIG as fits.
    """
    size = device.root.size
    job_cluster_size(size, 65536)  # EFBIG before anything is made
    fmt = spec.format
    if spec.mode == "new":
        fmt = fmt or "qcow2"
        if spec.compress and fmt != "qcow2":
            raise UsageError("compress=on needs a qcow2 target")
        if fmt == "raw" and spec.sync == "none":
            raise UsageError("sync=none needs a qcow2 target (backed by the device)")
    backing = _target_backing(spec, device) if spec.mode == "new" else None
    target = await open_job_target(
        spec.target,
        mode=spec.mode,
        fmt=fmt,
        size=size,
        like=device.root,
        backing=backing,
        temporary=spec.sync != "none",
    )
    if spec.compress and Capability.COMPRESSED_WRITES not in target.node.capabilities:
        await target.discard()
        raise UsageError(f"compress=on needs a qcow2 target, not {target.node.format_name}")
    return target


def _target_backing(spec: BackupSpec, device: Export) -> Node | None:
    """What a new target's unwritten clusters read as: the device (sync=none), the device's
    backing file (sync=top), or zeroes."""
    top = device.root
    while isinstance(top, FilterNode):
        top = top.child
    if spec.sync == "none":
        return top
    if spec.sync == "top" and spec.format != "raw":
        return top.backing
    return None
