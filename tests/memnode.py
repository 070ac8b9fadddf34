"""An in-memory node for tests below FUSE: a bytearray with allocation, a backing node, and
hooks to hold or fail a request, so a test decides exactly when each step of a race happens.

Allocation is tracked per ``cluster`` (a write allocates what it touches; write_zeroes with
``may_unmap`` and discard free whole clusters), so block_status answers as a format node does:
ALLOCATED for this layer's clusters, ZERO for freed ones, nothing (ask the backing node) else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from blockfs.errors import BlockfsError
from blockfs.nodes.base import Extent, Limits, Node, Status


class MemoryNode(Node):
    format_name = "memory"

    def __init__(
        self,
        size: int,
        *,
        cluster_size: int = 65536,
        backing: Node | None = None,
        fill: bytes | None = None,
        read_only: bool = False,
    ) -> None:
        self.size = size
        self.read_only = read_only
        self.filename = f"memory:{id(self):x}"
        self.limits = Limits(cluster_size=cluster_size)
        self.backing = backing
        self.cs = cluster_size
        self.data = bytearray(size)
        clusters = (size + cluster_size - 1) // cluster_size
        #: per cluster: 0 = not here (backing), 1 = data, 2 = zero
        self.alloc = bytearray(clusters)
        if fill is not None:
            self.data[:] = (fill * (size // len(fill) + 1))[:size]
            self.alloc[:] = b"\x01" * clusters
        #: (op, offset, length) of every request, in order
        self.log: list[tuple[str, int, int]] = []
        #: called before a request does anything: await it to hold the request, raise to fail
        self.before: Callable[[str, int, int], Awaitable[None]] | None = None
        self.closed = False

    async def _hook(self, op: str, offset: int, length: int) -> None:
        self.log.append((op, offset, length))
        if self.before is not None:
            await self.before(op, offset, length)
        await trio.lowlevel.checkpoint()

    def _clusters(self, offset: int, length: int) -> range:
        return range(offset // self.cs, (offset + length - 1) // self.cs + 1)

    async def read(self, offset: int, length: int) -> bytes:
        await self._hook("read", offset, length)
        out = bytearray(self.data[offset : offset + length])
        if self.backing is not None:
            for i in self._clusters(offset, length):
                if self.alloc[i] == 0:
                    lo, hi = max(offset, i * self.cs), min(offset + length, (i + 1) * self.cs)
                    below = b""
                    if lo < self.backing.size:
                        below = await self.backing.read(lo, min(hi, self.backing.size) - lo)
                    out[lo - offset : hi - offset] = below.ljust(hi - lo, b"\0")
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        assert not self.read_only
        await self._hook("write", offset, len(data))
        self.data[offset : offset + len(data)] = data
        for i in self._clusters(offset, len(data)):
            self.alloc[i] = 1

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        assert not self.read_only
        await self._hook("write_zeroes", offset, length)
        self.data[offset : offset + length] = bytes(length)
        for i in self._clusters(offset, length):
            whole = i * self.cs >= offset and (i + 1) * self.cs <= offset + length
            self.alloc[i] = 2 if whole else 1

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, True)

    async def flush(self) -> None:
        await self._hook("flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> Extent:
        first = offset // self.cs
        kind = self.alloc[first]
        end = min(offset + length, self.size)
        i = first + 1
        while i * self.cs < end and self.alloc[i] == kind:
            i += 1
        n = min(end, i * self.cs) - offset
        status = {
            0: Status(0),
            1: Status.DATA | Status.ALLOCATED,
            2: Status.ZERO | Status.ALLOCATED,
        }
        return Extent(offset, n, status[kind])

    async def aclose(self) -> None:
        self.closed = True


class Gate:
    """Holds requests that match until :meth:`open` (for ``MemoryNode.before``)."""

    def __init__(
        self, op: str, offset: int, *, fail: BlockfsError | None = None, once: bool = True
    ) -> None:
        self.op, self.offset, self.fail, self.once = op, offset, fail, once
        self.reached = trio.Event()
        self._open = trio.Event()
        self.hits = 0

    def open(self) -> None:
        self._open.set()

    async def __call__(self, op: str, offset: int, length: int) -> None:
        if op == self.op and offset <= self.offset < offset + length:
            self.hits += 1
            if self.once and self.hits > 1:
                return
            self.reached.set()
            await self._open.wait()
            if self.fail is not None:
                raise self.fail


def pattern(size: int, seed: int) -> bytes:
    """Each 8-byte word holds its own offset and the seed (nbdkit's pattern): a read from
    the wrong place, or of the wrong generation, shows."""
    return b"".join(((o << 8) | seed).to_bytes(8, "little") for o in range(0, size, 8))[:size]
