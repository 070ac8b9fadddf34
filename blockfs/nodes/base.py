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
- **Cancellation.** A request once submitted to a thread or a remote cannot be taken back (a
  pread in a pool thread, an SFTP write on the wire). Cancelling the task that awaits a node
  operation therefore does one of two things, and the node's docstring says which:
  *wait* (the task's ``Cancelled`` arrives only after the submitted work ended:
  :class:`blockfs.nodes.threads.IoThreadPool` does this) or *abandon* (``Cancelled`` arrives at
  once; the work goes on and its result is dropped). Either way the caller must treat a
  cancelled ``write``/``write_zeroes``/``discard``/``truncate`` as "may or may not have
  happened" (like a write whose reply was lost) and a cancelled ``flush`` as failed; and a node
  frees nothing that abandoned work still uses (buffers, descriptors, the connection) before
  that work ended: ``aclose`` waits for it. Before submission (while waiting for a lock or a
  slot) cancellation simply cancels.
- **Transient errors.** A protocol node raises :class:`blockfs.errors.TransientError` only when
  the way to the storage failed (a connection reset, a timeout) and sending the same request
  again after :meth:`Node.reconnect` is safe; every other error is final. Nodes never retry on
  their own: one filter, :class:`blockfs.nodes.retry.RetryFilter`, reconnects and retries.
- ``describe()`` and the ``identity()`` and ``capabilities`` answers do no I/O: they report
  what the node learnt when it was opened (``info`` awaits :meth:`Node.allocated_bytes` for
  what must be asked).

Opening is done by async factories (``await FileNode.open(...)``); ``__init__`` does no I/O.
This module must not import anything that touches FUSE or trio's threads: it is pure interface.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Hashable
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
    #: where ``offset`` lies in the storage below the node that answered (its child's bytes:
    #: a qcow2 data cluster's host offset; a file's own offset), or None when the range has no
    #: one place there (unallocated, a zero cluster, compressed, a node that does not say).
    #: What ``blockfs map`` shows as "offset", as QEMU's BDRV_BLOCK_OFFSET_VALID.
    host: int | None = None


class Capability(enum.IntFlag):
    """What a node declares it can do, beyond the operations every node has (nbdkit's
    ``can_zero``, ``can_trim``, ``can_extents``): callers read ``node.capabilities`` instead of
    probing for attributes."""

    #: ``write_zeroes`` zeroes without writing zero buffers (a hole punch, a zero cluster)
    ZERO = 1
    #: ``discard`` frees space (otherwise it is the default no-op)
    DISCARD = 2
    #: ``block_status`` tells holes and zeroes apart (otherwise: "all data, allocated")
    EXTENTS = 4
    #: ``truncate`` changes the size (otherwise it raises UnsupportedFeature)
    RESIZE = 8
    #: ``write_compressed(offset, data)`` stores whole clusters compressed (qcow2). A method
    #: outside the node operations, so a node never inherits it from its child.
    COMPRESSED_WRITES = 16


#: the capabilities that name node operations: what a node passing its operations straight to
#: its child (a filter, raw) inherits from it
PASSED_CAPABILITIES = Capability.ZERO | Capability.DISCARD | Capability.EXTENTS | Capability.RESIZE


@dataclass(frozen=True, slots=True)
class Limits:
    """Hints a node gives to its callers (jobs size their chunks and workers by them)."""

    cluster_size: int = 65536  # the unit in which this node allocates
    max_transfer: int = 16 * 1024 * 1024
    #: most requests the node works on at once (its thread pool, a remote's request window);
    #: more are accepted and wait in line. None: no bound of its own (it never blocks a thread).
    max_inflight: int | None = None


@dataclass(frozen=True, slots=True)
class DirectIo:
    """A node's data path callable from any thread, without the event loop (issue 17): the
    FUSE reader threads answer READ and WRITE with it where the mapping is known without an
    ``await`` (a raw image on a local file; a qcow2 cluster whose L2 table is cached). Both
    may block their calling thread (never the event loop's), return False when this request
    needs the event loop after all (an unallocated qcow2 cluster, a probed raw image's head,
    a read the page cache cannot answer: a read may then have filled part of the view, a
    write has written nothing), and raise :class:`~blockfs.errors.BlockfsError` as the async
    path does.
    The caller (:class:`blockfs.export.Export`) has checked the range against ``size``.
    """

    #: fill the whole view with the bytes at the offset
    readinto: Callable[[int, memoryview], bool]
    #: store the view at the offset; None: writes always need the event loop
    write: Callable[[int, memoryview], bool] | None = None
    #: a remote node's requests, sent from the calling thread and answered later (issue 14):
    #: ``submit_read(offset, length, done, held)`` and ``submit_write(offset, data, done,
    #: held)`` take the request and return True, or decline (False, nothing sent). The node
    #: may hold the request back and add to ``held`` (:data:`Held`) how to send what it holds:
    #: the caller calls each of those once it has no more requests at hand (before it waits
    #: or does anything slow), so that requests made together leave together. ``done(data,
    #: err)`` is then called once, in the event loop's thread: ``err`` 0 (``data``: the bytes
    #: read, as long as asked; b"" for a write), an errno (the request failed for good), or
    #: :data:`RETRY` (the connection went: the event loop must send the request again, with
    #: its retries). A write's data must stay unchanged until ``done``.
    submit_read: Callable[[int, int, DirectDone, Held], bool] | None = None
    submit_write: Callable[[int, memoryview, DirectDone, Held], bool] | None = None


#: how a submitted request ends (see :attr:`DirectIo.submit_read`)
DirectDone = Callable[[bytes, int], None]
#: how to send the requests a remote node held back (see :attr:`DirectIo.submit_read`)
Held = set[Callable[[], None]]
#: ``done``'s ``err`` for a request the event loop must send again
RETRY = -1


def never_direct(offset: int, view: memoryview) -> bool:
    """A ``readinto`` that always declines (a node whose only direct path is submitted)."""
    return False


#: what a reader thread copies zeroes from
_ZEROES = bytes(128 * 1024)


def fill_zeroes(view: memoryview) -> None:
    """Zero ``view`` in place (in chunks: no buffer as large as the request)."""
    step = len(_ZEROES)
    length = len(view)
    for pos in range(0, length, step):
        n = min(step, length - pos)
        view[pos : pos + n] = _ZEROES[:n]


def read_below_direct(backing: Node | None, offset: int, view: memoryview) -> bool:
    """Fill ``view`` with what a layer that does not hold the range reads there, in the
    calling thread: its backing node's bytes through that node's direct path (zeroes past the
    backing's end), zeroes without a backing. False: the backing has no direct path, or
    declined (nothing was written then). The chain changes only while the export is
    quiesced, so ``backing`` stays open for as long as this runs."""
    if backing is None or offset >= backing.size:
        fill_zeroes(view)
        return True
    below = backing.direct_io()
    if below is None:
        return False
    inside = min(len(view), backing.size - offset)
    if not below.readinto(offset, view[:inside]):
        return False
    if inside < len(view):
        fill_zeroes(view[inside:])
    return True


class IoCounters:
    """What one protocol node did on its storage (``Node.io``), counted where it does the I/O,
    so that each layer of a chain shows its own (format metadata, reads falling through to a
    backing file), as QEMU's per-node stats do, under QEMU's names. Counted: requests that
    succeeded (operations and bytes) and those that ended in an error (``failed_*``; a
    cancelled request counts neither way). A write-zeroes the storage does itself counts as a
    write of its length (as QEMU's devices account it); where a node falls back to writing zero
    buffers, those writes count instead. A discard is an unmap; one the storage refused counts
    as failed even where the node keeps quiet about it (a discard is a hint). One increment of
    a slot per counter: cheap enough for every request."""

    COUNTERS = (
        "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
        "flush_operations", "unmap_operations", "failed_rd_operations",
        "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations",
    )  # fmt: skip
    __slots__ = COUNTERS

    def __init__(self) -> None:
        self.rd_bytes = self.wr_bytes = self.unmap_bytes = 0
        self.rd_operations = self.wr_operations = 0
        self.flush_operations = self.unmap_operations = 0
        self.failed_rd_operations = self.failed_wr_operations = 0
        self.failed_flush_operations = self.failed_unmap_operations = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTERS}


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
    #: why this node stopped taking writes after a failure (qcow2's failsafe: a metadata
    #: write failed, so its tables in memory may not match the file), or None. Cleared only
    #: by opening the image again; a job reopens its target (see jobs.target).
    write_failure: str | None = None
    #: a protocol node's count of the I/O it did on its storage (the ``nodes`` of an image's
    #: ``stats`` file); None: a node that counts none of its own (formats, filters, views)
    io: IoCounters | None = None

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

    async def reconnect(self) -> None:
        """Re-establish the way to the storage after a :class:`blockfs.errors.TransientError`
        (a new connection and new remote handles, in the same mode), so that requests may be
        sent again. Called by :class:`blockfs.nodes.retry.RetryFilter` only, never while the
        node is being closed; requests may still be in flight (they fail or finish).

        The default passes it to the children: a local file has nothing to re-establish, a
        format or filter node keeps its state and reconnects what lies beneath.

        :raise TransientError: not yet (the retry filter backs off and tries again).
        :raise BlockfsError: never will (the retry filter gives up at once).
        """
        for child in self.children():
            await child.reconnect()

    def debug_event(self, name: str) -> None:  # noqa: B027 (a hook, empty by design)
        """A format node announces ``name``, a kind of metadata write (``l2_update``, ...; see
        :mod:`blockfs.nodes.inject`), to its child right before it makes that write. Only the
        error-injection filter listens; everywhere else this is a no-op call, made on metadata
        writes only, never on a mapped read or write."""

    def direct_io(self) -> DirectIo | None:
        """This node's thread-callable data path, or None (the default): every request goes
        through the event loop. Only a node whose read and write need no ``await`` and no
        state that the event loop changes may answer (see :class:`DirectIo`)."""
        return None

    def children(self) -> list[Node]:
        """Nodes this node owns and closes (not its backing chain, which is listed apart)."""
        return []

    def identity(self) -> Hashable | None:
        """What storage this node is, whatever name reached it: equal for two nodes over the
        same file (through a hard link, a symlink, another path), so that the loop and
        shared-file checks compare these. A protocol node answers (the file node: ``(st_dev,
        st_ino)``; a remote: its host and the remote file's identity); a format or filter node
        answers for its first child; None: no storage of its own (a view). No I/O."""
        children = self.children()
        return children[0].identity() if children else None

    @property
    def capabilities(self) -> Capability:
        """What this node can do beyond the common operations (see :class:`Capability`).
        A node with children passes on its first child's operation capabilities (right for
        filters and raw); protocol and format nodes declare theirs as a class attribute."""
        children = self.children()
        return children[0].capabilities & PASSED_CAPABILITIES if children else Capability(0)

    async def reopen(self, read_only: bool) -> None:
        """Switch this node between read-only and read-write (commit and stream write into a
        backing file, which is opened read-only). The caller holds the export quiesced: no
        request is in flight. The default passes the change down to the nodes this node owns,
        then takes it: right for format nodes that keep no per-mode state; a protocol node
        reopens its file.

        :raise BlockfsError: the file cannot be reopened so; the node keeps its old mode.
        """
        for child in self.children():
            await child.reopen(read_only)
        self.read_only = read_only

    async def change_backing_file(
        self, name: str | None, fmt: str | None, parent: Node | None = None
    ) -> None:
        """Record ``name`` (in format ``fmt``) as this image's backing file in its own
        metadata, or no backing file with None (commit and stream, once the data is in place).
        Changes what the image says, not the open chain: ``backing`` is the caller's to swap.
        ``parent`` is the open node ``name`` leads to (a format that records facts of its
        parent, as VHDX records its DataWriteGuid, takes them from it; None with ``name``
        None). Crash-safe: afterwards the image says either the old name or the new one.

        :raise UnsupportedFeature: a node whose format records no backing file (the default),
            or cannot record this one.
        """
        from blockfs.errors import UnsupportedFeature

        raise UnsupportedFeature(f"{self.format_name} nodes have no backing file to change")

    async def parent_will_change(self, parent: Node) -> None:  # noqa: B027 (optional)
        """``parent`` (this image's backing node) is about to be written (a commit folds data
        into it): record whatever lets this image still open over it afterwards, durably,
        before the first write. The data a reader of this image sees does not change (a commit
        writes into the parent only what this image and those above it hide). The default does
        nothing (qcow2 records no fact of its backing file that a write changes); VHDX records
        the parent's next DataWriteGuid as its second linkage."""

    async def parent_settled(self, parent: Node) -> None:  # noqa: B027 (optional)
        """A commit into ``parent`` (this image's backing node) ended with this image still
        over it: record what :meth:`parent_will_change` left provisional as final. The
        default does nothing; VHDX keeps one linkage, the parent's DataWriteGuid now."""

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


async def chain_block_status(
    node: Node, offset: int, length: int, *, base: Node | None = None
) -> Extent:
    """What a read of ``node`` returns at ``offset``: follows unallocated ranges down the
    backing chain. The answer always has ALLOCATED set somewhere in the chain, or ZERO when no
    layer holds the range (past a short backing file's end, or no backing file at all).
    ``depth`` says which layer answered.

    With ``base`` (a node of the chain), the walk stops above it: a range no layer above
    ``base`` holds comes back with neither ALLOCATED nor ZERO ("allocated above base" is what
    commit and stream copy; the rest is already in ``base``)."""
    depth = 0
    while True:
        if node is base:
            return Extent(offset, length, Status(0), depth)
        ext = await node.block_status(offset, length)
        if ext.status & Status.ALLOCATED:
            return Extent(ext.offset, ext.length, ext.status, depth)
        backing = node.backing
        if backing is None or offset >= backing.size:
            return Extent(offset, ext.length, Status.ZERO, depth)
        length = min(ext.length, backing.size - offset)
        node = backing
        depth += 1
