"""Refcounts of a qcow2 image and the allocation of host clusters (== Cluster refcounts ==).

What lives here: :class:`Refcounts`, which owns the refcount table, a cache of refcount blocks,
the free-cluster search, the reservation of clusters handed out without I/O, and the growth of
the refcount table. It writes only through the node's :class:`MetadataWriter` (so that every
metadata write is announced and guarded by the failsafe) and knows nothing of L1/L2 tables but
what the node tells it through ``other_tables``.

Invariants (the node's module docstring has the whole order of writes):

* Every method that changes state is called with the node's metadata lock held, so refcounts
  change one request at a time; reads of a refcount (:meth:`Refcounts.get`) may come from
  anywhere.
* Refcounts are always exact (no lazy refcounts, the dirty bit is never set), and a refcount
  is raised, and flushed, before any entry that relies on it: :meth:`Refcounts.alloc` hands out
  clusters from a *reservation* whose refcounts were written as 1 and flushed, so that most
  allocations cost no I/O under the lock. A kill leaves the unused rest of the reservation as
  leaked clusters (repairable), never as referenced free ones; :meth:`release_reservation`
  (at close) gives it back.
* A refcount block is changed in memory before it is written; when that write fails, the node
  breaks (see "Failsafe" in ``node.py``), so the difference is never acted on.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from blockfs.errors import ImageError
from blockfs.nodes.base import Node
from blockfs.nodes.cache import TableCache
from blockfs.nodes.qcow2.format import (
    OFF_REFCOUNT_TABLE,
    REFT_OFFSET_MASK,
    Header,
    pack_u64_table,
)

_RC_TYPECODES: dict[int, Literal["B", "H", "I", "Q"]] = {3: "B", 4: "H", 5: "I", 6: "Q"}
_BE_U64 = struct.Struct(">Q")

#: budget of the refcount-block cache, in bytes of blocks (at least a few blocks)
REFBLOCK_CACHE_BYTES = 2 * 1024 * 1024
#: the most host clusters reserved at once (refcount 1, flushed, handed out without I/O). Each
#: reservation costs one flush; a kill leaks what was reserved and unused (repairable leaks).
RESERVATION_BYTES = 32 * 1024 * 1024
#: the largest refcount table growth may make (an image may bring at most 8 MiB at open)
MAX_TABLE_BYTES = 8 * 1024 * 1024 * 8


class MetadataWriter(Protocol):
    """The node's guarded way to its child (see "Failsafe" in ``node.py``)."""

    async def write_metadata(self, event: str, offset: int, data: bytes) -> None:
        """Announce ``event`` to the child, then write; a failure stops the node."""

    async def flush_child(self) -> None:
        """Flush the child; a failure stops the node."""


class Refcounts:
    """The refcounts of one image, and its cluster allocator.

    ``other_tables(start, end)`` names the table (other than the refcount table and blocks)
    that lies in host clusters [start, end), or returns None: the allocator refuses to hand
    out a cluster the image's own tables use (a refcount of 0 there means corrupt refcounts).
    ``before_search`` runs before each search for free clusters (the node applies its pending
    decrements there).
    """

    def __init__(
        self,
        child: Node,
        meta: MetadataWriter,
        header: Header,
        table: array[int],
        *,
        other_tables: Callable[[int, int], str | None],
        before_search: Callable[[], Awaitable[None]],
    ) -> None:
        self._child = child
        self._meta = meta
        self._other_tables = other_tables
        self._before_search = before_search
        cb = header.cluster_bits
        self._cb = cb
        self._cs = 1 << cb
        #: the refcount table (host offsets of refcount blocks), and where it lies
        self.table = table
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.order = header.refcount_order
        #: bits per refcount, and the largest refcount they hold
        self.bits = 1 << header.refcount_order
        self.max = (1 << self.bits) - 1
        self._rb_bits = cb + 3 - header.refcount_order  # log2(entries per refcount block)
        self._rb_mask = (1 << self._rb_bits) - 1
        self._blocks: TableCache[bytearray] = TableCache(max(4, REFBLOCK_CACHE_BYTES >> cb))
        self._free_hint = 1
        self._resv = (0, 0)  # reserved clusters [start, end): refcount 1, not yet used
        self._resv_chunk = 1
        self._resv_max = max(1, RESERVATION_BYTES >> cb)
        self._hwm = (child.size + self._cs - 1) >> cb  # clusters at or above: not in the file yet

    def clear_cache(self) -> None:
        """Forget cached refcount blocks (after they were rewritten behind the cache)."""
        self._blocks.clear()

    # -- entries of a block ----------------------------------------------------------------------

    def _rc_get(self, blk: bytearray, j: int) -> int:
        w = self.bits
        if w >= 8:
            nb = w >> 3
            return int.from_bytes(blk[j * nb : (j + 1) * nb], "big")
        bit = j * w
        return (blk[bit >> 3] >> (bit & 7)) & self.max

    def _rc_set(self, blk: bytearray, j: int, v: int) -> tuple[int, int]:
        """Set entry ``j``; returns the byte range written."""
        w = self.bits
        if w >= 8:
            nb = w >> 3
            blk[j * nb : (j + 1) * nb] = v.to_bytes(nb, "big")
            return j * nb, (j + 1) * nb
        bit = j * w
        i = bit >> 3
        sh = bit & 7
        blk[i] = (blk[i] & ~(self.max << sh)) | (v << sh)
        return i, i + 1

    async def _read_block(self, off: int) -> bytearray:
        return bytearray(await self._child.read(off, self._cs))

    async def _block(self, off: int) -> bytearray:
        return await self._blocks.load(off, self._read_block)

    # -- reading and changing refcounts ------------------------------------------------------------

    async def get(self, c: int) -> int:
        """The refcount of host cluster ``c`` (0 past the table or where no block exists)."""
        rti = c >> self._rb_bits
        if rti >= len(self.table):
            return 0
        off = self.table[rti] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._rc_get(await self._block(off), c & self._rb_mask)

    async def change(self, deltas: dict[int, int]) -> list[int]:
        """Add ``deltas`` (cluster index -> delta) to refcounts, one write per refcount block.
        Blocks must exist for increments (see :meth:`alloc`). Returns the clusters whose
        refcount dropped to 0.

        :raise ImageError: a refcount would overflow or go negative (a corrupt image).
        """
        by_block: dict[int, list[tuple[int, int]]] = {}
        for c, d in deltas.items():
            if d:
                by_block.setdefault(c >> self._rb_bits, []).append((c, d))
        freed: list[int] = []
        where = self._child.filename
        for rti, items in sorted(by_block.items()):
            off = self.table[rti] & REFT_OFFSET_MASK if rti < len(self.table) else 0
            if not off:
                raise ImageError(
                    f"{where}: refcount block for cluster "
                    f"{items[0][0]} is missing; run 'blockfs check -r all'"
                )
            blk = await self._block(off)
            lo, hi = self._cs, 0
            for c, d in items:
                j = c & self._rb_mask
                v = self._rc_get(blk, j) + d
                if v < 0 or v > self.max:
                    raise ImageError(
                        f"{where}: refcount of cluster {c} would become "
                        f"{v}; run 'blockfs check -r all'"
                    )
                a, b = self._rc_set(blk, j, v)
                lo = min(lo, a)
                hi = max(hi, b)
                if v == 0:
                    freed.append(c)
            await self._meta.write_metadata("refblock_update", off + lo, bytes(blk[lo:hi]))
        if freed:
            self._free_hint = max(1, min(self._free_hint, min(freed)))
        return freed

    # -- allocation --------------------------------------------------------------------------------

    async def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous free host clusters, each with refcount 1 (durable), and
        return the host offset of the first. Most calls take them from the reservation."""
        r0, r1 = self._resv
        if r1 - r0 >= n:
            self._resv = (r0 + n, r1)
            return r0 << self._cb
        await self.release_reservation()
        want = max(n, self._resv_chunk)
        self._resv_chunk = min(self._resv_chunk * 2, self._resv_max)
        start = await self._alloc_now(want) >> self._cb
        # Refcounts before the L2/L1 entries that use them, across a power loss too (QEMU's
        # cache dependency): one flush per reservation, not per allocation.
        await self._meta.flush_child()
        self._resv = (start + n, start + want)
        return start << self._cb

    def give_back(self, host: int, n: int) -> bool:
        """Put ``n`` clusters from ``host``, just handed out by :meth:`alloc` and referenced by
        nothing (their data write failed), back at the front of the reservation: no I/O.
        False when another allocation came in between (the caller then frees them)."""
        c = host >> self._cb
        r0, r1 = self._resv
        if c + n != r0:
            return False
        self._resv = (c, r1)
        return True

    async def release_reservation(self) -> None:
        """Give back the reserved clusters not handed out (at close, and before a new one)."""
        r0, r1 = self._resv
        self._resv = (0, 0)
        if r1 > r0:
            await self.change({c: -1 for c in range(r0, r1)})

    async def _alloc_now(self, n: int) -> int:
        await self._before_search()
        while True:
            start = await self._find_free(n)
            if await self._ensure_blocks(start, n):
                break
        self._check_not_metadata(start, n)
        await self.change({c: 1 for c in range(start, start + n)})
        self._free_hint = start + n
        self._hwm = max(self._hwm, start + n)
        return start << self._cb

    def _check_not_metadata(self, start: int, n: int) -> None:
        """Refuse to hand out clusters the image's own tables use: a refcount of 0 there means
        corrupt refcounts, and writing would destroy metadata (QEMU's overlap check)."""
        cb = self._cb
        end = start + n
        first = self.table_offset >> cb
        hit = self._other_tables(start, end)
        if hit is None and first < end and first + self.table_clusters > start:
            hit = "the refcount table"
        if hit is None:
            for e in self.table:
                c = (e & REFT_OFFSET_MASK) >> cb
                if c and start <= c < end:
                    hit = "a refcount block"
                    break
        if hit is not None:
            raise ImageError(
                f"{self._child.filename}: refcounts are corrupt (metadata in clusters "
                f"{start}..{end - 1} counted free); run 'blockfs check -r all'"
            )

    async def _find_free(self, n: int) -> int:
        """The first cluster of a run of ``n`` free clusters at or after the free hint. Scans
        whole refcount blocks without an await per entry (first allocation in a big image)."""
        i = max(1, self._free_hint)
        start = i
        run = 0
        rbb = self._rb_bits
        typecode: Literal["B", "H", "I", "Q"] | None = _RC_TYPECODES.get(self.order)
        while run < n:
            rti = i >> rbb
            if rti >= len(self.table):
                return start if run else i  # everything past the table is free
            off = self.table[rti] & REFT_OFFSET_MASK
            end = (rti + 1) << rbb
            if not off:  # no block: the whole range is free
                if run == 0:
                    start = i
                take = min(n - run, end - i)
                run += take
                i += take
                continue
            blk = await self._block(off)
            j = i & self._rb_mask
            # a zero entry is zero in any byte order, so a native-endian view finds free ones
            view = memoryview(blk).cast(typecode) if typecode else None
            while i < end and run < n:
                if (view[j] if view is not None else self._rc_get(blk, j)) == 0:
                    if run == 0:
                        start = i
                    run += 1
                else:
                    run = 0
                i += 1
                j += 1
            if view is not None:
                view.release()
        return start

    async def _ensure_blocks(self, start: int, n: int) -> bool:
        """Make sure refcount blocks cover clusters [start, start+n), placing missing blocks
        outside that run. Returns False when the refcount table had to grow (then the caller
        searches again, as the new table may sit where the run was)."""
        rbb = self._rb_bits
        for rti in range(start >> rbb, ((start + n - 1) >> rbb) + 1):
            if rti >= len(self.table):
                await self._grow_table(rti + 1)
                return False
            c = start + n
            while not self.table[rti] & REFT_OFFSET_MASK:
                while await self.get(c):
                    c += 1
                r = c >> rbb
                if r >= len(self.table):
                    await self._grow_table(r + 1)
                    return False
                if not self.table[r] & REFT_OFFSET_MASK:
                    # every cluster of range r is free: its block lives in it and counts itself
                    await self._new_block(r, c, self_counted=True)
                else:
                    await self._new_block(rti, c, self_counted=False)
                c += 1
        return True

    async def _new_block(self, rti: int, c: int, self_counted: bool) -> None:
        blk = bytearray(self._cs)
        if self_counted:
            self._rc_set(blk, c & self._rb_mask, 1)
        else:
            await self.change({c: 1})  # counted by the existing block covering c
        entry = c << self._cb
        await self._meta.write_metadata("refblock_alloc", entry, bytes(blk))
        await self._meta.write_metadata(
            "reftable_update", self.table_offset + rti * 8, _BE_U64.pack(entry)
        )
        self.table[rti] = entry
        self._blocks.put(entry, blk)
        self._hwm = max(self._hwm, c + 1)

    async def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at the end of the file, with the refcount
        blocks that cover the new table itself."""
        cb = self._cb
        cs = self._cs
        rbb = self._rb_bits
        old = self.table
        old_len = len(old)
        end = max((self._child.size + cs - 1) >> cb, self._hwm)
        new_len = max(min_entries, old_len * 2)
        while True:
            tc = (new_len * 8 + cs - 1) >> cb
            nb = 0
            while True:
                last = end + tc + nb - 1
                missing = [
                    r
                    for r in range((end >> rbb), (last >> rbb) + 1)
                    if r >= old_len or not old[r] & REFT_OFFSET_MASK
                ]
                if len(missing) == nb:
                    break
                nb = len(missing)
            if missing and missing[-1] >= new_len:
                new_len = missing[-1] + 1
                continue
            break
        if tc * cs > MAX_TABLE_BYTES:
            raise ImageError(f"{self._child.filename}: refcount table would grow too large")
        new_rt = array("Q", old)
        new_rt.extend([0] * (new_len - old_len))
        blocks: dict[int, bytearray] = {}
        for k, r in enumerate(missing):
            new_rt[r] = (end + tc + k) << cb
            blocks[r] = bytearray(cs)
        existing: dict[int, int] = {}
        for c in range(end, end + tc + nb):
            r = c >> rbb
            if r in blocks:
                self._rc_set(blocks[r], c & self._rb_mask, 1)
            else:
                existing[c] = 1
        for r, blk in blocks.items():
            await self._meta.write_metadata("refblock_alloc", new_rt[r], bytes(blk))
        if existing:
            await self.change(existing)
        await self._meta.write_metadata("reftable_grow", end << cb, pack_u64_table(new_rt))
        await self._meta.write_metadata(
            "header_update", OFF_REFCOUNT_TABLE, struct.pack(">QI", end << cb, tc)
        )
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table = new_rt
        self.table_offset = end << cb
        self.table_clusters = tc
        for r, blk in blocks.items():
            self._blocks.put(new_rt[r], blk)
        self._hwm = max(self._hwm, end + tc + nb)
        await self.change({c: -1 for c in range(old_off >> cb, (old_off >> cb) + old_clusters)})
