"""The VHDX node: Hyper-V's image format (MS-VHDX v1.00), opened, its log replayed, read and
written.

What lives here: opening (identifier, headers, region tables, metadata, the BAT's shape, the log,
the parent), the one mapping function (:meth:`VhdxNode._lookup`) that serves read, write and
block_status with its fast path, the BAT and sector bitmap caches, the writing of payload blocks,
BAT entries and sector bitmaps, the failsafe, and the header update every writer of a VHDX file
needs (:class:`HeaderPair`). On-disk structures and their checks are in ``format.py``, the log's
structures and its replay in ``log.py``, the writing of the log in ``logwriter.py``, creation in
``create.py``.

The log, when the header names one to replay (MS-VHDX 2.3.3):

* opened writable, it is replayed onto the file: a header update gives the file a new
  FileWriteGuid first (2.2.2: before the first change, log playback included), the updates are
  written, the file is extended to the head's LastFileOffset and flushed, and only then a
  second header update clears the LogGuid. A crash anywhere in between leaves the log in place,
  to be replayed again (replay is idempotent);
* opened read-only, it is replayed into memory: the node reads its file through a
  :class:`~blockfs.nodes.vhdx.log.ReplayedFile`, which lays the replayed sectors over the
  file's own; nothing is written. ``describe()`` says which happened (``log-state``).

Writing. Before the first change after an open (of data or metadata), a header update gives the
file a new FileWriteGuid and DataWriteGuid (2.2.2); until then ``write``, ``write_zeroes`` and
``discard`` are shadowed by a hook that does it, so the fast path pays nothing. A write into a
FULLY_PRESENT block goes in place. Anything else claims the block (``_claims``: two requests
never allocate one block twice), then:

* a new payload block comes from space the block's entry retains (ZERO, UNMAPPED, UNDEFINED
  with a FileOffsetMB that passes the placement checks), or from the end of the file, 1 MiB
  aligned, the file grown first (``_grow``): fresh space reads as zeroes, so only the data is
  written; retained space gets the rest of the block zeroed first (fallocate, no buffers);
* in a differencing image a write that covers part of a NOT_PRESENT block makes it
  PARTIALLY_PRESENT: its sectors are written (a partial sector filled from the parent) and
  their bits set in the sector bitmap (a bitmap block is allocated for the chunk when it has
  none); a PARTIALLY_PRESENT block gains bits so, and becomes FULLY_PRESENT once every sector
  is present;
* then the BAT entry (and bitmap) change goes through the log (``logwriter.py``): data first,
  then the log entry, then the tables in memory.

``write_zeroes`` of whole blocks makes them ZERO through the log (keeping the block's space, its
storage freed with ``may_unmap``), ``discard`` of whole blocks UNMAPPED; partial ranges are
zeroed in place (a FULLY_PRESENT block: fallocate) or already read as zeroes. A fixed image
keeps every block allocated: zeroes are written in place, discard does nothing. A differencing
image never gets ZERO or UNMAPPED blocks from this code (libvhdi reads them from the parent):
zeroed whole blocks become FULLY_PRESENT over freed space, and discard does nothing.

Invariants the code relies on:

* Every BAT page is checked when it is loaded (states, and block offsets inside the file and
  clear of the headers, log, BAT and metadata), so the fast path trusts what it finds. Pages
  are loaded whole at open while the BAT fits the cache (any disk up to 1 TiB in 1 MiB blocks,
  32 TiB in 32 MiB ones): their errors are then errors at open, and every read is a hit.
* The fast paths (:meth:`VhdxNode.read` and :meth:`VhdxNode.write` of a fully present block)
  are one dictionary lookup and one child call: they hold the cache's dict itself and must not
  gain an await or a call. They do not mark the page as recently used (the cache is FIFO for
  such pages; a miss reloads).
* Payload states: NOT_PRESENT reads from the parent (zeroes without one); ZERO, UNDEFINED and
  UNMAPPED read as zeroes (the spec allows zeroes for the latter two, for every disk type);
  FULLY_PRESENT reads the block; PARTIALLY_PRESENT (differencing only) reads each run of
  sectors from the block or the parent as the sector bitmap says. Sector bitmap entries of
  non-differencing images are never used, nor checked (QEMU has written garbage there).
* Write-through: a metadata change reaches the file (as a log entry) before the request that
  made it returns, and before the tables in memory show it, so no task acts on a mapping that
  is not in the file; a kill -9 loses no acknowledged write (a reopen replays the log). The
  file's own BAT and bitmap sectors may lag behind the log until a flush or checkpoint: every
  metadata read from the file (a BAT page, a bitmap) goes through ``_read_meta``, which lays
  the logged images over it, so an evicted table never comes back stale.
* Data before metadata: a block's data is written before the log entry that makes it visible.
  The log entry is not flushed at once (a group commit, see ``logwriter.py``): ``flush`` makes
  data and entries durable together; a power loss before it may lose a write, never expose
  another block's or file's old bytes (new space is fresh, retained space is zeroed first).
* Space is never shared: new blocks come from the end of the file (``_grow``, serialised, the
  file only grows) or from space this block's own entry retains. Space of a failed write is
  kept for the next allocation (``_spare``), zeroed like retained space.
* Failsafe: every metadata write (log entries, in-place BAT and bitmap sectors, headers) passes
  :meth:`VhdxNode.write_metadata` and every flush :meth:`VhdxNode.flush_child`. When one fails
  the node stops as if killed at that instant, which the log makes safe: writes, zeroes and
  discards fail with EIO, reads go on, close writes nothing (the log stays, for the next open
  to replay), and after a failed flush every later flush fails too. A failed data write changes
  no metadata and needs no failsafe.
* Each metadata write is announced to the child first (``debug_event``: ``header_update``,
  ``log_write``, ``bat_update``, ``bitmap_update``; data into a new block is ``block_alloc``);
  a mapped read or write announces nothing.

Commit and stream. A parent's first write of a session gives it a new DataWriteGuid (as the
spec demands), which would unlink its children: before a commit writes into a parent, the child
above it records the GUID that write will set (fixed in advance: ``pending_data_write_guid``) as
its second linkage (``parent_will_change``). ``change_backing_file`` writes a new parent locator,
or (no parent) turns the image into a dynamic one. Metadata items change through the log too:
the changed sectors of the metadata table and items are one entry, so a crash leaves the old
items or the new ones; such changes set a new FileWriteGuid first, but keep the DataWriteGuid
(the disk reads the same, and the children stay linked).

Not done here: resizing (``truncate`` refuses), and reuse of space freed by other writers'
entries beyond the block's own.
"""

from __future__ import annotations

import errno
import logging
import sys
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import trio
from bitarray import bitarray

from blockfs.errors import BlockfsError, ImageError, ReadOnlyError, UnsupportedFeature, UsageError
from blockfs.nodes.base import (
    Capability,
    DirectIo,
    Extent,
    Limits,
    Node,
    Status,
    chain_block_status,
    fill_zeroes,
    read_below_direct,
)
from blockfs.nodes.cache import TableCache
from blockfs.nodes.failsafe import FailsafeNode
from blockfs.nodes.protocols import protocol_for, resolve_backing
from blockfs.nodes.vhdx.create import locator_entries, parent_location
from blockfs.nodes.vhdx.format import (
    BAT_GUID,
    BAT_STATE_MASK,
    FILE_PARAMETERS,
    HEAD_BYTES,
    HEADER_AREA,
    HEADER_OFFSETS,
    HEADER_SIZE,
    KEY_ABSOLUTE,
    KEY_LINKAGE,
    KEY_LINKAGE2,
    KEY_RELATIVE,
    KEY_VOLUME,
    KNOWN_ITEMS,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    PARENT_LOCATOR,
    PATH_KEYS,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SECTOR_BITMAP_BLOCK,
    ZERO_GUID,
    BatGeometry,
    BitmapState,
    Header,
    Metadata,
    MiB,
    ParentLocator,
    PayloadState,
    Region,
    bat_entry,
    bat_entry_offset,
    change_metadata_items,
    current_header,
    linkage_text,
    pack_file_parameters,
    parse_file_identifier,
    parse_metadata,
    parse_metadata_table,
    parse_region_tables,
)
from blockfs.nodes.vhdx.log import (
    MAX_REPLAY_LOG,
    SECTOR,
    DataUpdate,
    ReplayedFile,
    find_replay,
    replay_onto,
)
from blockfs.nodes.vhdx.logwriter import MAX_ENTRY_UPDATES, LoggedSector, LogWriter

log = logging.getLogger(__name__)

FORMAT_NAME = "vhdx"

# Kinds of run the mapping function returns.
K_UNALLOC = 0  # not in this file: the parent answers (or zeroes, without one)
K_ZERO = 1  # reads as zeroes
K_DATA = 2  # stored in this file at ``host``

_FULLY = int(PayloadState.FULLY_PRESENT)
_PARTIAL = int(PayloadState.PARTIALLY_PRESENT)
_NOT_PRESENT = int(PayloadState.NOT_PRESENT)
_ZERO = int(PayloadState.ZERO)
_UNMAPPED = int(PayloadState.UNMAPPED)
_UNDEFINED = int(PayloadState.UNDEFINED)
_PAYLOAD_STATES = frozenset(int(s) for s in PayloadState)
#: states whose FileOffsetMB may retain the block's space (2.5.1.1), reused when it is written
_RETAINING = frozenset((_ZERO, _UNMAPPED, _UNDEFINED))
_SB_PRESENT = int(BitmapState.PRESENT)
#: the BAT entry's FileOffsetMB, as a mask (bits 20-63)
_OFFSET_MASK = ~((1 << 20) - 1)
#: BAT entries per 4 KiB sector of the BAT
_SECTOR_ENTRIES = SECTOR // 8
#: whole blocks zeroed or discarded per batch (their claims held together): at most a few
#: BAT sectors per log entry
_ZERO_BATCH = 4 * _SECTOR_ENTRIES
#: partially present blocks made fully present per batch (claims held, one flush)
_FILL_BATCH = 64

WriteFn = Callable[[str, int, bytes], Awaitable[None]]
FlushFn = Callable[[], Awaitable[None]]

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
        write: WriteFn | None = None,
        flush: FlushFn | None = None,
    ) -> Header:
        """Write the next header and flush. A writer with a failsafe passes its guarded
        ``write(event, offset, data)`` and ``flush()``; the defaults go straight to ``child``.
        Callers serialise updates (two at once would both write the same slot)."""
        new = self.current.next(
            file_write_guid=file_write_guid, data_write_guid=data_write_guid, log_guid=log_guid
        )
        other = 1 - self.slot
        if write is None:
            child.debug_event("header_update")  # the error-injection filter's hook (inject.py)
            await child.write(HEADER_OFFSETS[other], new.pack())
        else:
            await write("header_update", HEADER_OFFSETS[other], new.pack())
        await (child.flush if flush is None else flush)()
        self.current, self.slot = new, other
        return new


@dataclass(frozen=True, slots=True)
class LogOutcome:
    """What opening did with the log."""

    state: str  # LOG_CLEAN, LOG_REPLAYED, LOG_IN_MEMORY
    entries: int = 0  # entries of the active sequence replayed


class VhdxNode(FailsafeNode):
    """A VHDX image over one child node (normally a ``file`` node)."""

    AFTER_BREAK = "its log is replayed at the next open"
    BREAK_ON_CANCEL = True

    format_name = FORMAT_NAME

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
        # -- the write half --
        self._diff = metadata.has_parent
        self._fixed = metadata.leave_blocks_allocated and not metadata.has_parent
        self._sectors_per_block = bs // self._lss
        caps = Capability.EXTENTS | Capability.ZERO
        if self._fixed:  # zeroes in place, through the file's own zeroing
            caps = Capability.EXTENTS | (child.capabilities & Capability.ZERO)
        elif not self._diff:
            caps |= Capability.DISCARD
        self._capabilities = caps
        self._log = LogWriter(
            h.log_offset,
            h.log_length,
            lambda: self.child.size,
            write=self.write_metadata,
            flush=self.flush_child,
            set_log_guid=self._set_log_guid,
        )
        #: BAT index -> the event set when the task that claimed that entry is done
        self._claims: dict[int, trio.Event] = {}
        self._grow_lock = trio.Lock()
        self._header_lock = trio.Lock()
        self._start_lock = trio.Lock()
        #: where the next block goes (MiB aligned), once the first one was allocated
        self._file_end: int | None = None
        #: block-sized space taken from the end of the file by writes that then failed
        self._spare: list[int] = []
        #: the GUIDs were changed since this open (see "Writing" above)
        self._writing = False
        #: the FileWriteGuid was changed since this open, for a change of metadata alone
        self._file_changed = False
        #: the DataWriteGuid the first write will set, once a child asked for it in advance
        #: (:meth:`pending_data_write_guid`)
        self._pending_guid: uuid.UUID | None = None
        #: the parent is being dropped (:meth:`_drop_parent`): no new partially present block
        self._dropping_parent = False
        # the failsafe (see "Failsafe" above; blockfs.nodes.failsafe)
        self._init_failsafe()
        self._closed = False

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
        node._arm_first_write()
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
        table.frombytes(await self._read_meta(key, PAGE_BYTES))
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
        bits.frombytes(await self._read_meta(key, self.geometry.bitmap_bytes_per_block))
        return bits

    async def _read_meta(self, offset: int, length: int) -> bytes:
        """Metadata as the file holds it once the log is applied: the file's bytes with the
        images of sectors logged but not yet written in place laid over them."""
        data = await self.child.read(offset, length)
        dirty = self._log.dirty
        if not dirty:
            return data
        buf: bytearray | None = None
        end = offset + length
        for s in range(offset - offset % SECTOR, end, SECTOR):
            d = dirty.get(s)
            if d is not None:
                if buf is None:
                    buf = bytearray(data)
                lo, hi = max(s, offset), min(s + SECTOR, end)
                buf[lo - offset : hi - offset] = d.image[lo - s : hi - s]
        return data if buf is None else bytes(buf)

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
        kind, host, n = await self._map(offset, length)
        if kind == K_UNALLOC:
            return Extent(offset, n, Status(0))
        if kind == K_ZERO:
            return Extent(offset, n, Status.ZERO | Status.ALLOCATED)
        return Extent(offset, n, Status.DATA | Status.ALLOCATED, 0, host)

    async def allocated_bytes(self) -> int:
        """Payload blocks present in this file (fully or partially), in bytes; counted once."""
        if self._allocated is None:
            g = self.geometry
            count = 0
            for block in range(g.data_blocks):
                state = await self._entry(g.payload_index(block)) & BAT_STATE_MASK
                count += state == _FULLY or state == _PARTIAL
                if block % 4096 == 4095:  # a big disk's walk never holds the event loop
                    await trio.lowlevel.checkpoint()
            self._allocated = count * self._bs
        return self._allocated

    # -- the data path of the FUSE reader threads ----------------------------------------------

    def direct_io(self) -> DirectIo | None:
        """Reads of fully present blocks, of blocks that read as zeroes, and of blocks not
        present (through the parent's own direct path); writes into fully present blocks once
        the first write after the open changed the GUIDs. Everything else (a partially
        present block, an allocation, a BAT page not in the cache) is declined and goes to the
        event loop. Safe from a thread: a block's space is never given to another block
        (``_grow``, retained space), so a mapping a thread read is never another block's."""
        below = self.child.direct_io()
        if below is None or below.write is None:
            return None
        child_read, child_write = below.readinto, below.write

        def read(offset: int, view: memoryview) -> bool:
            e = self._direct_entry(offset, len(view))
            if e is None:
                return False
            state = e & BAT_STATE_MASK
            if state == _FULLY:
                return child_read(bat_entry_offset(e) + (offset & self._bmask), view)
            if state == _NOT_PRESENT:
                return read_below_direct(self.backing, offset, view)
            if state == _PARTIAL:
                return False
            fill_zeroes(view)  # ZERO, UNDEFINED, UNMAPPED
            return True

        def write(offset: int, view: memoryview) -> bool:
            if not self._writing or self.read_only or self._broken is not None:
                return False
            e = self._direct_entry(offset, len(view))
            if e is None or e & BAT_STATE_MASK != _FULLY:
                return False
            return child_write(bat_entry_offset(e) + (offset & self._bmask), view)

        return DirectIo(read, write)

    def _direct_entry(self, offset: int, length: int) -> int | None:
        """The BAT entry of the block holding the whole range, if its page is cached."""
        if (offset & self._bmask) + length > self._bs:
            return None
        block = offset >> self._bb
        idx = block + (block >> self._crb)
        table = self._pages.get(self._bat_off + ((idx >> PAGE_BITS) * PAGE_BYTES))
        if table is None:
            return None
        return int(table[idx & (PAGE_ENTRIES - 1)])

    # -- writing: the first change after an open --------------------------------------------

    @property
    def capabilities(self) -> Capability:
        return self._capabilities

    def _arm_first_write(self) -> None:
        """Shadow the writing operations with a hook that changes the GUIDs first (see
        "Writing" in the module docstring); the hook removes itself."""
        if self.read_only or self._writing or self._broken is not None:
            return
        for name in self.GUARDED:
            method = getattr(type(self), name)

            async def first(
                *args: object, _method: Callable[..., Awaitable[None]] = method, **kw: object
            ) -> None:
                await self._start_writing()
                await _method(self, *args, **kw)

            setattr(self, name, first)

    async def _start_writing(self) -> None:
        async with self._start_lock:
            if self._writing:
                return
            if self._broken is not None:
                raise self._refusal()
            if self.read_only:
                raise ReadOnlyError(f"{self.filename} is open read-only")
            guid = self._pending_guid or uuid.uuid4()
            await self._update_header(file_write_guid=uuid.uuid4(), data_write_guid=guid)
            self._pending_guid = None
            self._writing = True
            for name in self.GUARDED:
                self.__dict__.pop(name, None)

    async def _update_header(self, **guids: uuid.UUID) -> None:
        """A header update through the failsafe; one at a time."""
        async with self._header_lock:
            await self.headers.update(
                self.child, write=self.write_metadata, flush=self.flush_child, **guids
            )

    async def _set_log_guid(self, guid: uuid.UUID) -> None:
        await self._update_header(log_guid=guid)

    # -- writing data ----------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        block = offset >> self._bb
        idx = block + (block >> self._crb)
        table = self._pages.get(self._bat_off + ((idx >> PAGE_BITS) * PAGE_BYTES))
        if table is not None:
            e = table[idx & (PAGE_ENTRIES - 1)]
            inb = offset & self._bmask
            if e & BAT_STATE_MASK == _FULLY and inb + len(data) <= self._bs:
                await self.child.write((e & _OFFSET_MASK) + inb, data)
                return
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        await self._write_slow(offset, data)

    async def _write_slow(self, offset: int, data: bytes) -> None:
        """Write block by block: in place where the block is fully present, else through
        :meth:`_write_block` (which claims it)."""
        if self._broken is not None:
            raise self._refusal()
        length = len(data)
        pos = 0
        while pos < length:
            off = offset + pos
            n = min(self._bs - (off & self._bmask), length - pos)
            kind, host, run = await self._map(off, n)
            if kind == K_DATA and run == n:
                await self.child.write(host, data[pos : pos + n])
            else:
                await self._write_block(off, data[pos : pos + n])
            pos += n

    async def _claim(self, idx: int) -> trio.Event:
        """Claim BAT entry ``idx`` for a change; waits while another task holds it."""
        while True:
            ev = self._claims.get(idx)
            if ev is None:
                ev = self._claims[idx] = trio.Event()
                return ev
            await ev.wait()

    def _release(self, idx: int, ev: trio.Event) -> None:
        del self._claims[idx]
        ev.set()

    async def _write_block(self, off: int, piece: bytes) -> None:
        """Write ``piece`` (within one block) where the block is not simply fully present:
        the block is claimed, and its state read again under the claim."""
        block = off >> self._bb
        idx = block + (block >> self._crb)
        ev = await self._claim(idx)
        try:
            e = await self._entry(idx)
            state = e & BAT_STATE_MASK
            inb = off & self._bmask
            if state == _FULLY:  # allocated while this task waited for the claim
                await self.child.write(bat_entry_offset(e) + inb, piece)
            elif state == _PARTIAL:
                await self._write_partial(block, idx, e, inb, piece)
            elif state == _NOT_PRESENT and self._diff and not self._dropping_parent:
                lss = self._lss
                a = inb - inb % lss
                b = -(-(inb + len(piece)) // lss) * lss
                if a == 0 and b >= self._extent(block):
                    await self._write_new_block(block, idx, e, inb, piece, from_parent=True)
                elif await self._parent_reads_zeroes(block):
                    await self._write_new_block(block, idx, e, inb, piece)  # no bitmap needed
                else:
                    await self._write_partial(block, idx, e, inb, piece)
            else:
                await self._write_new_block(block, idx, e, inb, piece)
        finally:
            self._release(idx, ev)

    async def _parent_reads_zeroes(self, block: int) -> bool:
        """Does every layer beneath read ``block`` as zeroes (none holds data there)? Then a
        new block of a differencing image may simply be fully present over zeroes."""
        backing = self.backing
        if backing is None:
            return True
        pos = block << self._bb
        end = pos + self._extent(block)
        while pos < end:
            ext = await chain_block_status(backing, pos, end - pos)
            if not ext.status & Status.ZERO:
                return False
            pos += ext.length
        return True

    def _extent(self, block: int) -> int:
        """Bytes of ``block`` inside the disk (less than a block for the last one)."""
        return min(self._bs, self.size - (block << self._bb))

    async def _write_new_block(
        self, block: int, idx: int, e: int, inb: int, piece: bytes, *, from_parent: bool = False
    ) -> None:
        """Make ``block`` (claimed, not present) FULLY_PRESENT holding ``piece`` at ``inb``;
        the rest reads as before: zeroes, or (``from_parent``, a differencing image's
        NOT_PRESENT block, where the rest is less than a sector at each end) the parent's."""
        host, fresh = await self._place(e)
        end = inb + len(piece)
        try:
            if from_parent:
                base = block << self._bb
                head = await self._read_range(base, inb) if inb else b""
                extent = self._extent(block)
                tail = await self._read_range(base + end, extent - end) if end < extent else b""
                piece, inb = head + piece + tail, 0
            elif not fresh:
                await self._zero_space(host, 0, inb)
                await self._zero_space(host, end, self._bs)
            self.child.debug_event("block_alloc")
            await self.child.write(host + inb, piece)
            if not fresh:
                await self._settle_reused()
            await self._change({idx: bat_entry(_FULLY, host)})
        except BaseException:
            self._keep_spare(host, e)
            raise

    async def _settle_reused(self) -> None:
        """Reused space held other bytes (a block's before it was zeroed, a failed write's):
        what replaced them must be durable before an entry that shows them can be, or a power
        loss could bring back bytes a flushed zeroing removed."""
        await self.flush_child()

    async def _zero_space(self, host: int, start: int, end: int) -> None:
        if end > start:
            await self.child.write_zeroes(host + start, end - start)

    async def _place(self, e: int) -> tuple[int, bool]:
        """Space for a payload block whose entry is ``e``: the space the entry retains, a
        spare, or new space at the end of the file; and whether it is fresh (reads as zeroes)."""
        if e & BAT_STATE_MASK in _RETAINING:
            off = e & _OFFSET_MASK
            if off and self._placeable(off, self._bs):
                return off, False
        if self._spare:
            return self._spare.pop(), False
        return await self._grow(self._bs), True

    def _keep_spare(self, host: int, e: int) -> None:
        """A write into ``host`` failed before any entry referred to it: keep it for the next
        allocation, unless it is the space ``e`` retains (still that entry's)."""
        if self._broken is None and host != e & _OFFSET_MASK:
            self._spare.append(host)

    def _placeable(self, off: int, length: int) -> bool:
        """May a block of ``length`` bytes lie at ``off`` (inside the file, clear of the
        headers, log and regions)? For space an entry retains, checked only when reused."""
        if off + length > self.child.size:
            return False
        return not any(off < end and off + length > start for start, end, _ in self._spans)

    async def _grow(self, length: int) -> int:
        """``length`` bytes of new space at the end of the file, MiB aligned; the file is grown
        first (one task at a time: the file only ever grows)."""
        async with self._grow_lock:
            if self._file_end is None:
                self._file_end = -(-self.child.size // MiB) * MiB
            host = self._file_end
            await self.child.truncate(host + length)
            self._file_end = host + length
            return host

    async def _write_partial(self, block: int, idx: int, e: int, inb: int, piece: bytes) -> None:
        """Write ``piece`` into a differencing image's ``block`` (claimed): PARTIALLY_PRESENT
        (``e``), or NOT_PRESENT, which it becomes. Runs of present sectors are written in
        place; the others are written whole (a partial sector filled from the parent, whose
        data it holds) and their bits set, with the BAT entry, through the log."""
        lss = self._lss
        base = block << self._bb
        end = inb + len(piece)
        new_block = e & BAT_STATE_MASK == _NOT_PRESENT
        if new_block:
            await self._ensure_bitmap_block(block)
            key = await self._bitmap_key(block)
            # Fresh space only (never a spare): the sectors whose bits stay clear must hold
            # zeroes, so that a power loss that keeps a later bit but not its data shows no
            # old bytes.
            host = await self._grow(self._bs)
            bits = bitarray(self._sectors_per_block, endian="little")
            bits.setall(0)
        else:
            host = e & _OFFSET_MASK
            key = await self._bitmap_key(block)
            bits = await self.bitmap_cache.load(key, self._read_bitmap)
        new = bits.copy()
        lo, hi = len(bits), 0  # the bits this write sets
        try:
            pos = inb
            while pos < end:
                s = pos // lss
                bit = bits[s]
                nxt = bits.find(not bit, s + 1, -(-end // lss))
                stop = end if nxt < 0 else min(end, nxt * lss)
                chunk = piece[pos - inb : stop - inb]
                if bit:
                    await self.child.write(host + pos, chunk)
                else:
                    a, b = s * lss, -(-stop // lss) * lss
                    head = await self._read_range(base + a, pos - a) if pos > a else b""
                    tail = await self._read_range(base + stop, b - stop) if b > stop else b""
                    if new_block:
                        self.child.debug_event("block_alloc")
                    await self.child.write(host + a, head + chunk + tail)
                    new[a // lss : b // lss] = 1
                    lo, hi = min(lo, a // lss), max(hi, b // lss)
                pos = stop
            if hi <= lo:
                return  # every sector was present already
            full = new[: self._extent(block) // lss].all()
            state = _FULLY if full else _PARTIAL
            entries = {idx: bat_entry(state, host)} if new_block or full else {}
            if full:
                await self._change(entries)
            elif new_block:  # the whole bitmap of the block: the old one may hold stale bits
                await self._change(entries, (key, new, 0, len(new)))
            else:
                await self._change(entries, (key, new, lo, hi))
        except BaseException:
            if new_block:
                self._keep_spare(host, e)
            raise

    async def _ensure_bitmap_block(self, block: int) -> None:
        """Give the chunk of ``block`` a sector bitmap block, if it has none: new space (fresh,
        so every bit is clear), then its BAT entry through the log."""
        sb_idx = self.geometry.bitmap_index(block)
        if await self._entry(sb_idx) & BAT_STATE_MASK == _SB_PRESENT:
            return
        ev = await self._claim(sb_idx)
        try:
            if await self._entry(sb_idx) & BAT_STATE_MASK == _SB_PRESENT:
                return
            host = await self._grow(SECTOR_BITMAP_BLOCK)
            await self._change({sb_idx: bat_entry(_SB_PRESENT, host)})
        finally:
            self._release(sb_idx, ev)

    # -- metadata changes through the log ------------------------------------------------------

    async def _change(
        self, entries: dict[int, int], bitmap: tuple[int, bitarray, int, int] | None = None
    ) -> None:
        """Set BAT entries (index -> entry) and, with ``bitmap`` = (key, bits, lo, hi), a
        block's sector bitmap (``bits``, whose bits [lo, hi) changed): the new sectors are
        logged, then the tables in memory changed (see logwriter.py). Claims of every entry
        and block changed are held by the caller. :raise BlockfsError: the log write failed
        (the node stopped)."""
        if self._broken is not None:
            raise self._refusal()
        if not self._log_length_ok():
            raise UnsupportedFeature(f"{self.filename}: the image has no log to change metadata")
        lock = self._log.lock
        try:  # uncontended, no trip through the scheduler (measured: a fifth of a bitmap write)
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            sectors = await self._bat_sectors(entries)
            if bitmap is not None:
                sectors += await self._bitmap_sectors(*bitmap)
            for i in range(0, len(sectors), MAX_ENTRY_UPDATES):
                await self._log.append(sectors[i : i + MAX_ENTRY_UPDATES])
            # Logged: the tables now (no await from here).
            self._apply_entries(entries)
            if bitmap is not None:
                self.bitmap_cache.put(bitmap[0], bitmap[1])
        finally:
            lock.release()

    def _log_length_ok(self) -> bool:
        return self.headers.current.log_length > 0

    async def _bat_sectors(self, entries: dict[int, int]) -> list[LoggedSector]:
        """The new images of the BAT sectors holding ``entries`` (from the tables, which hold
        every change logged before: the log lock is held)."""
        by_sector: dict[int, list[int]] = {}
        for idx in entries:
            by_sector.setdefault(idx // _SECTOR_ENTRIES, []).append(idx)
        out = []
        for sec in sorted(by_sector):
            first = sec * _SECTOR_ENTRIES
            key = self._bat_off + (first >> PAGE_BITS) * PAGE_BYTES
            page = await self.bat_cache.load(key, self._read_page)
            at = first & (PAGE_ENTRIES - 1)
            table = page[at : at + _SECTOR_ENTRIES]
            for idx in by_sector[sec]:
                table[idx - first] = entries[idx]
            if sys.byteorder == "big":
                table.byteswap()
            out.append(
                LoggedSector(
                    "bat_update", DataUpdate(self._bat_off + sec * SECTOR, table.tobytes())
                )
            )
        return out

    async def _bitmap_sectors(
        self, key: int, bits: bitarray, lo: int, hi: int
    ) -> list[LoggedSector]:
        """The new images of the bitmap sectors holding bits [lo, hi) of the block whose
        bitmap (``bits``) lies at ``key``. A sector shared with other blocks' bitmaps is read
        (through the logged images) and patched."""
        raw = bits.tobytes()
        end = key + len(raw)
        start = key + lo // 8
        stop = key + -(-hi // 8)
        out = []
        s = start - start % SECTOR
        while s < stop:
            a, b = max(s, key), min(s + SECTOR, end)
            if a == s and b == s + SECTOR:
                image = raw[s - key : s - key + SECTOR]
            else:
                logged = self._log.dirty.get(s)
                cur = bytearray(logged.image if logged else await self._read_meta(s, SECTOR))
                cur[a - s : b - s] = raw[a - key : b - key]
                image = bytes(cur)
            out.append(LoggedSector("bitmap_update", DataUpdate(s, image)))
            s += SECTOR
        return out

    def _apply_entries(self, entries: dict[int, int]) -> None:
        """Put logged BAT entries in the cached pages (a page not cached reloads them through
        the log's images) and keep the count of present blocks."""
        per_chunk = self.geometry.chunk_ratio + 1
        for idx, value in entries.items():
            table = self._pages.get(self._bat_off + (idx >> PAGE_BITS) * PAGE_BYTES)
            if table is None:
                self._allocated = None
                continue
            i = idx & (PAGE_ENTRIES - 1)
            old = table[i]
            table[i] = value
            if self._allocated is not None and (idx + 1) % per_chunk:
                was = old & BAT_STATE_MASK in (_FULLY, _PARTIAL)
                now = value & BAT_STATE_MASK in (_FULLY, _PARTIAL)
                self._allocated += (now - was) * self._bs

    # -- zeroes and discard ----------------------------------------------------------------------

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self._broken is not None:
            raise self._refusal()
        await self._zero_range(offset, length, may_unmap, discard=False)

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if self._broken is not None:
            raise self._refusal()
        if self._fixed or self._diff:
            return  # a hint (see "Writing" in the module docstring)
        await self._zero_range(offset, length, True, discard=True)

    async def _zero_range(self, offset: int, length: int, unmap: bool, discard: bool) -> None:
        """Whole blocks (the last one: up to the disk's end) change state in batches; the
        parts of blocks at either end are zeroed (or discarded) in place."""
        end = offset + length
        pos = offset
        whole: list[int] = []
        while pos < end:
            block = pos >> self._bb
            base = block << self._bb
            stop = min(end, base + self._extent(block))
            if pos == base and stop == base + self._extent(block):
                whole.append(block)
            else:
                await self._zero_part(pos, stop - pos, unmap, discard)
            pos = stop
        for i in range(0, len(whole), _ZERO_BATCH):
            await self._zero_blocks(whole[i : i + _ZERO_BATCH], unmap, discard)

    async def _zero_part(self, off: int, n: int, unmap: bool, discard: bool) -> None:
        """Zero (or discard) ``n`` bytes within one block without changing its state."""
        e = await self._entry(self.geometry.payload_index(off >> self._bb))
        state = e & BAT_STATE_MASK
        if state == _FULLY:
            host = (e & _OFFSET_MASK) + (off & self._bmask)
            if not discard:
                await self.child.write_zeroes(host, n, unmap and not self._fixed)
            elif not self._fixed:
                try:
                    await self.child.discard(host, n)
                except BlockfsError:
                    log.debug("%s: discard of %d bytes at %#x failed", self.filename, n, host)
        elif not discard and self._diff and state in (_NOT_PRESENT, _PARTIAL):
            # the parent's data shows there: zeroes must be written (through the bitmap)
            chunk = 1024 * 1024
            while n > 0:
                k = min(chunk, n)
                await self._write_slow(off, bytes(k))
                off += k
                n -= k
        # any other state reads as zeroes already

    async def _zero_blocks(self, blocks: list[int], unmap: bool, discard: bool) -> None:
        """Zero (or discard) whole blocks, claimed together (in order: no deadlock with other
        batches), their new entries logged at once."""
        idxs = [self.geometry.payload_index(b) for b in blocks]
        held: list[tuple[int, trio.Event]] = []
        try:
            for idx in idxs:
                held.append((idx, await self._claim(idx)))
            entries: dict[int, int] = {}
            punch: list[int] = []
            for block, idx in zip(blocks, idxs, strict=True):
                e = await self._entry(idx)
                state = e & BAT_STATE_MASK
                off = e & _OFFSET_MASK
                if self._diff:
                    # never ZERO here (libvhdi reads it from the parent): present over zeroes
                    if state in (_FULLY, _PARTIAL):
                        await self.child.write_zeroes(off, self._bs, unmap)
                        if state == _PARTIAL:
                            entries[idx] = bat_entry(_FULLY, off)
                    elif state == _NOT_PRESENT:
                        host, fresh = await self._place(e)
                        try:
                            if not fresh:
                                await self.child.write_zeroes(host, self._bs, unmap)
                                await self._settle_reused()
                        except BaseException:
                            self._keep_spare(host, e)
                            raise
                        entries[idx] = bat_entry(_FULLY, host)
                elif self._fixed and state == _FULLY:
                    if not discard:
                        await self.child.write_zeroes(off, self._extent(block), False)
                elif discard:
                    if state == _FULLY:
                        entries[idx] = bat_entry(_UNMAPPED, off)
                        punch.append(off)
                elif state != _ZERO:
                    keep = off if state != _NOT_PRESENT and self._placeable(off, self._bs) else 0
                    entries[idx] = bat_entry(_ZERO, keep)
                    if keep and unmap and state == _FULLY:
                        punch.append(keep)
            if entries:
                await self._change(entries)
            for off in punch:  # after the entries: a kill before leaves the data in place
                try:
                    await self.child.discard(off, self._bs)
                except BlockfsError:
                    log.debug("%s: discard of the block at %#x failed", self.filename, off)
        finally:
            for idx, ev in held:
                self._release(idx, ev)

    # -- the parent locator: commit and stream ---------------------------------------------------

    def pending_data_write_guid(self) -> uuid.UUID:
        """The DataWriteGuid this image has once it was written in this session: its current
        one when it already was; otherwise one chosen now, once, that its first write will set
        (so that a child can record it before that write: :meth:`parent_will_change`). Asked
        while no write of this image is under way (a first write in flight has chosen its GUID
        already)."""
        if self._writing:
            return self.headers.current.data_write_guid
        if self._pending_guid is None:
            self._pending_guid = uuid.uuid4()
        return self._pending_guid

    async def change_backing_file(
        self, name: str | None, fmt: str | None, parent: Node | None = None
    ) -> None:
        """Record ``name`` as this differencing image's parent (:meth:`Node.change_backing_file`):
        a new parent locator whose linkage is ``parent``'s DataWriteGuid as its header says now
        (the caller flushed ``parent`` first) and whose paths are made as creation makes them
        (:func:`~blockfs.nodes.vhdx.create.locator_entries`; a relative ``name`` is relative to
        this image's folder). The locator item may change size and place in the metadata region:
        table and item are written as one log entry, flushed, so a crash leaves the old locator
        or the new one. The DataWriteGuid stays (no guest data changes); the FileWriteGuid
        changes first, as before any change.

        With ``name`` None the image stops being differencing (:meth:`_drop_parent`).

        :raise ReadOnlyError: open read-only. :raise UnsupportedFeature: a parent (or ``fmt``)
            other than VHDX, or an image that is not differencing. :raise UsageError: a parent
            of another size or logical sector size, a name a locator cannot hold, a metadata
            region without room for the locator.
        """
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        if name is None:
            await self._drop_parent()
            return
        if not self._diff:
            raise UnsupportedFeature(
                f"{self.filename}: not a differencing VHDX image, it cannot gain a parent"
            )
        if fmt not in (None, FORMAT_NAME):
            raise UnsupportedFeature(
                f"{self.filename}: a differencing VHDX image needs a VHDX parent, not {fmt}"
            )
        if parent is None:
            raise UsageError(f"{self.filename}: the new parent {name} must be open")
        if not isinstance(parent, VhdxNode):
            raise UnsupportedFeature(
                f"{self.filename}: a differencing VHDX image needs a VHDX parent, not "
                f"{parent.format_name}"
            )
        where = parent_location(self.filename, name)
        ident = self.identity()
        if parent is self or (ident is not None and parent.identity() == ident):
            raise UsageError(f"{self.filename}: an image cannot be its own parent")
        pm = parent.metadata
        if parent.size != self.size or pm.logical_sector_size != self._lss:
            raise UsageError(
                f"{self.filename}: a parent of {parent.size} bytes in {pm.logical_sector_size}-"
                f"byte sectors, but this image has {self.size} bytes in {self._lss}-byte sectors"
            )
        linkage = parent.headers.current.data_write_guid
        locator = ParentLocator(locator_entries(self.filename, where, linkage), linkage)
        await self._change_metadata({PARENT_LOCATOR: locator.pack()})
        self.metadata = replace(self.metadata, parent=locator)
        usable = [p for _, p in parent_candidates(locator.entries) if p is not None]
        self.parent_name = next(
            (p for p in usable if _names_existing(self.filename, p)), usable[0] if usable else name
        )

    async def parent_will_change(self, parent: Node) -> None:
        """``parent`` (a VHDX image, this one's parent) is about to be written (a commit): fix
        now the DataWriteGuid its first write will set (:meth:`pending_data_write_guid`) and
        record it as this image's second linkage, beside the one that matches the parent's
        header now, through the log, flushed. Killed at any instant of the commit, this image
        still opens over the parent (before its first write the linkage matches; after it, the
        second linkage).

        An image open read-only (the usual case: it sits in the chain beneath the active
        layer) is reopened writable for the update and read-only again after it, which
        empties its log; the caller holds the export quiesced, as for any reopen. A parent of
        another format, or an image that is not differencing: nothing to record.
        """
        if not isinstance(parent, VhdxNode) or not self._diff:
            return
        loc = self.metadata.parent
        assert loc is not None
        now = parent.headers.current.data_write_guid
        pending = parent.pending_data_write_guid()
        if {now, pending} <= {loc.linkage, loc.linkage2}:
            return
        # The GUID the parent will have goes first: readers that check only parent_linkage
        # (libvhdi) then open the chain once the parent was written, which a commit does at
        # once; the spec's readers accept either. :meth:`parent_settled` tidies up after.
        await self._set_linkage(pending, now if now != pending else None)

    async def parent_settled(self, parent: Node) -> None:
        """A commit into ``parent`` ended with this image still over it (cancelled, failed):
        its one linkage becomes the parent's DataWriteGuid as it is now."""
        if not isinstance(parent, VhdxNode) or not self._diff:
            return
        loc = self.metadata.parent
        assert loc is not None
        now = parent.headers.current.data_write_guid
        if loc.linkage == now and loc.linkage2 is None:
            return
        await self._set_linkage(now, None)

    async def _set_linkage(self, linkage: uuid.UUID, linkage2: uuid.UUID | None) -> None:
        """Record the parent's identity (two GUIDs, the second optional) in the locator,
        through the log, flushed; an image open read-only is made writable for it (the caller
        holds the export quiesced, as for any reopen)."""
        loc = self.metadata.parent
        assert loc is not None
        entries = dict(loc.entries)
        entries[KEY_LINKAGE] = linkage_text(linkage)
        entries.pop(KEY_LINKAGE2, None)
        if linkage2 is not None:
            entries[KEY_LINKAGE2] = linkage_text(linkage2)
        locator = ParentLocator(entries, linkage, linkage2)
        was_read_only = self.read_only
        if was_read_only:
            await self.reopen(False)
        try:
            await self._change_metadata({PARENT_LOCATOR: locator.pack()})
            self.metadata = replace(self.metadata, parent=locator)
        finally:
            if was_read_only:
                with trio.CancelScope(shield=True):
                    await self.reopen(True)

    async def _drop_parent(self) -> None:
        """Make this differencing image a dynamic one (stream without a base, once every
        sector the parent provided was copied here, so that where this image holds nothing the
        parent reads as zeroes). Each step leaves an image that opens and reads the same:

        1. every PARTIALLY_PRESENT block becomes FULLY_PRESENT: zeroes written into its sectors
           not present, made durable, then its entry changed through the log (in batches);
           meanwhile a write into a NOT_PRESENT block makes it fully present (over zeroes), never
           partially, so none appears behind this pass (those that decided before it began are
           waited for first);
        2. the sector bitmap entries become NOT_PRESENT (a dynamic image has none), through the
           log: nothing uses them any more;
        3. the file parameters lose HasParent and the parent locator goes, as one log entry,
           flushed.

        The DataWriteGuid stays (the disk reads the same). The space of the sector bitmaps
        is not given back.

        :raise BlockfsError: a write failed (the node stopped; what was done stays done).
        """
        if not self._diff:
            return
        if self._broken is not None:
            raise self._refusal()
        await self._start_changing()
        self._dropping_parent = True
        try:
            # Requests that decided before the flag may still make a block partially present:
            # they hold a claim (of the block, or of its chunk's bitmap entry) until done.
            for ev in list(self._claims.values()):
                await ev.wait()
            await self._fill_partial_blocks()
            await self._drop_sector_bitmaps()
            params = pack_file_parameters(self._bs, leave_allocated=False, has_parent=False)
            await self._change_metadata({FILE_PARAMETERS: params, PARENT_LOCATOR: None})
        finally:
            self._dropping_parent = False
        m = self.metadata = replace(self.metadata, has_parent=False, parent=None)
        self.geometry = BatGeometry(m.block_size, m.logical_sector_size, m.virtual_size, False)
        self._diff = False
        self._capabilities |= Capability.DISCARD
        self.parent_name = None

    async def _fill_partial_blocks(self) -> None:
        """Step 1 of :meth:`_drop_parent`."""
        g = self.geometry
        partial = []
        for block in range(g.data_blocks):
            if await self._entry(g.payload_index(block)) & BAT_STATE_MASK == _PARTIAL:
                partial.append(block)
        lss = self._lss
        for i in range(0, len(partial), _FILL_BATCH):
            blocks = partial[i : i + _FILL_BATCH]
            held: list[tuple[int, trio.Event]] = []
            try:
                for block in blocks:  # in order: no deadlock with other batches
                    idx = g.payload_index(block)
                    held.append((idx, await self._claim(idx)))
                entries: dict[int, int] = {}
                for block, (idx, _) in zip(blocks, held, strict=True):
                    e = await self._entry(idx)
                    if e & BAT_STATE_MASK != _PARTIAL:
                        continue
                    host = e & _OFFSET_MASK
                    bits = await self.bitmap_cache.load(
                        await self._bitmap_key(block), self._read_bitmap
                    )
                    n = self._extent(block) // lss
                    s = bits.find(0, 0, n)
                    while s >= 0:
                        t = bits.find(1, s, n)
                        t = n if t < 0 else t
                        await self.child.write_zeroes(host + s * lss, (t - s) * lss)
                        s = bits.find(0, t, n) if t < n else -1
                    entries[idx] = bat_entry(_FULLY, host)
                if entries:
                    # the zeroes durable before an entry that shows them can be
                    await self.flush_child()
                    await self._change(entries)
            finally:
                for idx, ev in held:
                    self._release(idx, ev)

    async def _drop_sector_bitmaps(self) -> None:
        """Step 2 of :meth:`_drop_parent`."""
        g = self.geometry
        entries = {}
        for chunk in range(g.bitmap_blocks):
            idx = (chunk + 1) * (g.chunk_ratio + 1) - 1
            if await self._entry(idx) & BAT_STATE_MASK == _SB_PRESENT:
                entries[idx] = 0
        if entries:
            await self._change(entries)

    async def _start_changing(self) -> None:
        """Before a change of metadata alone (the parent locator, block states that read the
        same): a new FileWriteGuid, once per session (MS-VHDX 2.2.2); the DataWriteGuid stays,
        as the disk reads the same (images above this one stay linked to it)."""
        async with self._start_lock:
            if self._writing or self._file_changed:
                return
            if self._broken is not None:
                raise self._refusal()
            if self.read_only:
                raise ReadOnlyError(f"{self.filename} is open read-only")
            await self._update_header(file_write_guid=uuid.uuid4())
            self._file_changed = True

    async def _change_metadata(self, changes: dict[uuid.UUID, bytes | None]) -> None:
        """Give metadata items new values (None: remove the item): the changed sectors of the
        metadata table and items go into one log entry (all or nothing at a crash), which is
        flushed before this returns. :raise UsageError: the region has no room, or the change
        is too large for one entry (nothing written). :raise BlockfsError: a write failed (the
        node stopped)."""
        if self._broken is not None:
            raise self._refusal()
        if not self._log_length_ok():
            raise UnsupportedFeature(f"{self.filename}: the image has no log to change metadata")
        region = self.regions[METADATA_GUID]
        base = region.file_offset
        async with self._log.lock:
            table = await self._read_meta(base, METADATA_TABLE_SIZE)
            new, writes = change_metadata_items(table, region.length, changes, self.filename)
            images: dict[int, bytes] = {}
            for s in range(0, METADATA_TABLE_SIZE, SECTOR):
                if new[s : s + SECTOR] != table[s : s + SECTOR]:
                    images[base + s] = new[s : s + SECTOR]
            for off, value in writes:
                start, end = base + off, base + off + len(value)
                for s in range(start - start % SECTOR, end, SECTOR):
                    cur = bytearray(images.get(s) or await self._read_meta(s, SECTOR))
                    lo, hi = max(s, start), min(s + SECTOR, end)
                    cur[lo - s : hi - s] = value[lo - start : hi - start]
                    images[s] = bytes(cur)
            if len(images) > MAX_ENTRY_UPDATES:
                raise UsageError(
                    f"{self.filename}: a metadata change of {len(images)} sectors (at most "
                    f"{MAX_ENTRY_UPDATES} fit one log entry)"
                )
            # Refused changes wrote nothing; this one begins with the header (lock order: the
            # log's lock, then the header's, as an entry that sets a new log GUID takes them).
            await self._start_changing()
            await self._log.append(
                [LoggedSector("metadata_update", DataUpdate(s, images[s])) for s in sorted(images)]
            )
        await self._log.flush()

    # -- flush, close, reopen ------------------------------------------------------------------

    async def flush(self) -> None:
        if self.read_only:
            return
        if self._broken_by_flush:
            raise self._refusal()
        if self._broken is None:
            await self._log.flush()
        else:
            # Broken by a failed write, the node still makes what it acknowledged durable.
            await self.flush_child()

    async def reopen(self, read_only: bool) -> None:
        """Switch modes (see :meth:`Node.reopen`). Going read-only empties the log (a clean
        close of the writer) and flushes. Going writable does what a writable open does with a
        log the header still names (one without entries, when it was opened read-only: nothing
        was replayed in memory), and the next change sets new GUIDs. An image whose log was
        replayed into memory cannot become writable in place: it must be opened again, which
        replays onto the file.

        :raise UnsupportedFeature: that case. :raise BlockfsError: the child cannot be reopened,
            or the log not settled; the node stays read-only.
        """
        if read_only == self.read_only:
            return
        if read_only:
            if self._broken is None:
                await self._log.close()
                await self.flush_child()
            await super().reopen(True)
            self._writing = self._file_changed = False
            if self._broken is None:
                for name in self.GUARDED:
                    self.__dict__.pop(name, None)
            return
        if isinstance(self.child, ReplayedFile):
            raise UnsupportedFeature(
                f"{self.filename}: its log was replayed in memory; open it writable to replay "
                "the log onto the file"
            )
        await super().reopen(False)
        try:
            if self.headers.current.log_dirty:
                _, self.log_outcome = await _settle_log(
                    self.child, self.headers, False, self.filename
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await super().reopen(True)
            raise
        self._file_end = None
        self._arm_first_write()

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # A broken node writes no more metadata: its log is left for the next open.
            if not self.read_only and self._broken is None:
                await self._log.close()
        finally:
            await self.child.aclose()

    # -- failsafe (see the module docstring) ---------------------------------------------------

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
