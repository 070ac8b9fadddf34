"""The ``qcow2`` format node: QEMU's copy-on-write image format, read and written in place.

What lives here: opening (header, extensions, tables, backing chain), the one mapping function
(:meth:`Qcow2Node._lookup`) that serves read, write and block_status, cluster allocation with
exact refcounts, and the write-through L2 / refcount-block caches. On-disk structures are in
``qcow2_format.py``; internal snapshots in ``qcow2_snapshot.py``; image creation in
``qcow2_create.py``.

Invariants that the code relies on (write them down, since a new ``await`` breaks them):

* Write-through: every metadata change reaches the child (the OS page cache) before the request
  that made it returns, so a kill -9 of the process loses no acknowledged write. For tables other
  tasks read without a lock (L1, L2), the disk is written *first* and the in-memory copy updated
  after, so that no task can act on a mapping (e.g. write in place into a new cluster and
  acknowledge) that is not yet in the image.
* Order on disk: refcount increments before the data and L2/L1 entries that use the clusters;
  data before the L2 entry that points to it; L2 entry before the refcount decrement of the
  cluster it stopped pointing to. A kill at any instant leaves at worst leaked clusters
  (``qemu-img check -r leaks`` repairs those), never a reference to a free cluster.
* Refcounts are always exact (no lazy refcounts, the dirty bit is never set).
* Only metadata updates are serialised (``_meta_lock``: allocation, refcounts, L1 changes). A
  guest cluster being allocated, zeroed or discarded is *claimed* (``_claims``) so that two
  requests never allocate it twice; reads and in-place writes take no lock at all.
* A freed host cluster is not reused while a read or an in-place write that may have looked it
  up is in flight (``_io_active``): decrements wait in ``_pending_decref`` until none is.
* L2 tables that a task is about to change are pinned in the cache (never evicted), so that a
  reload can never bring back a stale copy.
* Compressed clusters (:meth:`Qcow2Node.write_compressed`) are packed into an area of host
  clusters whose refcounts were raised, and flushed, beforehand to the most references they can
  get; the surplus is given back when the area is left. A kill leaves leaks, never too few.
* Failsafe: every metadata write passes :meth:`Qcow2Node._meta_write` and every flush of the
  child :meth:`Qcow2Node._flush_child`. When one fails (EIO, ENOSPC, an injected fault), the
  in-memory tables may no longer match the disk (a refcount block is changed in memory before
  it is written; after a failed fsync the kernel may have dropped dirty metadata pages), so
  the node stops there, as if the process had been killed at that instant, which the order
  above makes safe: every later write, zero, discard and metadata write fails with EIO (one
  log line names the image), reads go on, close writes no metadata, and after a failed flush
  every later flush fails too. Reopening the image starts afresh from what is on disk (leaks
  at most). A failed data write (in place, or into clusters not yet referenced) changes no
  metadata and needs no failsafe.
* Each metadata write is announced to the child first (``debug_event``: the error-injection
  filter's hook, a no-op on a file); a mapped read or write announces nothing.

Not done here: lazy refcounts, extended L2 entries, external data files, encryption (refused
at open with a clear error), resizing.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

import trio

from blockfs.errors import BlockfsError, ImageError, ReadOnlyError, UsageError
from blockfs.nodes.base import Extent, Limits, Node, Status
from blockfs.nodes.qcow2_create import create_qcow2  # re-exported for block jobs
from blockfs.nodes.qcow2_format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAGIC,
    OFF_AUTOCLEAR,
    OFF_REFCOUNT_TABLE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    Autoclear,
    Compatible,
    CompressionType,
    Extensions,
    Header,
    Incompatible,
    Snapshot,
    check_l2_table,
    check_metadata_layout,
    decompress_cluster,
    metadata_regions,
    parse_extensions,
    parse_header,
    parse_snapshots,
    snapshot_table_bound,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "qcow2"

# Kinds of run the mapping function returns.
K_UNALLOC = 0  # not allocated in this layer: the backing file answers (or zeroes)
K_ZERO = 1  # reads as zeroes (v3 zero flag, with or without a preallocated host cluster)
K_DATA = 2  # a standard cluster with refcount 1 (COPIED): may be rewritten in place
K_COW = 3  # a standard cluster without COPIED (shared with a snapshot): copy before writing
K_COMP = 4  # a compressed cluster (one cluster per run; ``host`` is the raw L2 entry)

_LITTLE = sys.byteorder == "little"
_RC_TYPECODES: dict[int, Literal["B", "H", "I", "Q"]] = {3: "B", 4: "H", 5: "I", 6: "Q"}
_BE_U64 = struct.Struct(">Q")
SNAPSHOT_ENTRY_MIN = 40  # fixed part of a snapshot table entry

#: budget of the L2 and refcount-block caches, in bytes of tables (at least a few tables each)
L2_CACHE_BYTES = 8 * 1024 * 1024
REFBLOCK_CACHE_BYTES = 2 * 1024 * 1024
DECOMPRESSED_CACHE_ENTRIES = 8
#: the most host clusters reserved at once (refcount 1, flushed, handed out without I/O). Each
#: reservation costs one flush; a kill leaks what was reserved and unused (repairable leaks).
RESERVATION_BYTES = 32 * 1024 * 1024
#: the most host clusters taken at once for compressed data (one flush each, see _cz_alloc); a
#: close leaves the unused rest as a hole, a kill as repairable leaks
COMPRESSED_AREA_BYTES = 4 * 1024 * 1024
#: a compressed cluster must save at least one sector, or it is written uncompressed
COMPRESSED_SECTOR = 512
#: compressing a cluster this big is worth a hop to a worker thread (zlib/zstd release the GIL)
COMPRESS_IN_THREAD_BYTES = 64 * 1024


def probe(header: bytes) -> bool:
    # Any version: an image with qcow2's magic is never handed out as raw (its header would
    # become guest data); an unsupported version is refused by the qcow2 driver instead.
    return header[:4] == MAGIC


async def open_node(child: Node, ctx: object) -> Node:
    """Open a qcow2 image over ``child`` (the opener's entry point)."""
    return await Qcow2Node.open(child, ctx)


def _u64_table(raw: bytes) -> array[int]:
    t = array("Q")
    t.frombytes(raw)
    if _LITTLE:
        t.byteswap()
    return t


def _be_bytes(t: array[int]) -> bytes:
    if _LITTLE:
        t = array("Q", t)
        t.byteswap()
    return t.tobytes()


class Qcow2Node(Node):
    """A qcow2 image over one child node (normally a ``file`` node)."""

    format_name = "qcow2"
    #: :meth:`write_compressed` exists (backup with compress=on checks this)
    supports_compressed_writes = True

    def __init__(
        self,
        child: Node,
        header: Header,
        ext: Extensions,
        backing_name: str | None,
        l1: array[int],
        refcount_table: array[int],
        snapshots: list[Snapshot],
        read_only: bool,
    ) -> None:
        self.child = child
        self.header = header
        self.ext = ext
        self.backing_name = backing_name
        self.size = header.size
        self.read_only = read_only
        self.filename = child.filename
        self.snapshots = snapshots
        cb = header.cluster_bits
        self._cb = cb
        self._cs = cs = 1 << cb
        self._cmask = cs - 1
        self.limits = Limits(cluster_size=cs)
        self._l2_bits = cb - 3
        self._l2_n = 1 << (cb - 3)
        self._l2_mask = self._l2_n - 1
        self._zero_flag = OFLAG_ZERO if header.version >= 3 else 0
        self._l1 = l1
        self._l1_off = header.l1_table_offset
        # refcounts
        self._rt = refcount_table
        self._rt_off = header.refcount_table_offset
        self._rt_clusters = header.refcount_table_clusters
        self._rc_order = header.refcount_order
        self._rc_bits = 1 << header.refcount_order
        self._rc_max = (1 << self._rc_bits) - 1
        self._rb_bits = cb + 3 - header.refcount_order  # log2(entries per refcount block)
        self._rb_mask = (1 << self._rb_bits) - 1
        # caches
        self._l2: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cap = max(4, L2_CACHE_BYTES >> cb)
        self._l2_pins: dict[int, int] = {}
        self._l2_loading: dict[int, trio.Event] = {}
        self._rb: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_cap = max(4, REFBLOCK_CACHE_BYTES >> cb)
        self._dcache: OrderedDict[int, bytes] = OrderedDict()
        # allocation state
        self._meta_lock = trio.Lock()
        self._claims: dict[int, trio.Event] = {}
        self._io_active = 0
        self._pending_decref: list[int] = []
        self._free_hint = 1
        self._resv = (0, 0)  # reserved clusters [start, end): refcount 1, not yet used
        self._resv_chunk = 1
        self._resv_max = max(1, RESERVATION_BYTES >> cb)
        self._hwm = (child.size + cs - 1) >> cb  # clusters at or above are not in the file yet
        self._data_clusters: int | None = None
        self._closed = False
        #: why the node stopped accepting writes (see "Failsafe" above); None while healthy
        self._broken: str | None = None
        self._broken_by_flush = False
        # compressed writing (see _cz_alloc): the area [_cz_pos, _cz_end) of host clusters
        # _cz_first.. whose refcounts were raised to _cz_cap; _cz_refs counts the compressed
        # clusters placed in each. _cz_pos == 0: no area.
        self._cz_pos = 0
        self._cz_end = 0
        self._cz_first = 0
        self._cz_refs: dict[int, int] = {}
        self._cz_cap = min(self._rc_max, max(1, cs // COMPRESSED_SECTOR))
        self._cz_chunk = 1
        self._cz_limiter = trio.CapacityLimiter(os.cpu_count() or 1)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, child: Node, ctx: object) -> Qcow2Node:
        """Read and validate the header and tables, then open the backing chain.

        :raise ImageError: a corrupt or hostile image, or an unsupported feature.
        """
        where = child.filename
        fsize = child.size
        first = await child.read(0, min(fsize, 4096)) if fsize else b""
        header = parse_header(first, fsize, where)
        cs = header.cluster_size
        if cs > len(first) and fsize > len(first):
            first = await child.read(0, min(fsize, cs))
        ext = parse_extensions(first, header, where)
        read_only = bool(getattr(ctx, "read_only", True)) or child.read_only
        if header.incompatible & Incompatible.CORRUPT and not read_only:
            raise ImageError(
                f"{where}: image is marked corrupt; run 'qemu-img check -r all' "
                "(or open it read-only)"
            )
        if header.incompatible & Incompatible.DIRTY and not read_only:
            raise ImageError(
                f"{where}: image is dirty (lazy refcounts not written back); run "
                "'qemu-img check -r all' before opening it read-write (read-only works)"
            )
        backing_name = None
        if header.backing_file_offset:
            raw = first[
                header.backing_file_offset : header.backing_file_offset + header.backing_file_size
            ]
            try:
                backing_name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ImageError(f"{where}: backing file name is not valid UTF-8") from None
            if not backing_name or "\0" in backing_name:
                raise ImageError(f"{where}: backing file name is invalid")
        # L1 table (bounded by parse_header: <= 32 MiB, inside the file)
        l1 = (
            _u64_table(await child.read(header.l1_table_offset, header.l1_size * 8))
            if (header.l1_size)
            else array("Q")
        )
        _check_entries(l1, L1E_OFFSET_MASK, cs, fsize, where, "L1 table")
        rt = _u64_table(
            await child.read(header.refcount_table_offset, header.refcount_table_clusters * cs)
        )
        _check_entries(rt, REFT_OFFSET_MASK, cs, fsize, where, "refcount table")
        check_metadata_layout(where, header, l1, rt)
        snapshots: list[Snapshot] = []
        if header.nb_snapshots:
            n = min(snapshot_table_bound(header.nb_snapshots), fsize - header.snapshots_offset)
            buf = await child.read(header.snapshots_offset, n)
            snapshots = parse_snapshots(buf, header.nb_snapshots, header, fsize, where)
        node = cls(child, header, ext, backing_name, l1, rt, snapshots, read_only)
        if not read_only:
            await node._check_for_writing()
        if backing_name is not None:
            open_backing = getattr(ctx, "open_backing", None)
            if open_backing is None:
                raise ImageError(f"{where}: has a backing file, but no way to open it")
            node.backing = await open_backing(
                backing_name, ext.backing_format, relative_to=child.filename
            )
        return node

    async def _check_for_writing(self) -> None:
        """Cheap consistency checks before the first write, and the autoclear rule."""
        where = self.filename
        for off, n in (
            (0, 1),
            (self._l1_off, (self.header.l1_size * 8 + self._cmask) >> self._cb),
            (self._rt_off, self._rt_clusters),
        ):
            for c in range(off >> self._cb, (off >> self._cb) + n):
                if await self._refcount(c) == 0:
                    raise ImageError(
                        f"{where}: metadata cluster {c} has refcount 0; run 'qemu-img check -r all'"
                    )
        if self.header.autoclear:
            # We do not maintain bitmaps: an implementation that writes must clear the bits.
            await self._meta_write("header_update", OFF_AUTOCLEAR, _BE_U64.pack(0))

    # -- the mapping function ------------------------------------------------------------------

    def _lookup(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """Map the guest range starting at ``offset`` (at most ``length`` bytes) to the first
        run of one kind: ``(kind, host, n)``. ``host`` is the host offset of ``offset`` for
        K_DATA/K_COW, the raw L2 entry for K_COMP, and 0 otherwise. Runs of data are contiguous
        on the host. Returns None when the L2 table is not cached (see :meth:`_map`).
        Synchronous: no await, so the answer is consistent with the tables at one instant."""
        cb = self._cb
        gc = offset >> cb
        l2i = gc & self._l2_mask
        inc = offset & self._cmask
        avail = ((self._l2_n - l2i) << cb) - inc
        if avail > length:
            avail = length
        l2off = self._l1[gc >> self._l2_bits] & L1E_OFFSET_MASK
        if not l2off:
            return K_UNALLOC, 0, avail
        table = self._l2.get(l2off)
        if table is None:
            return None
        self._l2.move_to_end(l2off)
        e = table[l2i]
        cs = self._cs
        n = cs - inc
        if e & OFLAG_COMPRESSED:
            return K_COMP, e, n if n < avail else avail
        if e & self._zero_flag:
            kind = K_ZERO
            host = 0
        else:
            host = e & L2E_OFFSET_MASK
            if not host:
                kind = K_UNALLOC
            else:
                if host & self._cmask:
                    raise ImageError(f"{self.filename}: L2 entry {e:#x} is not cluster aligned")
                kind = K_DATA if e & OFLAG_COPIED else K_COW
        zf = self._zero_flag
        if kind >= K_DATA:
            nxt = host + cs
            want = e & OFLAG_COPIED
            while n < avail:
                l2i += 1
                e = table[l2i]
                if (
                    (e & L2E_OFFSET_MASK) != nxt
                    or e & (OFLAG_COMPRESSED | zf)
                    or (e & OFLAG_COPIED) != want
                ):
                    break
                n += cs
                nxt += cs
            host += inc
        elif kind == K_ZERO:
            while n < avail:
                l2i += 1
                e = table[l2i]
                if not e & zf or e & OFLAG_COMPRESSED:
                    break
                n += cs
        else:
            while n < avail:
                l2i += 1
                e = table[l2i]
                if e & (L2E_OFFSET_MASK | OFLAG_COMPRESSED | zf):
                    break
                n += cs
        return kind, host, n if n < avail else avail

    async def _map(self, offset: int, length: int) -> tuple[int, int, int]:
        """:meth:`_lookup`, loading the L2 table first when needed."""
        while True:
            m = self._lookup(offset, length)
            if m is not None:
                return m
            await self._load_l2(self._l1[offset >> (self._cb + self._l2_bits)] & L1E_OFFSET_MASK)

    async def _load_l2(self, off: int) -> array[int]:
        while True:
            t = self._l2.get(off)
            if t is not None:
                return t
            ev = self._l2_loading.get(off)
            if ev is not None:
                await ev.wait()
                continue
            ev = self._l2_loading[off] = trio.Event()
            try:
                raw = await self.child.read(off, self._cs)
                t = _u64_table(raw)
                h = self.header
                regions = metadata_regions(
                    self._cb,
                    self._l1_off,
                    len(self._l1),
                    self._rt_off,
                    self._rt_clusters,
                    h.snapshots_offset,
                    h.nb_snapshots,
                )
                check_l2_table(self.filename, off, t, self._cb, regions)
                self._cache_l2(off, t)
                return t
            finally:
                del self._l2_loading[off]
                ev.set()

    def _cache_l2(self, off: int, t: array[int]) -> None:
        cache = self._l2
        cache[off] = t
        if len(cache) > self._l2_cap:
            pins = self._l2_pins
            for k in list(cache):
                if len(cache) <= self._l2_cap:
                    break
                if k not in pins and k != off:
                    del cache[k]

    def _pin(self, off: int) -> None:
        self._l2_pins[off] = self._l2_pins.get(off, 0) + 1

    def _unpin(self, off: int) -> None:
        n = self._l2_pins[off] - 1
        if n:
            self._l2_pins[off] = n
        else:
            del self._l2_pins[off]

    # -- reading -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        m = self._lookup(offset, length)
        if m is not None and m[2] == length and m[0] >= K_DATA and m[0] != K_COMP:
            self._io_active += 1
            try:
                return await self.child.read(m[1], length)
            finally:
                self._io_active -= 1
        self._io_active += 1
        try:
            return await self._read_range(offset, length)
        finally:
            self._io_active -= 1

    async def _read_range(self, offset: int, length: int) -> bytes:
        """Read guest bytes of this layer and its chain; past ``size`` reads zeroes."""
        out = bytearray(length)
        pos = 0
        if offset + length > self.size:
            length = max(0, self.size - offset)
        while pos < length:
            off = offset + pos
            kind, host, n = await self._map(off, length - pos)
            if kind == K_DATA or kind == K_COW:
                out[pos : pos + n] = await self.child.read(host, n)
            elif kind == K_UNALLOC:
                b = self.backing
                if b is not None and off < b.size:
                    r = min(n, b.size - off)
                    out[pos : pos + r] = await b.read(off, r)
            elif kind == K_COMP:
                data = await self._decompress(host)
                inc = off & self._cmask
                out[pos : pos + n] = data[inc : inc + n]
            pos += n
        return bytes(out)

    async def _decompress(self, entry: int) -> bytes:
        d = self._dcache.get(entry)
        if d is not None:
            return d
        cb = self._cb
        x = 62 - (cb - 8)
        coff = entry & ((1 << x) - 1)
        nsec = ((entry >> x) & ((1 << (cb - 8)) - 1)) + 1
        clen = nsec * 512 - (coff & 511)
        fsize = self.child.size
        if coff >= fsize:
            raise ImageError(f"{self.filename}: compressed cluster at {coff:#x} is past the end")
        raw = await self.child.read(coff, min(clen, fsize - coff))
        out = decompress_cluster(
            raw,
            self.header.compression_type,
            self._cs,
            f"{self.filename}: compressed cluster at {coff:#x}",
        )
        self._dcache[entry] = out
        if len(self._dcache) > DECOMPRESSED_CACHE_ENTRIES:
            self._dcache.popitem(last=False)
        return out

    # -- writing -------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        m = self._lookup(offset, len(data))
        if m is not None and m[0] == K_DATA and m[2] == len(data):
            self._io_active += 1
            try:
                await self.child.write(m[1], data)
            finally:
                self._io_active -= 1
            return
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        await self._write_slow(offset, data)

    async def _write_slow(self, offset: int, data: bytes) -> None:
        if self._broken is not None:
            raise self._refusal()
        length = len(data)
        pos = 0
        cb = self._cb
        while pos < length:
            off = offset + pos
            kind, host, n = await self._map(off, length - pos)
            if kind == K_DATA:
                self._io_active += 1
                try:
                    await self.child.write(host, data[pos : pos + n])
                finally:
                    self._io_active -= 1
                pos += n
                continue
            # Gather the following runs that need allocation too (same L2 table): one
            # allocation, one data write.
            gc = off >> cb
            limit = min(
                length - pos, ((self._l2_n - (gc & self._l2_mask)) << cb) - (off & self._cmask)
            )
            span = n
            while span < limit:
                m = self._lookup(off + span, limit - span)
                if m is None or m[0] == K_DATA:
                    break
                span += m[2]
            await self._write_alloc(off, data[pos : pos + span])
            pos += span

    async def _claim(self, g0: int, g1: int) -> trio.Event:
        """Claim guest clusters [g0, g1) for a metadata change; waits for other claims."""
        claims = self._claims
        while True:
            for g in range(g0, g1):
                ev = claims.get(g)
                if ev is not None:
                    break
            else:
                ev = trio.Event()
                for g in range(g0, g1):
                    claims[g] = ev
                return ev
            await ev.wait()

    def _release(self, g0: int, g1: int, ev: trio.Event) -> None:
        for g in range(g0, g1):
            del self._claims[g]
        ev.set()

    async def _write_alloc(self, offset: int, data: bytes) -> None:
        """Write ``data`` (within one L2 table) into newly allocated clusters, copying the
        uncovered head and tail of the first and last cluster from the current contents."""
        cb = self._cb
        cs = self._cs
        end = offset + len(data)
        g0 = offset >> cb
        g1 = (end + cs - 1) >> cb
        n = g1 - g0
        l1i = g0 >> self._l2_bits
        l2i = g0 & self._l2_mask
        ev = await self._claim(g0, g1)
        retry = False
        try:
            async with self._meta_lock:
                table, l2off = await self._writable_l2(l1i)
            try:
                olds = table[l2i : l2i + n]
                for e in olds:
                    if (
                        e & OFLAG_COPIED
                        and e & L2E_OFFSET_MASK
                        and not e & (OFLAG_COMPRESSED | self._zero_flag)
                    ):
                        retry = True  # someone allocated it while we waited for the claim
                        break
                if not retry:
                    head = offset - (g0 << cb)
                    tail = (g1 << cb) - end
                    async with self._meta_lock:
                        host = await self._alloc_clusters(n)
                    if head or tail:
                        parts = []
                        if head:
                            parts.append(await self._read_range(g0 << cb, head))
                        parts.append(data)
                        if tail:
                            parts.append(await self._read_range(end, tail))
                        buf = b"".join(parts)
                    else:
                        buf = data
                    self.child.debug_event("cluster_alloc")
                    await self.child.write(host, buf)
                    new = array("Q", [(host + (i << cb)) | OFLAG_COPIED for i in range(n)])
                    # disk first, then the table other tasks read without a lock
                    await self._meta_write("l2_update", l2off + l2i * 8, _be_bytes(new))
                    table[l2i : l2i + n] = new
                    self._forget(olds)
                    if self._data_clusters is not None:
                        self._data_clusters += n - sum(1 for e in olds if self._has_storage(e))
            finally:
                self._unpin(l2off)
        finally:
            self._release(g0, g1, ev)
        if retry:
            await self._write_slow(offset, data)

    def _has_storage(self, e: int) -> bool:
        return bool(e & OFLAG_COMPRESSED or e & L2E_OFFSET_MASK)

    def _forget(self, entries: Iterable[int]) -> None:
        """Queue the decrement of host clusters the given (replaced) L2 entries pointed to."""
        cb = self._cb
        pend = self._pending_decref
        for e in entries:
            if e & OFLAG_COMPRESSED:
                x = 62 - (cb - 8)
                coff = e & ((1 << x) - 1)
                nsec = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
                last = coff + nsec * 512 - (coff & 511) - 1
                pend.extend(range(coff >> cb, (last >> cb) + 1))
            elif e & L2E_OFFSET_MASK:
                pend.append((e & L2E_OFFSET_MASK) >> cb)

    async def _apply_pending(self, force: bool = False) -> None:
        """Apply queued decrements (caller holds ``_meta_lock``) once no request that might
        still touch a freed cluster is in flight."""
        if not self._pending_decref or (self._io_active and not force):
            return
        pend = self._pending_decref
        self._pending_decref = []
        # The L1/L2 writes that dropped these references must be on disk before a refcount
        # falls; otherwise a power loss could leave an entry pointing at a free cluster.
        await self._flush_child()
        deltas: dict[int, int] = {}
        for c in pend:
            deltas[c] = deltas.get(c, 0) - 1
        freed = await self._change_refcounts(deltas)
        if freed:
            self._dcache.clear()
            cs = self._cs
            for c in freed:
                try:
                    await self.child.discard(c << self._cb, cs)
                except BlockfsError:  # a hint only
                    log.debug("discard of freed cluster %d failed", c)

    async def _writable_l2(self, l1i: int) -> tuple[array[int], int]:
        """The L2 table for L1 index ``l1i``, allocated or copied so that this image alone
        references it (COPIED); returned pinned. Caller holds ``_meta_lock``."""
        l1e = self._l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & OFLAG_COPIED:
            t = await self._load_l2(off)
            self._pin(off)
            return t, off
        cb = self._cb
        host = await self._alloc_clusters(1)
        if off:
            src = await self._load_l2(off)
            new = array("Q", src)
            # the table is shared: its clusters are referenced twice now, except when the
            # old table's COPIED flag was merely missing (then recompute from refcounts)
            old_rc = await self._refcount(off >> cb)
            for i, e in enumerate(new):
                if e & OFLAG_COMPRESSED:
                    new[i] = e & ~OFLAG_COPIED
                elif e & L2E_OFFSET_MASK:
                    rc = await self._refcount((e & L2E_OFFSET_MASK) >> cb)
                    if old_rc <= 1 and rc == 1:
                        new[i] = e | OFLAG_COPIED
                    else:
                        new[i] = e & ~OFLAG_COPIED
        else:
            new = array("Q", bytes(self._cs))
        await self._meta_write("l2_alloc", host, _be_bytes(new))
        self._cache_l2(host, new)
        self._pin(host)
        entry = host | OFLAG_COPIED
        await self._meta_write("l1_update", self._l1_off + l1i * 8, _BE_U64.pack(entry))
        self._l1[l1i] = entry
        if off:
            freed = await self._change_refcounts({off >> cb: -1})
            if freed:
                self._l2.pop(off, None)
        return new, host

    # -- compressed writing --------------------------------------------------------------------
    #
    # Compressed clusters are packed one after another, on sector (512 B) boundaries, in an
    # *area* of host clusters taken from the allocator. A host cluster is referenced once by
    # every compressed cluster whose sectors touch it (so a refcount may exceed 1 without any
    # snapshot), and freed through the same pending decrements as any other cluster.
    #
    # Refcounts must be durable before an L2 entry that relies on them, yet a flush per
    # compressed cluster would be ruinous. So the area works like the reservation: when it is
    # taken, every cluster's refcount is raised at once to ``_cz_cap`` (the most compressed
    # clusters that can touch one host cluster) and flushed; placements only count in memory
    # (``_cz_refs``); when the area is left behind, the surplus ``_cz_cap - placed`` is given
    # back. A kill in between leaves refcounts too high: leaks, never a reference to a free
    # cluster. All ``_cz_*`` state is changed only under ``_meta_lock``.

    async def write_compressed(self, offset: int, data: bytes) -> None:
        """Overwrite the guest cluster at ``offset`` with ``data``, stored compressed with the
        image's compression type when that saves at least a sector (else written normally).

        ``offset`` is cluster aligned; ``data`` is one cluster, or for the last, shorter
        cluster of the disk exactly the bytes up to ``size``. Whatever the cluster held before
        (data, compressed, zero with or without space) is released. Returning means the data
        and the L2 entry reached the child, as for :meth:`write`.

        :raise ReadOnlyError: the image is open read-only.
        :raise UsageError: ``offset`` is not cluster aligned or ``data`` is not one cluster.
        :raise ImageError: corrupt metadata met on the way (a refcount would overflow, ...).
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self._broken is not None:
            raise self._refusal()
        cs = self._cs
        n = len(data)
        if (
            offset & self._cmask
            or not 0 <= offset < self.size
            or (n != cs and n != self.size - offset)
        ):
            raise UsageError(
                f"{self.filename}: a compressed write must cover exactly one cluster "
                f"(offset {offset}, length {n}, cluster size {cs})"
            )
        buf = data if n == cs else data + bytes(cs - n)
        if cs >= COMPRESS_IN_THREAD_BYTES:
            comp = await trio.to_thread.run_sync(self._compress, buf, limiter=self._cz_limiter)
        else:
            comp = self._compress(buf)
        if comp is None:
            await self.write(offset, data)
            return
        cb = self._cb
        g = offset >> cb
        l1i = g >> self._l2_bits
        l2i = g & self._l2_mask
        size = -(-len(comp) // COMPRESSED_SECTOR) * COMPRESSED_SECTOR
        x = 62 - (cb - 8)
        ev = await self._claim(g, g + 1)
        try:
            async with self._meta_lock:
                table, l2off = await self._writable_l2(l1i)
            try:
                async with self._meta_lock:
                    coff = await self._cz_alloc(size)
                assert coff < 1 << x and not coff % COMPRESSED_SECTOR
                # whole sectors: the file never ends inside one, and a stale tail is never read
                self.child.debug_event("cluster_alloc")
                await self.child.write(coff, comp + bytes(size - len(comp)))
                entry = OFLAG_COMPRESSED | ((size // COMPRESSED_SECTOR - 1) << x) | coff
                old = table[l2i]  # the claim keeps it; no await between here and the swap
                # data before the entry, disk before the table other tasks read without a lock
                await self._meta_write("l2_update", l2off + l2i * 8, _BE_U64.pack(entry))
                table[l2i] = entry
                self._forget((old,))
                if self._data_clusters is not None and not self._has_storage(old):
                    self._data_clusters += 1
            finally:
                self._unpin(l2off)
        finally:
            self._release(g, g + 1, ev)
        if self._pending_decref and not self._io_active:
            async with self._meta_lock:
                await self._apply_pending()

    def _compress(self, buf: bytes) -> bytes | None:
        """``buf`` (one cluster) compressed as the image says, or None when that saves less
        than a sector. zlib is raw deflate with a 4 KiB window, as readers of qcow2 expect."""
        if self.header.compression_type == CompressionType.ZSTD:
            import zstandard

            out = zstandard.ZstdCompressor().compress(buf)
        else:
            z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12)
            out = z.compress(buf) + z.flush()
        return out if len(out) <= self._cs - COMPRESSED_SECTOR else None

    async def _cz_alloc(self, size: int) -> int:
        """Hand out ``size`` bytes (whole sectors, at most a cluster) of compressed space and
        count the reference in every host cluster they touch. Caller holds ``_meta_lock``."""
        cb = self._cb
        refs = self._cz_refs
        while True:
            pos = self._cz_pos
            if pos and pos + size <= self._cz_end:
                c = pos >> cb
                if refs.get(c, 0) < self._cz_cap:
                    # any further cluster touched starts at a boundary: nothing placed in it yet
                    for t in range(c, ((pos + size - 1) >> cb) + 1):
                        refs[t] = refs.get(t, 0) + 1
                    self._cz_pos = pos + size
                    return pos
                self._cz_pos = (c + 1) << cb  # its refcount cannot count one more
                continue
            await self._cz_grow(size)

    async def _cz_grow(self, size: int) -> None:
        """Take more host clusters for compressed data; if they follow the area directly, it
        goes on (a compressed cluster may then span the boundary), else a new area starts."""
        cb = self._cb
        n = max(self._cz_chunk, (size + self._cmask) >> cb)
        self._cz_chunk = min(self._cz_chunk * 2, max(1, COMPRESSED_AREA_BYTES >> cb))
        start = await self._alloc_clusters(n)  # refcount 1, durable
        c0 = start >> cb
        if self._cz_cap > 1:
            await self._change_refcounts({c: self._cz_cap - 1 for c in range(c0, c0 + n)})
            await self._flush_child()  # before any L2 entry relies on them
        if self._cz_pos and start == self._cz_end:
            self._cz_end = start + (n << cb)
            await self._cz_settle(self._cz_pos >> cb)
        else:
            await self._cz_release()
            self._cz_pos = start
            self._cz_end = start + (n << cb)
            self._cz_first = c0

    async def _cz_settle(self, upto: int) -> None:
        """Give back the surplus references of area clusters below ``upto`` (nothing more can
        be placed there). Caller holds ``_meta_lock``."""
        deltas = {c: self._cz_refs.pop(c, 0) - self._cz_cap for c in range(self._cz_first, upto)}
        self._cz_first = max(self._cz_first, upto)
        if deltas:
            # A cluster only drops to 0 here when nothing was ever placed in it.
            await self._change_refcounts(deltas)

    async def _cz_release(self) -> None:
        """Leave the compressed area (before a new one, and at close)."""
        if not self._cz_pos:
            return
        end = self._cz_end >> self._cb
        self._cz_pos = self._cz_end = 0
        await self._cz_settle(end)

    # -- refcounts and allocation (all under _meta_lock) ---------------------------------------

    def _rc_get(self, blk: bytearray, j: int) -> int:
        w = self._rc_bits
        if w >= 8:
            nb = w >> 3
            return int.from_bytes(blk[j * nb : (j + 1) * nb], "big")
        bit = j * w
        return (blk[bit >> 3] >> (bit & 7)) & self._rc_max

    def _rc_set(self, blk: bytearray, j: int, v: int) -> tuple[int, int]:
        """Set entry ``j``; returns the byte range written."""
        w = self._rc_bits
        if w >= 8:
            nb = w >> 3
            blk[j * nb : (j + 1) * nb] = v.to_bytes(nb, "big")
            return j * nb, (j + 1) * nb
        bit = j * w
        i = bit >> 3
        sh = bit & 7
        blk[i] = (blk[i] & ~(self._rc_max << sh)) | (v << sh)
        return i, i + 1

    async def _refblock(self, off: int) -> bytearray:
        blk = self._rb.get(off)
        if blk is None:
            blk = bytearray(await self.child.read(off, self._cs))
            self._rb[off] = blk
            while len(self._rb) > self._rb_cap:
                self._rb.popitem(last=False)
        else:
            self._rb.move_to_end(off)
        return blk

    async def _refcount(self, c: int) -> int:
        rti = c >> self._rb_bits
        if rti >= len(self._rt):
            return 0
        off = self._rt[rti] & REFT_OFFSET_MASK
        if not off:
            return 0
        return self._rc_get(await self._refblock(off), c & self._rb_mask)

    async def _change_refcounts(self, deltas: dict[int, int]) -> list[int]:
        """Add ``deltas`` (cluster index -> delta) to refcounts, one write per refcount block.
        Blocks must exist for increments (see :meth:`_alloc_clusters`). Returns the clusters
        whose refcount dropped to 0.

        :raise ImageError: a refcount would overflow or go negative (a corrupt image).
        """
        by_block: dict[int, list[tuple[int, int]]] = {}
        for c, d in deltas.items():
            if d:
                by_block.setdefault(c >> self._rb_bits, []).append((c, d))
        freed: list[int] = []
        for rti, items in sorted(by_block.items()):
            off = self._rt[rti] & REFT_OFFSET_MASK if rti < len(self._rt) else 0
            if not off:
                raise ImageError(
                    f"{self.filename}: refcount block for cluster "
                    f"{items[0][0]} is missing; run 'qemu-img check -r all'"
                )
            blk = await self._refblock(off)
            lo, hi = self._cs, 0
            for c, d in items:
                j = c & self._rb_mask
                v = self._rc_get(blk, j) + d
                if v < 0 or v > self._rc_max:
                    raise ImageError(
                        f"{self.filename}: refcount of cluster {c} would become "
                        f"{v}; run 'qemu-img check -r all'"
                    )
                a, b = self._rc_set(blk, j, v)
                lo = min(lo, a)
                hi = max(hi, b)
                if v == 0:
                    freed.append(c)
            await self._meta_write("refblock_update", off + lo, bytes(blk[lo:hi]))
        if freed:
            self._free_hint = max(1, min(self._free_hint, min(freed)))
        return freed

    async def _alloc_clusters(self, n: int) -> int:
        """Allocate ``n`` contiguous free host clusters and return the host offset of the
        first. Caller holds ``_meta_lock``.

        Clusters come from a reservation: a run whose refcounts were already written as 1, so
        that most allocations cost no I/O under the lock. A kill leaves the unused rest of the
        reservation as leaked clusters (never as referenced free ones); ``aclose`` returns it.
        """
        r0, r1 = self._resv
        if r1 - r0 >= n:
            self._resv = (r0 + n, r1)
            return r0 << self._cb
        await self._release_reservation()
        want = max(n, self._resv_chunk)
        self._resv_chunk = min(self._resv_chunk * 2, self._resv_max)
        start = await self._alloc_now(want) >> self._cb
        # Refcounts before the L2/L1 entries that use them, across a power loss too (QEMU's
        # cache dependency): one flush per reservation, not per allocation.
        await self._flush_child()
        self._resv = (start + n, start + want)
        return start << self._cb

    async def _release_reservation(self) -> None:
        r0, r1 = self._resv
        self._resv = (0, 0)
        if r1 > r0:
            await self._change_refcounts({c: -1 for c in range(r0, r1)})

    async def _alloc_now(self, n: int) -> int:
        await self._apply_pending()
        while True:
            start = await self._find_free(n)
            if await self._ensure_refblocks(start, n):
                break
        self._check_not_metadata(start, n)
        await self._change_refcounts({c: 1 for c in range(start, start + n)})
        self._free_hint = start + n
        self._hwm = max(self._hwm, start + n)
        return start << self._cb

    def _check_not_metadata(self, start: int, n: int) -> None:
        """Refuse to hand out clusters that the image's own tables use: a refcount of 0 there
        means corrupt refcounts, and writing would destroy metadata (QEMU's overlap check)."""
        cb = self._cb
        end = start + n

        def overlaps(off: int, length: int) -> bool:
            first = off >> cb
            return first < end and (off + length + self._cmask) >> cb > start

        h = self.header
        spans = [
            (0, self._cs),
            (self._l1_off, len(self._l1) * 8),
            (self._rt_off, self._rt_clusters * self._cs),
        ]
        if h.nb_snapshots:
            spans.append((h.snapshots_offset, SNAPSHOT_ENTRY_MIN * h.nb_snapshots))
        bad = any(overlaps(o, ln) for o, ln in spans if ln)
        if not bad:
            for table, mask in ((self._l1, L1E_OFFSET_MASK), (self._rt, REFT_OFFSET_MASK)):
                for e in table:
                    c = (e & mask) >> cb
                    if c and start <= c < end:
                        bad = True
                        break
        if bad:
            raise ImageError(
                f"{self.filename}: refcounts are corrupt (metadata in clusters {start}..{end - 1} "
                "counted free); run 'qemu-img check -r all'"
            )

    async def _find_free(self, n: int) -> int:
        """The first cluster of a run of ``n`` free clusters at or after the free hint. Scans
        whole refcount blocks without an await per entry (first allocation in a big image)."""
        i = max(1, self._free_hint)
        start = i
        run = 0
        rbb = self._rb_bits
        typecode: Literal["B", "H", "I", "Q"] | None = _RC_TYPECODES.get(self._rc_order)
        while run < n:
            rti = i >> rbb
            if rti >= len(self._rt):
                return start if run else i  # everything past the table is free
            off = self._rt[rti] & REFT_OFFSET_MASK
            end = (rti + 1) << rbb
            if not off:  # no block: the whole range is free
                if run == 0:
                    start = i
                take = min(n - run, end - i)
                run += take
                i += take
                continue
            blk = await self._refblock(off)
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

    async def _ensure_refblocks(self, start: int, n: int) -> bool:
        """Make sure refcount blocks cover clusters [start, start+n), placing missing blocks
        outside that run. Returns False when the refcount table had to grow (then the caller
        searches again, as the new table may sit where the run was)."""
        rbb = self._rb_bits
        for rti in range(start >> rbb, ((start + n - 1) >> rbb) + 1):
            if rti >= len(self._rt):
                await self._grow_refcount_table(rti + 1)
                return False
            c = start + n
            while not self._rt[rti] & REFT_OFFSET_MASK:
                while await self._refcount(c):
                    c += 1
                r = c >> rbb
                if r >= len(self._rt):
                    await self._grow_refcount_table(r + 1)
                    return False
                if not self._rt[r] & REFT_OFFSET_MASK:
                    # every cluster of range r is free: its block lives in it and counts itself
                    await self._new_refblock(r, c, self_counted=True)
                else:
                    await self._new_refblock(rti, c, self_counted=False)
                c += 1
        return True

    async def _new_refblock(self, rti: int, c: int, self_counted: bool) -> None:
        blk = bytearray(self._cs)
        if self_counted:
            self._rc_set(blk, c & self._rb_mask, 1)
        else:
            await self._change_refcounts({c: 1})  # counted by the existing block covering c
        entry = c << self._cb
        await self._meta_write("refblock_alloc", entry, bytes(blk))
        await self._meta_write("reftable_update", self._rt_off + rti * 8, _BE_U64.pack(entry))
        self._rt[rti] = entry
        self._rb[entry] = blk
        self._hwm = max(self._hwm, c + 1)

    async def _grow_refcount_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at the end of the file, with the refcount
        blocks that cover the new table itself."""
        cb = self._cb
        cs = self._cs
        rbb = self._rb_bits
        old = self._rt
        old_len = len(old)
        end = max((self.child.size + cs - 1) >> cb, self._hwm)
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
        if tc * cs > 8 * 1024 * 1024 * 8:
            raise ImageError(f"{self.filename}: refcount table would grow too large")
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
            await self._meta_write("refblock_alloc", new_rt[r], bytes(blk))
        if existing:
            await self._change_refcounts(existing)
        await self._meta_write("reftable_grow", end << cb, _be_bytes(new_rt))
        await self._meta_write(
            "header_update", OFF_REFCOUNT_TABLE, struct.pack(">QI", end << cb, tc)
        )
        old_off, old_clusters = self._rt_off, self._rt_clusters
        self._rt = new_rt
        self._rt_off = end << cb
        self._rt_clusters = tc
        for r, blk in blocks.items():
            self._rb[new_rt[r]] = blk
        self._hwm = max(self._hwm, end + tc + nb)
        await self._change_refcounts(
            {c: -1 for c in range(old_off >> cb, (old_off >> cb) + old_clusters)}
        )

    # -- zeroes and discard --------------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self._broken is not None:
            raise self._refusal()
        await self._zero_or_discard(offset, length, may_unmap, discard=False)

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self._broken is not None:
            raise self._refusal()
        await self._zero_or_discard(offset, length, True, discard=True)

    async def _zero_or_discard(self, offset: int, length: int, unmap: bool, discard: bool) -> None:
        cs = self._cs
        end = offset + length
        a = (offset + cs - 1) & ~self._cmask
        b = end & ~self._cmask
        if end == self.size:
            b = (end + cs - 1) & ~self._cmask  # the tail cluster past size counts as whole
        if not discard:
            if a >= b:
                await self._write_zero_bytes(offset, length)
                return
            if offset < a:
                await self._write_zero_bytes(offset, a - offset)
            if b < end:
                await self._write_zero_bytes(b, end - b)
        if a >= b:
            return  # discard of less than a cluster: a hint we may ignore
        if not self._zero_flag and self.backing is not None:
            if not discard:
                await self._write_zero_bytes(a, min(b, end) - a)
            return  # v2 with a backing file cannot express "zero" without data
        cb = self._cb
        g = a >> cb
        gend = b >> cb
        while g < gend:
            g1 = min(gend, ((g >> self._l2_bits) + 1) << self._l2_bits)
            await self._zero_clusters(g, g1, unmap, discard)
            g = g1

    async def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1024 * 1024
        while length > 0:
            n = min(chunk, length)
            await self.write(offset, bytes(n))
            offset += n
            length -= n

    async def _zero_clusters(self, g0: int, g1: int, unmap: bool, discard: bool) -> None:
        """Make guest clusters [g0, g1) (within one L2 table) read as zeroes."""
        has_backing = self.backing is not None
        l1i = g0 >> self._l2_bits
        l2i = g0 & self._l2_mask
        n = g1 - g0
        ev = await self._claim(g0, g1)
        try:
            if not self._l1[l1i] & L1E_OFFSET_MASK and not has_backing:
                return  # nothing allocated, nothing beneath: reads zeroes already
            async with self._meta_lock:
                table, l2off = await self._writable_l2(l1i)
            try:
                olds = table[l2i : l2i + n]
                new = array("Q", olds)
                zf = self._zero_flag
                for i, e in enumerate(olds):
                    if not has_backing and (discard or unmap or not zf):
                        new[i] = 0
                    elif (
                        not unmap
                        and zf
                        and e & OFLAG_COPIED
                        and e & L2E_OFFSET_MASK
                        and not e & OFLAG_COMPRESSED
                    ):
                        new[i] = (e & (L2E_OFFSET_MASK | OFLAG_COPIED)) | zf  # keep the space
                    else:
                        new[i] = zf
                if new == olds:
                    return
                await self._meta_write("l2_update", l2off + l2i * 8, _be_bytes(new))
                table[l2i : l2i + n] = new
                dropped = [
                    o
                    for o, e in zip(olds, new, strict=True)
                    if self._has_storage(o) and not (e & L2E_OFFSET_MASK)
                ]
                self._forget(dropped)
                if self._data_clusters is not None:
                    self._data_clusters -= len(dropped)
            finally:
                self._unpin(l2off)
        finally:
            self._release(g0, g1, ev)
        if self._pending_decref and not self._io_active:
            async with self._meta_lock:
                await self._apply_pending()

    # -- status, flush, close ------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        kind, _, n = await self._map(offset, length)
        if kind == K_UNALLOC:
            st = Status(0)
        elif kind == K_ZERO:
            st = Status.ZERO | Status.ALLOCATED
        else:
            st = Status.DATA | Status.ALLOCATED
        return Extent(offset, n, st)

    async def allocated_bytes(self) -> int:
        if self._data_clusters is None:
            count = 0
            for l1e in self._l1:
                off = l1e & L1E_OFFSET_MASK
                if off:
                    t = self._l2.get(off)
                    if t is None:
                        t = _u64_table(await self.child.read(off, self._cs))
                    count += sum(1 for e in t if e & (OFLAG_COMPRESSED | L2E_OFFSET_MASK))
            if self._data_clusters is None:
                self._data_clusters = count
        return self._data_clusters << self._cb

    async def flush(self) -> None:
        if self.read_only:
            return
        if self._broken_by_flush:
            raise self._refusal()
        if self._broken is None:
            async with self._meta_lock:
                await self._apply_pending()
        # Broken by a failed write, the node still makes what it acknowledged durable.
        await self._flush_child()

    # -- failsafe (see the module docstring) ---------------------------------------------------

    async def _meta_write(self, event: str, offset: int, data: bytes) -> None:
        """The one way metadata reaches the child: announced first as ``event``; a failure
        stops the node (:meth:`_break`) before the error goes on to the caller."""
        if self._broken is not None:
            raise self._refusal()
        self.child.debug_event(event)
        try:
            await self.child.write(offset, data)
        except Exception as exc:
            self._break(f"{event} write failed", exc)
            raise

    async def _flush_child(self) -> None:
        """Flush the child; a failure stops the node and makes every later flush fail (the
        kernel may have dropped the dirty pages whose write-back failed)."""
        try:
            await self.child.flush()
        except Exception as exc:
            self._break("flush failed", exc, by_flush=True)
            raise

    def _break(self, what: str, exc: Exception, *, by_flush: bool = False) -> None:
        self._broken_by_flush |= by_flush
        if self._broken is not None:
            return
        self._broken = f"{what}: {exc}"
        log.error(
            "%s: %s: %s; the image refuses writes until it is reopened (reads go on; "
            "'qemu-img check' shows at most leaks)",
            self.filename,
            what,
            exc,
        )

        # The mapped-write fast path stays free of a check: the entry points are shadowed.
        async def refuse(*args: object, **kwargs: object) -> None:
            raise self._refusal()

        for name in ("write", "write_zeroes", "discard", "write_compressed"):
            setattr(self, name, refuse)

    def _refusal(self) -> BlockfsError:
        return BlockfsError(
            f"{self.filename}: stopped writing after a failure ({self._broken}); reopen the image",
            errno=errno.EIO,
        )

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # A broken node writes no more metadata: what is on disk is consistent as it is.
            if not self.read_only and self._broken is None:
                async with self._meta_lock:
                    await self._apply_pending(force=True)
                    await self._cz_release()
                    await self._release_reservation()
        finally:
            await self.child.aclose()

    def drop_caches(self) -> None:
        """Forget cached tables (after snapshot operations rewrote them)."""
        self._l2.clear()
        self._rb.clear()
        self._dcache.clear()
        self._data_clusters = None

    def describe(self) -> dict[str, object]:
        d = super().describe()
        h = self.header
        d.update(
            {
                "cluster-size": self._cs,
                "compat": "0.10" if h.version == 2 else "1.1",
                "backing-filename": self.backing_name,
                "backing-format": self.ext.backing_format,
                "dirty-flag": bool(h.incompatible & Incompatible.DIRTY),
                "corrupt": bool(h.incompatible & Incompatible.CORRUPT),
                "lazy-refcounts": bool(h.compatible & Compatible.LAZY_REFCOUNTS),
                "refcount-bits": self._rc_bits,
                "compression-type": "zstd"
                if h.compression_type == CompressionType.ZSTD
                else "zlib",
                "extended-l2": False,
                "bitmaps": bool(self.ext.has_bitmaps and h.autoclear & Autoclear.BITMAPS),
                "snapshots": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "vm-state-size": s.vm_state_size,
                        "date-sec": s.date_sec,
                        "date-nsec": s.date_nsec,
                        "vm-clock-nsec": s.vm_clock_nsec,
                        "disk-size": s.disk_size,
                    }
                    for s in self.snapshots
                ],
            }
        )
        return d


def _check_entries(
    table: array[int], mask: int, cs: int, fsize: int, where: str, what: str
) -> None:
    """Every table entry must point to a cluster-aligned offset inside the file."""
    for e in table:
        if e:
            off = e & mask
            if off & (cs - 1) or off >= fsize:
                raise ImageError(f"{where}: {what} entry {e:#x} points outside the image")
            if off == 0 and e & ~(1 << 63):
                raise ImageError(f"{where}: {what} entry {e:#x} points to the header")


__all__ = ["FORMAT_NAME", "Qcow2Node", "create_qcow2", "open_node", "probe"]
