"""The qcow2 node: QEMU's copy-on-write image format, read and written in place.

What lives here: opening (header, extensions, tables, backing chain), the one mapping function
(:meth:`Qcow2Node._lookup`) that serves read, write and block_status with its fast path, the L2
tables (claims, copy-on-write of shared tables, zeroes and discard), the failsafe, and the small
interface the snapshot code (``snapshot.py``) and jobs use to rewrite tables and the header.
Refcounts and allocation are in ``refcount.py``, the table cache in ``nodes/cache.py``, compressed
clusters in ``compressed.py``, on-disk structures in ``format.py``, creation in ``create.py``.

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
* Refcounts are always exact (no lazy refcounts, the dirty bit is never set; ``refcount.py``).
* Only metadata updates are serialised (``_meta_lock``: allocation, refcounts, L1 changes, the
  compressed area, the header). A guest cluster being allocated, zeroed or discarded is
  *claimed* (``_claims``) so that two requests never allocate it twice; reads and in-place
  writes take no lock at all.
* A freed host cluster is not reused while a read or an in-place write that may have looked it
  up is in flight (``_io_active``): decrements wait in ``_pending_decref`` until none is.
* The FUSE reader threads (``blockfs.fuseloop``) read and write allocated clusters whose L2
  table is cached, and read zero clusters, without the event loop (:meth:`direct_io`): they
  count themselves in ``_direct_active`` (under a thread lock) *before* they look the cluster
  up, and the decrements wait for that count too. The table update that drops a reference
  comes before the decrement is queued, so a thread that counts itself after the event loop
  saw no one in flight looks the cluster up in the new table. A read of an unallocated
  cluster goes on to the backing node's own direct path (the chain changes only while the
  export is quiesced). Anything else (a compressed cluster, a table not in the cache, a
  backing file without a direct path, any write needing metadata) is declined and goes to
  the event loop.
* L2 tables that a task is about to change are pinned in the cache (never evicted), so that a
  reload can never bring back a stale copy (``nodes/cache.py``).
* Compressed clusters (:meth:`Qcow2Node.write_compressed`) are packed into an area whose
  refcounts were raised, and flushed, beforehand (``compressed.py``). A kill leaves leaks.
* Failsafe: every metadata write passes :meth:`Qcow2Node.write_metadata` and every flush of the
  child :meth:`Qcow2Node.flush_child` (``refcount.py`` and ``snapshot.py`` write only through
  them). When one fails (EIO, ENOSPC, an injected fault), the in-memory tables may no longer
  match the disk (a refcount block is changed in memory before it is written; after a failed
  fsync the kernel may have dropped dirty metadata pages), so the node stops there, as if the
  process had been killed at that instant, which the order above makes safe: every later
  write, zero, discard and metadata write fails with EIO (one log line names the image), reads
  go on, close writes no metadata, and after a failed flush every later flush fails too.
  Reopening the image starts afresh from what is on disk (leaks at most). A failed data write
  (in place, or into clusters not yet referenced) changes no metadata and needs no failsafe.
* Each metadata write is announced to the child first (``debug_event``: the error-injection
  filter's hook, a no-op on a file; the names are :data:`blockfs.nodes.inject.EVENTS`, plus
  ``l1_alloc`` and ``snapshot_table`` from snapshot operations, which never run on a mount); a
  mapped read or write announces nothing.
* The fast path (:meth:`Qcow2Node.read`, :meth:`Qcow2Node.write` of an allocated cluster) is
  one cached lookup and one child call: it holds the cache's dict itself (``_l2``) and must not
  gain a call, an await or an attribute hop.

Not done here: lazy refcounts, extended L2 entries, external data files, encryption (refused
at open with a clear error), resizing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable

import trio

from blockfs.errors import BlockfsError, ImageError, ReadOnlyError, UsageError
from blockfs.nodes.base import (
    Capability,
    DirectIo,
    Extent,
    Limits,
    Node,
    Status,
    fill_zeroes,
    read_below_direct,
)
from blockfs.nodes.cache import TableCache
from blockfs.nodes.failsafe import FailsafeNode
from blockfs.nodes.qcow2.compressed import (
    SECTOR,
    CompressedArea,
    CompressedEntry,
    compress_cluster,
    decompress_cluster,
)
from blockfs.nodes.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFF_AUTOCLEAR,
    OFF_L1,
    OFF_SNAPSHOTS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SNAPSHOT_ENTRY,
    SNAPSHOT_EXTRA,
    SNAPSHOT_ICOUNT,
    Autoclear,
    BitmapInfo,
    Compatible,
    CompressionType,
    Extensions,
    Header,
    Incompatible,
    Snapshot,
    bitmap_directory_span,
    check_l2_table,
    check_metadata_layout,
    header_cluster_with_backing,
    metadata_regions,
    pack_u64_table,
    parse_bitmap_directory,
    parse_extensions,
    parse_header,
    parse_snapshots,
    snapshot_table_bound,
    unpack_u64_table,
)
from blockfs.nodes.qcow2.refcount import Refcounts

log = logging.getLogger(__name__)

# Kinds of run the mapping function returns.
K_UNALLOC = 0  # not allocated in this layer: the backing file answers (or zeroes)
K_ZERO = 1  # reads as zeroes (v3 zero flag, with or without a preallocated host cluster)
K_DATA = 2  # a standard cluster with refcount 1 (COPIED): may be rewritten in place
K_COW = 3  # a standard cluster without COPIED (shared with a snapshot): copy before writing
K_COMP = 4  # a compressed cluster (one cluster per run; ``host`` is the raw L2 entry)

_BE_U64 = struct.Struct(">Q")

#: budget of the L2 cache, in bytes of tables (at least a few tables)
L2_CACHE_BYTES = 8 * 1024 * 1024
DECOMPRESSED_CACHE_ENTRIES = 8
#: compressing a cluster this big is worth a hop to a worker thread (zlib/zstd release the GIL)
COMPRESS_IN_THREAD_BYTES = 64 * 1024


class Qcow2Node(FailsafeNode):
    """A qcow2 image over one child node (normally a ``file`` node)."""

    GUARDED = ("write", "write_zeroes", "discard", "write_compressed")
    AFTER_BREAK = "'qemu-img check' shows at most leaks"

    format_name = "qcow2"
    capabilities = (
        Capability.ZERO | Capability.DISCARD | Capability.EXTENTS | Capability.COMPRESSED_WRITES
    )

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
        #: the persistent dirty bitmaps the image had when opened (only their names and
        #: flags: blockfs does not keep them, and clears the autoclear bit on writing)
        self.bitmaps: list[BitmapInfo] = []
        cb = header.cluster_bits
        self.cluster_bits = self._cb = cb
        self.cluster_size = self._cs = cs = 1 << cb
        self._cmask = cs - 1
        self.limits = Limits(cluster_size=cs)
        self._l2_bits = cb - 3
        self._l2_n = 1 << (cb - 3)
        self._l2_mask = self._l2_n - 1
        self._zero_flag = OFLAG_ZERO if header.version >= 3 else 0
        self._l1 = l1
        self._l1_off = header.l1_table_offset
        #: the L2 tables by host offset; ``_l2`` is its dict, held for the fast path
        self.l2_cache: TableCache[array[int]] = TableCache(max(4, L2_CACHE_BYTES >> cb))
        self._l2 = self.l2_cache.tables
        self._dcache: OrderedDict[int, bytes] = OrderedDict()
        self._meta_lock = trio.Lock()
        self._claims: dict[int, trio.Event] = {}
        self._io_active = 0
        #: reader threads inside :meth:`_read_direct` / :meth:`_write_direct` (see above)
        self._direct_active = 0
        self._direct_lock = threading.Lock()
        self._pending_decref: list[int] = []
        self._data_clusters: int | None = None
        self._closed = False
        # the failsafe (see "Failsafe" above; blockfs.nodes.failsafe)
        self._init_failsafe()
        self.refcounts = Refcounts(
            child,
            self,
            header,
            refcount_table,
            other_tables=self._table_in,
            before_search=self._apply_pending,
        )
        self._compressed = CompressedArea(self.refcounts, self.flush_child, cb)
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
                f"{where}: image is marked corrupt; run 'blockfs check -r all' "
                "(or open it read-only)"
            )
        if header.incompatible & Incompatible.DIRTY and not read_only:
            raise ImageError(
                f"{where}: image is dirty (lazy refcounts not written back); run "
                "'blockfs check -r all' before opening it read-write (read-only works)"
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
            unpack_u64_table(await child.read(header.l1_table_offset, header.l1_size * 8))
            if (header.l1_size)
            else array("Q")
        )
        _check_entries(l1, L1E_OFFSET_MASK, cs, fsize, where, "L1 table")
        rt = unpack_u64_table(
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
        if ext.bitmap_directory is not None and header.autoclear & Autoclear.BITMAPS:
            # Read before _check_for_writing clears the autoclear bit: what the image held.
            nb, doff, dsize = bitmap_directory_span(ext, fsize, where)
            node.bitmaps = parse_bitmap_directory(await child.read(doff, dsize), nb, where)
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
            (self.refcounts.table_offset, self.refcounts.table_clusters),
        ):
            for c in range(off >> self._cb, (off >> self._cb) + n):
                if await self.refcounts.get(c) == 0:
                    raise ImageError(
                        f"{where}: metadata cluster {c} has refcount 0; run 'blockfs check -r all'"
                    )
        if self.header.autoclear:
            # We do not maintain bitmaps: an implementation that writes must clear the bits.
            await self.write_metadata("header_update", OFF_AUTOCLEAR, _BE_U64.pack(0))

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
        return await self.l2_cache.load(off, self._read_l2)

    async def _read_l2(self, off: int) -> array[int]:
        t = unpack_u64_table(await self.child.read(off, self._cs))
        h = self.header
        regions = metadata_regions(
            self._cb,
            self._l1_off,
            len(self._l1),
            self.refcounts.table_offset,
            self.refcounts.table_clusters,
            h.snapshots_offset,
            h.nb_snapshots,
        )
        check_l2_table(self.filename, off, t, self._cb, regions)
        return t

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
        ce = CompressedEntry.decode(entry, self._cb)
        coff = ce.host_offset
        fsize = self.child.size
        if coff >= fsize:
            raise ImageError(f"{self.filename}: compressed cluster at {coff:#x} is past the end")
        raw = await self.child.read(coff, min(ce.length, fsize - coff))
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

    # -- the data path of the FUSE reader threads ------------------------------------------------

    def direct_io(self) -> DirectIo | None:
        below = self.child.direct_io()
        if below is None or below.write is None:
            return None
        child_read, child_write = below.readinto, below.write

        def read(offset: int, view: memoryview) -> bool:
            return self._read_direct(offset, view, child_read)

        def write(offset: int, view: memoryview) -> bool:
            return self._write_direct(offset, view, child_write)

        return DirectIo(read, write)

    def _direct_map(self, offset: int, length: int) -> tuple[int, int, int] | None:
        try:
            return self._lookup(offset, length)
        except KeyError:  # the table left the cache between get() and move_to_end()
            return None

    def _read_direct(
        self, offset: int, view: memoryview, child_read: Callable[[int, memoryview], bool]
    ) -> bool:
        lock = self._direct_lock
        with lock:
            self._direct_active += 1
        try:
            length = len(view)
            m = self._direct_map(offset, length)
            if m is None or m[2] != length:
                return False
            kind = m[0]
            if kind == K_DATA or kind == K_COW:
                return child_read(m[1], view)
            if kind == K_ZERO:
                fill_zeroes(view)
                return True
            if kind == K_UNALLOC:
                return read_below_direct(self.backing, offset, view)
            return False
        finally:
            with lock:
                self._direct_active -= 1

    def _write_direct(
        self, offset: int, view: memoryview, child_write: Callable[[int, memoryview], bool]
    ) -> bool:
        if self.read_only or self._broken is not None:
            return False
        lock = self._direct_lock
        with lock:
            self._direct_active += 1
        try:
            m = self._direct_map(offset, len(view))
            if m is None or m[0] != K_DATA or m[2] != len(view):
                return False
            return child_write(m[1], view)
        finally:
            with lock:
                self._direct_active -= 1

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
                        host = await self.refcounts.alloc(n)
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
                    try:
                        await self.child.write(host, buf)
                    except BaseException:
                        # Nothing refers to the new clusters yet: give them back, or a
                        # target that fills up would leak a little at every failed write.
                        if not self.refcounts.give_back(host, n):
                            first = host >> cb
                            self._pending_decref.extend(range(first, first + n))
                        raise
                    new = array("Q", [(host + (i << cb)) | OFLAG_COPIED for i in range(n)])
                    # disk first, then the table other tasks read without a lock
                    await self.write_metadata("l2_update", l2off + l2i * 8, pack_u64_table(new))
                    table[l2i : l2i + n] = new
                    self._forget(olds)
                    if self._data_clusters is not None:
                        self._data_clusters += n - sum(1 for e in olds if self._has_storage(e))
            finally:
                self.l2_cache.unpin(l2off)
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
                pend.extend(CompressedEntry.decode(e, cb).host_clusters(cb))
            elif e & L2E_OFFSET_MASK:
                pend.append((e & L2E_OFFSET_MASK) >> cb)

    async def _apply_pending(self, force: bool = False) -> None:
        """Apply queued decrements (caller holds ``_meta_lock``) once no request that might
        still touch a freed cluster is in flight."""
        if not self._pending_decref or ((self._io_active or self._direct_active) and not force):
            return
        pend = self._pending_decref
        self._pending_decref = []
        # The L1/L2 writes that dropped these references must be on disk before a refcount
        # falls; otherwise a power loss could leave an entry pointing at a free cluster.
        await self.flush_child()
        deltas: dict[int, int] = {}
        for c in pend:
            deltas[c] = deltas.get(c, 0) - 1
        await self.drop_references(deltas)

    async def _writable_l2(self, l1i: int) -> tuple[array[int], int]:
        """The L2 table for L1 index ``l1i``, allocated or copied so that this image alone
        references it (COPIED); returned pinned. Caller holds ``_meta_lock``."""
        l1e = self._l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off and l1e & OFLAG_COPIED:
            t = await self._load_l2(off)
            self.l2_cache.pin(off)
            return t, off
        cb = self._cb
        host = await self.refcounts.alloc(1)
        if off:
            src = await self._load_l2(off)
            new = array("Q", src)
            # the table is shared: its clusters are referenced twice now, except when the
            # old table's COPIED flag was merely missing (then recompute from refcounts)
            old_rc = await self.refcounts.get(off >> cb)
            for i, e in enumerate(new):
                if e & OFLAG_COMPRESSED:
                    new[i] = e & ~OFLAG_COPIED
                elif e & L2E_OFFSET_MASK:
                    rc = await self.refcounts.get((e & L2E_OFFSET_MASK) >> cb)
                    if old_rc <= 1 and rc == 1:
                        new[i] = e | OFLAG_COPIED
                    else:
                        new[i] = e & ~OFLAG_COPIED
        else:
            new = array("Q", bytes(self._cs))
        await self.write_metadata("l2_alloc", host, pack_u64_table(new))
        self.l2_cache.put(host, new)
        self.l2_cache.pin(host)
        entry = host | OFLAG_COPIED
        await self.write_metadata("l1_update", self._l1_off + l1i * 8, _BE_U64.pack(entry))
        self._l1[l1i] = entry
        if off:
            freed = await self.refcounts.change({off >> cb: -1})
            if freed:
                self.l2_cache.pop(off)
        return new, host

    # -- compressed writing (the area and the descriptor: compressed.py) ----------------------

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
            comp = await trio.to_thread.run_sync(
                compress_cluster, buf, self.header.compression_type, limiter=self._cz_limiter
            )
        else:
            comp = compress_cluster(buf, self.header.compression_type)
        if comp is None:
            await self.write(offset, data)
            return
        cb = self._cb
        g = offset >> cb
        l1i = g >> self._l2_bits
        l2i = g & self._l2_mask
        size = -(-len(comp) // SECTOR) * SECTOR
        ev = await self._claim(g, g + 1)
        try:
            async with self._meta_lock:
                table, l2off = await self._writable_l2(l1i)
            try:
                async with self._meta_lock:
                    coff = await self._compressed.place(size)
                assert coff < 1 << (62 - (cb - 8)) and not coff % SECTOR
                # whole sectors: the file never ends inside one, and a stale tail is never read
                self.child.debug_event("cluster_alloc")
                await self.child.write(coff, comp + bytes(size - len(comp)))
                entry = CompressedEntry(coff, size // SECTOR).encode(cb)
                old = table[l2i]  # the claim keeps it; no await between here and the swap
                # data before the entry, disk before the table other tasks read without a lock
                await self.write_metadata("l2_update", l2off + l2i * 8, _BE_U64.pack(entry))
                table[l2i] = entry
                self._forget((old,))
                if self._data_clusters is not None and not self._has_storage(old):
                    self._data_clusters += 1
            finally:
                self.l2_cache.unpin(l2off)
        finally:
            self._release(g, g + 1, ev)
        if self._pending_decref and not (self._io_active or self._direct_active):
            async with self._meta_lock:
                await self._apply_pending()

    # -- what the allocator must not hand out ------------------------------------------------

    def _table_in(self, start: int, end: int) -> str | None:
        """The table (other than refcount structures) in host clusters [start, end), if any:
        the header, the active L1 table, the snapshot table (its fixed part) or an L2 table."""
        cb = self._cb
        h = self.header
        spans = [("the header", 0, self._cs), ("the L1 table", self._l1_off, len(self._l1) * 8)]
        if h.nb_snapshots:
            spans.append(
                ("the snapshot table", h.snapshots_offset, SNAPSHOT_ENTRY.size * h.nb_snapshots)
            )
        for what, off, length in spans:
            if length and off >> cb < end and (off + length + self._cmask) >> cb > start:
                return what
        for e in self._l1:
            c = (e & L1E_OFFSET_MASK) >> cb
            if c and start <= c < end:
                return "an L2 table"
        return None

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
                await self.write_metadata("l2_update", l2off + l2i * 8, pack_u64_table(new))
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
                self.l2_cache.unpin(l2off)
        finally:
            self._release(g0, g1, ev)
        if self._pending_decref and not (self._io_active or self._direct_active):
            async with self._meta_lock:
                await self._apply_pending()

    # -- status, flush, close ------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        kind, host, n = await self._map(offset, length)
        if kind == K_UNALLOC:
            return Extent(offset, n, Status(0))
        if kind == K_ZERO:
            zhost, n = self._zero_run_host(offset, n)
            return Extent(offset, n, Status.ZERO | Status.ALLOCATED, 0, zhost)
        if kind == K_COMP:
            return Extent(offset, n, Status.DATA | Status.ALLOCATED)
        return Extent(offset, n, Status.DATA | Status.ALLOCATED, 0, host)

    def _zero_run_host(self, offset: int, n: int) -> tuple[int | None, int]:
        """A run of zero clusters that ``_map`` found at ``offset`` (``n`` bytes, within one
        L2 table, now cached), cut to where its clusters are all preallocated in a row (the
        host offset of ``offset``) or all without a host cluster (None). For block status
        only: the read path needs no host for zeroes."""
        cs = self._cs
        gc = offset >> self._cb
        l2i = gc & self._l2_mask
        table = self._l2.get(self._l1[gc >> self._l2_bits] & L1E_OFFSET_MASK)
        if table is None:
            return None, n
        host = table[l2i] & L2E_OFFSET_MASK
        m = cs - (offset & self._cmask)
        nxt = host + cs if host else 0
        while m < n:
            l2i += 1
            if table[l2i] & L2E_OFFSET_MASK != nxt:
                break
            m += cs
            if host:
                nxt += cs
        return (host + (offset & self._cmask) if host else None), min(m, n)

    async def allocated_bytes(self) -> int:
        if self._data_clusters is None:
            count = 0
            for l1e in self._l1:
                off = l1e & L1E_OFFSET_MASK
                if off:
                    t = self._l2.get(off)
                    if t is None:
                        t = unpack_u64_table(await self.child.read(off, self._cs))
                    count += sum(1 for e in t if e & (OFLAG_COMPRESSED | L2E_OFFSET_MASK))
                    # one table at a time (~0.3 ms of counting): a big disk's walk, its tables
                    # read from the page cache without a yield, never holds the event loop
                    await trio.lowlevel.checkpoint()
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
        await self.flush_child()

    # -- failsafe (see the module docstring) ---------------------------------------------------

    def children(self) -> list[Node]:
        return [self.child]

    async def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (see :meth:`Node.reopen`). A writer holds
        state a reader must not: going read-only applies the pending decrements, gives back the
        compressed area and the reservation (else they would stay as leaks) and flushes; going
        read-write checks the image as opening it read-write would (corrupt and dirty flags,
        metadata refcounts, autoclear bits), and stays read-only when that fails.

        :raise ImageError: the image may not be written (read-write only).
        :raise BlockfsError: the child cannot be reopened; the node keeps its old mode.
        """
        if read_only == self.read_only:
            return
        if read_only:
            if self._broken is None:
                async with self._meta_lock:
                    await self._apply_pending(force=True)
                    await self._compressed.release()
                    await self.refcounts.release_reservation()
                await self.flush_child()
            await super().reopen(True)
            return
        where = self.filename
        if self.header.incompatible & (Incompatible.CORRUPT | Incompatible.DIRTY):
            raise ImageError(f"{where}: image is marked corrupt or dirty; it cannot be written")
        await super().reopen(False)
        try:
            await self._check_for_writing()
        except BaseException:
            with trio.CancelScope(shield=True):
                await super().reopen(True)
            raise

    # -- tables and header as a whole: the interface of snapshot.py (and of jobs) ---------------

    @contextlib.asynccontextmanager
    async def rewriting_tables(self) -> AsyncIterator[None]:
        """Hold the metadata lock for an operation that rewrites tables wholesale (a snapshot
        operation); every cache is dropped on entry and on exit, so nothing stale is acted on
        or kept. Requests must not be in flight (snapshots run on an image nothing else uses)."""
        async with self._meta_lock:
            self.drop_caches()
            try:
                yield
            finally:
                self.drop_caches()

    @property
    def active_l1(self) -> array[int]:
        """The active L1 table. Read it; change it only through :meth:`set_l1_entry` and
        :meth:`switch_active_l1` (the disk first, then this copy)."""
        return self._l1

    async def read_table(self, offset: int, entries: int) -> array[int]:
        """A table of ``entries`` 64-bit entries at ``offset``, read from the image (not from
        the cache: for walks of whole trees, e.g. a snapshot's)."""
        if not entries:
            return array("Q")
        return unpack_u64_table(await self.child.read(offset, entries * 8))

    async def set_l1_entry(self, index: int, entry: int) -> None:
        """Write entry ``index`` of the active L1 table. Caller is in :meth:`rewriting_tables`."""
        await self.write_metadata("l1_update", self._l1_off + index * 8, _BE_U64.pack(entry))
        self._l1[index] = entry

    async def switch_active_l1(self, l1: array[int], offset: int) -> None:
        """Make ``l1``, already written at ``offset``, the active L1 table (one header write).
        The old table's clusters are the caller's to free. Caller is in
        :meth:`rewriting_tables`."""
        await self.write_metadata("header_update", OFF_L1, struct.pack(">IQ", len(l1), offset))
        self._l1 = l1
        self._l1_off = offset
        self.header = dataclasses.replace(self.header, l1_size=len(l1), l1_table_offset=offset)

    async def switch_snapshot_table(self, snapshots: list[Snapshot], offset: int) -> None:
        """Make the snapshot table written at ``offset`` (0: none) the image's (one header
        write). The old table's clusters are the caller's to free. Caller is in
        :meth:`rewriting_tables`."""
        await self.write_metadata(
            "header_update", OFF_SNAPSHOTS, struct.pack(">IQ", len(snapshots), offset)
        )
        self.header = dataclasses.replace(
            self.header, nb_snapshots=len(snapshots), snapshots_offset=offset
        )
        self.snapshots = list(snapshots)

    async def drop_references(self, deltas: dict[int, int]) -> None:
        """Apply refcount decrements (host cluster -> negative delta); clusters that become
        free are discarded in the child (a hint). Caller holds the metadata lock (or is in
        :meth:`rewriting_tables`), and no entry still points to what it frees."""
        freed = await self.refcounts.change(deltas)
        if freed:
            self._dcache.clear()
            cs = self._cs
            for c in freed:
                try:
                    await self.child.discard(c << self._cb, cs)
                except BlockfsError:  # a hint only
                    log.debug("discard of freed cluster %d failed", c)

    async def change_backing_file(
        self, name: str | None, fmt: str | None, parent: Node | None = None
    ) -> None:
        """Record ``name`` (format ``fmt``) as the backing file in the image header, or no
        backing file with None. Changes what the image says, not the open chain: ``backing``
        is the caller's to swap (a commit does so at a quiescent point).

        The whole of cluster 0 (header, extensions, name) is rebuilt from what is on disk now
        and written in one write, then flushed: a crash leaves the old header or the new one,
        and the name is never read without the header fields that point to it.

        :raise ReadOnlyError: the image is open read-only.
        :raise UsageError: a bad name or format, or a name too long for cluster 0.
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        async with self._meta_lock:
            cs = self._cs
            first = await self.child.read(0, min(cs, self.child.size))
            first += bytes(cs - len(first))
            ext = parse_extensions(first, self.header, self.filename)
            cluster, header = header_cluster_with_backing(first, self.header, ext, name, fmt)
            await self.write_metadata("header_update", 0, cluster)
            await self.flush_child()
            self.header = header
            self.ext = parse_extensions(cluster, header, self.filename)
            self.backing_name = name

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # A broken node writes no more metadata: what is on disk is consistent as it is.
            if not self.read_only and self._broken is None:
                async with self._meta_lock:
                    await self._apply_pending(force=True)
                    await self._compressed.release()
                    await self.refcounts.release_reservation()
        finally:
            await self.child.aclose()

    def drop_caches(self) -> None:
        """Forget cached tables (after snapshot operations rewrote them)."""
        self.l2_cache.clear()
        self.refcounts.clear_cache()
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
                "refcount-bits": self.refcounts.bits,
                "compression-type": "zstd"
                if h.compression_type == CompressionType.ZSTD
                else "zlib",
                "extended-l2": False,
                "bitmaps": [
                    {"flags": list(b.flags), "name": b.name, "granularity": b.granularity}
                    for b in self.bitmaps
                ],
                "snapshots": [_snapshot_info(s) for s in self.snapshots],
            }
        )
        return d


def _snapshot_info(s: Snapshot) -> dict[str, object]:
    """One snapshot as ``qemu-img info`` lists it (``icount`` only when the entry records it),
    plus the ``disk-size`` blockfs also shows."""
    d: dict[str, object] = {
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    }
    at = SNAPSHOT_EXTRA.size
    if len(s.extra) >= at + SNAPSHOT_ICOUNT.size:
        d["icount"] = SNAPSHOT_ICOUNT.unpack_from(s.extra, at)[0]
    d["disk-size"] = s.disk_size
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
