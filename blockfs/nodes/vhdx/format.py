"""On-disk structures of VHDX, declared once, each beside the section of Microsoft's "VHDX Format
Specification" v1.00 (MS-VHDX) it comes from; and the validation of everything they claim.

Everything here is pure (bytes in, values out) and bounded: a hostile field is refused with a
one-line :class:`ImageError` before anything is allocated from it. This module must not do I/O;
the node (``node.py``) and the log (``log.py``) read the bytes and hand them here. The log's own
structures live in ``log.py``, beside the code that replays them.

All integers are little endian. GUIDs are Microsoft GUIDs (the first three fields little
endian): :class:`uuid.UUID` with ``bytes_le``. CRC-32C (Castagnoli) checksums are computed by
``google-crc32c`` (measured faster than ``crc32c`` on 4 KiB and 64 KiB buffers), always over the
structure with its 4-byte checksum field at offset 4 taken as zero.
"""

from __future__ import annotations

import enum
import itertools
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import google_crc32c

from blockfs.errors import ImageError, UnsupportedFeature, UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

ZERO_GUID = uuid.UUID(int=0)

# == 2.1 File layout == the first MiB: identifier, two headers, two region tables
FILE_SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_AREA = MiB  # nothing but these structures lies below 1 MiB
#: the bytes read at open: identifier, both headers, both region tables
HEAD_BYTES = 320 * KiB
#: log updates never touch the identifier or the headers (MS-VHDX 2.2.2: headers are updated
#: in place, not through the log)
LOG_TARGET_MIN = REGION_TABLE_OFFSETS[0]

#: the largest virtual disk (MS-VHDX 2.6.2.2: 64 TB)
MAX_VIRTUAL_SIZE = 64 * TiB
#: no sane image file is larger than its largest virtual disk twice over; a size claimed beyond
#: this (a log's LastFileOffset) is a lie, refused before it can extend a file
MAX_FILE_OFFSET = 2 * MAX_VIRTUAL_SIZE
MIN_BLOCK_SIZE = MiB
MAX_BLOCK_SIZE = 256 * MiB
SECTOR_SIZES = (512, 4096)
#: MS-VHDX 2.5: a sector bitmap block is 1 MiB and describes 2^23 sectors
SECTOR_BITMAP_BLOCK = MiB
SECTORS_PER_BITMAP = 1 << 23
#: MS-VHDX 2.2.3 / 2.6.1: at most 2047 entries fit after a table header in 64 KiB
MAX_TABLE_ENTRIES = 2047
MAX_METADATA_ITEM = MiB
METADATA_TABLE_SIZE = 64 * KiB
REGION_TABLE_SIZE = 64 * KiB
HEADER_SIZE = 4 * KiB
#: longest creator string (2.1.1: 256 UTF-16 code units)
CREATOR_BYTES = 512


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (google-crc32c wants ``bytes``, not a view)."""
    return int(google_crc32c.value(data))


def checksum(buf: bytes) -> int:
    """The checksum of a structure whose 4-byte checksum field sits at offset 4 (headers,
    region tables, log entries): CRC-32C with that field taken as zero."""
    return crc32c(buf[:4] + b"\0\0\0\0" + buf[8:])


def with_checksum(buf: bytes) -> bytes:
    """``buf`` with its checksum field (offset 4) filled in."""
    return buf[:4] + struct.pack("<I", checksum(buf)) + buf[8:]


def checksum_ok(buf: bytes) -> bool:
    (stored,) = struct.unpack_from("<I", buf, 4)
    return bool(stored == checksum(buf))


# == 2.1.1 File Type Identifier ==


def parse_file_identifier(buf: bytes, where: str) -> str:
    """The creator string of the file identifier. :raise ImageError: not a VHDX file."""
    if buf[:8] != FILE_SIGNATURE:
        raise ImageError(f"{where}: not a VHDX file (no 'vhdxfile' signature)")
    raw = buf[8 : 8 + CREATOR_BYTES]
    text = raw.decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


def pack_file_identifier(creator: str) -> bytes:
    raw = creator.encode("utf-16-le")[: CREATOR_BYTES - 2]
    return FILE_SIGNATURE + raw + bytes(CREATOR_BYTES - len(raw))


# == 2.2.2 Headers == 4 KiB each, at 64 KiB and 128 KiB
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_SIGNATURE = b"head"


@dataclass(frozen=True, slots=True)
class Header:
    sequence_number: int  # bytes 8-15: the valid header with the higher one is current
    file_write_guid: uuid.UUID  # 16-31: changed before the first change after an open
    data_write_guid: uuid.UUID  # 32-47: changed before the first change of guest data
    log_guid: uuid.UUID  # 48-63: zero when the log holds nothing to replay
    log_version: int  # 64-65: 0
    version: int  # 66-67: 1
    log_length: int  # 68-71: a multiple of 1 MiB
    log_offset: int  # 72-79: a multiple of 1 MiB, at least 1 MiB

    def pack(self) -> bytes:
        """The whole 4 KiB header, checksum filled in."""
        raw = HEADER.pack(
            HEADER_SIGNATURE,
            0,
            self.sequence_number,
            self.file_write_guid.bytes_le,
            self.data_write_guid.bytes_le,
            self.log_guid.bytes_le,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        return with_checksum(raw + bytes(HEADER_SIZE - len(raw)))

    def next(
        self,
        *,
        file_write_guid: uuid.UUID | None = None,
        data_write_guid: uuid.UUID | None = None,
        log_guid: uuid.UUID | None = None,
    ) -> Header:
        """The header that replaces this one (MS-VHDX 2.2.2.1): sequence number + 1, and the
        GUIDs given."""
        return replace(
            self,
            sequence_number=self.sequence_number + 1,
            file_write_guid=self.file_write_guid if file_write_guid is None else file_write_guid,
            data_write_guid=self.data_write_guid if data_write_guid is None else data_write_guid,
            log_guid=self.log_guid if log_guid is None else log_guid,
        )

    @property
    def log_dirty(self) -> bool:
        return self.log_guid != ZERO_GUID


def _unpack_header(buf: bytes) -> Header | None:
    """A header that is valid (signature and checksum, MS-VHDX 2.2.2), or None."""
    if len(buf) < HEADER_SIZE or buf[:4] != HEADER_SIGNATURE or not checksum_ok(buf[:HEADER_SIZE]):
        return None
    _, _, seq, fw, dw, lg, log_version, version, log_length, log_offset = HEADER.unpack_from(buf)
    return Header(
        seq,
        uuid.UUID(bytes_le=fw),
        uuid.UUID(bytes_le=dw),
        uuid.UUID(bytes_le=lg),
        log_version,
        version,
        log_length,
        log_offset,
    )


def current_header(first: bytes, second: bytes, fsize: int, where: str) -> tuple[Header, int]:
    """The current header and its slot (0: at 64 KiB, 1: at 128 KiB), checked.

    A header is current when it is valid and its sequence number is the higher (MS-VHDX 2.2.2).
    Two valid headers with the same number are corrupt by the spec; they are accepted when they
    are byte for byte the same (Disk2VHD writes such files, and QEMU reads them).

    :raise ImageError: no valid header, an ambiguous pair, a log outside the file.
    :raise UnsupportedFeature: a header or log version other than the spec's.
    """
    h1, h2 = _unpack_header(first), _unpack_header(second)
    if h1 is None and h2 is None:
        raise ImageError(f"{where}: both VHDX headers are invalid (bad signature or checksum)")
    if h1 is not None and h2 is not None and h1.sequence_number == h2.sequence_number:
        if first[:HEADER_SIZE] != second[:HEADER_SIZE]:
            raise ImageError(
                f"{where}: both VHDX headers have sequence number {h1.sequence_number} but differ"
            )
    if h2 is None or (h1 is not None and h1.sequence_number >= h2.sequence_number):
        assert h1 is not None
        header, slot = h1, 0
    else:
        header, slot = h2, 1
    if header.version != 1:
        raise UnsupportedFeature(f"{where}: VHDX header version {header.version} (only 1 is known)")
    if header.log_version != 0:
        raise UnsupportedFeature(
            f"{where}: VHDX log version {header.log_version} (only 0 is known)"
        )
    _check_log_location(header, fsize, where)
    return header, slot


def _check_log_location(h: Header, fsize: int, where: str) -> None:
    if h.log_length % MiB or h.log_offset % MiB:
        raise ImageError(f"{where}: log at {h.log_offset:#x}+{h.log_length:#x} is not MiB aligned")
    if h.log_length == 0:
        if h.log_dirty:
            raise ImageError(f"{where}: header names a log to replay, but the log is empty")
        return
    if h.log_offset < HEADER_AREA:
        raise ImageError(f"{where}: log at {h.log_offset:#x} overlaps the file header area")
    if h.log_offset + h.log_length > fsize:
        raise ImageError(
            f"{where}: log at {h.log_offset:#x}+{h.log_length:#x} lies past the end of the file"
        )


# == 2.2.3 Region Table == 64 KiB each, at 192 KiB and 256 KiB
REGION_TABLE_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
REGION_SIGNATURE = b"regi"
BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
KNOWN_REGIONS = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}


@dataclass(frozen=True, slots=True)
class Region:
    guid: uuid.UUID  # bytes 0-15
    file_offset: int  # 16-23: a multiple of 1 MiB, at least 1 MiB
    length: int  # 24-27: a multiple of 1 MiB
    required: bool  # 28-31, bit 0: an implementation that does not know it must refuse

    @property
    def end(self) -> int:
        return self.file_offset + self.length

    @property
    def name(self) -> str:
        return KNOWN_REGIONS.get(self.guid, f"region {self.guid}")


def pack_region_table(regions: Iterable[Region]) -> bytes:
    entries = b"".join(
        REGION_ENTRY.pack(r.guid.bytes_le, r.file_offset, r.length, int(r.required))
        for r in regions
    )
    raw = REGION_TABLE_HEADER.pack(REGION_SIGNATURE, 0, len(entries) // REGION_ENTRY.size, 0)
    raw += entries
    return with_checksum(raw + bytes(REGION_TABLE_SIZE - len(raw)))


def _unpack_region_table(buf: bytes) -> list[Region] | None:
    """The entries of a valid region table (signature and checksum), or None."""
    if len(buf) < REGION_TABLE_SIZE or buf[:4] != REGION_SIGNATURE:
        return None
    if not checksum_ok(buf[:REGION_TABLE_SIZE]):
        return None
    count = REGION_TABLE_HEADER.unpack_from(buf)[2]
    if count > MAX_TABLE_ENTRIES:
        return None
    out = []
    for i in range(count):
        g, off, length, flags = REGION_ENTRY.unpack_from(buf, REGION_TABLE_HEADER.size + i * 32)
        out.append(Region(uuid.UUID(bytes_le=g), off, length, bool(flags & 1)))
    return out


def parse_region_tables(
    first: bytes, second: bytes, header: Header, fsize: int, where: str
) -> dict[uuid.UUID, Region]:
    """The regions of the first valid region table (the second is its copy), checked: aligned,
    inside the file, overlapping neither each other, the header area nor the log; the BAT and
    metadata regions present; no unknown region required.

    :raise ImageError: as above. :raise UnsupportedFeature: an unknown required region.
    """
    entries = _unpack_region_table(first)
    if entries is None:
        entries = _unpack_region_table(second)
    if entries is None:
        raise ImageError(f"{where}: both region tables are invalid (bad signature or checksum)")
    regions: dict[uuid.UUID, Region] = {}
    for r in entries:
        if r.guid in regions:
            raise ImageError(f"{where}: region table lists the {r.name} region twice")
        if r.guid not in KNOWN_REGIONS and r.required:
            raise UnsupportedFeature(f"{where}: unknown required region {r.guid}")
        _check_region(r, fsize, where)
        regions[r.guid] = r
    for guid, name in KNOWN_REGIONS.items():
        if guid not in regions:
            raise ImageError(f"{where}: region table has no {name} region")
    spans = [(r.file_offset, r.end, f"the {r.name} region") for r in regions.values()]
    if header.log_length:
        spans.append((header.log_offset, header.log_offset + header.log_length, "the log"))
    check_disjoint(spans, where)
    return regions


def _check_region(r: Region, fsize: int, where: str) -> None:
    if r.file_offset % MiB or r.length % MiB or r.length == 0:
        raise ImageError(
            f"{where}: {r.name} region at {r.file_offset:#x}+{r.length:#x} is not MiB aligned"
        )
    if r.file_offset < HEADER_AREA:
        raise ImageError(f"{where}: {r.name} region overlaps the file header area")
    if r.end > fsize:
        raise ImageError(
            f"{where}: {r.name} region at {r.file_offset:#x}+{r.length:#x} lies past the end "
            f"of the file ({fsize:#x})"
        )


def check_disjoint(spans: list[tuple[int, int, str]], where: str) -> None:
    """:raise ImageError: two of the (start, end, name) spans overlap."""
    ordered = sorted(spans)
    for (_, end, name), (start, _, other) in itertools.pairwise(ordered):
        if start < end:
            raise ImageError(f"{where}: {name} overlaps {other}")


# == 2.6 Metadata Region == a 64 KiB table, then the items
METADATA_TABLE_HEADER = struct.Struct("<8sHH20s")
METADATA_ENTRY = struct.Struct("<16sIII4s")
METADATA_SIGNATURE = b"metadata"
#: items start past the table (MS-VHDX 2.6.1.2: Offset >= 64 KB)
METADATA_ITEMS_START = METADATA_TABLE_SIZE


class MetadataFlag(enum.IntFlag):
    """Bits of a metadata table entry's flags word (2.6.1.2)."""

    IS_USER = 1
    IS_VIRTUAL_DISK = 2
    IS_REQUIRED = 4


# 2.6.2 Known metadata items
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
VIRTUAL_DISK_ID = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")  # "Page 83 Data"
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
#: name and exact length of each known item (the parent locator's varies)
KNOWN_ITEMS: dict[uuid.UUID, tuple[str, int | None]] = {
    FILE_PARAMETERS: ("file parameters", 8),
    VIRTUAL_DISK_SIZE: ("virtual disk size", 8),
    VIRTUAL_DISK_ID: ("virtual disk id", 16),
    LOGICAL_SECTOR_SIZE: ("logical sector size", 4),
    PHYSICAL_SECTOR_SIZE: ("physical sector size", 4),
    PARENT_LOCATOR: ("parent locator", None),
}
#: the items every image has
REQUIRED_ITEMS = (
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    VIRTUAL_DISK_ID,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
)
#: flags each item is written with (2.6.2: the virtual-disk items describe the disk, the file
#: parameters and the parent locator this file)
ITEM_FLAGS = {
    FILE_PARAMETERS: MetadataFlag.IS_REQUIRED,
    VIRTUAL_DISK_SIZE: MetadataFlag.IS_VIRTUAL_DISK | MetadataFlag.IS_REQUIRED,
    VIRTUAL_DISK_ID: MetadataFlag.IS_VIRTUAL_DISK | MetadataFlag.IS_REQUIRED,
    LOGICAL_SECTOR_SIZE: MetadataFlag.IS_VIRTUAL_DISK | MetadataFlag.IS_REQUIRED,
    PHYSICAL_SECTOR_SIZE: MetadataFlag.IS_VIRTUAL_DISK | MetadataFlag.IS_REQUIRED,
    PARENT_LOCATOR: MetadataFlag.IS_REQUIRED,
}


@dataclass(frozen=True, slots=True)
class MetadataEntry:
    item_id: uuid.UUID  # bytes 0-15
    offset: int  # 16-19: from the start of the metadata region, >= 64 KiB (0 if empty)
    length: int  # 20-23: at most 1 MiB
    flags: int  # 24-27: MetadataFlag


def parse_metadata_table(
    table: bytes, region_length: int, where: str
) -> dict[uuid.UUID, MetadataEntry]:
    """The system items of the metadata table (user items are skipped), checked: each inside
    the region and past the table, no two overlapping, no item twice, no unknown item required.

    :raise ImageError: as above. :raise UnsupportedFeature: an unknown required item.
    """
    sig, _, count, _ = METADATA_TABLE_HEADER.unpack_from(table)
    if sig != METADATA_SIGNATURE:
        raise ImageError(f"{where}: metadata table has no 'metadata' signature")
    if count > MAX_TABLE_ENTRIES:
        raise ImageError(f"{where}: metadata table claims {count} entries (at most 2047)")
    items: dict[uuid.UUID, MetadataEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for i in range(count):
        g, off, length, flags, _ = METADATA_ENTRY.unpack_from(table, 32 + i * 32)
        e = MetadataEntry(uuid.UUID(bytes_le=g), off, length, flags)
        name = KNOWN_ITEMS.get(e.item_id, (f"metadata item {e.item_id}", None))[0]
        _check_item_bounds(e, name, region_length, where)
        if e.length:
            spans.append((e.offset, e.offset + e.length, f"the {name} item"))
        if flags & MetadataFlag.IS_USER:
            continue  # user items belong to their users; none is required of us
        if e.item_id in items:
            raise ImageError(f"{where}: metadata table lists the {name} item twice")
        if e.item_id not in KNOWN_ITEMS and flags & MetadataFlag.IS_REQUIRED:
            raise UnsupportedFeature(f"{where}: unknown required metadata item {e.item_id}")
        items[e.item_id] = e
    check_disjoint(spans, where)
    return items


def _check_item_bounds(e: MetadataEntry, name: str, region_length: int, where: str) -> None:
    if e.length > MAX_METADATA_ITEM:
        raise ImageError(f"{where}: the {name} item is {e.length} bytes (at most 1 MiB)")
    if e.length == 0:
        return
    if e.offset < METADATA_ITEMS_START or e.offset + e.length > region_length:
        raise ImageError(
            f"{where}: the {name} item at {e.offset:#x}+{e.length:#x} lies outside the "
            "metadata region's item area"
        )


def pack_metadata(items: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """The metadata region's table and items (items packed from 64 KiB on, 8-byte aligned)."""
    entries = []
    data = bytearray()
    for item_id, value in items:
        off = METADATA_ITEMS_START + len(data)
        entries.append(
            METADATA_ENTRY.pack(item_id.bytes_le, off, len(value), ITEM_FLAGS[item_id], b"")
        )
        data += value + bytes(-len(value) % 8)
    table = METADATA_TABLE_HEADER.pack(METADATA_SIGNATURE, 0, len(entries), b"") + b"".join(entries)
    return table + bytes(METADATA_TABLE_SIZE - len(table)) + bytes(data)


#: one metadata table entry as its fields: item id (bytes_le), offset, length, flags, reserved
_Row = tuple[bytes, int, int, int, bytes]


def change_metadata_items(
    table: bytes, region_length: int, changes: dict[uuid.UUID, bytes | None], where: str
) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The metadata table ``table`` (the region's first 64 KiB, as it is now) with the system
    items of ``changes`` given new values (None: the item and its table entry go; a new item
    gets an entry with the flags it is written with); and the item values to write, as
    (offset in the region, bytes). An item whose length stays stays where it is; another is
    put in the lowest gap of the item area (8-byte aligned) clear of every other item, user
    items too (its own old bytes may be reused: the caller writes table and items at once,
    through the log). Entries of other items are kept as they are, byte for byte.

    :raise UsageError: no gap in the region fits an item, or the table is full.
    """
    _, reserved, count, reserved2 = METADATA_TABLE_HEADER.unpack_from(table)
    rows: list[_Row] = [
        METADATA_ENTRY.unpack_from(table, METADATA_TABLE_HEADER.size + i * METADATA_ENTRY.size)
        for i in range(count)
    ]
    writes: list[tuple[int, bytes]] = []
    for item_id, value in changes.items():
        name = KNOWN_ITEMS.get(item_id, (f"metadata item {item_id}", None))[0]
        key = item_id.bytes_le
        pos = next(
            (i for i, r in enumerate(rows) if r[0] == key and not r[3] & MetadataFlag.IS_USER),
            None,
        )
        if value is None:
            if pos is not None:
                del rows[pos]
            continue
        if len(value) > MAX_METADATA_ITEM:
            raise UsageError(f"{where}: a {len(value)}-byte {name} item (at most 1 MiB)")
        if pos is None:
            if len(rows) >= MAX_TABLE_ENTRIES:
                raise UsageError(f"{where}: the metadata table is full")
            rows.append((key, 0, 0, int(ITEM_FLAGS.get(item_id, 0)), bytes(4)))
            pos = len(rows) - 1
        _, offset, length, flags, rest = rows[pos]
        if length != len(value) or not offset:
            others = [(r[1], r[1] + r[2]) for i, r in enumerate(rows) if i != pos and r[2]]
            offset = _item_gap(others, len(value), region_length, name, where)
            rows[pos] = (key, offset, len(value), flags, rest)
        if value:
            writes.append((offset, value))
    out = bytearray(table[:METADATA_TABLE_SIZE])
    out[: METADATA_TABLE_HEADER.size] = METADATA_TABLE_HEADER.pack(
        METADATA_SIGNATURE, reserved, len(rows), reserved2
    )
    at = METADATA_TABLE_HEADER.size
    for r in rows:
        out[at : at + METADATA_ENTRY.size] = METADATA_ENTRY.pack(*r)
        at += METADATA_ENTRY.size
    old_end = METADATA_TABLE_HEADER.size + count * METADATA_ENTRY.size
    if old_end > at:  # the slots of entries that went, zeroed
        out[at:old_end] = bytes(old_end - at)
    return bytes(out), writes


def _item_gap(
    others: list[tuple[int, int]], length: int, region_length: int, name: str, where: str
) -> int:
    """The lowest 8-byte aligned offset of the item area where ``length`` bytes overlap none
    of the ``others`` (start, end) spans; 0 for an empty item. :raise UsageError: none fits."""
    if not length:
        return 0
    at = METADATA_ITEMS_START
    for start, end in sorted(others):
        if at + length <= start:
            break
        at = max(at, -(-end // 8) * 8)
    if at + length > region_length:
        raise UsageError(
            f"{where}: no room for a {length}-byte {name} item in the {region_length}-byte "
            "metadata region"
        )
    return at


# 2.6.2.1 File Parameters
FILE_PARAMETERS_ITEM = struct.Struct("<II")
LEAVE_BLOCKS_ALLOCATED = 1  # bit 0: a fixed image, fully provisioned
HAS_PARENT = 2  # bit 1: a differencing image


class DiskType(enum.Enum):
    FIXED = "fixed"
    DYNAMIC = "dynamic"
    DIFFERENCING = "differencing"


@dataclass(frozen=True, slots=True)
class Metadata:
    """What the known metadata items say, checked."""

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    virtual_disk_id: uuid.UUID
    logical_sector_size: int
    physical_sector_size: int
    parent: ParentLocator | None = None

    @property
    def disk_type(self) -> DiskType:
        if self.has_parent:
            return DiskType.DIFFERENCING
        return DiskType.FIXED if self.leave_blocks_allocated else DiskType.DYNAMIC


def parse_metadata(values: dict[uuid.UUID, bytes], where: str) -> Metadata:
    """The metadata, from the raw value of each known item present.

    :raise ImageError: a required item missing or of the wrong length, a block size, sector size
        or virtual size the spec forbids, reserved bits set, a parent without a locator.
    """
    for item_id in REQUIRED_ITEMS:
        if item_id not in values:
            raise ImageError(f"{where}: metadata has no {KNOWN_ITEMS[item_id][0]} item")
    for item_id, value in values.items():
        name, exact = KNOWN_ITEMS[item_id]
        if exact is not None and len(value) != exact:
            raise ImageError(f"{where}: the {name} item is {len(value)} bytes, not {exact}")
    block_size, bits = FILE_PARAMETERS_ITEM.unpack(values[FILE_PARAMETERS])
    check_block_size(block_size, where)
    if bits & ~(LEAVE_BLOCKS_ALLOCATED | HAS_PARENT):
        raise ImageError(f"{where}: file parameters have reserved bits set ({bits:#x})")
    (size,) = struct.unpack("<Q", values[VIRTUAL_DISK_SIZE])
    (lss,) = struct.unpack("<I", values[LOGICAL_SECTOR_SIZE])
    (pss,) = struct.unpack("<I", values[PHYSICAL_SECTOR_SIZE])
    check_sector_size(lss, "logical", where)
    check_sector_size(pss, "physical", where)
    check_virtual_size(size, lss, where)
    has_parent = bool(bits & HAS_PARENT)
    parent = None
    if has_parent:
        raw = values.get(PARENT_LOCATOR)
        if raw is None:
            raise ImageError(f"{where}: a differencing image without a parent locator")
        parent = parse_parent_locator(raw, where)
    return Metadata(
        block_size=block_size,
        leave_blocks_allocated=bool(bits & LEAVE_BLOCKS_ALLOCATED),
        has_parent=has_parent,
        virtual_size=size,
        virtual_disk_id=uuid.UUID(bytes_le=values[VIRTUAL_DISK_ID]),
        logical_sector_size=lss,
        physical_sector_size=pss,
        parent=parent,
    )


def check_block_size(block_size: int, where: str) -> None:
    """MS-VHDX 2.6.2.1: a power of two, 1 MiB to 256 MiB."""
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ImageError(f"{where}: block size {block_size} (a power of two, 1 MiB to 256 MiB)")


def check_sector_size(size: int, kind: str, where: str) -> None:
    if size not in SECTOR_SIZES:
        raise ImageError(f"{where}: {kind} sector size {size} (512 or 4096)")


def check_virtual_size(size: int, lss: int, where: str) -> None:
    if size > MAX_VIRTUAL_SIZE:
        raise ImageError(f"{where}: virtual disk size {size} exceeds 64 TiB")
    if size % lss:
        raise ImageError(
            f"{where}: virtual disk size {size} is not a multiple of the {lss}-byte sector"
        )


def pack_file_parameters(block_size: int, *, leave_allocated: bool, has_parent: bool) -> bytes:
    bits = (LEAVE_BLOCKS_ALLOCATED if leave_allocated else 0) | (HAS_PARENT if has_parent else 0)
    return FILE_PARAMETERS_ITEM.pack(block_size, bits)


# 2.6.2.6 Parent Locator: a header, key/value entries, UTF-16LE strings
PARENT_LOCATOR_HEADER = struct.Struct("<16sHH")
PARENT_LOCATOR_ENTRY = struct.Struct("<IIHH")
VHDX_LOCATOR_TYPE = uuid.UUID("b04aefb7-d19e-4a81-b789-25b8e9445913")
#: 2.6.2.6.1: the keys of a VHDX parent locator
KEY_LINKAGE = "parent_linkage"
KEY_LINKAGE2 = "parent_linkage2"
KEY_RELATIVE = "relative_path"
KEY_VOLUME = "volume_path"
KEY_ABSOLUTE = "absolute_win32_path"
PATH_KEYS = (KEY_RELATIVE, KEY_VOLUME, KEY_ABSOLUTE)


@dataclass(frozen=True, slots=True)
class ParentLocator:
    """The parent locator's entries; ``linkage`` is the parent's DataWriteGuid when the child
    was made (``linkage2`` an alternative some writers record)."""

    entries: dict[str, str] = field(default_factory=dict)
    linkage: uuid.UUID = ZERO_GUID
    linkage2: uuid.UUID | None = None

    def pack(self) -> bytes:
        """The item's bytes: header, entries, then each key and value."""
        head = PARENT_LOCATOR_HEADER.size + PARENT_LOCATOR_ENTRY.size * len(self.entries)
        table = []
        data = bytearray()
        for key, value in self.entries.items():
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            table.append(
                PARENT_LOCATOR_ENTRY.pack(
                    head + len(data), head + len(data) + len(k), len(k), len(v)
                )
            )
            data += k + v
        return (
            PARENT_LOCATOR_HEADER.pack(VHDX_LOCATOR_TYPE.bytes_le, 0, len(self.entries))
            + b"".join(table)
            + bytes(data)
        )


def parse_parent_locator(raw: bytes, where: str) -> ParentLocator:
    """:raise ImageError: a locator that lies (entries outside the item, odd lengths, a key
    twice, no linkage). :raise UnsupportedFeature: a locator type other than VHDX's."""
    if len(raw) < PARENT_LOCATOR_HEADER.size:
        raise ImageError(f"{where}: parent locator is {len(raw)} bytes")
    ltype, _, count = PARENT_LOCATOR_HEADER.unpack_from(raw)
    if uuid.UUID(bytes_le=ltype) != VHDX_LOCATOR_TYPE:
        raise UnsupportedFeature(f"{where}: parent locator type {uuid.UUID(bytes_le=ltype)}")
    if PARENT_LOCATOR_HEADER.size + count * PARENT_LOCATOR_ENTRY.size > len(raw):
        raise ImageError(f"{where}: parent locator claims {count} entries, more than it holds")
    entries: dict[str, str] = {}
    for i in range(count):
        ko, vo, kl, vl = PARENT_LOCATOR_ENTRY.unpack_from(raw, PARENT_LOCATOR_HEADER.size + i * 12)
        key = _locator_string(raw, ko, kl, where)
        if not key or key in entries:
            raise ImageError(f"{where}: parent locator has an empty or repeated key {key!r}")
        entries[key] = _locator_string(raw, vo, vl, where)
    if KEY_LINKAGE not in entries:
        raise ImageError(f"{where}: parent locator has no parent_linkage")
    linkage = _locator_guid(entries[KEY_LINKAGE], where)
    linkage2 = _locator_guid(entries[KEY_LINKAGE2], where) if KEY_LINKAGE2 in entries else None
    if not any(k in entries for k in PATH_KEYS):
        raise ImageError(f"{where}: parent locator names no path of the parent")
    return ParentLocator(entries, linkage, linkage2)


def _locator_string(raw: bytes, offset: int, length: int, where: str) -> str:
    if length % 2 or offset + length > len(raw) or offset < PARENT_LOCATOR_HEADER.size:
        raise ImageError(f"{where}: parent locator entry at {offset:#x}+{length} lies outside it")
    try:
        return raw[offset : offset + length].decode("utf-16-le")
    except UnicodeDecodeError:
        raise ImageError(f"{where}: parent locator holds invalid UTF-16") from None


def _locator_guid(text: str, where: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise ImageError(f"{where}: parent linkage {text!r} is not a GUID") from None


def linkage_text(g: uuid.UUID) -> str:
    """A GUID as parent locators write it: braced (MS-VHDX 2.6.2.6.1)."""
    return "{" + str(g) + "}"


# == 2.5 BAT == entries of 64 bits: state in bits 0-2, FileOffsetMB in bits 20-63
BAT_STATE_MASK = 7
BAT_OFFSET_SHIFT = 20
BAT_ENTRY = 8


class PayloadState(enum.IntEnum):
    """2.5.1.1 Payload BAT entry states (4 and 5 are reserved)."""

    NOT_PRESENT = 0
    UNDEFINED = 1
    ZERO = 2
    UNMAPPED = 3
    FULLY_PRESENT = 6
    PARTIALLY_PRESENT = 7


class BitmapState(enum.IntEnum):
    """2.5.1.2 Sector bitmap BAT entry states."""

    NOT_PRESENT = 0
    PRESENT = 6


def bat_entry(state: int, file_offset: int) -> int:
    """A BAT entry for ``state`` at ``file_offset`` (a multiple of 1 MiB, or 0)."""
    assert not file_offset % MiB
    return file_offset | state


def bat_entry_offset(entry: int) -> int:
    return (entry >> BAT_OFFSET_SHIFT) << BAT_OFFSET_SHIFT


@dataclass(frozen=True, slots=True)
class BatGeometry:
    """The BAT's shape (MS-VHDX 2.5): payload entries in chunks of ``chunk_ratio``, each chunk
    followed by the entry of its sector bitmap block."""

    block_size: int
    logical_sector_size: int
    virtual_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector bitmap block: (2^23 * logical sector size) / block size;
        a power of two, as both sizes are."""
        return (SECTORS_PER_BITMAP * self.logical_sector_size) // self.block_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def bitmap_blocks(self) -> int:
        return -(-self.data_blocks // self.chunk_ratio)

    @property
    def total_entries(self) -> int:
        """Entries the BAT region must hold (2.5): a differencing image has every sector bitmap
        entry; others stop after the last payload entry."""
        if self.has_parent:
            return self.bitmap_blocks * (self.chunk_ratio + 1)
        if not self.data_blocks:
            return 0
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        """The BAT index of the sector bitmap entry of the chunk that holds ``block``."""
        return (block // self.chunk_ratio + 1) * (self.chunk_ratio + 1) - 1

    @property
    def bitmap_bytes_per_block(self) -> int:
        """Bytes of sector bitmap that describe one payload block."""
        return self.block_size // self.logical_sector_size // 8

    def check_bat_region(self, length: int, where: str) -> None:
        """:raise ImageError: the BAT region is too small for the virtual size."""
        need = self.total_entries * BAT_ENTRY
        if length < need:
            raise ImageError(
                f"{where}: BAT region of {length} bytes is too small for a {self.virtual_size}-"
                f"byte disk in {self.block_size}-byte blocks ({need} bytes needed)"
            )
