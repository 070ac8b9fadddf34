"""The VHDX node: Hyper-V's image format (MS-VHDX v1.00), opened, its log replayed, and read.

What lives here: opening (identifier, headers, region tables, metadata, the BAT's shape, the log,
the parent), the one mapping function (:meth:`VhdxNode._lookup`) that serves read and
block_status with its fast path, the BAT and sector bitmap caches, and the header update every
writer of a VHDX file needs (:class:`HeaderPair`). On-disk structures and their checks are in
``format.py``, the log in ``log.py``, creation in ``create.py``.

This half reads. Writing (allocating payload blocks, BAT and sector bitmap updates through the
log, the DataWriteGuid on the first write) is not done yet: a node opened writable refuses
writes with :class:`UnsupportedFeature` (ENOTSUP), and one opened read-only with
:class:`ReadOnlyError`. Opening writable still does what the spec asks of an opener that may
write: a dirty log is replayed onto the file (see below).

The log, when the header names one to replay (MS-VHDX 2.3.3):

* opened writable, it is replayed onto the file: a header update gives the file a new
  FileWriteGuid first (2.2.2: before the first change, log playback included), the updates are
  written, the file is extended to the head's LastFileOffset and flushed, and only then a
  second header update clears the LogGuid. A crash anywhere in between leaves the log in place,
  to be replayed again (replay is idempotent);
* opened read-only, it is replayed into memory: the node reads its file through a
  :class:`~blockfs.nodes.vhdx.log.ReplayedFile`, which lays the replayed sectors over the
  file's own; nothing is written. ``describe()`` says which happened (``log-state``).

Invariants the code relies on:

* Every BAT page is checked when it is loaded (states, and block offsets inside the file and
  clear of the headers, log, BAT and metadata), so the fast path trusts what it finds. Pages
  are loaded whole at open while the BAT fits the cache (any disk up to 1 TiB in 1 MiB blocks,
  32 TiB in 32 MiB ones): their errors are then errors at open, and every read is a hit.
* The fast path (:meth:`VhdxNode.read` of a fully present block) is one dictionary lookup and
  one child call: it holds the cache's dict itself and must not gain an await or a call. It
  does not mark the page as recently used (the cache is FIFO for such pages; a miss reloads).
* Payload states: NOT_PRESENT reads from the parent (zeroes without one); ZERO, UNDEFINED and
  UNMAPPED read as zeroes (the spec allows zeroes for the latter two, for every disk type);
  FULLY_PRESENT reads the block; PARTIALLY_PRESENT (differencing only) reads each run of
  sectors from the block or the parent as the sector bitmap says. Sector bitmap entries of
  non-differencing images are never used, nor checked (QEMU has written garbage there).
"""

from __future__ import annotations

import errno
import logging
import sys
import uuid
from array import array
from dataclasses import dataclass
from typing import Protocol

import trio
from bitarray import bitarray

from blockfs.errors import ImageError, ReadOnlyError, UnsupportedFeature, UsageError
from blockfs.nodes.base import Capability, Extent, Limits, Node, Status
from blockfs.nodes.cache import TableCache
from blockfs.nodes.protocols import protocol_for, resolve_backing
from blockfs.nodes.vhdx.format import (
    BAT_GUID,
    BAT_STATE_MASK,
    HEAD_BYTES,
    HEADER_AREA,
    HEADER_OFFSETS,
    HEADER_SIZE,
    KEY_ABSOLUTE,
    KEY_RELATIVE,
    KEY_VOLUME,
    KNOWN_ITEMS,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    PATH_KEYS,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SECTOR_BITMAP_BLOCK,
    ZERO_GUID,
    BatGeometry,
    BitmapState,
    Header,
    Metadata,
    PayloadState,
    Region,
    bat_entry_offset,
    current_header,
    parse_file_identifier,
    parse_metadata,
    parse_metadata_table,
    parse_region_tables,
)
from blockfs.nodes.vhdx.log import (
    MAX_REPLAY_LOG,
    ReplayedFile,
    find_replay,
    replay_onto,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "vhdx"

# Kinds of run the mapping function returns.
K_UNALLOC = 0  # not in this file: the parent answers (or zeroes, without one)
K_ZERO = 1  # reads as zeroes
K_DATA = 2  # stored in this file at ``host``

_FULLY = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)
_PAYLOAD_STATES = frozenset(int(s) for s in PayloadState)

#: BAT pages: 64 KiB of entries each (8192), cached by file offset
PAGE_BITS = 13
PAGE_ENTRIES = 1 << PAGE_BITS
PAGE_BYTES = PAGE_ENTRIES * 8
#: budgets of the caches, in bytes of table (at least a few tables each)
BAT_CACHE_BYTES = 16 * 1024 * 1024
BITMAP_CACHE_BYTES = 8 * 1024 * 1024

#: what ``describe()`` says of the log
LOG_CLEAN = "clean"
LOG_REPLAYED = "replayed"
LOG_IN_MEMORY = "replayed in memory"


class OpenContextLike(Protocol):
    """What opening needs from the registry's OpenContext (not imported: the registry imports
    this package)."""

    read_only: bool

    async def open_backing(self, location: str, fmt: str | None, relative_to: str) -> Node: ...


class HeaderPair:
    """The current header and its slot. An update writes the next header (sequence number + 1)
    over the *other* slot and flushes (MS-VHDX 2.2.2.1): a crash leaves the old header or the
    new one current, never neither. Writers of the file (the log replay here, the writing half
    for its GUIDs) change the header through this alone."""

    def __init__(self, current: Header, slot: int) -> None:
        self.current = current
        self.slot = slot

    async def update(
        self,
        child: Node,
        *,
        file_write_guid: uuid.UUID | None = None,
        data_write_guid: uuid.UUID | None = None,
        log_guid: uuid.UUID | None = None,
    ) -> Header:
        new = self.current.next(
            file_write_guid=file_write_guid, data_write_guid=data_write_guid, log_guid=log_guid
        )
        other = 1 - self.slot
        child.debug_event("header_update")  # the error-injection filter's hook (inject.py)
        await child.write(HEADER_OFFSETS[other], new.pack())
        await child.flush()
        self.current, self.slot = new, other
        return new


@dataclass(frozen=True, slots=True)
class LogOutcome:
    """What opening did with the log."""

    state: str  # LOG_CLEAN, LOG_REPLAYED, LOG_IN_MEMORY
    entries: int = 0  # entries of the active sequence replayed


class VhdxNode(Node):
    """A VHDX image over one child node (normally a ``file`` node)."""

    format_name = FORMAT_NAME
    capabilities = Capability.EXTENTS

    def __init__(
        self,
        child: Node,
        headers: HeaderPair,
        regions: dict[uuid.UUID, Region],
        metadata: Metadata,
        creator: str,
        log_outcome: LogOutcome,
        read_only: bool,
    ) -> None:
        self.child = child
        self.filename = child.filename
        self.headers = headers
        self.regions = regions
        self.metadata = metadata
        self.creator = creator
        self.log_outcome = log_outcome
        self.read_only = read_only
        self.size = metadata.virtual_size
        self.geometry = g = BatGeometry(
            metadata.block_size,
            metadata.logical_sector_size,
            metadata.virtual_size,
            metadata.has_parent,
        )
        bs = metadata.block_size
        self.limits = Limits(cluster_size=bs)
        self._bs = bs
        self._bb = bs.bit_length() - 1
        self._bmask = bs - 1
        self._crb = g.chunk_ratio.bit_length() - 1
        self._lss = metadata.logical_sector_size
        self._bat_off = regions[BAT_GUID].file_offset
        #: BAT pages by file offset; ``_pages`` is its dict, held for the fast path
        self.bat_cache: TableCache[array[int]] = TableCache(max(4, BAT_CACHE_BYTES // PAGE_BYTES))
        self._pages = self.bat_cache.tables
        #: the sector bitmap of one payload block each, by file offset
        self.bitmap_cache: TableCache[bitarray] = TableCache(
            max(4, BITMAP_CACHE_BYTES // max(1, g.bitmap_bytes_per_block))
        )
        #: where no payload block or sector bitmap may lie: the headers, the log, the regions
        h = headers.current
        self._spans = [(0, HEADER_AREA, "the file header area")]
        if h.log_length:
            self._spans.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        self._spans += [(r.file_offset, r.end, f"the {r.name} region") for r in regions.values()]
        self._allocated: int | None = None
        #: the parent as the locator named it (the path that opened), for describe()
        self.parent_name: str | None = None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, child: Node, ctx: OpenContextLike) -> VhdxNode:
        """Read and check the identifier, headers, log, regions and metadata; replay a dirty
        log; load the BAT; open the parent of a differencing image.

        :raise ImageError: a corrupt or hostile image (one line naming the field).
        :raise UnsupportedFeature: a version, region or metadata item this code does not know.
        """
        where = child.filename
        if child.size < HEAD_BYTES:
            raise ImageError(f"{where}: {child.size} bytes is too short for a VHDX image")
        head = await child.read(0, HEAD_BYTES)
        creator = parse_file_identifier(head, where)
        first, second = (head[o : o + HEADER_SIZE] for o in HEADER_OFFSETS)
        headers = HeaderPair(*current_header(first, second, child.size, where))
        read_only = ctx.read_only or child.read_only
        view, outcome = await _settle_log(child, headers, read_only, where)
        if outcome.state != LOG_CLEAN:
            head = await view.read(0, HEAD_BYTES)  # the log may have changed the region tables
        rt1, rt2 = (head[o : o + REGION_TABLE_SIZE] for o in REGION_TABLE_OFFSETS)
        regions = parse_region_tables(rt1, rt2, headers.current, view.size, where)
        metadata = await _read_metadata(view, regions[METADATA_GUID], where)
        g = BatGeometry(
            metadata.block_size,
            metadata.logical_sector_size,
            metadata.virtual_size,
            metadata.has_parent,
        )
        g.check_bat_region(regions[BAT_GUID].length, where)
        node = cls(view, headers, regions, metadata, creator, outcome, read_only)
        await node._preload_bat()
        if metadata.has_parent:
            node.backing = await node._open_parent(ctx)
        return node

    async def _open_parent(self, ctx: OpenContextLike) -> Node:
        """Open the parent through the registry (so the loop, depth and probing rules hold)
        at the first of the locator's paths, in the spec's order (relative, volume, absolute),
        that names existing storage (the first usable one when none can be told), and check
        that it is the parent this image was made from: its DataWriteGuid is the linkage.

        One path is opened, never several in turn: each level of a chain tried twice over would
        cost 2^depth opens on a hostile chain.

        :raise ImageError: no usable path, a parent that cannot be opened (the registry's
            one line), or one that changed since (another DataWriteGuid).
        """
        loc = self.metadata.parent
        assert loc is not None
        usable = [(k, p) for k, p in parent_candidates(loc.entries) if p is not None]
        if not usable:
            named = ", ".join(f"{k} {v!r}" for k, v in loc.entries.items() if k in PATH_KEYS)
            raise ImageError(f"{self.filename}: no parent path usable on this system ({named})")
        key, path = next(
            ((k, p) for k, p in usable if _names_existing(self.filename, p)), usable[0]
        )
        parent = await ctx.open_backing(path, FORMAT_NAME, relative_to=self.filename)
        guid = parent.headers.current.data_write_guid if isinstance(parent, VhdxNode) else None
        if guid is None or guid not in (loc.linkage, loc.linkage2):
            await _close_chain(parent)
            raise ImageError(
                f"{self.filename}: its parent {path} ({key}) has data write GUID {guid}, but "
                f"this image was made from {loc.linkage}: the parent changed since",
                errno=errno.EINVAL,
            )
        self.parent_name = path
        return parent

    async def _preload_bat(self) -> None:
        """Load every BAT page while the BAT fits the cache (see the module docstring)."""
        pages = -(-self.geometry.total_entries // PAGE_ENTRIES)
        if pages <= self.bat_cache.capacity:
            for p in range(pages):
                await self.bat_cache.load(self._bat_off + p * PAGE_BYTES, self._read_page)

    # -- the BAT and the sector bitmaps --------------------------------------------------------

    async def _read_page(self, key: int) -> array[int]:
        table = array("Q")
        table.frombytes(await self.child.read(key, PAGE_BYTES))
        if sys.byteorder == "big":
            table.byteswap()
        self._check_page(table, (key - self._bat_off) // 8)
        return table

    def _check_page(self, table: array[int], first: int) -> None:
        """:raise ImageError: an entry of the page (whose first entry is ``first``) in a state
        its disk type forbids, or placing a block where it cannot be."""
        g = self.geometry
        per_chunk = g.chunk_ratio + 1
        has_parent = g.has_parent
        for i in range(min(len(table), g.total_entries - first)):
            e = table[i]
            if not e:
                continue
            idx = first + i
            state = e & BAT_STATE_MASK
            if (idx + 1) % per_chunk == 0:  # a sector bitmap entry
                if not has_parent or state == BitmapState.NOT_PRESENT:
                    continue
                if state != BitmapState.PRESENT:
                    raise ImageError(
                        f"{self.filename}: BAT entry {idx}: sector bitmap state {state}"
                    )
                self._check_block_place(idx, e, SECTOR_BITMAP_BLOCK, "sector bitmap block")
            elif state == _FULLY or state == _PARTIAL:
                if state == _PARTIAL and not has_parent:
                    raise ImageError(
                        f"{self.filename}: BAT entry {idx} is partially present in an image "
                        "without a parent"
                    )
                self._check_block_place(idx, e, self._bs, "payload block")
            elif state not in _PAYLOAD_STATES:
                raise ImageError(f"{self.filename}: BAT entry {idx} has reserved state {state}")

    def _check_block_place(self, idx: int, entry: int, length: int, what: str) -> None:
        off = bat_entry_offset(entry)
        fsize = self.child.size
        if off >= fsize:
            raise ImageError(
                f"{self.filename}: BAT entry {idx} puts a {what} at {off:#x}, past the end of "
                f"the file ({fsize:#x})"
            )
        for start, end, name in self._spans:
            if off < end and off + length > start:
                raise ImageError(
                    f"{self.filename}: BAT entry {idx} puts a {what} at {off:#x}, inside {name}"
                )

    async def _entry(self, idx: int) -> int:
        key = self._bat_off + ((idx >> PAGE_BITS) * PAGE_BYTES)
        table = await self.bat_cache.load(key, self._read_page)
        return table[idx & (PAGE_ENTRIES - 1)]

    async def _read_bitmap(self, key: int) -> bitarray:
        bits = bitarray(endian="little")
        bits.frombytes(await self.child.read(key, self.geometry.bitmap_bytes_per_block))
        return bits

    async def _bitmap_key(self, block: int) -> int:
        """File offset of the sector bitmap of payload ``block`` (partially present).
        :raise ImageError: its chunk has no sector bitmap block."""
        g = self.geometry
        sb = await self._entry(g.bitmap_index(block))
        if sb & BAT_STATE_MASK != BitmapState.PRESENT:
            raise ImageError(
                f"{self.filename}: payload block {block} is partially present, but its chunk "
                "has no sector bitmap"
            )
        return bat_entry_offset(sb) + (block % g.chunk_ratio) * g.bitmap_bytes_per_block

    # -- the mapping function ------------------------------------------------------------------

    def _lookup(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """Map the guest range at ``offset`` (at most ``length`` bytes, within one block) to its
        first run of one kind: ``(kind, host, n)``, ``host`` the file offset of ``offset`` for
        K_DATA. None when a BAT page or sector bitmap it needs is not cached (see :meth:`_map`).
        Synchronous: the answer is consistent with the tables at one instant."""
        block = offset >> self._bb
        inb = offset & self._bmask
        avail = self._bs - inb
        if avail > length:
            avail = length
        idx = block + (block >> self._crb)
        table = self._pages.get(self._bat_off + ((idx >> PAGE_BITS) * PAGE_BYTES))
        if table is None:
            return None
        e = table[idx & (PAGE_ENTRIES - 1)]
        state = e & BAT_STATE_MASK
        if state == _FULLY:
            return K_DATA, bat_entry_offset(e) + inb, avail
        if state == _NOT_PRESENT:
            return K_UNALLOC, 0, avail
        if state == _PARTIAL:
            return self._lookup_partial(block, e, inb, avail)
        return K_ZERO, 0, avail

    def _lookup_partial(
        self, block: int, entry: int, inb: int, avail: int
    ) -> tuple[int, int, int] | None:
        """The first run of sectors of one bit in a partially present block's bitmap."""
        g = self.geometry
        sb_idx = g.bitmap_index(block)
        table = self._pages.get(self._bat_off + ((sb_idx >> PAGE_BITS) * PAGE_BYTES))
        if table is None:
            return None
        sb = table[sb_idx & (PAGE_ENTRIES - 1)]
        if sb & BAT_STATE_MASK != BitmapState.PRESENT:
            return None  # _map's load of the bitmap raises the error
        key = bat_entry_offset(sb) + (block % g.chunk_ratio) * g.bitmap_bytes_per_block
        bits = self.bitmap_cache.get(key)
        if bits is None:
            return None
        lss = self._lss
        s0 = inb // lss
        bit = bits[s0]
        nxt = bits.find(not bit, s0 + 1, (inb + avail + lss - 1) // lss)
        n = avail if nxt < 0 else nxt * lss - inb
        if bit:
            return K_DATA, bat_entry_offset(entry) + inb, n
        return K_UNALLOC, 0, n

    async def _map(self, offset: int, length: int) -> tuple[int, int, int]:
        """:meth:`_lookup`, loading the BAT page and sector bitmap first when needed."""
        while True:
            m = self._lookup(offset, length)
            if m is not None:
                return m
            block = offset >> self._bb
            e = await self._entry(self.geometry.payload_index(block))
            if e & BAT_STATE_MASK == _PARTIAL:
                key = await self._bitmap_key(block)
                await self.bitmap_cache.load(key, self._read_bitmap)

    # -- reading -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        block = offset >> self._bb
        idx = block + (block >> self._crb)
        table = self._pages.get(self._bat_off + ((idx >> PAGE_BITS) * PAGE_BYTES))
        if table is not None:
            e = table[idx & (PAGE_ENTRIES - 1)]
            inb = offset & self._bmask
            if e & BAT_STATE_MASK == _FULLY and inb + length <= self._bs:
                return await self.child.read(bat_entry_offset(e) + inb, length)
        return await self._read_range(offset, length)

    async def _read_range(self, offset: int, length: int) -> bytes:
        """Read guest bytes of this layer and its chain."""
        out = bytearray(length)
        pos = 0
        while pos < length:
            off = offset + pos
            kind, host, n = await self._map(off, length - pos)
            if kind == K_DATA:
                out[pos : pos + n] = await self.child.read(host, n)
            elif kind == K_UNALLOC:
                b = self.backing
                if b is not None and off < b.size:
                    r = min(n, b.size - off)
                    out[pos : pos + r] = await b.read(off, r)
            pos += n
        return bytes(out)

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
        """Payload blocks present in this file (fully or partially), in bytes; counted once."""
        if self._allocated is None:
            g = self.geometry
            count = 0
            for block in range(g.data_blocks):
                state = await self._entry(g.payload_index(block)) & BAT_STATE_MASK
                count += state == _FULLY or state == _PARTIAL
            self._allocated = count * self._bs
        return self._allocated

    # -- writing: the second half --------------------------------------------------------------

    def _refuse_write(self) -> Exception:
        if self.read_only:
            return ReadOnlyError(f"{self.filename} is open read-only")
        return UnsupportedFeature(
            f"{self.filename}: writing VHDX images is not supported yet (open it read-only)"
        )

    async def write(self, offset: int, data: bytes) -> None:
        raise self._refuse_write()

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        raise self._refuse_write()

    async def discard(self, offset: int, length: int) -> None:
        raise self._refuse_write()

    async def flush(self) -> None:
        if not self.read_only:
            await self.child.flush()

    async def reopen(self, read_only: bool) -> None:
        """Switch modes (see :meth:`Node.reopen`). Going writable does what a writable open
        does with a log the header still names (one without entries, when it was opened
        read-only: nothing was replayed in memory). An image whose log was replayed into memory
        cannot become writable in place: it must be opened again, which replays onto the file.

        :raise UnsupportedFeature: that case. :raise BlockfsError: the child cannot be reopened,
            or the log not settled; the node stays read-only.
        """
        if read_only == self.read_only:
            return
        if not read_only and isinstance(self.child, ReplayedFile):
            raise UnsupportedFeature(
                f"{self.filename}: its log was replayed in memory; open it writable to replay "
                "the log onto the file"
            )
        await super().reopen(read_only)
        if read_only or not self.headers.current.log_dirty:
            return
        try:
            _, self.log_outcome = await _settle_log(self.child, self.headers, False, self.filename)
        except BaseException:
            with trio.CancelScope(shield=True):
                await super().reopen(True)
            raise

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        await self.child.aclose()

    def describe(self) -> dict[str, object]:
        d = super().describe()
        m = self.metadata
        h = self.headers.current
        parent = m.parent
        d.update(
            {
                "cluster-size": self._bs,
                "block-size": self._bs,
                "subformat": m.disk_type.value,
                "logical-sector-size": m.logical_sector_size,
                "physical-sector-size": m.physical_sector_size,
                "log-state": self.log_outcome.state,
                "log-entries-replayed": self.log_outcome.entries,
                "log-size": h.log_length,
                "virtual-disk-id": str(m.virtual_disk_id),
                "data-write-guid": str(h.data_write_guid),
                "file-write-guid": str(h.file_write_guid),
                "log-guid": str(h.log_guid),
                "creator": self.creator,
                "backing-filename": self.parent_name,
                "backing-format": FORMAT_NAME if parent is not None else None,
                "parent-linkage": str(parent.linkage) if parent is not None else None,
                "parent-locator": dict(parent.entries) if parent is not None else None,
            }
        )
        return d


# -- helpers of opening -------------------------------------------------------------------------


async def _settle_log(
    child: Node, headers: HeaderPair, read_only: bool, where: str
) -> tuple[Node, LogOutcome]:
    """Replay a dirty log (see the module docstring): the node to read the file through, and
    what was done.

    :raise ImageError: a hostile log. :raise UnsupportedFeature: a log too large to replay.
    """
    h = headers.current
    if not h.log_dirty:
        return child, LogOutcome(LOG_CLEAN)
    if h.log_length > MAX_REPLAY_LOG:
        raise UnsupportedFeature(
            f"{where}: a log of {h.log_length} bytes to replay (at most {MAX_REPLAY_LOG} are)"
        )
    ring = await child.read(h.log_offset, h.log_length)
    replay = find_replay(ring, h.log_guid, log_offset=h.log_offset, fsize=child.size, where=where)
    count = len(replay.entries)
    if read_only:
        if not count:
            return child, LogOutcome(LOG_CLEAN)  # the GUID is set, but no entry was written
        log.info("%s: log of %d entries replayed in memory (opened read-only)", where, count)
        return ReplayedFile(child, replay), LogOutcome(LOG_IN_MEMORY, count)
    await headers.update(child, file_write_guid=uuid.uuid4())
    await replay_onto(child, replay)
    await child.flush()
    await headers.update(child, log_guid=ZERO_GUID)
    log.info("%s: log of %d entries replayed onto the file", where, count)
    return child, LogOutcome(LOG_REPLAYED, count)


async def _read_metadata(child: Node, region: Region, where: str) -> Metadata:
    """The metadata region's table and known items (never an unknown one: an item is read only
    when its length was checked against the region and the 1 MiB bound)."""
    table = await child.read(region.file_offset, METADATA_TABLE_SIZE)
    entries = parse_metadata_table(table, region.length, where)
    values = {}
    for item_id, e in entries.items():
        if item_id in KNOWN_ITEMS:
            values[item_id] = (
                await child.read(region.file_offset + e.offset, e.length) if e.length else b""
            )
    return parse_metadata(values, where)


def parent_candidates(entries: dict[str, str]) -> list[tuple[str, str | None]]:
    """The locator's paths in the spec's order (2.6.2.6.2: relative, volume, absolute), each as
    a path of this system, or None where it names a Windows volume or drive. Windows
    separators become ``/``; a relative path is resolved against the child's folder by the
    registry, as backing names are."""
    out: list[tuple[str, str | None]] = []
    for key in (KEY_RELATIVE, KEY_VOLUME, KEY_ABSOLUTE):
        value = entries.get(key)
        if value is not None:
            out.append((key, _posix_path(value, relative=key == KEY_RELATIVE)))
    return out


def _posix_path(value: str, *, relative: bool) -> str | None:
    if value.startswith("\\\\?\\"):
        value = value[4:]
    if (len(value) >= 2 and value[1] == ":") or value.lower().startswith("volume{"):
        return None  # a drive letter or a volume GUID: nothing here to resolve it against
    path = value.replace("\\", "/")
    if not path or "\0" in path or path.startswith("/") == relative:
        return None
    return path


def _names_existing(relative_to: str, path: str) -> bool:
    """Does ``path`` (resolved as a backing name of ``relative_to``) name storage that exists,
    as far as its protocol can tell cheaply (a local file: a stat)?"""
    try:
        location = resolve_backing(relative_to, path)
        return protocol_for(location).named_identity(location) is not None
    except UsageError:
        return False


async def _close_chain(node: Node) -> None:
    backing = node.backing
    await node.aclose()
    if backing is not None:
        await _close_chain(backing)
