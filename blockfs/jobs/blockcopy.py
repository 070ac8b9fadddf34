"""The copy engine every job drives: which clusters are still to copy, and copying them.

:class:`BlockCopy` owns a :class:`DirtyBitmap` (1 = to copy), the table of copies in flight,
the background workers (:meth:`BlockCopy.run`: several copies in flight, a rate limit, zero and
unallocated skipping, progress counters) and the copy-before-write path
(:meth:`BlockCopy.copy_before_write`). A job chooses the source, the target and the start
bitmap, and keeps only its policy: what an error does (``on_error``), where it pauses
(``checkpoint``), and for backup the stash of old data a failing target could not take.

The dirty-bit rule (as QEMU's block-copy does it): **a cluster's bit is cleared when a copy
claims it, and set again when that copy fails.** A write that marks a cluster dirty while it is
being copied (a mirror's write notifier, :meth:`BlockCopy.mark_dirty`) therefore leaves the bit
set, and the cluster is copied again once the first copy ended; clearing the bit when the copy
*finished* would lose that write. Two copies of one cluster never run at once (a claim skips
clusters in flight), so an old copy can never land after a newer one.

With the bit cleared at claim, "dirty" alone no longer says "not yet copied": a cluster in
flight is clean but its old data has not reached the target. What copy-before-write must see
finished before a guest write proceeds is a **pending** cluster: dirty *or* in flight
(:meth:`BlockCopy.is_pending`). The in-flight table is that second half: each claimed run has an
event, set when its copy ends either way; copy-before-write copies the dirty clusters itself,
waits for the in-flight ones, and looks again (a failed copy made them dirty again). For backup
nothing re-dirties a cluster, so "not pending" is exactly "copied".

Invariants kept without locks (no ``await`` between the lines that keep them):
claiming = clearing the bits and entering the run in the in-flight table; ending a copy =
leaving the table, setting the bits again on failure, waking the waiters.

Zero detection: a run that reads as zeroes becomes ``write_zeroes`` on the target, or nothing
at all when the target is new and reads as zeroes already, so a sparse source gives a sparse
target. With a ``base`` (commit, stream), a run that no layer above ``base`` holds is skipped.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from bitarray import bitarray

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node, Status, chain_block_status

_ZERO_CACHE: dict[int, bytes] = {}

#: the most clusters one bitmap tracks (one bit each: 64 MiB of memory at the most)
MAX_BITMAP_CLUSTERS = 1 << 29
#: the largest cluster a job tracks (and so the largest copy-before-write unit)
MAX_JOB_CLUSTER = 1 << 20
#: rounds of copy-before-write on one range before it gives up (each copies or waits)
_CBW_ROUNDS = 1000


def job_cluster_size(size: int, minimum: int) -> int:
    """The unit a job tracks a disk of ``size`` bytes in: ``minimum``, doubled until the
    bitmap fits :data:`MAX_BITMAP_CLUSTERS`.

    :raise UsageError: (EFBIG) the disk needs a unit above :data:`MAX_JOB_CLUSTER` (past
        512 TiB at the most: a bitmap for it would not fit in memory).
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


def _zeroes(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


class DirtyBitmap:
    """One bit per cluster (``bitarray``, in C): 1 TiB at 64 KiB clusters costs 2 MiB, and the
    next dirty cluster is found as fast as ``bytearray.find`` finds a byte (measured: 0.25 µs
    a search over 16 Mi clusters, sparse or dense; the byte-per-cluster map it replaces cost 8
    times the memory for the same speed). Every operation on a range is one C call: marking a
    2 TiB disk dirty takes a fraction of a millisecond. ``count`` is the live number of dirty
    clusters."""

    def __init__(self, clusters: int, *, dirty: bool) -> None:
        self._bits = bitarray(clusters)
        self._bits.setall(dirty)
        self.count = clusters if dirty else 0

    def __len__(self) -> int:
        return len(self._bits)

    def get(self, i: int) -> bool:
        return bool(self._bits[i])

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
            self._bits[first:end] = 1

    def clear_range(self, first: int, count: int) -> None:
        end = min(first + count, len(self._bits))
        if end > first:
            self.count -= self._bits.count(1, first, end)
            self._bits[first:end] = 0

    def set_all(self) -> None:
        """Mark every cluster dirty (one memset: 0.1 ms for a 1 TiB disk)."""
        self._bits.setall(1)
        self.count = len(self._bits)

    def next_dirty(self, start: int) -> int:
        """The first dirty cluster at or after ``start``, or -1."""
        return int(self._bits.find(1, start))

    def next_clean(self, start: int) -> int:
        i = int(self._bits.find(0, start))
        return len(self._bits) if i < 0 else i


class SourceError(BlockfsError):
    """Reading the source failed; ``cause`` is the error."""

    def __init__(self, cause: BlockfsError) -> None:
        super().__init__(f"source read failed: {cause}", errno=cause.errno)
        self.cause = cause


class TargetError(BlockfsError):
    """Writing the target failed; ``data`` is what was read from the source (empty when
    zeroes were being written)."""

    def __init__(self, cause: BlockfsError, offset: int, data: bytes) -> None:
        super().__init__(f"target write failed: {cause}", errno=cause.errno)
        self.cause = cause
        self.offset = offset
        self.data = data


CopyError = SourceError | TargetError
#: a job's error policy for background copies: called after a run failed (its clusters are
#: dirty again); raise to fail the job, pause it, or wait. Returns True to retry the range at
#: once (the workers go back to it), False to move on (the next pass retries it).
OnError = Callable[[CopyError], Awaitable[bool]]
#: copy-before-write's policy: called with no ``await`` between the failure and the call, so
#: it may take the failed clusters over (backup stashes their data) before anyone claims them
OnCbwError = Callable[[CopyError, int, int], None]


class RateLimiter:
    """Bytes per second for background copying (``speed()``; 0 = unlimited); copy-before-write
    never waits here.

    A worker reserves its next chunk before it claims clusters (so it never sleeps holding a
    claim a guest write might wait for) and gives back what it did not move."""

    def __init__(self, speed: Callable[[], int]) -> None:
        self._speed = speed
        self._start = trio.current_time()
        self._bytes = 0

    async def reserve(self, nbytes: int) -> None:
        speed = self._speed()
        if not speed:
            self._start = trio.current_time()
            self._bytes = 0
            return
        now = trio.current_time()
        if self._bytes > speed * 10 or self._start + self._bytes / speed < now - 1.0:
            # forget the far past (or an idle spell), so a speed change acts soon
            self._start = now
            self._bytes = 0
        self._bytes += nbytes
        delay = self._start + (self._bytes - nbytes) / speed - now
        if delay > 0:
            await trio.sleep(min(delay, 5.0))

    def refund(self, nbytes: int) -> None:
        self._bytes = max(0, self._bytes - nbytes)


@dataclass(frozen=True, slots=True)
class CopyStatistics:
    clusters: int
    dirty: int  # clusters still to copy (live: writes may add to it)
    in_flight: int  # clusters being copied now
    bytes_copied: int  # read from the source and written to the target
    bytes_zeroed: int  # written as zeroes (or nothing, on a zero-initialised target)
    bytes_skipped: int  # not held above the base: left as they are
    failures: int  # failed runs in the current :meth:`BlockCopy.run`


async def _no_checkpoint() -> None:
    await trio.lowlevel.checkpoint()


class BlockCopy:
    """Copies clusters of ``source`` to ``target`` (same offsets), as the module says."""

    def __init__(
        self,
        source: Node,
        target: Node,
        cluster_size: int,
        *,
        target_zero_init: bool,
        compress: bool = False,
        max_chunk: int = 1 << 20,
        base: Node | None = None,
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
        #: skip what no layer of the source's chain above ``base`` holds (commit, stream)
        self.base = base
        self.max_run = max(1, max_chunk // cluster_size)
        self._inflight: dict[int, trio.Event] = {}
        self._idle = trio.Event()
        self._dirtied = trio.Event()
        self._cursor = 0
        self.failures = 0
        self.bytes_copied = self.bytes_zeroed = self.bytes_skipped = 0
        #: called with the number of bytes each copy, zeroing or skip dealt with (progress)
        self.on_progress: Callable[[int], None] = lambda n: None

    # -- the bitmap -----------------------------------------------------------------------------

    @property
    def dirty_count(self) -> int:
        """Clusters still to copy, now."""
        return self.bitmap.count

    def mark_dirty(self, offset: int, length: int) -> None:
        """Mark the clusters of a byte range to copy (again): a write notifier's callback."""
        if length <= 0 or offset >= self.size:
            return
        first, last = self.clusters_of(offset, min(length, self.size - offset))
        self.bitmap.set_range(first, last + 1 - first)
        self._wake_dirty()

    def _wake_dirty(self) -> None:
        self._dirtied.set()
        self._dirtied = trio.Event()

    async def wait_until_dirty(self) -> None:
        """Return once some cluster is dirty (at once if one is)."""
        while not self.bitmap.count:
            await self._dirtied.wait()

    def is_inflight(self, i: int) -> bool:
        return i in self._inflight

    def is_pending(self, i: int) -> bool:
        """Dirty or being copied: its data has not surely reached the target."""
        return i in self._inflight or self.bitmap.get(i)

    def clusters_of(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        return offset // cs, (offset + length - 1) // cs

    # -- claiming -------------------------------------------------------------------------------

    def claim_run(self, first: int, limit: int) -> tuple[int, int]:
        """Claim the run of dirty, not in-flight clusters starting at ``first`` (at most
        ``limit`` long): their bits are cleared and they are in flight. Returns (first,
        count); count 0 when ``first`` is not claimable."""
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
            bitmap.clear_range(first, n)
        return first, n

    def _end(self, first: int, count: int, ok: bool) -> None:
        """A claimed run's copy ended; on failure its clusters are dirty again."""
        inflight = self._inflight
        event = inflight.get(first)
        for i in range(first, first + count):
            del inflight[i]
        if not ok:
            self.bitmap.set_range(first, count)
            self._wake_dirty()
        if event is not None:
            event.set()
        if not inflight:
            self._idle.set()

    def mark_done(self, first: int, count: int) -> None:
        """End a claim as done without copying (the data went elsewhere, or needs no copy)."""
        self._end(first, count, True)

    def release_claim(self, first: int, count: int) -> None:
        """End a claim as not done: the clusters are dirty again."""
        self._end(first, count, False)

    async def wait_inflight(self, first: int, last: int) -> bool:
        """Wait for copies in flight over clusters [first, last]; True if there were any."""
        waited = False
        for i in range(first, last + 1):
            event = self._inflight.get(i)
            if event is not None:
                await event.wait()
                waited = True
        return waited

    async def wait_idle(self) -> None:
        """Wait until no copy is in flight (copy-before-write ones included)."""
        while self._inflight:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    @property
    def in_flight_count(self) -> int:
        """Clusters being copied (or held by a write-blocking write) now."""
        return len(self._inflight)

    def statistics(self) -> CopyStatistics:
        return CopyStatistics(
            clusters=self.clusters,
            dirty=self.bitmap.count,
            in_flight=len(self._inflight),
            bytes_copied=self.bytes_copied,
            bytes_zeroed=self.bytes_zeroed,
            bytes_skipped=self.bytes_skipped,
            failures=self.failures,
        )

    # -- copying one run ------------------------------------------------------------------------

    async def copy_claimed(self, first: int, count: int) -> int:
        """Copy a claimed run and end its claim. Returns the bytes moved.

        :raise SourceError, TargetError: the run is dirty again and its claim ended.
        """
        cs = self.cluster_size
        offset = first * cs
        length = min(count * cs, self.size - offset)
        ok = False
        try:
            try:
                data = await self.source.read(offset, length)
            except BlockfsError as exc:
                raise SourceError(exc) from None
            try:
                zeroes = await self.write_target(offset, data)
            except BlockfsError as exc:
                raise TargetError(exc, offset, data) from None
            ok = True
        finally:
            self._end(first, count, ok)
        if zeroes:
            self.bytes_zeroed += length
        else:
            self.bytes_copied += length
        self.on_progress(length)
        return length

    async def write_target(self, offset: int, data: bytes) -> bool:
        """Put ``data`` on the target: zeroes as zeroes (or nothing on a zero-initialised
        target), the rest compressed or plain. True if it was all zeroes. :raise BlockfsError:"""
        if data == _zeroes(len(data)):
            await self.zero_target(offset, len(data))
            return True
        if self.compress:
            await self._write_compressed(offset, data)
        else:
            await self.target.write(offset, data)
        return False

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

    # -- copy-before-write ----------------------------------------------------------------------

    async def copy_before_write(
        self,
        offset: int,
        length: int,
        on_error: OnCbwError,
        active: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Return once no cluster of the byte range is pending (see the module docstring):
        copies the dirty ones now (never throttled), waits for those in flight, and looks
        again. ``active()`` false ends it early (the job gave up the point in time).
        False if it made no progress in :data:`_CBW_ROUNDS` rounds."""
        first, last = self.clusters_of(offset, length)
        bitmap, inflight = self.bitmap, self._inflight
        for _ in range(_CBW_ROUNDS):
            i = first
            while i <= last:
                if not active():
                    return True
                if bitmap.get(i) and i not in inflight:
                    start, n = self.claim_run(i, last - i + 1)
                    try:
                        await self.copy_claimed(start, n)
                    except (SourceError, TargetError) as exc:
                        on_error(exc, start, n)  # no await since the failure: see OnCbwError
                    i = start + n
                else:
                    i += 1
            await self.wait_inflight(first, last)
            if not active() or not any(self.is_pending(k) for k in range(first, last + 1)):
                return True
        return False

    # -- write-blocking: a guest write reaches both sides before it completes ------------------

    async def write_blocking(
        self,
        offset: int,
        length: int,
        write_source: Callable[[], Awaitable[None]],
        write_target: Callable[[], Awaitable[None]],
        on_target_error: Callable[[BlockfsError], None],
    ) -> None:
        """Carry out a guest write on the source and then on the target, so the target never
        lags behind what the guest saw completed (a mirror's ``copy-mode=write-blocking``).

        The write's clusters are held in flight (as if claimed) for the whole write: no
        background copy of them starts, and one already running is waited for first, so an
        older copy never lands over this write on the target. Clusters the write covers whole
        are clean afterwards; a cluster it covers in part keeps its bit (dirty or clean, the
        untouched part is as it was on both sides). A failed source write leaves the range
        dirty and raises (the guest hears of it); a failed target write leaves it dirty and
        goes to ``on_target_error`` (called with no ``await`` since): the guest write
        succeeds.
        """
        if length <= 0 or offset >= self.size:
            await write_source()
            return
        first, last = self.clusters_of(offset, min(length, self.size - offset))
        while await self.wait_inflight(first, last):
            pass  # another write or copy held one of them: look again
        inflight, bitmap, cs = self._inflight, self.bitmap, self.cluster_size
        done = trio.Event()
        for i in range(first, last + 1):
            inflight[i] = done
        whole_first = first if offset <= first * cs else first + 1
        end = offset + length
        whole_last = last if end >= min((last + 1) * cs, self.size) else last - 1
        ok = False
        try:
            await write_source()
            try:
                await write_target()
            except BlockfsError as exc:
                self._end_held(first, last, False, done)
                on_target_error(exc)
                return
            ok = True
        finally:
            if ok:
                if whole_last >= whole_first:
                    bitmap.clear_range(whole_first, whole_last + 1 - whole_first)
                self.bytes_copied += length
            if inflight.get(first) is done:  # not ended by a target failure above
                self._end_held(first, last, ok, done)

    def _end_held(self, first: int, last: int, ok: bool, done: trio.Event) -> None:
        inflight = self._inflight
        for i in range(first, last + 1):
            del inflight[i]
        if not ok:
            self.bitmap.set_range(first, last + 1 - first)
            self._wake_dirty()
        done.set()
        if not inflight:
            self._idle.set()

    # -- the background copy --------------------------------------------------------------------

    async def run(
        self,
        *,
        workers: int,
        on_error: OnError,
        limiter: RateLimiter | None = None,
        checkpoint: Callable[[], Awaitable[None]] = _no_checkpoint,
        on_workers: Callable[[int], None] = lambda n: None,
        max_passes: int | None = 100,
        converge: bool = True,
    ) -> None:
        """Copy until no cluster is dirty and no copy is in flight.

        ``workers`` tasks claim runs of dirty clusters in order, each after ``checkpoint()``
        (a job's pause point) and a reservation from ``limiter``. ``on_workers(n)`` hears how
        many of them run (a job is paused once all of its body tasks are parked). A pass ends
        when no dirty cluster is left after the cursor; passes repeat for what failed or was
        dirtied again. Copies in flight from copy-before-write are waited for. ``max_passes``
        None: as many passes as it takes (a mirror under writes; its job decides when to stop).
        ``converge`` off: return after ``max_passes`` passes even if some cluster is dirty (a
        mirror's catch-up pass before it quiesces the device).

        :raise BlockfsError: what ``on_error`` raised; or the same ranges kept failing, or
            ``max_passes`` passes did not leave the bitmap clean.
        """
        self.failures = 0
        passes = 0
        while max_passes is None or passes < max_passes:
            passes += 1
            self._cursor = 0
            live = [workers]
            on_workers(workers)
            try:
                async with trio.open_nursery() as nursery:
                    for _w in range(workers):
                        nursery.start_soon(
                            self._worker, live, on_error, limiter, checkpoint, on_workers
                        )
            except BaseExceptionGroup as group:
                # Several workers may fail at once on the same cause: report the first.
                first = _first_blockfs_error(group)
                if first is None:
                    raise
                raise first from None
            if self.bitmap.count == 0:
                await self.wait_idle()  # copy-before-write copies still under way
            await checkpoint()
            if self.bitmap.count == 0 and not self._inflight:
                return
            if self.failures > 10 * self.clusters + 100:
                raise BlockfsError("the same ranges keep failing")
        if converge:
            raise BlockfsError("copy did not converge")

    async def _worker(
        self,
        live: list[int],
        on_error: OnError,
        limiter: RateLimiter | None,
        checkpoint: Callable[[], Awaitable[None]],
        on_workers: Callable[[int], None],
    ) -> None:
        chunk = self.max_run * self.cluster_size
        try:
            while True:
                await checkpoint()
                if limiter is not None:
                    await limiter.reserve(chunk)
                moved = await self._copy_next(on_error)
                if moved < 0:
                    return
                if limiter is not None:
                    limiter.refund(chunk - moved)
        finally:
            live[0] -= 1
            on_workers(live[0])  # the others may all be parked already

    async def _copy_next(self, on_error: OnError) -> int:
        """Copy, zero or skip the next run of dirty clusters. Returns the bytes read and
        written, or -1 when no dirty cluster is left after the cursor."""
        bitmap, cs = self.bitmap, self.cluster_size
        i = bitmap.next_dirty(self._cursor)
        while i >= 0 and i in self._inflight:
            i = bitmap.next_dirty(i + 1)
        if i < 0:
            return -1
        first, n = self.claim_run(i, self.max_run)
        self._cursor = first + n
        offset = first * cs
        length = min(n * cs, self.size - offset)
        # What reads as zeroes is not read: written as zeroes, or not at all on a new target;
        # what the chain above the base does not hold is not touched.
        try:
            ext = await chain_block_status(self.source, offset, length, base=self.base)
        except BlockfsError:
            ext = None
        if ext is not None:
            skip = self.base is not None and not ext.status & (Status.ALLOCATED | Status.ZERO)
            k = n if ext.length >= length else ext.length // cs
            if k > 0 and (skip or ext.status & Status.ZERO):
                run_len = min(k * cs, self.size - offset)
                if skip:
                    self.bytes_skipped += run_len
                else:
                    try:
                        await self.zero_target(offset, run_len)
                    except BlockfsError as exc:
                        self.release_claim(first, n)
                        return await self._failed(TargetError(exc, offset, b""), first, on_error)
                    self.bytes_zeroed += run_len
                self.mark_done(first, k)
                self.on_progress(run_len)
                if k < n:
                    self.release_claim(first + k, n - k)
                    self._cursor = first + k
                return 0
            if 0 < k < n and self.base is not None:
                # Data for k clusters only: what follows may lie below the base (not to be
                # copied). Without a base the whole run is copied in one go, as reads of
                # mixed runs are cheaper than more, smaller copies.
                self.release_claim(first + k, n - k)
                self._cursor = first + k
                n = k
        try:
            return await self.copy_claimed(first, n)
        except (SourceError, TargetError) as exc:
            return await self._failed(exc, first, on_error)

    async def _failed(self, exc: CopyError, first: int, on_error: OnError) -> int:
        self.failures += 1
        if await on_error(exc):
            self._cursor = min(self._cursor, first)
        return 0


def _first_blockfs_error(group: BaseExceptionGroup[BaseException]) -> BlockfsError | None:
    for exc in group.exceptions:
        if isinstance(exc, BlockfsError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_blockfs_error(exc)
            if found is not None:
                return found
    return None
