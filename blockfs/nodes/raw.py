"""The ``raw`` format node: the guest sees the child's bytes one to one.

It adds nothing to the data path but a bound on the size, so it stays as thin as a call.
"""

from __future__ import annotations

from blockfs.nodes.base import Extent, Node


class RawNode(Node):
    format_name = "raw"

    def __init__(self, child: Node) -> None:
        self.child = child
        self.size = child.size
        self.read_only = child.read_only
        self.filename = child.filename
        # Bind the child's methods once: the per-request cost is one call, not two.
        self.read = child.read  # type: ignore[method-assign]
        self.write = child.write  # type: ignore[method-assign]
        self.write_zeroes = child.write_zeroes  # type: ignore[method-assign]
        self.discard = child.discard  # type: ignore[method-assign]
        self.flush = child.flush  # type: ignore[method-assign]
        self.block_status = child.block_status  # type: ignore[method-assign]
        self.allocated_bytes = child.allocated_bytes  # type: ignore[method-assign]

    @classmethod
    async def open(cls, child: Node) -> RawNode:
        return cls(child)

    async def read(self, offset: int, length: int) -> bytes:  # replaced per instance
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:  # replaced per instance
        await self.child.write(offset, data)

    async def flush(self) -> None:  # replaced per instance
        await self.child.flush()

    async def block_status(self, offset: int, length: int) -> Extent:  # replaced per instance
        return await self.child.block_status(offset, length)

    async def truncate(self, size: int) -> None:
        await self.child.truncate(size)
        self.size = size

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        await self.child.aclose()
