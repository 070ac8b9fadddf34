"""Compressed clusters of qcow2: the L2 entry that points to one, (de)compression, and the area
compressed clusters are packed into.

What lives here: :class:`CompressedEntry` (the one decoding and encoding of a compressed-cluster
L2 entry, == Compressed Clusters Descriptor == of qcow2.txt), the bounded decompression and the
compression of one cluster, and :class:`CompressedArea`, which hands out space for compressed
data. The node (``node.py``) decides when a cluster is written compressed; this module must not
touch L1 or L2 tables.

The area's invariants (all its state changes under the node's metadata lock):

* Compressed clusters are packed one after another, on sector (512 B) boundaries, in an *area*
  of host clusters taken from the allocator. A host cluster is referenced once by every
  compressed cluster whose sectors touch it (so a refcount may exceed 1 without any snapshot),
  and freed through the node's pending decrements as any other cluster.
* Refcounts must be durable before an L2 entry that relies on them, yet a flush per compressed
  cluster would be ruinous. So when an area is taken, every cluster's refcount is raised at once
  to ``cap`` (the most compressed clusters that can touch one host cluster) and flushed;
  placements only count in memory; when the area is left behind, the surplus ``cap - placed`` is
  given back. A kill in between leaves refcounts too high: leaks, never a reference to a free
  cluster.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockfs.errors import ImageError
from blockfs.nodes.qcow2.format import MAX_ZSTD_WINDOW, OFLAG_COMPRESSED, CompressionType

if TYPE_CHECKING:
    from blockfs.nodes.qcow2.refcount import Refcounts

#: compressed data is stored in whole sectors; a compressed cluster must save at least one
SECTOR = 512
#: the most host clusters taken at once for compressed data (one flush each); a close leaves
#: the unused rest as a hole, a kill as repairable leaks
AREA_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CompressedEntry:
    """Where a compressed cluster's data lies (== Compressed Clusters Descriptor ==).

    With ``x = 62 - (cluster_bits - 8)``, bits 0..x-1 of the L2 entry hold the host offset
    (any byte, not cluster aligned) and bits x..61 the number of 512-byte sectors *after* the
    one holding that offset. Bit 62 is the compressed flag; COPIED is never set.
    """

    host_offset: int  # byte offset of the compressed data in the image file
    sectors: int  # 512-byte sectors the data may span, counted from the sector of host_offset

    @classmethod
    def decode(cls, entry: int, cluster_bits: int) -> CompressedEntry:
        """The descriptor of an L2 entry that has :data:`OFLAG_COMPRESSED` set."""
        x = 62 - (cluster_bits - 8)
        return cls(entry & ((1 << x) - 1), ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1)

    def encode(self, cluster_bits: int) -> int:
        """The L2 entry (compressed flag included). The caller keeps ``host_offset`` below
        ``1 << (62 - (cluster_bits - 8))`` and ``sectors`` within a cluster."""
        x = 62 - (cluster_bits - 8)
        return OFLAG_COMPRESSED | ((self.sectors - 1) << x) | self.host_offset

    @property
    def length(self) -> int:
        """Bytes from ``host_offset`` to the end of the last sector (the most to read)."""
        return self.sectors * SECTOR - (self.host_offset & (SECTOR - 1))

    def host_clusters(self, cluster_bits: int) -> range:
        """The host clusters the data touches (each holds one reference for this entry)."""
        last = self.host_offset + self.length - 1
        return range(self.host_offset >> cluster_bits, (last >> cluster_bits) + 1)


def compress_cluster(buf: bytes, compression_type: int) -> bytes | None:
    """``buf`` (one cluster) compressed as the image says, or None when that saves less than a
    sector. zlib is raw deflate with a 4 KiB window, as readers of qcow2 expect. Pure CPU:
    zlib and zstd release the GIL, so a caller may run this in a worker thread."""
    if compression_type == CompressionType.ZSTD:
        import zstandard  # here, not at the top: only images with compressed clusters need it

        out = zstandard.ZstdCompressor().compress(buf)
    else:
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
        out = z.compress(buf) + z.flush()
    return out if len(out) <= len(buf) - SECTOR else None


def decompress_cluster(raw: bytes, compression_type: int, cs: int, what: str) -> bytes:
    """The first ``cs`` bytes that ``raw`` (one compressed cluster's sectors) decompress to.
    Never produces more than ``cs`` bytes, whatever the data claims: 32 KiB of zstd expand to
    a GiB, so an unbounded decompression would let a hostile image exhaust memory and time.

    :raise ImageError: the data is corrupt or decompresses to less than a cluster (``what``
        names the cluster in the message).
    """
    import zstandard  # here, not at the top: only images with compressed clusters need it

    try:
        if compression_type == CompressionType.ZSTD:
            dctx = zstandard.ZstdDecompressor(max_window_size=max(cs, MAX_ZSTD_WINDOW))
            reader = dctx.stream_reader(raw)
            parts: list[bytes] = []
            got = 0
            while got < cs:
                chunk = reader.read(cs - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = b"".join(parts)
        else:
            out = zlib.decompressobj(-12).decompress(raw, cs)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise ImageError(f"{what} is corrupt: {exc}") from None
    if len(out) < cs:
        raise ImageError(f"{what} is truncated")
    return out[:cs]


class CompressedArea:
    """Space for compressed data (see the module docstring). Every method is called with the
    node's metadata lock held; ``flush`` is the node's failsafe flush of its child."""

    def __init__(
        self, refcounts: Refcounts, flush: Callable[[], Awaitable[None]], cluster_bits: int
    ) -> None:
        self._refcounts = refcounts
        self._flush = flush
        self._cb = cluster_bits
        cs = 1 << cluster_bits
        #: the most compressed clusters that may touch one host cluster (refcounts must hold it)
        self.cap = min(refcounts.max, max(1, cs // SECTOR))
        # the area [_pos, _end) of host clusters _first.. whose refcounts were raised to cap;
        # _refs counts the compressed clusters placed in each. _pos == 0: no area.
        self._pos = 0
        self._end = 0
        self._first = 0
        self._refs: dict[int, int] = {}
        self._chunk = 1
        self._chunk_max = max(1, AREA_BYTES >> cluster_bits)

    async def place(self, size: int) -> int:
        """Hand out ``size`` bytes (whole sectors, at most a cluster) of compressed space and
        count the reference in every host cluster they touch; returns the host offset."""
        cb = self._cb
        refs = self._refs
        while True:
            pos = self._pos
            if pos and pos + size <= self._end:
                c = pos >> cb
                if refs.get(c, 0) < self.cap:
                    # any further cluster touched starts at a boundary: nothing placed in it yet
                    for t in range(c, ((pos + size - 1) >> cb) + 1):
                        refs[t] = refs.get(t, 0) + 1
                    self._pos = pos + size
                    return pos
                self._pos = (c + 1) << cb  # its refcount cannot count one more
                continue
            await self._grow(size)

    async def _grow(self, size: int) -> None:
        """Take more host clusters; if they follow the area directly, it goes on (a compressed
        cluster may then span the boundary), else a new area starts."""
        cb = self._cb
        n = max(self._chunk, (size + (1 << cb) - 1) >> cb)
        self._chunk = min(self._chunk * 2, self._chunk_max)
        start = await self._refcounts.alloc(n)  # refcount 1, durable
        c0 = start >> cb
        if self.cap > 1:
            await self._refcounts.change({c: self.cap - 1 for c in range(c0, c0 + n)})
            await self._flush()  # before any L2 entry relies on them
        if self._pos and start == self._end:
            self._end = start + (n << cb)
            await self._settle(self._pos >> cb)
        else:
            await self.release()
            self._pos = start
            self._end = start + (n << cb)
            self._first = c0

    async def _settle(self, upto: int) -> None:
        """Give back the surplus references of area clusters below ``upto`` (nothing more can
        be placed there)."""
        deltas = {c: self._refs.pop(c, 0) - self.cap for c in range(self._first, upto)}
        self._first = max(self._first, upto)
        if deltas:
            # A cluster only drops to 0 here when nothing was ever placed in it.
            await self._refcounts.change(deltas)

    async def release(self) -> None:
        """Leave the area (before a new one, and at close)."""
        if not self._pos:
            return
        end = self._end >> self._cb
        self._pos = self._end = 0
        await self._settle(end)
