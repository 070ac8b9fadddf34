"""An export: one image as one file of the mount — a name, a root node, statistics.

Every FUSE request on an image passes :meth:`Export.read` / :meth:`Export.write` /
:meth:`Export.flush`, the one place where requests are validated against the virtual size (nodes
below then trust their arguments), counted for the ``stats`` file, and admitted or held back while
a job changes the graph (:meth:`Export.quiesced`).

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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from blockfs.errors import BlockfsError, NoSpaceError, ReadOnlyError
from blockfs.nodes.base import Node
from blockfs.nodes.filter import FilterNode

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=FilterNode)

_now = time.perf_counter_ns


class BlockStats:
    """Counters named as QEMU's ``query-blockstats`` names them."""

    __slots__ = (
        "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
        "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
        "flush_total_time_ns", "wr_highest_offset", "failed_rd_operations",
        "failed_wr_operations", "failed_flush_operations", "invalid_rd_operations",
        "invalid_wr_operations", "last_io_ns",
    )  # fmt: skip

    def __init__(self) -> None:
        self.rd_bytes = self.wr_bytes = self.unmap_bytes = 0
        self.rd_operations = self.wr_operations = self.flush_operations = 0
        self.unmap_operations = 0
        self.rd_total_time_ns = self.wr_total_time_ns = self.flush_total_time_ns = 0
        self.wr_highest_offset = 0
        self.failed_rd_operations = self.failed_wr_operations = 0
        self.failed_flush_operations = 0
        self.invalid_rd_operations = self.invalid_wr_operations = 0
        self.last_io_ns = _now()

    def as_dict(self) -> dict[str, int]:
        d = {name: getattr(self, name) for name in self.__slots__ if name != "last_io_ns"}
        d["idle_time_ns"] = _now() - self.last_io_ns
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
        stats.rd_operations += 1
        stats.rd_bytes += length
        stats.rd_total_time_ns += t1 - t0
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
        stats.wr_operations += 1
        stats.wr_bytes += length
        stats.wr_total_time_ns += t1 - t0
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
        self.stats.flush_operations += 1
        self.stats.flush_total_time_ns += _now() - t0

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
