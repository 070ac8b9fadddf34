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

A failed flush stays failed (guarantee G4): once a flush of the image has failed, every later
flush fails too, until the image is reopened (a remount). After a failed fsync the kernel may
have dropped the dirty pages it could not write, so a later flush that "succeeds" would claim
durability for data that is gone.
"""

from __future__ import annotations

import errno
import logging
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Literal, TypeVar

import trio

from blockfs.errors import BlockfsError, NoSpaceError, ReadOnlyError, UsageError
from blockfs.nodes.base import Node
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
        self.root = root
        self.read_only = read_only or root.read_only
        self.stats = BlockStats()
        self.mtime_ns = time.time_ns()
        self._inflight = 0
        self._gate: trio.Event | None = None  # set while requests are held back
        self._drained: trio.Event | None = None  # set when the last in-flight request ends
        #: the first flush failure; every later flush fails with it (see the module docstring)
        self.flush_error: str | None = None

    # -- the data path ------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        size = self.root.size
        if offset >= size or length <= 0:
            return b""
        if offset + length > size:
            length = size - offset
        if self._gate is not None:
            await self._wait_admitted()
        stats = self.stats
        self._inflight += 1
        t0 = _now()
        try:
            data = await self.root.read(offset, length)
        except BaseException:
            stats.failed_rd_operations += 1
            raise
        finally:
            self._request_done()
        t1 = _now()
        dt = t1 - t0
        # the histogram's bin, which counts the operation too (see BlockStats)
        stats.rd_bins[bisect_right(stats.rd_boundaries, dt)] += 1
        stats.rd_bytes += length
        stats.rd_total_time_ns += dt
        stats.last_io_ns = t1
        return data

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data``; a write straddling the end is cut short (its length is returned), a
        write starting at or past the end fails with ENOSPC, as on a block device."""
        stats = self.stats
        if self.read_only:
            stats.invalid_wr_operations += 1
            raise ReadOnlyError(f"{self.name} is read-only")
        size = self.root.size
        length = len(data)
        if offset >= size:
            if length == 0:
                return 0
            stats.invalid_wr_operations += 1
            raise NoSpaceError(f"write past the end of {self.name}")
        if offset + length > size:
            length = size - offset
            data = data[:length]
        if length == 0:
            return 0
        if self._gate is not None:
            await self._wait_admitted()
        self._inflight += 1
        t0 = _now()
        try:
            await self.root.write(offset, data)
        except BaseException:
            stats.failed_wr_operations += 1
            raise
        finally:
            self._request_done()
        t1 = _now()
        dt = t1 - t0
        stats.wr_bins[bisect_right(stats.wr_boundaries, dt)] += 1
        stats.wr_bytes += length
        stats.wr_total_time_ns += dt
        stats.last_io_ns = t1
        if offset + length > stats.wr_highest_offset:
            stats.wr_highest_offset = offset + length
        self.mtime_ns = time.time_ns()
        return length

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
        self._inflight += 1
        t0 = _now()
        try:
            await self.root.flush()
        except BaseException as exc:
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
        stats.flush_bins[bisect_right(stats.flush_boundaries, dt)] += 1
        stats.flush_total_time_ns += dt

    def _request_done(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

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
        gate = self._gate = trio.Event()
        try:
            if self._inflight:
                self._drained = trio.Event()
                with trio.CancelScope(shield=True):
                    await self._drained.wait()
                self._drained = None
            yield
        finally:
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
