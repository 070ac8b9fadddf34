"""The node interface: one async contract for every layer of the block graph.

A node is a protocol node (bytes in a file: ``file``), a format node (a disk image format over one
child node: ``raw``, ``qcow2``), or a filter node (one child, inserted above another node by a job).
A FUSE request reaches the image through exactly one path: the export's root node, then down.

Contracts (what the caller guarantees, what the node owes), in the manner of QEMU's BlockDriver:

- Requests are validated once, above the nodes, by :class:`blockfs.export.Export`: every
  ``offset``/``length`` a node receives satisfies ``0 <= offset``, ``offset + length <= size``
  and ``length > 0``. Nodes may assert this; they need not re-check it.
- Nodes accept any byte alignment; a node with a coarser granularity does its own
  read-modify-write (qcow2 does, as partial-cluster writes are part of the format).
- A node that is ``read_only`` is never asked to write, zero, discard or truncate.
- ``write`` returning means the data, and the metadata needed to find it again, reached the
  layer below (for the file node: the OS page cache). ``flush`` returning means everything
  acknowledged before it is durable on stable storage.
- Concurrent requests are allowed; a node serialises internally only what it must (metadata
  updates), never whole requests.

Opening is done by async factories (``await FileNode.open(...)``); ``__init__`` does no I/O.
This module must not import anything that touches FUSE or trio's threads: it is pure interface.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class Status(enum.IntFlag):
    """What a range of a node reads as (QEMU's BDRV_BLOCK_* flags)."""

    DATA = 1  # reads come from stored data (may still be zeroes)
    ZERO = 2  # reads return zeroes
    ALLOCATED = 4  # this layer answers for the range; unset means "ask the backing node"


@dataclass(frozen=True, slots=True)
class Extent:
    """One run of a node with a single status, starting at ``offset``."""

    offset: int
    length: int
    status: Status
    depth: int = 0  # in a chain: 0 = the node asked, 1 = its backing node, ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Hints a node gives to its callers (jobs size their chunks by them)."""

    cluster_size: int = 65536  # the unit in which this node allocates
    max_transfer: int = 16 * 1024 * 1024


class Node(abc.ABC):
    """Base of every node. Subclasses set ``size`` and ``read_only`` before they are used."""

    #: virtual size in bytes, as the layer above sees it
    size: int
    read_only: bool
    #: the format's name as ``qemu-img info`` would print it ("raw", "qcow2", "file", ...)
    format_name: str = "?"
    #: a human-readable name of what lies beneath (a path, a URI)
    filename: str = ""
    #: the node a read falls through to where this node reports a range unallocated
    backing: Node | None = None
    limits: Limits = Limits()

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` (the range lies within ``size``).

        :raise BlockfsError: on an I/O error or corrupt metadata met on the way.
        """

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at ``offset`` (the range lies within ``size``).

        On return the data and all metadata needed to read it back have reached the layer
        below; a crash of this process after that loses nothing.
        """

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeroes; ``may_unmap`` allows freeing the space."""
        chunk = min(length, 1024 * 1024)
        zeroes = bytes(chunk)
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self.write(offset, zeroes if n == chunk else zeroes[:n])
            offset += n

    async def discard(self, offset: int, length: int) -> None:  # noqa: B027 (optional)
        """Hint that the range is no longer needed; it may read back as anything afterwards
        (the nodes here make it read as zeroes where they free it). The default does nothing."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write acknowledged so far durable (fsync at the bottom)."""

    async def block_status(self, offset: int, length: int) -> Extent:
        """Describe the first run at ``offset``, at most ``length`` long, for this layer alone.

        The default says "all data, allocated here": right for any node without holes.
        """
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int) -> None:
        """Change the virtual size. Nodes that cannot resize raise UnsupportedFeature."""
        from blockfs.errors import UnsupportedFeature

        raise UnsupportedFeature(f"{self.format_name} nodes cannot be resized")

    async def allocated_bytes(self) -> int:
        """Bytes of this layer's own storage that hold data (for st_blocks and ``du``)."""
        return self.size

    def debug_event(self, name: str) -> None:  # noqa: B027 (a hook, empty by design)
        """A format node announces ``name``, a kind of metadata write (``l2_update``, ...; see
        :mod:`blockfs.nodes.inject`), to its child right before it makes that write. Only the
        error-injection filter listens; everywhere else this is a no-op call, made on metadata
        writes only, never on a mapped read or write."""

    def children(self) -> list[Node]:
        """Nodes this node owns and closes (not its backing chain, which is listed apart)."""
        return []

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything; called once, after the last request finished."""

    def describe(self) -> dict[str, object]:
        """The fields ``info`` files and ``blockfs info`` show for this layer."""
        return {
            "filename": self.filename,
            "format": self.format_name,
            "virtual-size": self.size,
            "read-only": self.read_only,
        }


async def chain_block_status(node: Node, offset: int, length: int) -> Extent:
    """What a read of ``node`` returns at ``offset``: follows unallocated ranges down the
    backing chain. The answer always has ALLOCATED set somewhere in the chain, or ZERO when no
    layer holds the range (past a short backing file's end, or no backing file at all).
    ``depth`` says which layer answered."""
    depth = 0
    while True:
        ext = await node.block_status(offset, length)
        if ext.status & Status.ALLOCATED:
            return Extent(ext.offset, ext.length, ext.status, depth)
        backing = node.backing
        if backing is None or offset >= backing.size:
            return Extent(offset, ext.length, Status.ZERO, depth)
        length = min(ext.length, backing.size - offset)
        node = backing
        depth += 1
