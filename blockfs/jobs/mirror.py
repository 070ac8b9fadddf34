"""Mirror: move a disk in use to a new image, keep it in sync, then switch over (QEMU's
drive-mirror), a thin driver of the copy engine.

At start a :class:`MirrorFilter` goes above the device's root node. From then on every write
that reaches the device marks its clusters dirty in the engine's bitmap once it landed
(``copy-mode=background``), or is carried out on the source and then on the target before it
completes (``copy-mode=write-blocking``, :meth:`BlockCopy.write_blocking`: the target never
lags, so the job converges under any write rate).

The phases, as in QEMU:

1. The initial bitmap: what the target lacks (sync=full: everything that does not read as
   zeroes on a new target, or everything on an existing one; sync=top: what the top image
   holds, the rest being in the backing file the target shares; sync=none: nothing). It is
   built by a walk of the source's extents *after* the filter went in, so a write during the
   walk is marked by the filter whatever the walk saw (the union covers every change), and the
   walk never holds guest requests back. The engine then copies until no cluster is dirty.
2. READY (event BLOCK_JOB_READY): the engine copies whatever gets dirty, for as long as it
   takes.
3. ``complete``: one unthrottled pass over what is dirty while the guest goes on writing, then
   the device is quiesced (new requests wait), the rest is copied, the target flushed and given
   its final name, and the device's root becomes the target (:meth:`Export.replace_root`): the
   same file, open handles keep working. The old image is flushed, closed and left as it was.
   ``cancel`` in READY does the same but keeps the source (the target then holds the source
   as it was at that point: QEMU's meaning; BLOCK_JOB_COMPLETED). ``cancel`` before READY, or
   ``cancel force``, ends at once: the target is incomplete, and a new one is removed.

A failing target never fails a guest write: background mode only marks clusters; in
write-blocking mode a failed target write leaves the clusters dirty and goes to the
``on-target-error`` policy (report fails the job and the filter steps aside; stop pauses it;
ignore lets the background copy retry).

sync=top and sync=none targets read their unallocated clusters through the source's own nodes
(sync=top: the source's backing; sync=none: the source itself), never a second open of the same
files, so they see the same metadata the source writes; after the switch those nodes are simply
the target's chain.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from blockfs.errors import BlockfsError, ImageError, JobError, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import BlockCopy, CopyError, RateLimiter, TargetError, job_cluster_size
from blockfs.jobs.host import JobHost
from blockfs.jobs.job import ErrorAction, Job, JobFailed, JobState
from blockfs.jobs.target import OpenedTarget, open_job_target, parse_target_job
from blockfs.nodes.base import Node, Status, chain_block_status
from blockfs.nodes.filter import WRITE_HOOK_PASSES, FilterNode
from blockfs.nodes.registry import close_chain
from blockfs.values import choice, size_value

log = logging.getLogger(__name__)

#: mirror's own keys, beside those of every target job (jobs.target.TARGET_JOB_KEYS)
MIRROR_KEYS = ("granularity", "buf-size", "copy-mode")
MIN_GRANULARITY = 512
MAX_GRANULARITY = 64 << 20
#: the data in flight at once by default (QEMU's default is 16 MiB; four 1 MiB copies keep a
#: local disk busy, and Python's per-request cost makes more workers cost more than they give)
DEFAULT_BUF_SIZE = 4 << 20
MAX_BUF_SIZE = 1 << 30
#: the largest single copy (and so the data one worker holds)
MAX_CHUNK = 1 << 20
MAX_WORKERS = 16
#: the longest the start-up walk runs before it lets other tasks in
_SLICE_SECONDS = 0.002


def _power_of_two(value: int) -> bool:
    return value > 0 and not value & (value - 1)


@dataclass(frozen=True)
class MirrorSpec:
    device: str
    target: str
    format: str | None
    mode: str
    sync: str
    granularity: int  # 0: the target's cluster size, or 64 KiB
    buf_size: int
    speed: int
    copy_mode: str
    on_source_error: ErrorAction
    on_target_error: ErrorAction
    id: str

    @classmethod
    def parse(cls, text: bytes | str) -> MirrorSpec:
        """:raise UsageError: any unknown key or bad value."""
        fields, w = parse_target_job(text, MIRROR_KEYS)
        granularity = size_value(w, "granularity")
        if "granularity" in w and not (
            _power_of_two(granularity) and MIN_GRANULARITY <= granularity <= MAX_GRANULARITY
        ):
            raise UsageError(f"granularity={w['granularity'][:40]}: a power of two from 512 to 64M")
        buf_size = size_value(w, "buf-size", DEFAULT_BUF_SIZE)
        if not (MIN_GRANULARITY <= buf_size <= MAX_BUF_SIZE):
            raise UsageError(f"buf-size={w['buf-size'][:40]}: from 512 to 1G")
        if granularity and buf_size < granularity:
            raise UsageError(f"buf-size ({buf_size}) is smaller than the granularity")
        return cls(
            **fields,
            granularity=granularity,
            buf_size=buf_size,
            copy_mode=choice(w, "copy-mode", ["background", "write-blocking"], "background"),
        )


class MirrorFilter(FilterNode):
    """Above the device while a mirror runs: every write is tracked (background) or also
    carried out on the target (write-blocking). Inactive, it passes everything through."""

    passes_through = WRITE_HOOK_PASSES

    def __init__(self, child: Node, job: MirrorJob) -> None:
        super().__init__(child)
        self.job = job
        self.active = True
        self.blocking = job.spec.copy_mode == "write-blocking"

    async def write(self, offset: int, data: bytes) -> None:
        if not self.active:
            await self.child.write(offset, data)
        elif self.blocking:
            job = self.job
            await job.copy.write_blocking(
                offset,
                len(data),
                lambda: self.child.write(offset, data),
                lambda: job.target.write(offset, data),
                job.write_through_failed,
            )
        else:
            try:
                await self.child.write(offset, data)
            finally:
                self.job.copy.mark_dirty(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if not self.active:
            await self.child.write_zeroes(offset, length, may_unmap)
        elif self.blocking:
            job = self.job
            await job.copy.write_blocking(
                offset,
                length,
                lambda: self.child.write_zeroes(offset, length, may_unmap),
                lambda: job.target.write_zeroes(offset, length, may_unmap),
                job.write_through_failed,
            )
        else:
            try:
                await self.child.write_zeroes(offset, length, may_unmap)
            finally:
                self.job.copy.mark_dirty(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        # What a discarded range reads as is the source's business (zeroes, or its backing
        # file's data): the copy engine carries whatever that is over, in both modes.
        try:
            await self.child.discard(offset, length)
        finally:
            if self.active:
                self.job.copy.mark_dirty(offset, length)

    async def truncate(self, size: int) -> None:
        raise BlockfsError("cannot resize a disk while a mirror runs", errno=errno.EBUSY)

    async def aclose(self) -> None:
        await self.child.aclose()


class MirrorJob(Job):
    type = "mirror"

    def __init__(
        self, spec: MirrorSpec, host: JobHost, export: Export, target: OpenedTarget
    ) -> None:
        super().__init__(spec.id, export.name, host.events)
        self.spec = spec
        self.host = host
        self.export = export
        self.opened = target
        self.target: Node = target.node
        self.speed = spec.speed
        self.source: Node = export.root
        granularity = spec.granularity or (
            target.node.limits.cluster_size if target.node.format_name != "raw" else 0
        )
        cs = job_cluster_size(self.source.size, granularity or 65536)
        chunk = max(cs, min(MAX_CHUNK, spec.buf_size) // cs * cs)
        self.workers = max(1, min(MAX_WORKERS, spec.buf_size // chunk))
        self.copy = BlockCopy(
            self.source, target.node, cs, target_zero_init=target.zero_init, max_chunk=chunk
        )
        self.copy.on_progress = self._progress
        self.filter: MirrorFilter | None = None
        #: what cancel in READY asked for: end with the target in sync, keep the source
        self._cancel_in_sync = False
        #: the device now serves the target
        self.switched = False
        #: what became of the target, for the status file
        self.target_state = "copying"
        #: a whole copy whose final name was taken stays under its temporary name
        self._keep_partial = False
        self._reopen_lock = trio.Lock()
        #: the final sync runs with the device quiesced by this job
        self._device_held = False

    @classmethod
    def make(
        cls, spec: MirrorSpec, host: JobHost, export: Export, target: OpenedTarget | None
    ) -> MirrorJob:
        """The registry's factory (:data:`blockfs.jobs.registry.JOB_KINDS`)."""
        assert target is not None
        return cls(spec, host, export, target)

    def _progress(self, nbytes: int) -> None:
        self.offset += nbytes

    # -- start: the filter goes in; the walk comes after, in the body ----------------------------

    async def start(self) -> None:
        self.filter = await self.export.insert_filter(self._make_filter)

    async def _make_filter(self, root: Node) -> MirrorFilter:
        self.source = self.copy.source = root
        return MirrorFilter(root, self)

    async def _initial_bitmap(self) -> None:
        """Mark what the target lacks (see the module docstring); yields every few ms."""
        sync, bitmap, cs = self.spec.sync, self.copy.bitmap, self.copy.cluster_size
        if sync == "none":
            return
        if sync == "full" and not self.opened.zero_init:
            bitmap.set_all()
            return
        source, size, pos = self.source, self.source.size, 0
        deadline = trio.current_time() + _SLICE_SECONDS
        while pos < size:
            if sync == "top":
                ext = await source.block_status(pos, size - pos)
                wanted = bool(ext.status & Status.ALLOCATED)
            else:  # full, onto a target that reads as zeroes: what does not read as zeroes
                ext = await chain_block_status(source, pos, size - pos)
                wanted = not ext.status & Status.ZERO
            if wanted:
                first, last = pos // cs, (pos + ext.length - 1) // cs
                bitmap.set_range(first, last + 1 - first)
            pos += max(ext.length, 1)
            if trio.current_time() > deadline:
                await trio.lowlevel.checkpoint()
                deadline = trio.current_time() + _SLICE_SECONDS

    # -- the body ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self._initial_bitmap()
        limiter = RateLimiter(lambda: self.speed)
        # Phase 1: copy until nothing is dirty (as many passes as it takes).
        await self._copy(limiter)
        # What READY promises is durable on the target (as QEMU flushes it there): a cancel
        # in READY, or a crash after it, finds every copied cluster on disk.
        await self._flush_target()
        self.len = self.offset
        self.target_state = "in sync"
        self.ready_for_completion()
        # Phase 2: keep the target in sync until complete (or cancel) is asked for.
        while not self._asked_to_end():
            await self.checkpoint()
            if self.copy.dirty_count or self.copy.busy:
                await self._until_asked(lambda: self._copy(limiter))
            else:
                await self._until_asked(self.copy.wait_until_dirty)
        # Phase 3: catch up while the guest writes, then with the device quiesced.
        await self._copy(None, max_passes=1)
        switch = self._complete_requested and not self._cancel_in_sync
        if switch:
            old = await self.export.replace_root(self._switch_over)
            await self._retire_source(old)
        else:
            async with self.export.quiesced():
                await self._final_sync()
            self.target_state = "consistent: the source as it was at cancel"

    async def _copy(self, limiter: RateLimiter | None, max_passes: int | None = None) -> None:
        """Copy what is dirty: until nothing is, or (``max_passes``) that many passes."""
        await self.copy.run(
            workers=self.workers,
            on_error=self._copy_failed,
            limiter=limiter,
            checkpoint=self._worker_checkpoint,
            on_workers=self.set_body_tasks,
            max_passes=max_passes,
            converge=max_passes is None,
        )

    async def _worker_checkpoint(self) -> None:
        """Each worker, before each run: the pause point; then a target that stopped writing
        (a failed metadata write tripped qcow2's failsafe) is read again from its file before
        work goes on (after ``resume`` under ``stop``, at once under ``ignore``)."""
        await self.checkpoint()
        if self.target.write_failure is not None:
            await self._reopen_target()

    async def _reopen_target(self) -> None:
        async with self._reopen_lock:
            failure = self.target.write_failure
            if failure is None:
                return  # another worker did it
            # No request may be in flight on the old node: guest writes (write-blocking)
            # wait at the device (already held in the final sync), copies are waited for.
            async with contextlib.AsyncExitStack() as stack:
                if not self._device_held:
                    await stack.enter_async_context(self.export.quiesced())
                await self.copy.wait_idle()
                try:
                    node = await self.opened.reopen()
                except BlockfsError as exc:
                    raise JobFailed(f"the target cannot be read again: {exc}") from None
                self.target = self.copy.target = node
            log.warning("job %s: target read again from its file after: %s", self.id, failure)

    def _asked_to_end(self) -> bool:
        return self._complete_requested or self._cancel_in_sync

    async def _until_asked(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` until it ends or a verb kicks the job (complete, cancel, pause); a
        copy cut short leaves its clusters dirty (the engine's claim rule)."""
        kick = self.kick
        if self._asked_to_end() or self._paused:
            return  # asked before this kick event was taken: no later kick would come
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await kick.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await work()
            nursery.cancel_scope.cancel()

    async def _final_sync(self) -> None:
        """With the device quiesced: copy what is left, then make the target durable. Also
        turns the filter off (a write after this point belongs to the source alone)."""
        self._device_held = True
        try:
            await self._copy(None)
        finally:
            self._device_held = False
        await self._flush_target()
        if self.filter is not None:
            self.filter.active = False

    async def _flush_target(self) -> None:
        try:
            await self.target.flush()
        except BlockfsError as exc:
            raise JobFailed(f"flushing the target failed: {exc}", errno=exc.errno) from None

    async def _switch_over(self, root: Node) -> Node:
        """Inside the quiesced section of :meth:`Export.replace_root`: the new root."""
        if root is not self.filter:
            raise JobFailed("the device's graph changed under the mirror; not switched")
        await self._final_sync()
        tfile = self.opened.file
        if tfile is not None:
            try:
                await tfile.publish()  # before the switch: a target without its name is no switch
            except BlockfsError as exc:
                # The copy is whole but its name is taken: it stays where it is, the device
                # keeps its source, and the job fails with publish's message.
                self._keep_partial = True
                raise JobFailed(str(exc), errno=exc.errno) from None
        # From here on the target's chain is the device's: the nodes it shares with the old
        # source (sync=top, none) now belong to it.
        self.opened.shared_backing = None
        self.switched = True
        self.target_state = "switched: the device now serves the target"
        return self.target

    async def _retire_source(self, old_root: Node) -> None:
        """Flush and close the old image (left as it was at the switch). What the target's
        chain now uses of it stays open: sync=top shares its backing file, sync=none the
        image itself, which becomes a read-only backing file."""
        assert isinstance(old_root, FilterNode)
        source = old_root.child
        try:
            await source.flush()
        except BlockfsError as exc:
            log.warning("job %s: flushing the old image failed: %s", self.id, exc)
        in_chain: set[int] = set()
        node: Node | None = self.target.backing
        while node is not None:
            in_chain.add(id(node))
            node = node.backing
        if id(source) in in_chain:
            try:
                await source.reopen(True)
            except BlockfsError as exc:
                log.warning("job %s: the old image stays writable: %s", self.id, exc)
            return
        backing = source.backing
        await source.aclose()
        if backing is not None and id(backing) not in in_chain:
            await close_chain(backing)

    # -- errors -----------------------------------------------------------------------------

    async def _copy_failed(self, exc: CopyError) -> bool:
        if isinstance(exc, TargetError):
            return await self.io_error(
                self.spec.on_target_error, exc.cause, "write", "target write failed"
            )
        return await self.io_error(
            self.spec.on_source_error, exc.cause, "read", "source read failed"
        )

    def write_through_failed(self, exc: BlockfsError) -> None:
        """A write-blocking guest write reached the source but not the target (its clusters
        are dirty again); the guest write still succeeds."""
        action = self.judge_io_error(self.spec.on_target_error, exc, "write")
        if action is ErrorAction.REPORT:
            if self.filter is not None:
                self.filter.active = False
            if self.error is None:
                self.error = f"target write failed: {exc}"
            self._scope.cancel()

    # -- verbs ------------------------------------------------------------------------------

    def cancel(self, force: bool = False) -> None:
        """In READY (not ``force``): end with the target in sync and keep the source
        (BLOCK_JOB_COMPLETED, QEMU's meaning). Otherwise: end now; the target is incomplete."""
        self._check_verb("cancel")
        if not force and self.state in (JobState.READY, JobState.STANDBY):
            self._cancel_in_sync = True
            if self._paused:
                self.resume()
            self._kick()
            return
        super().cancel(force)

    def complete(self) -> None:
        self._check_verb("complete")
        if self._paused:
            raise JobError(f"job {self.id!r} is paused: resume it first", errno=errno.EBUSY)
        super().complete()

    # -- the end ----------------------------------------------------------------------------

    async def finalize(self, ok: bool) -> None:
        copy = self.copy
        pending = (copy.dirty_count + copy.in_flight_count) * copy.cluster_size
        self.len = max(self.len, self.offset + min(copy.size, pending))
        filt = self.filter
        if filt is not None:
            filt.active = False
            if not self.switched:
                await self.export.remove_filter(filt)
            self.filter = None
        if self.switched:
            return  # the target is the device's now; the old image was retired
        tfile = self.opened.file
        try:
            if ok:
                try:
                    await self.target.flush()
                except BlockfsError as exc:
                    self.error = f"flushing the target failed: {exc}"
                    ok = False
        finally:
            await self.opened.close()
            if tfile is not None:
                await self._settle_target_file(ok)

    async def _settle_target_file(self, ok: bool) -> None:
        tfile = self.opened.file
        assert tfile is not None
        try:
            if ok:
                await tfile.publish()
            elif self._keep_partial:
                self.target_state = f"complete, in {tfile.partial_path} (its name was taken)"
            elif tfile.temp is not None:
                await tfile.discard()
                self.target_state = "incomplete: removed"
            else:
                self.target_state = "incomplete"
        except BlockfsError as exc:
            self.error = str(exc)
            log.error("job %s: %s", self.id, exc)
        except OSError as exc:
            log.error("job %s: removing the unfinished target failed: %s", self.id, exc)
        finally:
            tfile.close()

    def status(self) -> dict[str, object]:
        st = super().status()
        copy = self.copy
        if self.state not in (JobState.CONCLUDED, JobState.NULL):
            pending = (copy.dirty_count + copy.in_flight_count) * copy.cluster_size
            pending = min(copy.size, pending)
            st["len"] = self.offset + pending
        tfile = self.opened.file
        st["target"] = self.spec.target
        if tfile is not None and tfile.partial_path:
            st["partial-target"] = tfile.partial_path
        st["target-state"] = self.target_state
        st["sync"] = self.spec.sync
        st["copy-mode"] = self.spec.copy_mode
        st["granularity"] = copy.cluster_size
        return st


async def open_mirror_target(spec: MirrorSpec, device: Export) -> OpenedTarget:
    """The mirror's target (:func:`~blockfs.jobs.target.open_job_target`): sync=top reads
    unwritten clusters through the source's backing file, sync=none through the source; a
    new target records that file as its own backing file, an existing one must already.

    :raise UsageError: EEXIST, ENOENT, EACCES, EINVAL, EFBIG as fits.
    """
    size = device.root.size
    job_cluster_size(size, spec.granularity or 65536)  # EFBIG before anything is made
    top = device.root
    while isinstance(top, FilterNode):
        top = top.child
    backing = {"full": None, "top": top.backing, "none": top}[spec.sync]
    if backing is not None and spec.format == "raw" and spec.mode == "new":
        raise UsageError(
            f"sync={spec.sync} needs a qcow2 target (its unwritten clusters read from "
            f"{backing.filename})"
        )
    try:
        target = await open_job_target(
            spec.target, mode=spec.mode, fmt=spec.format, size=size, like=device.root,
            backing=backing,
        )  # fmt: skip
    except ImageError as exc:
        raise UsageError(f"target {spec.target}: {exc}", errno=exc.errno) from None
    if backing is not None and target.node.backing is not backing:
        await target.discard()
        raise UsageError(
            f"target {spec.target} has no backing file, so sync={spec.sync} would leave "
            f"out what {backing.filename} holds: use sync=full, or a target backed by it"
        )
    return target
