"""Stream: pull into the active layer what it reads from the images below it, down to a base
(or the whole chain), then drop those images from the chain, while the device is in use
(QEMU's block-stream).

Every cluster the active layer does not hold but an image between it and ``base`` does is
read through the active layer (so it reads what the guest reads) and written into it. Then, at
a quiescent point, the active layer records ``base`` as its backing file (or none) and the
images between leave the chain, their files untouched. The device reads the same at every
instant; a crash leaves the old chain, valid, with some clusters copied up.

Guest writes race with the copies: a copy reads a cluster from below and writes it into the
active layer, and a guest write landing between the two would be overwritten with old data.
So a :class:`StreamFilter` above the device carries each write with its clusters held as if a
copy claimed them (:meth:`BlockCopy.write_blocking`, with nothing to write on a second side):
a copy of those clusters waits for the write, and the write waits for a copy under way.
Clusters a write covers whole need no copy afterwards. A discard (or an unmapping
write-zeroes) may make a cluster read from below again, so it is marked to be looked at again.
"""

from __future__ import annotations

import errno

import trio

from blockfs.errors import BlockfsError, JobError, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import BlockCopy, CopyError, RateLimiter, TargetError, job_cluster_size
from blockfs.jobs.chain import (
    CHAIN_WORKERS,
    ChainSpec,
    chain_layers,
    check_can_back,
    close_layers,
    find_layer,
    mark_held_above,
    new_backing_name,
    stitch,
)
from blockfs.jobs.host import JobHost
from blockfs.jobs.job import Job, JobFailed
from blockfs.nodes.base import Node
from blockfs.nodes.filter import WRITE_HOOK_PASSES, FilterNode

STREAM_GRANULARITY = 65536


async def _nothing() -> None:
    return None


def _never(exc: BlockfsError) -> None:  # the second side never fails: there is none
    raise AssertionError(exc)


class StreamFilter(FilterNode):
    """Above the device while a stream runs: writes and copies of the same clusters never
    overlap (see the module docstring). Inactive, it passes everything through."""

    passes_through = WRITE_HOOK_PASSES

    def __init__(self, child: Node, job: StreamJob) -> None:
        super().__init__(child)
        self.job = job
        self.active = True

    async def write(self, offset: int, data: bytes) -> None:
        if not self.active:
            await self.child.write(offset, data)
            return
        await self.job.copy.write_blocking(
            offset, len(data), lambda: self.child.write(offset, data), _nothing, _never
        )

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if not self.active:
            await self.child.write_zeroes(offset, length, may_unmap)
            return
        copy = self.job.copy
        try:
            await copy.write_blocking(
                offset,
                length,
                lambda: self.child.write_zeroes(offset, length, may_unmap),
                _nothing,
                _never,
            )
        finally:
            if may_unmap:
                copy.mark_dirty(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        if not self.active:
            await self.child.discard(offset, length)
            return
        copy = self.job.copy
        try:
            await copy.write_blocking(
                offset, length, lambda: self.child.discard(offset, length), _nothing, _never
            )
        finally:
            copy.mark_dirty(offset, length)

    async def truncate(self, size: int) -> None:
        raise BlockfsError("cannot resize a disk while a stream runs", errno=errno.EBUSY)

    async def aclose(self) -> None:
        await self.child.aclose()


class StreamJob(Job):
    type = "stream"

    def __init__(
        self, spec: ChainSpec, host: JobHost, export: Export, layers: list[Node],
        base: int | None,
    ) -> None:  # fmt: skip
        super().__init__(spec.id, export.name, host.events)
        self.spec = spec
        self.host = host
        self.export = export
        self.speed = spec.speed
        self.layers = layers
        self.active = layers[0]
        self.base = layers[base] if base is not None else None
        self.dropped = layers[1:base] if base is not None else layers[1:]
        self.backing_name: str | None = (
            new_backing_name(self.active, self.base, spec.backing_file)
            if self.base is not None
            else None
        )
        cs = job_cluster_size(self.active.size, STREAM_GRANULARITY)
        self.copy = BlockCopy(
            self.active, self.active, cs, target_zero_init=False, base=self.base
        )
        self.copy.on_progress = self._progress
        self.filter: StreamFilter | None = None
        self.stitched = False

    @classmethod
    def make(cls, spec: ChainSpec, host: JobHost, export: Export, target: object) -> StreamJob:
        """The registry's factory for ``jobs/stream``.

        :raise UsageError: a read-only device (EROFS), no backing file, a base that is not
            below the active layer or not in the chain, an active layer that cannot record
            base (EINVAL, ENOENT).
        """
        if export.read_only:
            raise UsageError(
                f"device {export.name!r} is mounted read-only: a stream writes into it",
                errno=errno.EROFS,
            )
        layers = chain_layers(export.root)
        if len(layers) < 2:
            raise UsageError(f"device {export.name!r} has no backing file: nothing to stream")
        if spec.backing_file is not None and spec.base is None:
            raise UsageError("backing-file= needs a base= (without one the image keeps none)")
        base = None
        if spec.base is not None:
            base = find_layer(layers, spec.base, "base", export.name)
            if base == 0:
                raise UsageError(
                    f"base {layers[0].filename} is the active layer: it must be below it"
                )
        check_can_back(layers[0], layers[base] if base is not None else None)
        return cls(spec, host, export, layers, base)

    def _progress(self, nbytes: int) -> None:
        self.offset += nbytes

    async def start(self) -> None:
        self.filter = await self.export.insert_filter(self._make_filter)

    async def _make_filter(self, root: Node) -> StreamFilter:
        return StreamFilter(root, self)

    async def _initial_bitmap(self) -> None:
        """Mark what the active layer lacks and an image above base holds. Without a base,
        nothing past the end of the active layer's backing file: it reads as zeroes with no
        backing file too."""
        active, below = self.active, self.active.backing
        assert below is not None
        size = active.size if self.base is not None else min(active.size, below.size)
        await mark_held_above(
            self.copy, below, self.base, size, self.checkpoint, unless_held_by=active
        )
        self.len = min(active.size, self.copy.bitmap.count * self.copy.cluster_size)

    async def _copy(self, limiter: RateLimiter | None, *, held: bool = False) -> None:
        """Copy until nothing is marked. ``held``: the device is quiesced, so no pause point
        (a job paused here would hold the guest back)."""
        await self.copy.run(
            workers=CHAIN_WORKERS,
            on_error=self._copy_failed,
            limiter=limiter,
            checkpoint=trio.lowlevel.checkpoint if held else self.checkpoint,
            on_workers=self.set_body_tasks,
            max_passes=None,
        )

    async def run(self) -> None:
        await self._initial_bitmap()
        await self._copy(RateLimiter(lambda: self.speed))
        await self._flush()
        await self.checkpoint()
        async with self.export.quiesced():
            # What discards marked meanwhile, with the device held (usually nothing).
            await self._copy(None, held=True)
            await self._flush()
            try:
                with trio.CancelScope(shield=True):  # the metadata and the chain agree
                    await stitch(self.active, self.base, self.backing_name, keep_writable=True)
            except BlockfsError as exc:
                raise JobFailed(
                    f"{self.active.filename}: recording the new backing file failed: {exc}",
                    errno=exc.errno,
                ) from None
            self.stitched = True
            if self.filter is not None:
                self.filter.active = False
        self.len = max(self.len, self.offset)
        await close_layers(self.dropped)

    async def _flush(self) -> None:
        try:
            await self.active.flush()
        except BlockfsError as exc:
            raise JobFailed(f"flushing {self.active.filename} failed: {exc}",
                            errno=exc.errno) from None  # fmt: skip

    async def _copy_failed(self, exc: CopyError) -> bool:
        if isinstance(exc, TargetError):
            return await self.io_error(self.spec.on_error, exc.cause, "write", "write failed")
        return await self.io_error(self.spec.on_error, exc.cause, "read", "read failed")

    def complete(self) -> None:
        raise JobError(f"job {self.id!r} is a stream: it completes on its own", errno=errno.EINVAL)

    async def finalize(self, ok: bool) -> None:
        filt = self.filter
        if filt is not None:
            filt.active = False
            await self.export.remove_filter(filt)
            self.filter = None

    def status(self) -> dict[str, object]:
        st = super().status()
        st["base"] = self.base.filename if self.base is not None else None
        st["backing-file"] = self.backing_name
        st["stitched"] = self.stitched
        return st
