"""An export: one image as one file of the mount — a name, a root node, statistics.

Every FUSE request on an image passes :meth:`Export.read` / :meth:`Export.write` /
:meth:`Export.flush`, the one place where requests are validated against the virtual size (nodes
below then trust their arguments), counted for the ``stats`` file, and admitted or held back while
a job changes the graph (:meth:`Export.quiesced`).

Counting (:class:`BlockStats`, QEMU's ``query-blockstats`` names and latency histograms) is on
the path of every request, so each counter is one increment of a slot (~25 ns here) and a
histogram's bin one C ``bisect`` over a short tuple, whose increment counts the operation too:
the histograms added 60-90 ns to a request that costs ~550 ns in :meth:`Export.read` over a
node that does nothing (measured on these machines, 2026-11-29).

The graph changes only through the verbs :meth:`Export.insert_filter`,
:meth:`Export.remove_filter` and :meth:`Export.replace_root` (a job inserts a filter, mirror
switches to its target), each inside ``quiesced()``: no request is in flight then, and none
starts until the change is made. Jobs never assign ``root`` themselves.

Invariant kept without locks: between reading ``self.root`` and calling into it there is no
``await``, so a request runs entirely against one graph.

**Requests from the FUSE reader threads** (:mod:`blockfs.fuseloop`): where the root offers a
thread-callable data path (:meth:`Node.direct_io`: a raw image on a local file, the cached and
allocated clusters of a local qcow2 image; never a filter), a reader thread answers READ and
WRITE itself through :meth:`read_direct` and :meth:`write_direct`: the same checks and
counters as :meth:`read` and :meth:`write`, without the event loop. The in-flight count, the
gate, the counters and the choice of the direct path are kept under one lock, shared by both
paths, so that ``quiesced()`` waits for the threads' requests too and no thread starts one
inside it: a job's filter, once in the graph, sees every write (the root changes only inside
``quiesced()``, and a filter has no direct path). A request the direct path declines (the gate
is shut, a cluster to allocate, a probed image's head) goes to the event loop.

A failed flush stays failed (guarantee G4): once a flush of the image has failed, every later
flush fails too, until the image is reopened (a remount). After a failed fsync the kernel may
have dropped the dirty pages it could not write, so a later flush that "succeeds" would claim
durability for data that is gone.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

import trio

from blockfs.errors import BlockfsError, NoSpaceError, ReadOnlyError, UsageError
from blockfs.nodes.base import DirectIo, Held, Node
from blockfs.nodes.filter import FilterNode

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=FilterNode)

_now = time.perf_counter_ns

#: Default bin edges of every latency histogram, in ns: 10 us, 100 us, 1 ms, 10 ms, 100 ms,
#: 1 s. One decade a bin: below 10 us a page-cache hit (the export's own time, not the
#: kernel's), then a local SSD (~100 us), a disk or a remote (ms), and stalls (100 ms, s).
DEFAULT_LATENCY_BOUNDARIES: tuple[int, ...] = (
    10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000,
)  # fmt: skip
#: most boundaries a histogram may have (65 bins)
MAX_LATENCY_BOUNDARIES = 64
#: the largest boundary accepted (QEMU's are uint64 ns; this is 292 years)
_MAX_BOUNDARY = (1 << 63) - 1

LatencyKind = Literal["rd", "wr", "flush"]
LATENCY_KINDS: tuple[LatencyKind, ...] = ("rd", "wr", "flush")


def check_boundaries(values: Sequence[int], what: str = "boundaries") -> tuple[int, ...]:
    """``values`` as a histogram's boundaries: 1 to :data:`MAX_LATENCY_BOUNDARIES` positive
    integers (ns), strictly increasing (so that ``bisect_right`` finds QEMU's bins).

    :raise UsageError: (EINVAL) with a one-line reason naming ``what``.
    """
    if not values:
        raise UsageError(f"{what}: give at least one boundary (ns)")
    if len(values) > MAX_LATENCY_BOUNDARIES:
        raise UsageError(f"{what}: at most {MAX_LATENCY_BOUNDARIES} boundaries")
    prev = 0
    for v in values:
        if not 0 < v <= _MAX_BOUNDARY:
            raise UsageError(f"{what}: {v} is not a positive number of ns below 2**63")
        if v <= prev:
            raise UsageError(f"{what}: must increase strictly ({v} after {prev})")
        prev = v
    return tuple(values)


class BlockStats:
    """An export's counters, named as QEMU's ``query-blockstats`` names them, and its latency
    histograms, shaped as QEMU's ``block-latency-histogram-set`` makes them.

    A histogram of kind K is ``K_boundaries`` (a tuple of ns) and ``K_bins`` (a list, one
    longer): bin ``i`` counts the successful requests whose latency fell in
    ``[boundaries[i-1], boundaries[i])`` (bin 0 from 0, the last one unbounded), which is
    ``bins[bisect_right(boundaries, latency)]``. Both are replaced together, never mutated in
    place except for one bin's increment, so a request counts into a consistent pair.

    The bins are also the operation counts: ``K_operations`` is the sum of the bins plus what
    bins dropped by a reset held (``K_ops_reset``), so a request pays one increment for both
    (each costs ~25 ns on the request path).
    """

    #: the counters, in the order the stats file shows them
    COUNTERS = (
        "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
        "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
        "flush_total_time_ns", "wr_highest_offset", "failed_rd_operations",
        "failed_wr_operations", "failed_flush_operations", "invalid_rd_operations",
        "invalid_wr_operations",
    )  # fmt: skip
    __slots__ = (
        *(c for c in COUNTERS if c not in ("rd_operations", "wr_operations", "flush_operations")),
        "last_io_ns", "rd_boundaries", "rd_bins", "wr_boundaries", "wr_bins", "flush_boundaries",
        "flush_bins", "rd_ops_reset", "wr_ops_reset", "flush_ops_reset",
    )  # fmt: skip

    def __init__(self) -> None:
        self.rd_bytes = self.wr_bytes = self.unmap_bytes = 0
        self.unmap_operations = 0
        self.rd_total_time_ns = self.wr_total_time_ns = self.flush_total_time_ns = 0
        self.wr_highest_offset = 0
        self.failed_rd_operations = self.failed_wr_operations = 0
        self.failed_flush_operations = 0
        self.invalid_rd_operations = self.invalid_wr_operations = 0
        self.last_io_ns = _now()
        b = DEFAULT_LATENCY_BOUNDARIES
        self.rd_boundaries, self.rd_bins = b, [0] * (len(b) + 1)
        self.wr_boundaries, self.wr_bins = b, [0] * (len(b) + 1)
        self.flush_boundaries, self.flush_bins = b, [0] * (len(b) + 1)
        self.rd_ops_reset = self.wr_ops_reset = self.flush_ops_reset = 0

    @property
    def rd_operations(self) -> int:
        return self.rd_ops_reset + sum(self.rd_bins)

    @property
    def wr_operations(self) -> int:
        return self.wr_ops_reset + sum(self.wr_bins)

    @property
    def flush_operations(self) -> int:
        return self.flush_ops_reset + sum(self.flush_bins)

    def _reset_bins(self, kind: LatencyKind, boundaries: tuple[int, ...]) -> None:
        reset = f"{kind}_ops_reset"
        setattr(self, reset, getattr(self, reset) + sum(getattr(self, f"{kind}_bins")))
        setattr(self, f"{kind}_boundaries", boundaries)
        setattr(self, f"{kind}_bins", [0] * (len(boundaries) + 1))

    def set_latency_boundaries(
        self, kinds: Iterable[LatencyKind], boundaries: Sequence[int]
    ) -> None:
        """New boundaries for the histograms of ``kinds``, whose bins start again from zero
        (as QEMU's ``block-latency-histogram-set`` does). :raise UsageError: bad boundaries."""
        b = check_boundaries(boundaries)
        for kind in kinds:
            self._reset_bins(kind, b)

    def clear_latency_histograms(self) -> None:
        """Every bin back to zero; the boundaries stay."""
        for kind in LATENCY_KINDS:
            self._reset_bins(kind, getattr(self, f"{kind}_boundaries"))

    def latency_histogram(self, kind: LatencyKind) -> dict[str, list[int]]:
        """QEMU's ``BlockLatencyHistogramInfo``: ``{"boundaries": [...], "bins": [...]}``."""
        return {
            "boundaries": list(getattr(self, f"{kind}_boundaries")),
            "bins": list(getattr(self, f"{kind}_bins")),
        }

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {name: getattr(self, name) for name in self.COUNTERS}
        d["idle_time_ns"] = _now() - self.last_io_ns
        for kind in LATENCY_KINDS:
            d[f"{kind}_latency_histogram"] = self.latency_histogram(kind)
        return d


class Export:
    """One image under the mountpoint."""

    def __init__(self, name: str, root: Node, *, read_only: bool = False) -> None:
        self.name = name
        self.read_only = read_only or root.read_only
        self.stats = BlockStats()
        self.mtime_ns = time.time_ns()
        #: guards the in-flight count, the gate, the counters and the direct path (see the
        #: module docstring); held for a few bytecodes, never across I/O or an await
        self._lock = threading.Lock()
        self._inflight = 0
        self._gate: trio.Event | None = None  # set while requests are held back
        self._drained: trio.Event | None = None  # set when the last in-flight request ends
        self._token: trio.lowlevel.TrioToken | None = None  # to set _drained from a thread
        self._loop_thread = 0  # the thread that runs the event loop
        self._direct: DirectIo | None = None
        #: the direct path is off for good (the images are closing)
        self._direct_closed = False
        #: requests answered by the direct path (also counted in ``stats``)
        self.direct_rd_operations = 0
        self.direct_wr_operations = 0
        #: the first flush failure; every later flush fails with it (see the module docstring)
        self.flush_error: str | None = None
        self._root = root
        self.root = root

    @property
    def root(self) -> Node:
        return self._root

    @root.setter
    def root(self, node: Node) -> None:
        """The graph changes inside ``quiesced()`` only (or before the export serves): the
        direct path follows the new root."""
        with self._lock:
            self._root = node
            self._direct = None if self._direct_closed else node.direct_io()

    @property
    def has_direct_path(self) -> bool:
        """Whether FUSE reader threads can answer some of this image's reads and writes."""
        return self._direct is not None

    @property
    def submits(self) -> bool:
        """Whether the image's node sends requests from the calling thread and answers them
        later (a remote image: :meth:`submit_read`, :meth:`submit_write`)."""
        direct = self._direct
        return direct is not None and direct.submit_read is not None

    # -- the data path ------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        length = self._reach(offset, length)
        if length == 0:
            return b""
        if self._gate is not None:
            await self._wait_admitted()
        stats = self.stats
        lock = self._lock
        with lock:
            self._inflight += 1
        t0 = _now()
        try:
            data = await self.root.read(offset, length)
        except BaseException:
            with lock:
                stats.failed_rd_operations += 1
            raise
        finally:
            self._request_done()
        self._count_read(length, t0)
        return data

    def _reach(self, offset: int, length: int) -> int:
        """How much of a read of ``length`` at ``offset`` the disk holds (0: none; cut
        short at its end)."""
        size = self._root.size
        if offset >= size or length <= 0:
            return 0
        return min(length, size - offset)

    def _count_read(
        self, length: int, t0: int, direct: bool = False, done: bool = False
    ) -> None:
        """Count a read that succeeded; ``done``: and it is no longer in flight (one lock
        round for both, as :meth:`_request_done` would)."""
        t1 = _now()
        dt = t1 - t0
        stats = self.stats
        with self._lock:
            # the histogram's bin, which counts the operation too (see BlockStats)
            stats.rd_bins[bisect_right(stats.rd_boundaries, dt)] += 1
            stats.rd_bytes += length
            stats.rd_total_time_ns += dt
            stats.last_io_ns = t1
            self.direct_rd_operations += direct
            drained = self._one_less() if done else None
        self._wake_drained(drained)

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data``; a write straddling the end is cut short (its length is returned), a
        write starting at or past the end fails with ENOSPC, as on a block device."""
        stats = self.stats
        if self.read_only:
            stats.invalid_wr_operations += 1
            raise ReadOnlyError(f"{self.name} is read-only")
        length = self._landing(offset, len(data))
        if length == 0:
            return 0
        if length < len(data):
            data = data[:length]
        if self._gate is not None:
            await self._wait_admitted()
        lock = self._lock
        with lock:
            self._inflight += 1
        t0 = _now()
        try:
            await self.root.write(offset, data)
        except BaseException:
            with lock:
                stats.failed_wr_operations += 1
            raise
        finally:
            self._request_done()
        self._count_write(offset, length, t0)
        return length

    def _landing(self, offset: int, length: int) -> int:
        """How much of a write of ``length`` at ``offset`` lands: cut short at the end of the
        disk (0: nothing to write). :raise NoSpaceError: it starts at or past the end (counted
        as invalid), as on a block device."""
        size = self._root.size
        if offset >= size:
            if length == 0:
                return 0
            self.stats.invalid_wr_operations += 1
            raise NoSpaceError(f"write past the end of {self.name}")
        return min(length, size - offset)

    def _count_write(
        self, offset: int, length: int, t0: int, direct: bool = False, done: bool = False
    ) -> None:
        """Count a write that succeeded (``done``: as :meth:`_count_read`)."""
        t1 = _now()
        dt = t1 - t0
        stats = self.stats
        with self._lock:
            self.direct_wr_operations += direct
            stats.wr_bins[bisect_right(stats.wr_boundaries, dt)] += 1
            stats.wr_bytes += length
            stats.wr_total_time_ns += dt
            stats.last_io_ns = t1
            if offset + length > stats.wr_highest_offset:
                stats.wr_highest_offset = offset + length
            drained = self._one_less() if done else None
        self.mtime_ns = time.time_ns()
        self._wake_drained(drained)

    # -- the data path of the FUSE reader threads ----------------------------------------------

    def read_direct(self, offset: int, into: memoryview) -> int | None:
        """Read into ``into`` (as long as the request) in the calling thread; the bytes read
        (fewer at the end of the disk), or None: the event loop must answer (no direct path,
        or the gate is shut). :raise BlockfsError: the read failed (counted)."""
        with self._lock:
            direct = self._direct
            if direct is None or self._gate is not None:
                return None
            length = self._reach(offset, len(into))
            if length == 0:
                return 0
            self._inflight += 1
        stats = self.stats
        t0 = _now()
        try:
            done = direct.readinto(offset, into[:length])
        except BaseException:
            with self._lock:
                stats.failed_rd_operations += 1
            raise
        finally:
            self._request_done()
        if not done:
            return None
        self._count_read(length, t0, direct=True)
        return length

    def write_direct(self, offset: int, data: memoryview) -> int | None:
        """Write ``data`` in the calling thread, as :meth:`write` does; the length written, or
        None: the event loop must answer (no direct path for writes here, the gate is shut, or
        a check that needs the loop). :raise BlockfsError: refused or failed (counted)."""
        stats = self.stats
        with self._lock:
            direct = self._direct
            if direct is None or direct.write is None or self._gate is not None:
                return None
            if self.read_only:
                return None  # the event loop answers (and counts) these
            length = self._landing(offset, len(data))
            if length == 0:
                return 0
            self._inflight += 1
        t0 = _now()
        try:
            done = direct.write(offset, data[:length])
        except BaseException:
            with self._lock:
                stats.failed_wr_operations += 1
            raise
        finally:
            self._request_done()
        if not done:
            return None
        self._count_write(offset, length, t0, direct=True)
        return length

    def submit_read(
        self, offset: int, length: int, answer: Callable[[bytes, int], None], held: Held
    ) -> bool:
        """A read the image's remote node sends from the calling thread (issue 14), answered
        later: ``answer(data, err)`` in the event loop's thread, ``err`` 0 with the bytes (as
        many as asked, fewer at the end of the disk), an errno, or
        :data:`~blockfs.nodes.base.RETRY` (the event loop must serve the request itself).
        False: declined, nothing sent (the event loop serves it). The node may hold the
        request back: the caller calls what it added to ``held`` once it has no more
        requests at hand (:attr:`~blockfs.nodes.base.DirectIo.submit_read`)."""
        with self._lock:
            direct = self._direct
            if direct is None or direct.submit_read is None or self._gate is not None:
                return False
            length = self._reach(offset, length)
            if length == 0:
                return False  # the event loop answers it (nothing to read)
            self._inflight += 1
        t0 = _now()
        stats = self.stats

        def done(data: bytes, err: int) -> None:
            if err == 0:
                self._count_read(length, t0, direct=True, done=True)
            else:
                with self._lock:
                    stats.failed_rd_operations += err > 0
                self._request_done()
            answer(data, err)

        return self._submitted(direct.submit_read, offset, length, done, held)

    def submit_write(
        self, offset: int, data: memoryview, answer: Callable[[bytes, int], None], held: Held
    ) -> bool:
        """A write sent from the calling thread (:meth:`submit_read`); ``data`` must stay
        unchanged until ``answer``. A write that reaches the end of the disk is declined
        (the event loop cuts it and counts it)."""
        stats = self.stats
        with self._lock:
            direct = self._direct
            if direct is None or direct.submit_write is None or self._gate is not None:
                return False
            length = len(data)
            if self.read_only or length <= 0 or offset + length > self._root.size:
                return False
            self._inflight += 1
        t0 = _now()

        def done(_: bytes, err: int) -> None:
            if err == 0:
                self._count_write(offset, length, t0, direct=True, done=True)
            else:
                with self._lock:
                    stats.failed_wr_operations += err > 0
                self._request_done()
            answer(b"", err)

        return self._submitted(direct.submit_write, offset, data, done, held)

    def _submitted(self, submit: Callable[..., bool], *args: object) -> bool:
        """Send a counted request; a declined one (or one that failed to go) is uncounted."""
        try:
            sent = submit(*args)
        except Exception:
            log.exception("%s: a request could not be sent", self.name)
            sent = False
        if not sent:
            self._request_done()
        return sent

    async def close_direct(self) -> None:
        """No thread starts a direct request from now on (the image is about to close), and
        none is in flight on return; later requests go to the event loop."""
        with self._lock:
            self._direct_closed = True
            self._direct = None
        await self._drain()

    async def _drain(self) -> None:
        """Wait until no request is in flight (none may start meanwhile: the caller shut the
        gate or the direct path)."""
        with self._lock:
            if not self._inflight:
                return
            drained = self._drained
            if drained is None:
                drained = self._drained = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._loop_thread = threading.get_ident()
        with trio.CancelScope(shield=True):
            await drained.wait()
        self._drained = None

    async def flush(self) -> None:
        """Make every acknowledged write durable.

        :raise BlockfsError: this flush failed, or an earlier one did (EIO then).
        """
        if self.read_only:
            return
        if self.flush_error is not None:
            self.stats.failed_flush_operations += 1
            raise BlockfsError(
                f"{self.name}: an earlier flush failed ({self.flush_error}); flushes fail "
                "until the image is reopened",
                errno=errno.EIO,
            )
        if self._gate is not None:
            await self._wait_admitted()
        with self._lock:
            self._inflight += 1
        t0 = _now()
        try:
            await self.root.flush()
        except BaseException as exc:
            with self._lock:
                self.stats.failed_flush_operations += 1
            if isinstance(exc, Exception) and self.flush_error is None:
                self.flush_error = str(exc)
                log.error(
                    "%s: flush failed: %s; every later flush fails until the image is reopened",
                    self.name,
                    exc,
                )
            raise
        finally:
            self._request_done()
        dt = _now() - t0
        stats = self.stats
        with self._lock:
            stats.flush_bins[bisect_right(stats.flush_boundaries, dt)] += 1
            stats.flush_total_time_ns += dt

    def _request_done(self) -> None:
        """One request less in flight; the last one wakes ``quiesced()`` (from a reader thread
        through the event loop's token)."""
        with self._lock:
            drained = self._one_less()
        self._wake_drained(drained)

    def _one_less(self) -> trio.Event | None:
        """(Under the lock.) One request less in flight; the event to set if it was the
        last."""
        self._inflight -= 1
        return self._drained if self._inflight == 0 else None

    def _wake_drained(self, drained: trio.Event | None) -> None:
        if drained is not None:
            token = self._token
            if token is not None and threading.get_ident() != self._loop_thread:
                token.run_sync_soon(drained.set)
            else:
                drained.set()

    async def _wait_admitted(self) -> None:
        while self._gate is not None:
            await self._gate.wait()

    # -- graph changes -------------------------------------------------------------------------

    @asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Hold new requests back and wait for the in-flight ones; the graph may change inside.

        Nested or concurrent use is serialised: a second caller waits for the first to finish.
        """
        while self._gate is not None:
            await self._gate.wait()
        with self._lock:
            gate = self._gate = trio.Event()
        try:
            await self._drain()
            yield
        finally:
            with self._lock:
                self._gate = None
            gate.set()

    async def insert_filter(self, make: Callable[[Node], Awaitable[_F]]) -> _F:
        """Put a filter above the root at a quiescent point. ``make`` gets the root and
        returns the filter over it; it runs inside the quiesced section, so whatever it
        records (a backup's bitmap) holds for the graph the filter goes on. If it raises,
        the graph is unchanged."""
        async with self.quiesced():
            filt = await make(self.root)
            if filt.child is not self.root:
                raise ValueError("the new filter must sit on the export's root")
            self.root = filt
        return filt

    async def remove_filter(self, filt: FilterNode) -> bool:
        """Take ``filt`` out of the graph (its parent, or the export, points to its child
        again) at a quiescent point. False if it is not in the graph (removed already)."""
        async with self.quiesced():
            if self.root is filt:
                self.root = filt.child
                return True
            above = self.root
            while isinstance(above, FilterNode):
                if above.child is filt:
                    above.set_child(filt.child)
                    return True
                above = above.child
            return False

    async def replace_root(self, make: Callable[[Node], Awaitable[Node]]) -> Node:
        """Serve another root from now on (mirror's switch-over); returns the old root, which
        the caller owns. ``make`` gets the old root inside the quiesced section (a mirror
        copies what is left there) and returns the new one, which must have the same size. If
        it raises, the graph is unchanged."""
        async with self.quiesced():
            old = self.root
            new_root = await make(old)
            if new_root.size != old.size:
                raise ValueError(f"new root is {new_root.size} bytes, the export {old.size}")
            self.root = new_root
        return old

    async def allocated_bytes(self) -> int:
        """Bytes that hold data, over the whole chain, capped at the virtual size."""
        total = 0
        node: Node | None = self.root
        while node is not None:
            total += await node.allocated_bytes()
            node = node.backing
        return min(total, self.root.size)
