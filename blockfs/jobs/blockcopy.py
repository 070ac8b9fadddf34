"""The copy engine shared by jobs: which clusters are still to copy, and copying them once.

:class:`BlockCopy` owns a :class:`DirtyBitmap` (1 = still to copy) and a table of copies in
flight. Two kinds of caller use it at once:

- a job's background loop, which claims runs of dirty clusters in order and copies them, at most
  ``max_workers`` at a time, under a rate limit;
- a copy-before-write hook, which must see every cluster a guest write touches copied before the
  write proceeds: it copies the dirty ones itself (never throttled) and waits for those a worker
  is copying.

A cluster is claimed (put in flight) before any ``await``, so no cluster is ever copied twice,
and when a copy fails its clusters go back to dirty and its waiters wake up to see that.

Zero detection: a run that reads as zeroes becomes ``write_zeroes`` on the target, or nothing at
all when the target is new and reads as zeroes already, so a sparse source gives a sparse target.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import trio

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node

_ZERO_CACHE: dict[int, bytes] = {}

#: the most clusters one bitmap tracks (one byte each: 64 MiB of memory at the most)
MAX_BITMAP_CLUSTERS = 1 << 26
#: the largest cluster a job tracks (and so the largest copy-before-write unit)
MAX_JOB_CLUSTER = 1 << 20
#: bitmap bytes set between two checkpoints (about a millisecond of memset and count)
_FILL_SLICE = 1 << 20
_ONES = b"\x01" * _FILL_SLICE


def job_cluster_size(size: int, minimum: int) -> int:
    """The unit a job tracks a disk of ``size`` bytes in: ``minimum``, doubled until the
    bitmap fits :data:`MAX_BITMAP_CLUSTERS`.

    :raise UsageError: (EFBIG) the disk needs a unit above :data:`MAX_JOB_CLUSTER` (past
        64 TiB at the most: a bitmap for it would not fit in memory).
    """
    cs = minimum
    while (size + cs - 1) // cs > MAX_BITMAP_CLUSTERS:
        cs *= 2
    if cs > max(minimum, MAX_JOB_CLUSTER):
        limit = MAX_BITMAP_CLUSTERS * max(minimum, MAX_JOB_CLUSTER)
        raise UsageError(
            f"a disk of {size} bytes is larger than block jobs support ({limit >> 40} TiB)",
            errno=errno.EFBIG,
        )
    return cs


async def fill_bytes(buf: bytearray, first: int, end: int, value: int) -> None:
    """Set ``buf[first:end]`` to ``value`` in slices, with a checkpoint after each, so that
    a bitmap of a huge disk is built without holding the event loop."""
    piece = _ONES if value == 1 else bytes(_FILL_SLICE)
    while first < end:
        n = min(_FILL_SLICE, end - first)
        buf[first : first + n] = piece if n == _FILL_SLICE else piece[:n]
        first += n
        await trio.lowlevel.checkpoint()


def _zeroes(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


class DirtyBitmap:
    """One byte per cluster, so that the next dirty cluster is found by ``bytearray.find`` in C
    (1 TiB at 64 KiB clusters costs 16 MiB)."""

    def __init__(self, clusters: int, *, dirty: bool) -> None:
        self._bits = bytearray(b"\x01" * clusters if dirty else clusters)
        self.count = clusters if dirty else 0

    def __len__(self) -> int:
        return len(self._bits)

    def get(self, i: int) -> bool:
        return self._bits[i] == 1

    def set(self, i: int) -> None:
        if not self._bits[i]:
            self._bits[i] = 1
            self.count += 1

    def clear(self, i: int) -> None:
        if self._bits[i]:
            self._bits[i] = 0
            self.count -= 1

    def set_range(self, first: int, count: int) -> None:
        """Mark ``count`` clusters from ``first`` dirty (in C: no loop per cluster)."""
        end = min(first + count, len(self._bits))
        if end > first:
            self.count += self._bits.count(0, first, end)
            self._bits[first:end] = b"\x01" * (end - first)

    async def set_all(self) -> None:
        """Mark every cluster dirty, with checkpoints (a 2 TiB disk has 32 Mi clusters)."""
        await fill_bytes(self._bits, 0, len(self._bits), 1)
        self.count = len(self._bits)

    def next_dirty(self, start: int) -> int:
        """The first dirty cluster at or after ``start``, or -1."""
        return self._bits.find(1, start)

    def next_clean(self, start: int) -> int:
        i = self._bits.find(0, start)
        return len(self._bits) if i < 0 else i


class SourceError(BlockfsError):
    """Reading the source failed; ``cause`` is the error."""

    def __init__(self, cause: BlockfsError) -> None:
        super().__init__(f"source read failed: {cause}", errno=cause.errno)
        self.cause = cause


class TargetError(BlockfsError):
    """Writing the target failed; ``data`` is what was read from the source."""

    def __init__(self, cause: BlockfsError, offset: int, data: bytes) -> None:
        super().__init__(f"target write failed: {cause}", errno=cause.errno)
        self.cause = cause
        self.offset = offset
        self.data = data


class BlockCopy:
    """Copies clusters of ``source`` to ``target`` (same offsets), each at most once."""

    def __init__(
        self,
        source: Node,
        target: Node,
        cluster_size: int,
        *,
        target_zero_init: bool,
        compress: bool = False,
        max_chunk: int = 1 << 20,
    ) -> None:
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.size = source.size
        self.clusters = (self.size + cluster_size - 1) // cluster_size
        self.bitmap = DirtyBitmap(self.clusters, dirty=False)
        self.target_zero_init = target_zero_init
        #: write data as compressed clusters of the target (a qcow2 node's write_compressed)
        self.compress = compress
        self.max_run = max(1, max_chunk // cluster_size)
        self._inflight: dict[int, trio.Event] = {}
        self._idle = trio.Event()
        #: called with the number of bytes each successful copy moved (progress)
        self.on_progress: Callable[[int], None] = lambda n: None

    # -- claiming -------------------------------------------------------------------------------

    def is_inflight(self, i: int) -> bool:
        return i in self._inflight

    def claim_run(self, first: int, limit: int) -> tuple[int, int]:
        """Claim the run of dirty, not in-flight clusters starting at ``first`` (at most
        ``limit`` long). Returns (first, count); count 0 when ``first`` is not claimable."""
        n = 0
        bitmap, inflight = self.bitmap, self._inflight
        while n < limit and first + n < self.clusters:
            i = first + n
            if not bitmap.get(i) or i in inflight:
                break
            n += 1
        if n:
            done = trio.Event()
            for i in range(first, first + n):
                inflight[i] = done
        return first, n

    def _release(self, first: int, count: int, copied: bool) -> None:
        event = self._inflight.get(first)
        for i in range(first, first + count):
            self._inflight.pop(i, None)
            if copied:
                self.bitmap.clear(i)
        if event is not None:
            event.set()
        if not self._inflight:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no copy is in flight (copy-before-write ones included)."""
        while self._inflight:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    # -- copying --------------------------------------------------------------------------------

    async def copy_claimed(self, first: int, count: int) -> int:
        """Copy a claimed run; on return its clusters are clean. Returns the bytes moved.

        :raise SourceError, TargetError: the run stays dirty and is released.
        """
        cs = self.cluster_size
        offset = first * cs
        length = min(count * cs, self.size - offset)
        copied = False
        try:
            try:
                data = await self.source.read(offset, length)
            except BlockfsError as exc:
                raise SourceError(exc) from None
            try:
                await self.write_target(offset, data)
            except BlockfsError as exc:
                raise TargetError(exc, offset, data) from None
            copied = True
        finally:
            self._release(first, count, copied)
        self.on_progress(length)
        return length

    async def write_target(self, offset: int, data: bytes) -> None:
        """Put ``data`` on the target: zeroes as zeroes (or nothing on a zero-initialised
        target), the rest compressed or plain. :raise BlockfsError:"""
        if data == _zeroes(len(data)):
            await self.zero_target(offset, len(data))
        elif self.compress:
            await self._write_compressed(offset, data)
        else:
            await self.target.write(offset, data)

    async def zero_target(self, offset: int, length: int) -> None:
        """Make the range read as zeroes on the target (nothing to do on a new target)."""
        if not self.target_zero_init:
            await self.target.write_zeroes(offset, length, may_unmap=True)

    async def _write_compressed(self, offset: int, data: bytes) -> None:
        """One target cluster at a time (job clusters are whole target clusters)."""
        tcs = self.target.limits.cluster_size
        write = self.target.write_compressed  # type: ignore[attr-defined]
        for pos in range(0, len(data), tcs):
            chunk = data[pos : pos + tcs]
            if chunk == _zeroes(len(chunk)):
                await self.zero_target(offset + pos, len(chunk))
            else:
                await write(offset + pos, chunk)

    def mark_done(self, first: int, count: int) -> None:
        """Count claimed clusters as copied without copying (their data went elsewhere)."""
        self._release(first, count, True)

    def release_claim(self, first: int, count: int) -> None:
        self._release(first, count, False)

    async def wait_inflight(self, first: int, last: int) -> bool:
        """Wait for copies in flight over clusters [first, last]; True if there were any."""
        waited = False
        for i in range(first, last + 1):
            event = self._inflight.get(i)
            if event is not None:
                await event.wait()
                waited = True
        return waited

    def clusters_of(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        return offset // cs, (offset + length - 1) // cs
