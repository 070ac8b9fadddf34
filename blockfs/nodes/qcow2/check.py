"""Checking and repairing a qcow2 image's metadata, as ``qemu-img check`` (QEMU 7.2) does.

What lives here: :func:`check_qcow2`, one pass of QEMU's ``qcow2_co_check`` over an open image
file: count every reference to every host cluster (header, L1 and L2 tables of the active
layer and of every snapshot, data and compressed clusters, the snapshot table, the refcount
table and blocks, persistent bitmaps) in an in-memory refcount table, compare it with the
refcounts the image stores, check the COPIED flags of the active tables, and optionally repair:
leaks (``Fix.LEAKS``), refcounts that are too low, misaligned preallocated zero clusters, the
COPIED flags and a broken refcount structure, which is rebuilt from scratch (``Fix.ERRORS``).
A repair that leaves no corruption clears the dirty bit (lazy refcounts) and the corrupt bit.
:class:`CheckResult` carries QEMU's counters, under QEMU's names. The double check after a
repair, and everything said to a person, belong to the caller (``blockfs/cli/check.py``); this
module reports through the ``on_message`` and ``on_progress`` callbacks and never prints.

The image is read and written through ``os.pread``/``os.pwrite`` on a descriptor the caller
opened (and locked), not through the node stack: a checker must see the bytes as they are and
must not be stopped by what it is there to find. The header and snapshot table are parsed by
``format.py`` (a header it refuses is refused here too, in one line).

Bounds (a hostile image costs bounded memory and time, and never a huge allocation from a
header): the in-memory refcount table has one entry per cluster of the *file* (at most
:data:`MAX_IMRT_BYTES`); each L1 and snapshot table is bounded by ``format.py``, and the
snapshots' L1 tables, the L2 tables and the bitmap tables may not claim more than the file
holds (:data:`TABLE_SLACK`); every distinct L2 table is read once, however many L1 entries
point to it (its references are counted with their multiplicity, its messages said once);
refcount blocks are cached up to :data:`REFBLOCK_CACHE_BYTES`.

Order of repair writes, so that a kill at any instant leaves an image no worse than it was:

* Each refcount repair moves one refcount to the number of references counted, never below
  it: any subset of them is a safe image (leaks at worst), so they are written one refcount
  block at a time (a torn block is such a subset too), then flushed, before any COPIED flag
  is touched. A misaligned preallocated zero cluster is made a plain zero cluster (one 8-byte
  write, flushed) before refcounts are compared: the cluster it named was never part of the
  guest's data.
* A rebuilt refcount structure is written only into clusters nothing references (free in the
  in-memory table) and the old refcount table does not name, even through a broken entry,
  flushed, and then switched to by one 12-byte write of the header (offset
  and size of the refcount table together), flushed again. Until that write the old structure
  is in force, untouched; after it, the new one is complete. Only then are the old blocks
  freed (as leaks of the new structure).
* COPIED flags are set or cleared after the refcounts they describe are flushed; the header's
  dirty and corrupt bits are cleared last, after a flush, and only when nothing is left to
  repair. One window remains, as in QEMU: a leak fixed down to refcount 1 leaves the entry's
  COPIED flag missing until the flag pass, which ``qemu-img check`` counts as a corruption
  although it is harmless (the next write copies the cluster once); running the repair again
  clears it.

Not repaired, as QEMU does not repair them: L2 entries that point past the end of the file,
misaligned data clusters, reserved bits; metadata that overlaps gets QEMU's repair (its
refcount raised to what is counted, COPIED cleared), not its own cluster. Not done here: the
repairs of the snapshot table itself (``qcow2_check_fix_snapshot_table``: too many snapshots,
excess extra data), and images ``format.py`` refuses (encryption, external data files,
extended L2 entries, a snapshot table it cannot parse), which are refused in one line.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from blockfs.errors import ImageError
from blockfs.nodes.checkio import CheckIo as _FileIo
from blockfs.nodes.qcow2.compressed import CompressedEntry
from blockfs.nodes.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFF_REFCOUNT_TABLE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SNAPSHOT_ENTRY,
    Autoclear,
    ExtensionType,
    Incompatible,
    Snapshot,
    parse_extensions,
    parse_header,
    parse_snapshots,
    snapshot_table_bound,
    unpack_u64_table,
)

#: reserved bits of an L1 entry, of a standard L2 entry, of a refcount table entry (qcow2.txt)
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
#: a bitmap table entry (== Bitmaps extension ==): offset bits 9-55, bit 0 "all ones"
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_ALL_ONES = 1
#: the bitmaps extension: nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset
BITMAPS_EXT = struct.Struct(">IIQQ")
#: a bitmap directory entry's fixed part: table offset, table size, flags, type,
#: granularity_bits, name_size, extra_data_size
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
#: QEMU's limits on bitmaps (qcow2-bitmap.c)
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024

#: the in-memory refcount table may take this much memory (one entry per cluster of the file,
#: as wide as the image's refcounts): 2^28 clusters of 16-bit refcounts, a 16 TiB file of
#: 64 KiB clusters. A larger file is refused, not half checked.
MAX_IMRT_BYTES = 1 << 29
#: QEMU refuses files of more clusters than an int holds (EFBIG)
MAX_CLUSTERS = (1 << 31) - 1
#: distinct L2 tables and snapshot L1 tables may claim at most this many times the file's
#: size (they are distinct clusters of it in any image a program wrote)
TABLE_SLACK = 2
#: budget of decoded refcount blocks kept while comparing and repairing
REFBLOCK_CACHE_BYTES = 64 * 1024 * 1024

_TYPECODES = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}
assert array("H").itemsize == 2 and array("I").itemsize == 4 and array("Q").itemsize == 8
_LITTLE = sys.byteorder == "little"
_BE_U64 = struct.Struct(">Q")
#: incompatible_features in a v3 header (bytes 72-79)
OFF_INCOMPATIBLE = 72


class Fix(enum.IntFlag):
    """What a pass may repair (QEMU's BdrvCheckMode): ``-r leaks`` is LEAKS, ``-r all`` both."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2


@dataclass(slots=True)
class CheckResult:
    """QEMU's BdrvCheckResult: what one pass found and fixed."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def counts(self) -> dict[str, int]:
        """Every counter under the name ``qemu-img check --output json`` gives it."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def copy(self) -> CheckResult:
        return CheckResult(**{f.name: getattr(self, f.name) for f in fields(self)})

    def restore(self, saved: CheckResult) -> None:
        """Make every counter what ``saved`` says (QEMU's ``*res = saved``)."""
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))


class CheckFailed(ImageError):
    """The check could not complete (QEMU: "Check failed", exit status 1); what it found until
    then was said through ``on_message``."""


MessageFn = Callable[[str], None]
ProgressFn = Callable[[int, int], None]


def check_qcow2(
    fd: int,
    where: str,
    fix: Fix = Fix.NONE,
    *,
    on_message: MessageFn | None = None,
    on_progress: ProgressFn | None = None,
) -> CheckResult:
    """Check (and with ``fix``, repair) the qcow2 image open on ``fd`` (read-write if ``fix``);
    ``where`` names it in errors. One pass of QEMU's check: a caller that got anything fixed
    runs a second pass without ``fix`` to report what is left, as ``qemu-img check`` does.

    :raise ImageError: a header or table this module refuses to read (one line).
    :raise CheckFailed: the check stopped (a structure that must be rebuilt when only leaks
        may be fixed, an overlap that forbids a repair write, an I/O error).
    """
    checker = _Checker(fd, where, fix, on_message or _ignore, on_progress)
    return checker.run()


def _ignore(_: str) -> None:
    pass


class _Unreadable(Exception):
    """A refcount that cannot be read (its block's offset is not cluster aligned)."""


def _expand_table(width: int) -> list[bytes]:
    """For refcounts narrower than a byte: each byte value -> the refcounts it holds, one byte
    each, lowest bits first (qcow2.txt: refcount j lives at bit j * width)."""
    mask = (1 << width) - 1
    per = 8 // width
    return [bytes((b >> (k * width)) & mask for k in range(per)) for b in range(256)]


class _RefcountCodec:
    """The on-disk form of a refcount block <-> an array of its refcounts (of the in-memory
    table's type code)."""

    def __init__(self, order: int, cluster_bits: int) -> None:
        self.order = order
        self.width = 1 << order
        self.code = _TYPECODES[order]
        self.entries = 1 << (cluster_bits + 3 - order)
        self.size = 1 << cluster_bits
        self._expand = _expand_table(self.width) if self.width < 8 else None

    def decode(self, raw: bytes) -> array[int]:
        if self._expand is not None:
            return array("B", b"".join(map(self._expand.__getitem__, raw)))
        a = array(self.code)
        a.frombytes(raw)
        if _LITTLE and a.itemsize > 1:
            a.byteswap()
        return a

    def encode(self, values: array[int]) -> bytes:
        """``values`` (exactly one block of refcounts, each within the width) on disk."""
        assert len(values) == self.entries
        if self.width < 8:
            w = self.width
            per = 8 // w
            lanes = [values[k::per] for k in range(per)]
            return bytes(
                sum(v << (k * w) for k, v in enumerate(group)) for group in zip(*lanes, strict=True)
            )
        a = array(self.code, values)
        if _LITTLE and a.itemsize > 1:
            a.byteswap()
        return a.tobytes()


class _Imrt:
    """QEMU's in-memory refcount table: the references counted, one entry per host cluster,
    each at most the image's largest refcount. ``nb`` is the number of clusters it covers."""

    def __init__(self, code: str, nb: int, rmax: int) -> None:
        self.code = code
        self.max = rmax
        self.nb = nb
        self.a = array(code, [0]) * nb

    def grow(self, nb: int) -> None:
        if nb > len(self.a):
            extra = max(nb - len(self.a), len(self.a) // 4)
            self.a.frombytes(bytes(self.a.itemsize * extra))
        self.nb = max(self.nb, nb)

    def clear(self) -> None:
        self.a = array(self.code, [0]) * len(self.a)

    def window(self, lo: int, count: int) -> array[int]:
        """``count`` entries from ``lo``, zeroes past the end."""
        part = self.a[lo : min(lo + count, self.nb)]
        if len(part) < count:
            part.frombytes(bytes(part.itemsize * (count - len(part))))
        return part

    def first_free(self, pos: int) -> int:
        """The first cluster at or after ``pos`` that nothing references (past the end: all)."""
        a = self.a
        isz = a.itemsize
        zero = bytes(isz)
        while pos < self.nb:
            end = min(self.nb, pos + 65536)
            raw = a[pos:end].tobytes()
            at = 0
            while True:
                hit = raw.find(zero, at)
                if hit < 0:
                    break
                if hit % isz == 0:
                    return pos + hit // isz
                at = hit + isz - hit % isz
            pos = end
        return max(pos, self.nb)

    def alloc(self, count: int, start: int) -> int:
        """QEMU's alloc_clusters_imrt: the first run of ``count`` clusters at or after
        ``start`` that nothing references (a run may go past the end, which then grows),
        marked referenced once; returns its first cluster."""
        c = start
        while True:
            c = self.first_free(c)
            busy = [k for k, v in enumerate(self.a[c : min(c + count, self.nb)]) if v]
            if not busy:
                break
            c += busy[-1] + 1
        self.grow(c + count)
        for k in range(c, c + count):
            self.a[k] = 1
        return c


class _DiskRefcounts:
    """The refcounts the image stores: its refcount table and blocks, read (and for repairs,
    written) through the descriptor."""

    def __init__(self, io: _FileIo, codec: _RefcountCodec, cluster_bits: int) -> None:
        self.io = io
        self.codec = codec
        self.cb = cluster_bits
        self.rb_bits = cluster_bits + 3 - codec.order
        self.table: array[int] = array("Q")
        self.table_offset = 0
        self.table_clusters = 0
        self._cache: dict[int, array[int]] = {}
        self._cache_max = max(4, REFBLOCK_CACHE_BYTES >> cluster_bits)

    def load_table(self, offset: int, clusters: int) -> None:
        self.table = unpack_u64_table(self.io.read(offset, clusters << self.cb))
        self.table_offset = offset
        self.table_clusters = clusters
        self._cache.clear()

    def block_offset(self, r: int) -> int:
        """The offset of refcount block ``r`` (0: none). :raise _Unreadable: not aligned."""
        if r >= len(self.table):
            return 0
        off = self.table[r] & REFT_OFFSET_MASK
        if off & ((1 << self.cb) - 1) or off >= 1 << 62:
            raise _Unreadable
        return off

    def block(self, r: int) -> array[int] | None:
        """Refcount block ``r`` decoded (None: the table has none there).
        :raise _Unreadable:"""
        off = self.block_offset(r)
        if not off:
            return None
        blk = self._cache.get(off)
        if blk is None:
            if len(self._cache) >= self._cache_max:
                self._cache.clear()
            blk = self.codec.decode(self.io.read(off, self.codec.size))
            self._cache[off] = blk
        return blk

    def get(self, c: int) -> int:
        """The stored refcount of cluster ``c``. :raise _Unreadable:"""
        blk = self.block(c >> self.rb_bits)
        return 0 if blk is None else blk[c & ((1 << self.rb_bits) - 1)]

    def write_block(self, r: int, blk: array[int]) -> None:
        """Write refcount block ``r`` (which exists) as ``blk`` says."""
        off = self.block_offset(r)
        assert off
        self.io.write(off, self.codec.encode(blk))
        self._cache[off] = blk


@dataclass(slots=True)
class _L2Refs:
    """How many L1 entries point to one L2 table: of the active L1 table, and in all."""

    active: int = 0
    total: int = 0


class _Checker:
    def __init__(
        self, fd: int, where: str, fix: Fix, say: MessageFn, on_progress: ProgressFn | None
    ) -> None:
        self.where = where
        self.fix = fix
        self.say = say
        self.on_progress = on_progress
        self.io = _FileIo(fd, where, writable=bool(fix), write_error=CheckFailed)
        self._done = 0
        self._total = 0
        self._open()

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        io = self.io
        where = self.where
        head = io.read(0, min(max(io.size, 0), 1 << 21))
        h = parse_header(head, io.size, where)
        self.header = h
        self.ext = parse_extensions(head, h, where)
        cb = self.cb = h.cluster_bits
        self.cs = 1 << cb
        self.nb_file = -(-io.size // self.cs)
        if self.nb_file > MAX_CLUSTERS:
            raise ImageError(f"{where}: {self.nb_file} clusters are too many to check (EFBIG)")
        self.codec = _RefcountCodec(h.refcount_order, cb)
        itemsize = array(self.codec.code).itemsize
        if self.nb_file * itemsize > MAX_IMRT_BYTES:
            raise ImageError(
                f"{where}: a file of {self.nb_file} clusters is too large to check here "
                f"(more than {MAX_IMRT_BYTES >> 20} MiB of counts)"
            )
        self.rmax = (1 << (1 << h.refcount_order)) - 1
        self.l1 = unpack_u64_table(io.read(h.l1_table_offset, h.l1_size * 8))
        self.snapshots: list[Snapshot] = []
        self.snapshots_size = 0
        if h.nb_snapshots:
            bound = min(snapshot_table_bound(h.nb_snapshots), io.size - h.snapshots_offset)
            raw = io.read(h.snapshots_offset, bound)
            self.snapshots = parse_snapshots(raw, h.nb_snapshots, h, io.size, where)
            self.snapshots_size = _snapshot_table_size(raw, h.nb_snapshots)
            if sum(sn.l1_size * 8 for sn in self.snapshots) > TABLE_SLACK * io.size:
                raise ImageError(
                    f"{where}: the snapshots' L1 tables claim more than the file holds"
                )
        self.disk = _DiskRefcounts(io, self.codec, cb)
        self.disk.load_table(h.refcount_table_offset, h.refcount_table_clusters)
        self.bitmaps = self._bitmaps_extension()

    def _bitmaps_extension(self) -> tuple[int, int, int] | None:
        """(count, directory offset, directory size) of persistent bitmaps QEMU would load:
        only while the autoclear bit says a program that knows them wrote the image last."""
        if not self.header.autoclear & Autoclear.BITMAPS:
            return None
        for etype, data in self.ext.entries:
            if etype == ExtensionType.BITMAPS and len(data) >= BITMAPS_EXT.size:
                n, _, size, off = BITMAPS_EXT.unpack_from(data)
                if n == 0:
                    return None
                if n > MAX_BITMAPS or size > MAX_BITMAP_DIRECTORY or off % self.cs:
                    raise ImageError(f"{self.where}: bitmaps extension is invalid")
                return n, off, size
        return None

    # -- one pass: qcow2_co_check_locked -------------------------------------------------------

    def run(self) -> CheckResult:
        res = CheckResult()
        self._check_refcounts(res)
        if self.fix and res.check_errors == 0 and res.corruptions == 0:
            self._mark_clean()
        return res

    def _phase(self, steps: int) -> None:
        """Start a phase of ``steps`` (L2 tables to read, refcount blocks to compare): progress
        is reported per phase, from 0 to ``steps``."""
        self._done = 0
        self._total = steps
        if self.on_progress is not None:
            self.on_progress(0, steps)

    def _progress(self) -> None:
        self._done += 1
        if self.on_progress is not None:
            self.on_progress(self._done, self._total)

    def _check_refcounts(self, res: CheckResult) -> None:
        """qcow2_check_refcounts: count, compare, rebuild or repair, check COPIED flags."""
        h = self.header
        res.total_clusters = -(-h.size // self.cs)
        imrt = _Imrt(self.codec.code, self.nb_file, self.rmax)
        rebuild = self._calculate(res, self.fix, imrt)
        pre_compare = res.copy()
        rebuild, highest = self._compare(res, Fix.NONE, imrt, rebuild)
        if rebuild and self.fix & Fix.ERRORS:
            old = res.copy()
            self.say("Rebuilding refcount structure")
            self._rebuild(imrt)
            res.corruptions = 0
            res.leaks = 0
            imrt.clear()
            rebuild = self._calculate(res, Fix.NONE, imrt)
            fresh_leaks = 0
            if self.fix & Fix.LEAKS:
                # the old structure is now leaked: free it; only leaks that cannot be fixed
                # count (the rebuilt structure itself must need nothing)
                saved = res.copy()
                scratch = CheckResult()
                rebuild, highest = self._compare(scratch, Fix.LEAKS, imrt, False)
                if rebuild:
                    self.say("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
                res.restore(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if rebuild:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(
                    f"{self.where}: check failed: the refcount structure must be rebuilt, "
                    "which only '-r all' does"
                )
            if res.leaks or res.corruptions:
                res.restore(pre_compare)
                _, highest = self._compare(res, self.fix, imrt, rebuild)
        self._check_oflag_copied(res)
        res.image_end_offset = (highest + 1) * self.cs

    # -- counting references: calculate_refcounts ----------------------------------------------

    def _inc(self, res: CheckResult, imrt: _Imrt, offset: int, size: int, times: int = 1) -> None:
        """qcow2_inc_refcounts_imrt: count ``times`` references to the clusters of
        [offset, offset + size)."""
        if size <= 0:
            return
        cs = self.cs
        if offset + size - self.io.size >= cs:
            self.say(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset {offset:#x} size {size:#x}"
            )
            res.corruptions += times
            return
        first = offset >> self.cb
        last = (offset + size - 1) >> self.cb
        if last >= imrt.nb:
            imrt.grow(last + 1)
        a = imrt.a
        for c in range(first, last + 1):
            v = a[c] + times
            if v > imrt.max:
                over = v - imrt.max
                v = imrt.max
                self.say(f"ERROR: overflow cluster offset={c << self.cb:#x}")
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"
                )
                res.corruptions += over
            a[c] = v

    def _calculate(self, res: CheckResult, fix: Fix, imrt: _Imrt) -> bool:
        """calculate_refcounts: every reference into ``imrt``; True when the refcount
        structure must be rebuilt."""
        h = self.header
        self._inc(res, imrt, 0, self.cs)
        l2_refs: dict[int, _L2Refs] = {}
        self._count_l1(res, imrt, h.l1_table_offset, h.l1_size, True, l2_refs)
        # (a snapshot whose L1 table is misaligned or too large, which QEMU counts as a
        # corruption, is refused by format.py with the snapshot table)
        for sn in self.snapshots:
            self._count_l1(res, imrt, sn.l1_table_offset, sn.l1_size, False, l2_refs)
        inside = sum(1 for off in l2_refs if off < self.io.size)
        if inside * self.cs > TABLE_SLACK * self.io.size + self.cs:
            raise ImageError(
                f"{self.where}: the L1 tables claim more L2 tables than the file holds"
            )
        self._phase(len(l2_refs))
        for off, refs in l2_refs.items():
            self._count_l2(res, imrt, off, refs, fix)
            self._progress()
        self._inc(res, imrt, h.snapshots_offset, self.snapshots_size)
        self._inc(res, imrt, self.disk.table_offset, self.disk.table_clusters * self.cs)
        self._count_bitmaps(res, imrt)
        return self._check_refblocks(res, fix, imrt)

    def _count_l1(
        self,
        res: CheckResult,
        imrt: _Imrt,
        offset: int,
        entries: int,
        active: bool,
        l2_refs: dict[int, _L2Refs],
    ) -> None:
        """check_refcounts_l1, its L1 half: the table, each L2 table it points to, and the
        L2 tables to scan (with how many entries point to each)."""
        if not entries:
            return
        self._inc(res, imrt, offset, entries * 8)
        table = self.l1 if active else unpack_u64_table(self.io.read(offset, entries * 8))
        for e in table:
            if not e:
                continue
            if e & L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            l2 = e & L1E_OFFSET_MASK
            self._inc(res, imrt, l2, self.cs)
            if l2 & (self.cs - 1):
                self.say(
                    f"ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                )
                res.corruptions += 1
            refs = l2_refs.get(l2)
            if refs is None:
                refs = l2_refs[l2] = _L2Refs()
            refs.total += 1
            if active:
                refs.active += 1

    def _count_l2(self, res: CheckResult, imrt: _Imrt, l2: int, refs: _L2Refs, fix: Fix) -> None:
        """check_refcounts_l2 for one L2 table, counted once per L1 entry pointing to it."""
        cs = self.cs
        cb = self.cb
        raw = self.io.read(l2, cs)
        if raw.count(0) == cs:
            return
        table = unpack_u64_table(raw)
        times = refs.total
        active = refs.active
        file_size = self.io.size
        a = imrt.a
        rmax = imrt.max
        next_contiguous = 0
        for i, e in enumerate(table):
            if not e:
                continue
            if e & OFLAG_COMPRESSED:
                if e & OFLAG_COPIED:
                    d = CompressedEntry.decode(e, cb)
                    self.say(
                        f"ERROR: coffset={d.host_offset:#x}: copied flag must never be set for "
                        "compressed clusters"
                    )
                    res.corruptions += times
                d = CompressedEntry.decode(e & ~OFLAG_COPIED, cb)
                self._inc(res, imrt, d.host_offset, d.length, times)
                a = imrt.a
                if active:
                    res.allocated_clusters += active
                    res.compressed_clusters += active
                    res.fragmented_clusters += active
                continue
            if e & L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += times
            off = e & L2E_OFFSET_MASK
            if not off:
                continue  # unallocated, or zero without a cluster
            if off & (cs - 1):
                if e & OFLAG_ZERO:
                    repairing = bool(fix & Fix.ERRORS)
                    self.say(
                        f"{'Repairing' if repairing else 'ERROR'} offset={off:x}: Preallocated "
                        "cluster is not properly aligned; L2 entry corrupted."
                    )
                    if repairing:
                        # made a plain zero cluster: nothing to count, now or for the
                        # other L1 entries that point to this table
                        self._zero_l2_entry(res, l2, i)
                        continue
                    res.corruptions += times
                else:
                    res.corruptions += times
                    self.say(
                        f"ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry "
                        "corrupted."
                    )
            if active:
                res.allocated_clusters += active
                if next_contiguous and off != next_contiguous:
                    res.fragmented_clusters += active
                next_contiguous = off + cs
            # the one-cluster case of _inc, inline: this loop runs once per cluster of data
            if off & (cs - 1) or off + cs - file_size >= cs:
                self._inc(res, imrt, off, cs, times)
                continue
            c = off >> cb
            if c >= imrt.nb:
                imrt.grow(c + 1)
                a = imrt.a
            v = a[c] + times
            if v > rmax:
                self._inc(res, imrt, off, cs, times)
            else:
                a[c] = v

    def _zero_l2_entry(self, res: CheckResult, l2: int, index: int) -> None:
        """fix_l2_entry_by_zero: make entry ``index`` of the L2 table at ``l2`` a plain zero
        cluster (the cluster it named was never written: nothing is lost).

        :raise CheckFailed: the entry lies in other metadata (QEMU's overlap check)."""
        at = l2 + index * 8
        hit = self._metadata_overlap(at, 8)
        if hit is not None:
            self.say("ERROR: Overlap check failed")
            res.check_errors += 1
            raise CheckFailed(
                f"{self.where}: check failed: the L2 table at {l2:#x} overlaps {hit}; not written"
            )
        self.io.write(at, _BE_U64.pack(OFLAG_ZERO))
        self.io.sync()
        res.corruptions_fixed += 1

    def _count_bitmaps(self, res: CheckResult, imrt: _Imrt) -> None:
        """qcow2_check_bitmaps_refcounts: the directory, each bitmap's table and its data."""
        if self.bitmaps is None:
            return
        count, off, size = self.bitmaps
        self._inc(res, imrt, off, size)
        raw = self.io.read(off, min(size, max(0, self.io.size - off)))
        pos = 0
        tables: list[tuple[int, int]] = []
        for _ in range(count):
            if pos + BITMAP_DIR_ENTRY.size > len(raw):
                res.corruptions += 1
                raise CheckFailed(f"{self.where}: check failed: the bitmap directory is corrupt")
            t_off, t_size, _, _, _, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(raw, pos)
            pos += BITMAP_DIR_ENTRY.size + extra + name_size
            pos += -pos % 8
            if pos > len(raw) or t_off % self.cs or t_size * 8 > self.io.size:
                res.corruptions += 1
                raise CheckFailed(f"{self.where}: check failed: the bitmap directory is corrupt")
            tables.append((t_off, t_size))
        if sum(size for _, size in tables) * 8 > TABLE_SLACK * self.io.size:
            raise ImageError(f"{self.where}: the bitmap tables claim more than the file holds")
        for t_off, t_size in tables:
            self._inc(res, imrt, t_off, t_size * 8)
            for e in unpack_u64_table(self.io.read(t_off, t_size * 8)):
                data = e & BME_OFFSET_MASK
                if e & BME_RESERVED_MASK or (data and (e & BME_ALL_ONES or data % self.cs)):
                    res.corruptions += 1
                    continue
                if data:
                    self._inc(res, imrt, data, self.cs)

    def _check_refblocks(self, res: CheckResult, fix: Fix, imrt: _Imrt) -> bool:
        """check_refblocks: each refcount block counted, and its table entry checked."""
        rebuild = False
        cs = self.cs
        for i, e in enumerate(self.disk.table):
            off = e & REFT_OFFSET_MASK
            c = off >> self.cb
            if e & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if off & (cs - 1):
                self.say(
                    f"ERROR refcount block {i} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                res.corruptions += 1
                rebuild = True
                continue
            if c >= imrt.nb:
                res.corruptions += 1
                repairing = bool(fix & Fix.ERRORS)
                self.say(
                    f"{'Repairing' if repairing else 'ERROR'} refcount block {i} is outside image"
                )
                if repairing:
                    if off >= 1 << 62:
                        self.say("ERROR could not resize image: Invalid argument")
                        rebuild = True
                        continue
                    # the block reads as zeroes past the end: make the file hold it
                    self._extend(off + cs)
                    imrt.grow(-(-self.io.size // cs))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self._inc(res, imrt, off, cs)
                continue
            if off:
                self._inc(res, imrt, off, cs)
                if imrt.a[c] != 1:
                    self.say(f"ERROR refcount block {i} refcount={imrt.a[c]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def _extend(self, size: int) -> None:
        try:
            os.ftruncate(self.io.fd, size)
        except OSError as exc:
            raise CheckFailed(f"{self.where}: could not resize image: {exc.strerror}") from None
        self.io.size = max(self.io.size, size)
        self.io.sync()

    # -- comparing: compare_refcounts ----------------------------------------------------------

    def _compare(self, res: CheckResult, fix: Fix, imrt: _Imrt, rebuild: bool) -> tuple[bool, int]:
        """compare_refcounts: the stored refcounts against ``imrt``, repaired as ``fix``
        allows. Returns (rebuild needed, the highest cluster in use)."""
        disk = self.disk
        per = self.codec.entries
        isz = imrt.a.itemsize
        highest = 0
        nb = imrt.nb
        ranges = -(-nb // per)
        self._phase(ranges)
        changed: list[tuple[int, array[int]]] = []
        for r in range(ranges):
            lo = r * per
            n = min(nb, lo + per) - lo
            want = imrt.a[lo : lo + n]
            try:
                blk = disk.block(r)
            except _Unreadable:
                for c in range(lo, lo + n):
                    self.say(f"Can't get refcount for cluster {c}: Input/output error")
                res.check_errors += n
                self._progress()
                continue
            have = blk[:n] if blk is not None else None
            if have == want or (have is None and want.count(0) == n):
                tail = len(want.tobytes().rstrip(b"\0"))
                if tail:
                    highest = lo + (tail - 1) // isz
                self._progress()
                continue
            new = array(blk.typecode, blk) if blk is not None else None
            for j in range(n):
                r1 = have[j] if have is not None else 0
                r2 = want[j]
                if r1 or r2:
                    highest = lo + j
                if r1 == r2:
                    continue
                c = lo + j
                fixed = None
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & Fix.LEAKS:
                    fixed = "leaks"
                elif r1 < r2 and fix & Fix.ERRORS:
                    fixed = "corruptions"
                word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.say(f"{word} cluster {c} refcount={r1} reference={r2}")
                if fixed is not None and new is not None:
                    new[j] = r2
                    if fixed == "leaks":
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
            if new is not None and new != blk:
                changed.append((r, new))
                if len(changed) >= 64:
                    self._write_blocks(changed)
            self._progress()
        self._write_blocks(changed)
        if fix:
            self.io.sync()
        return rebuild, highest

    def _write_blocks(self, changed: list[tuple[int, array[int]]]) -> None:
        for r, blk in changed:
            self.disk.write_block(r, blk)
        changed.clear()

    # -- rebuilding: rebuild_refcount_structure ------------------------------------------------

    def _rebuild(self, imrt: _Imrt) -> None:
        """Write a new refcount structure from ``imrt`` into clusters nothing references, then
        switch the header to it (see the module docstring for the order)."""
        # Clusters the old refcount table names, even through an entry too broken to use,
        # stay as they are until the header no longer points to it: counted as used here,
        # they are freed afterwards with the rest of the old structure.
        for e in self.disk.table:
            c = (e & REFT_OFFSET_MASK) >> self.cb
            if 0 < c < imrt.nb and not imrt.a[c]:
                imrt.a[c] = 1
        reftable: list[int] = []
        self._write_refblocks(imrt, 0, imrt.nb, reftable)
        while True:
            entries = len(reftable)
            clusters = -(-(entries * 8) // self.cs)
            first = imrt.alloc(clusters, 0)
            grown = self._write_refblocks(imrt, first, first + clusters, reftable)
            if not grown:
                break
        table = array("Q", reftable)
        if _LITTLE:
            table.byteswap()
        raw = table.tobytes()
        offset = first << self.cb
        self.io.write(offset, raw + bytes(clusters * self.cs - len(raw)))
        self.io.sync()
        self.io.write(OFF_REFCOUNT_TABLE, struct.pack(">QI", offset, clusters))
        self.io.sync()
        self.disk.load_table(offset, clusters)

    def _write_refblocks(self, imrt: _Imrt, start: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks: write the refcount block of every range of
        [start, end) that holds a referenced cluster, allocating blocks (in ``imrt``) where
        ``reftable`` has none. Returns whether ``reftable`` had to grow."""
        per = self.codec.entries
        grown = False
        r = start // per
        while r * per < end:
            lo = r * per
            part = imrt.window(max(lo, start), min(lo + per, end) - max(lo, start))
            if part.count(0) == len(part):
                r += 1
                continue
            if r < len(reftable) and reftable[r]:
                block = reftable[r] >> self.cb
            else:
                # never in a range whose block is already written
                block = imrt.alloc(1, lo)
                if block >= end:
                    end = block + 1
                if r >= len(reftable):
                    need = -(-((r + 1) * 8) // self.cs) * self.cs // 8
                    reftable.extend([0] * (need - len(reftable)))
                    grown = True
                reftable[r] = block << self.cb
            self.io.write(block << self.cb, self.codec.encode(imrt.window(lo, per)))
            r += 1
        return grown

    # -- the COPIED flags: check_oflag_copied --------------------------------------------------

    def _stored(self, c: int) -> int | None:
        try:
            return self.disk.get(c)
        except _Unreadable:
            return None

    def _check_oflag_copied(self, res: CheckResult) -> None:
        """Every active L1 and L2 entry must have COPIED set exactly when its cluster's
        refcount is 1; repaired with ``-r all``, or with ``-r leaks`` when nothing else is
        left to repair."""
        if self.fix & Fix.ERRORS:
            repair = True
        elif self.fix & Fix.LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        cb = self.cb
        h = self.header
        # L2 tables seen: their verdict holds for every further L1 entry pointing to them
        seen: dict[int, int] = {}
        self._phase(len({e & L1E_OFFSET_MASK for e in self.l1} - {0}))
        for i, l1e in enumerate(self.l1):
            l2 = l1e & L1E_OFFSET_MASK
            if not l2:
                continue
            rc = self._stored(l2 >> cb)
            if rc is None:
                continue
            if (rc == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.say(
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                )
                if repair:
                    new = l1e | OFLAG_COPIED if rc == 1 else l1e & ~OFLAG_COPIED
                    at = h.l1_table_offset + i * 8
                    hit = self._metadata_overlap(at, 8, skip_l1=True)
                    if hit is not None:
                        res.check_errors += 1
                        raise CheckFailed(
                            f"{self.where}: check failed: the L1 table overlaps {hit}; not written"
                        )
                    self.io.write(at, _BE_U64.pack(new))
                    self.l1[i] = new
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if l2 in seen:
                if not repair:
                    res.corruptions += seen[l2]
                continue
            seen[l2] = self._copied_l2(res, l2, repair, word)
            self._progress()
        if repair:
            self.io.sync()

    def _copied_l2(self, res: CheckResult, l2: int, repair: bool, word: str) -> int:
        """The COPIED flags of one L2 table; returns the corruptions it leaves (each further
        L1 entry pointing to the table finds them again; none once repaired)."""
        raw = self.io.read(l2, self.cs)
        if raw.count(0) == self.cs:
            return 0
        table = unpack_u64_table(raw)
        cb = self.cb
        dirty = found = 0
        for j, e in enumerate(table):
            if not e or e & OFLAG_COMPRESSED:
                continue
            off = e & L2E_OFFSET_MASK
            if not off:
                continue
            rc = self._stored(off >> cb)
            if rc is None:
                continue
            if (rc == 1) != bool(e & OFLAG_COPIED):
                res.corruptions += 1
                found += 1
                self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                if repair:
                    table[j] = e | OFLAG_COPIED if rc == 1 else e & ~OFLAG_COPIED
                    dirty += 1
        if dirty:
            hit = self._metadata_overlap(l2, self.cs)
            if hit is not None:
                self.say(
                    "ERROR: Could not write L2 table; metadata overlap check failed: "
                    "Input/output error"
                )
                res.check_errors += 1
                raise CheckFailed(
                    f"{self.where}: check failed: the L2 table at {l2:#x} overlaps {hit}; "
                    "not written"
                )
            out = array("Q", table)
            if _LITTLE:
                out.byteswap()
            self.io.write(l2, out.tobytes())
            res.corruptions -= dirty
            res.corruptions_fixed += dirty
        return 0 if repair else found

    # -- metadata overlap (qcow2_pre_write_overlap_check) ----------------------------------------

    def _metadata_regions(self) -> Iterator[tuple[str, int, int]]:
        """(name, start, end) byte ranges of the image's own metadata (L2 tables aside)."""
        h = self.header
        cs = self.cs
        yield "the header", 0, cs
        if h.l1_size:
            yield "the L1 table", h.l1_table_offset, h.l1_table_offset + h.l1_size * 8
        d = self.disk
        yield "the refcount table", d.table_offset, d.table_offset + d.table_clusters * cs
        for e in d.table:
            off = e & REFT_OFFSET_MASK
            if off:
                yield "a refcount block", off, off + cs
        if h.nb_snapshots:
            yield (
                "the snapshot table",
                h.snapshots_offset,
                h.snapshots_offset + max(self.snapshots_size, SNAPSHOT_ENTRY.size),
            )
        for sn in self.snapshots:
            if sn.l1_size:
                yield (
                    "a snapshot's L1 table",
                    sn.l1_table_offset,
                    sn.l1_table_offset + sn.l1_size * 8,
                )
        if self.bitmaps is not None:
            _, off, size = self.bitmaps
            yield "the bitmap directory", off, off + size

    def _metadata_overlap(self, offset: int, length: int, *, skip_l1: bool = False) -> str | None:
        """The metadata a write of [offset, offset + length) would hit, in whole clusters."""
        cb = self.cb
        first = offset >> cb
        last = (offset + length - 1) >> cb
        for name, start, end in self._metadata_regions():
            if skip_l1 and name == "the L1 table":
                continue
            if end > start and first <= (end - 1) >> cb and start >> cb <= last:
                return name
        return None

    # -- the header bits -------------------------------------------------------------------------

    def _mark_clean(self) -> None:
        """qcow2_mark_clean and qcow2_mark_consistent: clear the dirty and corrupt bits, after
        everything else is on disk."""
        h = self.header
        if h.version < 3:
            return
        bits = h.incompatible & ~(Incompatible.DIRTY | Incompatible.CORRUPT)
        if bits == h.incompatible:
            return
        self.io.sync()
        self.io.write(OFF_INCOMPATIBLE, _BE_U64.pack(bits))
        self.io.sync()


def _snapshot_table_size(raw: bytes, count: int) -> int:
    """The bytes the snapshot table takes (each entry padded to 8), walked over the table
    ``parse_snapshots`` already checked."""
    pos = 0
    for _ in range(count):
        _, _, id_len, name_len, _, _, _, _, extra_len = SNAPSHOT_ENTRY.unpack_from(raw, pos)
        pos += SNAPSHOT_ENTRY.size + extra_len + id_len + name_len
        pos += -pos % 8
    return pos
