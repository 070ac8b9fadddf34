"""On-disk structures of qcow2, declared once, each beside the section of QEMU's
``docs/interop/qcow2.txt`` it comes from; and the validation of everything a header claims.

Everything here is pure (bytes in, values out) and bounded: a hostile header is refused with a
one-line :class:`ImageError` before anything is allocated from its numbers. This module must not
do I/O; the node (``node.py``) reads the bytes and hands them here. The compressed-cluster
descriptor lives with the rest of compression, in ``compressed.py``.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from blockfs.errors import ImageError, UnsupportedFeature, UsageError

MAGIC = b"QFI\xfb"

# == Header == (bytes 0-71, all versions)
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# version 3 additions (bytes 72-103): incompatible, compatible, autoclear features,
# refcount_order, header_length
HEADER_V3_EXTRA = struct.Struct(">QQQII")
HEADER_V2_LEN = 72
HEADER_V3_LEN = 104
#: offset of compression_type (a byte) in a v3 header whose header_length is > 104
COMPRESSION_TYPE_OFFSET = 104
#: the header as blockfs and qemu-img write it for v3: 104 bytes + compression type + padding
HEADER_V3_WRITTEN_LEN = 112

# byte offsets of fields that are rewritten in place (each rewrite is one small write)
OFF_BACKING = 8  # backing_file_offset (Q), backing_file_size (I)
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (I), l1_table_offset (Q)
OFF_REFCOUNT_TABLE = 48  # refcount_table_offset (Q), refcount_table_clusters (I)
OFF_SNAPSHOTS = 60  # nb_snapshots (I), snapshots_offset (Q)
OFF_AUTOCLEAR = 88

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit (2 MiB)
MAX_BACKING_NAME = 1023
#: QEMU's limits: 32 MiB of active L1, 8 MiB of refcount table, 64 Ki snapshots, 64 MiB of table
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_ID = 1024  # QEMU's IDs are decimal numbers; a long one is an attack
#: host offsets live in bits 9-55 of L1/L2 entries
MAX_HOST_OFFSET = 1 << 56
#: the largest zstd window a compressed cluster may ask for: QEMU compresses one cluster at a
#: time, so a window beyond the cluster (2 MiB at most) is never needed, and a hostile frame
#: cannot make the decoder reserve zstd's default limit of 128 MiB
MAX_ZSTD_WINDOW = 8 * 1024 * 1024
#: QEMU's limits on persistent dirty bitmaps: 65535 of them, a directory of 1 KiB each
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS


class Incompatible(enum.IntFlag):
    """incompatible_features (header bytes 72-79)."""

    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTL2 = 1 << 4


KNOWN_INCOMPATIBLE = int(Incompatible.DIRTY | Incompatible.CORRUPT | Incompatible.DATA_FILE) | int(
    Incompatible.COMPRESSION | Incompatible.EXTL2
)


class Compatible(enum.IntFlag):
    """compatible_features (header bytes 80-87)."""

    LAZY_REFCOUNTS = 1 << 0


class Autoclear(enum.IntFlag):
    """autoclear_features (header bytes 88-95)."""

    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


class CompressionType(enum.IntEnum):
    """compression_type (header byte 104)."""

    ZLIB = 0
    ZSTD = 1


class ExtensionType(enum.IntEnum):
    """== Header extensions == type codes."""

    END = 0x00000000
    BACKING_FORMAT = 0xE2792ACA
    FEATURE_TABLE = 0x6803F857
    BITMAPS = 0x23852875
    CRYPTO = 0x0537BE77
    DATA_FILE = 0x44415441


EXTENSION_HEADER = struct.Struct(">II")
FEATURE_ENTRY = struct.Struct(">BB46s")

# == Cluster mapping == L1 / L2 entry bits
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# == Snapshots == table entry, fixed part (40 bytes) and the v3 extra data
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
SNAPSHOT_EXTRA = struct.Struct(">QQ")  # vm_state_size_large, disk_size
SNAPSHOT_ICOUNT = struct.Struct(">Q")  # extra bytes 16-23, when present

# == Bitmaps extension == and a bitmap directory entry's fixed part
BITMAPS_EXTENSION = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size and offset
BITMAP_ENTRY = struct.Struct(">QIIBBHI")  # table offset and size, flags, type, granularity
#: bits, name size, extra data size
BITMAP_FLAGS = ((1 << 0, "in-use"), (1 << 1, "auto"))  # in the order qemu-img lists them


@dataclass(frozen=True, slots=True)
class Header:
    """The parsed, validated image header (== Header == of qcow2.txt)."""

    version: int  # bytes 4-7: 2 or 3
    backing_file_offset: int  # bytes 8-15
    backing_file_size: int  # bytes 16-19
    cluster_bits: int  # bytes 20-23
    size: int  # bytes 24-31: virtual size
    crypt_method: int  # bytes 32-35
    l1_size: int  # bytes 36-39: entries of the active L1
    l1_table_offset: int  # bytes 40-47
    refcount_table_offset: int  # bytes 48-55
    refcount_table_clusters: int  # bytes 56-59
    nb_snapshots: int  # bytes 60-63
    snapshots_offset: int  # bytes 64-71
    incompatible: int = 0  # bytes 72-79 (v3)
    compatible: int = 0  # bytes 80-87 (v3)
    autoclear: int = 0  # bytes 88-95 (v3)
    refcount_order: int = 4  # bytes 96-99 (v3; v2 is always 4)
    header_length: int = HEADER_V2_LEN  # bytes 100-103 (v3)
    compression_type: int = CompressionType.ZLIB  # byte 104 (v3, optional)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """The header bytes (``header_length`` long; v3 includes the compression type)."""
        base = HEADER_V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version == 2:
            return base
        extra = HEADER_V3_EXTRA.pack(
            self.incompatible,
            self.compatible,
            self.autoclear,
            self.refcount_order,
            self.header_length,
        )
        tail = bytearray(self.header_length - HEADER_V3_LEN)
        if tail:
            tail[0] = self.compression_type
        return base + extra + bytes(tail)


@dataclass(slots=True)
class Extensions:
    """What the header extensions say (== Header extensions ==)."""

    backing_format: str | None = None
    data_file: str | None = None
    #: (type, bit) -> name, from the feature name table
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    has_bitmaps: bool = False
    #: the bitmaps extension: (nb_bitmaps, directory size, directory offset)
    bitmap_directory: tuple[int, int, int] | None = None
    #: offset just past the end-of-extensions marker (where a backing name may start)
    end: int = 0
    #: raw unknown extensions to preserve when rewriting: (type, data)
    unknown: list[tuple[int, bytes]] = field(default_factory=list)
    #: every extension in the order found, raw: (type, data); the header rewrite keeps them
    entries: list[tuple[int, bytes]] = field(default_factory=list)


def l2_entries(cluster_bits: int) -> int:
    return 1 << (cluster_bits - 3)


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    """L1 entries that a disk of ``size`` bytes needs (== Cluster mapping ==)."""
    span = 1 << (cluster_bits + cluster_bits - 3)  # guest bytes one L2 table maps
    return (size + span - 1) // span


_LITTLE = sys.byteorder == "little"


def unpack_u64_table(raw: bytes) -> array[int]:
    """A table of big-endian 64-bit entries (L1, L2, refcount table) as an array."""
    t = array("Q")
    t.frombytes(raw)
    if _LITTLE:
        t.byteswap()
    return t


def pack_u64_table(t: array[int]) -> bytes:
    """The on-disk (big-endian) bytes of a table of 64-bit entries."""
    if _LITTLE:
        t = array("Q", t)
        t.byteswap()
    return t.tobytes()


def parse_header(buf: bytes, file_size: int, where: str) -> Header:
    """Parse and validate the header at the start of ``buf`` (at least one cluster, or the whole
    file if shorter). ``file_size`` bounds every offset.

    :raise ImageError: a corrupt or hostile header.
    :raise UnsupportedFeature: encryption, an external data file, extended L2 entries, unknown
        incompatible features.
    """
    if len(buf) < HEADER_V2_LEN or buf[:4] != MAGIC:
        raise ImageError(f"{where}: not a qcow2 image (bad magic or truncated header)")
    f = HEADER_V2.unpack_from(buf, 0)
    (
        _,
        version,
        bf_off,
        bf_size,
        cbits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = f
    if version not in (2, 3):
        raise UnsupportedFeature(f"{where}: qcow2 version {version} is not supported (2 or 3)")
    if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
        raise ImageError(
            f"{where}: cluster_bits {cbits} out of range "
            f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}: 512 B to 2 MiB clusters)"
        )
    cs = 1 << cbits
    incompatible = compatible = autoclear = 0
    refcount_order = 4
    header_length = HEADER_V2_LEN
    compression = CompressionType.ZLIB
    if version == 3:
        if len(buf) < HEADER_V3_LEN:
            raise ImageError(f"{where}: truncated qcow2 v3 header")
        incompatible, compatible, autoclear, refcount_order, header_length = (
            HEADER_V3_EXTRA.unpack_from(buf, HEADER_V2_LEN)
        )
        if header_length < HEADER_V3_LEN or header_length % 8 or header_length > cs:
            raise ImageError(f"{where}: invalid header_length {header_length}")
        if len(buf) < header_length:
            raise ImageError(f"{where}: truncated qcow2 header")
        if refcount_order > 6:
            raise ImageError(f"{where}: refcount_order {refcount_order} out of range (0..6)")
        if header_length > COMPRESSION_TYPE_OFFSET:
            ctype = buf[COMPRESSION_TYPE_OFFSET]
            if ctype not in (0, 1):
                raise UnsupportedFeature(f"{where}: unknown compression type {ctype}")
            compression = CompressionType(ctype)
        if bool(incompatible & Incompatible.COMPRESSION) != (compression != 0):
            raise ImageError(f"{where}: compression type bit and compression_type disagree")
    if crypt:
        raise UnsupportedFeature(f"{where}: encrypted qcow2 images are not supported")
    if size >= 1 << 63:
        raise ImageError(f"{where}: virtual size {size} overflows")
    needed = l1_entries_needed(size, cbits)
    if needed * 8 > MAX_L1_BYTES:
        raise ImageError(f"{where}: virtual size {size} too large for {cs}-byte clusters")
    if l1_size < needed:
        raise ImageError(f"{where}: L1 table too small ({l1_size} entries, need {needed})")
    if l1_size * 8 > MAX_L1_BYTES or l1_size > 4 * needed + 128:
        raise ImageError(
            f"{where}: L1 table of {l1_size} entries is larger than a {size}-byte disk needs"
        )
    _check_table(where, "L1 table", l1_off, l1_size * 8, cs, file_size, allow_empty=True)
    if rt_clusters == 0:
        raise ImageError(f"{where}: refcount table is empty")
    if rt_clusters * cs > MAX_REFCOUNT_TABLE_BYTES:
        raise ImageError(f"{where}: refcount table of {rt_clusters} clusters is too large")
    _check_table(where, "refcount table", rt_off, rt_clusters * cs, cs, file_size)
    if nb_snap > MAX_SNAPSHOTS:
        raise ImageError(f"{where}: {nb_snap} snapshots is more than {MAX_SNAPSHOTS}")
    if nb_snap:
        _check_table(
            where, "snapshot table", snap_off, nb_snap * SNAPSHOT_ENTRY.size, cs, file_size
        )
    if bf_off:
        if bf_size > MAX_BACKING_NAME or bf_size == 0:
            raise ImageError(f"{where}: backing file name length {bf_size} is invalid")
        if bf_off + bf_size > min(cs, file_size):
            raise ImageError(f"{where}: backing file name lies outside the first cluster")
    else:
        bf_size = 0
    unknown = incompatible & ~KNOWN_INCOMPATIBLE
    if unknown:
        raise UnsupportedFeature(f"{where}: unknown incompatible features {unknown:#x}")
    if incompatible & Incompatible.EXTL2:
        raise UnsupportedFeature(f"{where}: extended L2 entries (subclusters) are not supported")
    if incompatible & Incompatible.DATA_FILE:
        raise UnsupportedFeature(f"{where}: external data files are not supported")
    return Header(
        version,
        bf_off,
        bf_size,
        cbits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        header_length,
        compression,
    )


def _check_table(
    where: str,
    what: str,
    offset: int,
    length: int,
    cs: int,
    file_size: int,
    allow_empty: bool = False,
) -> None:
    if allow_empty and length == 0:
        return
    if offset % cs:
        raise ImageError(f"{where}: {what} offset {offset:#x} is not cluster aligned")
    if offset == 0:
        raise ImageError(f"{where}: {what} overlaps the header")
    if offset + length > file_size:
        raise ImageError(f"{where}: {what} at {offset:#x} lies past the end of the file")


def parse_extensions(buf: bytes, header: Header, where: str) -> Extensions:
    """Walk the header extensions that follow the header, within the first cluster.

    :raise ImageError: an extension that runs past the first cluster.
    """
    ext = Extensions()
    limit = min(len(buf), header.cluster_size)
    if header.backing_file_offset:
        limit = min(limit, header.backing_file_offset)
    pos = header.header_length
    seen: set[int] = set()
    while True:
        if pos + EXTENSION_HEADER.size > limit:
            if pos >= limit:  # no end marker, but nothing left: tolerated as QEMU does
                ext.end = pos
                return ext
            raise ImageError(f"{where}: header extension area is truncated")
        etype, elen = EXTENSION_HEADER.unpack_from(buf, pos)
        pos += EXTENSION_HEADER.size
        if etype == ExtensionType.END:
            ext.end = pos
            return ext
        if elen > limit - pos:
            raise ImageError(f"{where}: header extension {etype:#x} of {elen} bytes is too long")
        data = bytes(buf[pos : pos + elen])
        pos += (elen + 7) & ~7
        if etype in seen and etype != ExtensionType.FEATURE_TABLE:
            raise ImageError(f"{where}: header extension {etype:#x} appears twice")
        seen.add(etype)
        ext.entries.append((etype, data))
        if etype == ExtensionType.BACKING_FORMAT:
            ext.backing_format = _text(data, where, "backing format")
        elif etype == ExtensionType.DATA_FILE:
            ext.data_file = _text(data, where, "data file name")
        elif etype == ExtensionType.FEATURE_TABLE:
            for i in range(0, len(data) - FEATURE_ENTRY.size + 1, FEATURE_ENTRY.size):
                ftype, bit, name = FEATURE_ENTRY.unpack_from(data, i)
                ext.feature_names[(ftype, bit)] = name.rstrip(b"\0").decode("utf-8", "replace")
        elif etype == ExtensionType.BITMAPS:
            ext.has_bitmaps = True
            if len(data) >= BITMAPS_EXTENSION.size:
                nb, _, dsize, doff = BITMAPS_EXTENSION.unpack_from(data)
                ext.bitmap_directory = (nb, dsize, doff)
        elif etype == ExtensionType.CRYPTO:
            pass  # encryption is refused by crypt_method already
        else:
            ext.unknown.append((etype, data))


def _text(data: bytes, where: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{where}: {what} is not valid UTF-8") from None


def feature_table() -> bytes:
    """The feature name table blockfs writes (names as qemu-img writes them)."""
    names = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ]
    return b"".join(FEATURE_ENTRY.pack(t, b, n.encode()) for t, b, n in names)


def pack_extension(etype: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return EXTENSION_HEADER.pack(etype, len(data)) + data + bytes(pad)


def header_cluster_with_backing(
    first: bytes, header: Header, ext: Extensions, name: str | None, fmt: str | None
) -> tuple[bytes, Header]:
    """Cluster 0 as it must read once the backing file is ``name`` in format ``fmt`` (None:
    no backing file, no format), built from ``first`` (the current cluster 0, whole, with
    ``header`` and ``ext`` parsed from it), and the header it holds. The header bytes are kept
    as they are but for the backing file's offset and size; every extension is kept, raw and in
    order, but the backing format, which is replaced; the name follows the end marker. The
    rest of the cluster is zeroes (== Header == : cluster 0 holds nothing else).

    :raise UsageError: an empty name, a format without a name, or too long for the cluster.
    """
    cs = header.cluster_size
    if name is None and fmt is not None:
        raise UsageError("a backing format needs a backing file")
    raw_name = name.encode() if name is not None else b""
    if name is not None and not 0 < len(raw_name) <= MAX_BACKING_NAME:
        raise UsageError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes")
    exts = b""
    if fmt:
        exts += pack_extension(ExtensionType.BACKING_FORMAT, fmt.encode())
    for etype, data in ext.entries:
        if etype != ExtensionType.BACKING_FORMAT:
            exts += pack_extension(etype, data)
    exts += bytes(EXTENSION_HEADER.size)  # end of extensions
    hlen = header.header_length
    bf_off = hlen + len(exts) if raw_name else 0
    if hlen + len(exts) + len(raw_name) > cs:
        raise UsageError(
            f"header, extensions and backing file name do not fit in a {cs}-byte cluster"
        )
    out = bytearray(cs)
    out[:hlen] = first[:hlen]
    struct.pack_into(">QI", out, OFF_BACKING, bf_off, len(raw_name))
    out[hlen : hlen + len(exts)] = exts
    out[hlen + len(exts) : hlen + len(exts) + len(raw_name)] = raw_name
    new = replace(header, backing_file_offset=bf_off, backing_file_size=len(raw_name))
    return bytes(out), new


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One entry of the snapshot table (== Snapshots ==)."""

    l1_table_offset: int  # bytes 0-7
    l1_size: int  # bytes 8-11
    id: str  # unique ID string
    name: str
    date_sec: int  # bytes 16-19
    date_nsec: int  # bytes 20-23
    vm_clock_nsec: int  # bytes 24-31
    vm_state_size: int  # bytes 32-35, or extra bytes 40-47 when present
    disk_size: int | None  # extra bytes 48-55 (v3)
    extra: bytes = b""  # the whole extra data, preserved when rewriting the table

    def pack(self, version: int) -> bytes:
        extra = bytearray(self.extra)
        if version == 3 and len(extra) < SNAPSHOT_EXTRA.size:
            extra.extend(bytes(SNAPSHOT_EXTRA.size - len(extra)))
        if len(extra) >= SNAPSHOT_EXTRA.size:
            disk = self.disk_size if self.disk_size is not None else 0
            SNAPSHOT_EXTRA.pack_into(extra, 0, self.vm_state_size, disk)
        ident = self.id.encode()
        name = self.name.encode()
        head = SNAPSHOT_ENTRY.pack(
            self.l1_table_offset,
            self.l1_size,
            len(ident),
            len(name),
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            min(self.vm_state_size, 0xFFFFFFFF),
            len(extra),
        )
        entry = head + bytes(extra) + ident + name
        return entry + bytes((-len(entry)) % 8)


def parse_snapshots(
    buf: bytes, count: int, header: Header, file_size: int, where: str
) -> list[Snapshot]:
    """Parse ``count`` entries from ``buf`` (the table, read up to its bound).

    :raise ImageError: an entry runs past the table, or its L1 table is out of bounds.
    """
    cs = header.cluster_size
    out: list[Snapshot] = []
    pos = 0
    for _ in range(count):
        if pos + SNAPSHOT_ENTRY.size > len(buf):
            raise ImageError(f"{where}: snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vmstate, extra_len) = (
            SNAPSHOT_ENTRY.unpack_from(buf, pos)
        )
        pos += SNAPSHOT_ENTRY.size
        if id_len > MAX_SNAPSHOT_ID:
            raise ImageError(f"{where}: snapshot table entry has an ID of {id_len} bytes")
        if extra_len > MAX_SNAPSHOT_EXTRA:
            raise ImageError(f"{where}: snapshot extra data of {extra_len} bytes is too large")
        end = pos + extra_len + id_len + name_len
        if end > len(buf):
            raise ImageError(f"{where}: snapshot table is truncated")
        extra = bytes(buf[pos : pos + extra_len])
        pos += extra_len
        ident = buf[pos : pos + id_len].decode("utf-8", "replace")
        pos += id_len
        name = buf[pos : pos + name_len].decode("utf-8", "replace")
        pos += name_len
        pos += (-pos) % 8
        disk_size: int | None = None
        if extra_len >= 8:
            vmstate = struct.unpack_from(">Q", extra, 0)[0]
        if extra_len >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if l1_size * 8 > MAX_L1_BYTES:
            raise ImageError(f"{where}: snapshot {ident!r} has an L1 table that is too large")
        _check_table(
            where,
            f"snapshot {ident!r} L1 table",
            l1_off,
            l1_size * 8,
            cs,
            file_size,
            allow_empty=True,
        )
        out.append(
            Snapshot(l1_off, l1_size, ident, name, sec, nsec, clock, vmstate, disk_size, extra)
        )
    return out


def snapshot_table_bound(count: int) -> int:
    """The most bytes a table of ``count`` entries may take (bounds the read)."""
    return min(
        MAX_SNAPSHOT_TABLE_BYTES,
        count * (SNAPSHOT_ENTRY.size + MAX_SNAPSHOT_EXTRA + MAX_SNAPSHOT_ID + 65535 + 8),
    )


#: a run of metadata clusters: (what, first cluster, end cluster)
Region = tuple[str, int, int]


def metadata_regions(
    cluster_bits: int,
    l1_offset: int,
    l1_entries: int,
    rt_offset: int,
    rt_clusters: int,
    snapshots_offset: int,
    nb_snapshots: int,
) -> list[Region]:
    """The clusters of the header and of the tables the header points to (the snapshot table
    counted at its fixed part only: that much it holds at least)."""
    cs = 1 << cluster_bits

    def clusters(offset: int, length: int) -> tuple[int, int]:
        return offset >> cluster_bits, (offset + length + cs - 1) >> cluster_bits

    regions: list[Region] = [("header", 0, 1)]
    if l1_entries:
        regions.append(("L1 table", *clusters(l1_offset, l1_entries * 8)))
    regions.append(("refcount table", *clusters(rt_offset, rt_clusters * cs)))
    if nb_snapshots:
        regions.append(
            ("snapshot table", *clusters(snapshots_offset, nb_snapshots * SNAPSHOT_ENTRY.size))
        )
    return regions


def check_metadata_layout(
    where: str, header: Header, l1: Sequence[int], refcount_table: Sequence[int]
) -> None:
    """Refuse tables that overlap each other: the header, the active L1 table, the refcount
    table and the snapshot table must lie apart, refcount blocks outside all of them, and L2
    tables outside all of them and outside every refcount block. QEMU checks this before every
    metadata write; a hostile image that points a refcount block at the L1 table would
    otherwise have its L1 table overwritten by the first allocation. O(entries), no I/O.

    :raise ImageError: naming the first table entry (or table) that overlaps.
    """
    cb = header.cluster_bits
    fixed = metadata_regions(
        cb,
        header.l1_table_offset,
        header.l1_size,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        header.snapshots_offset,
        header.nb_snapshots,
    )
    for i, (name, a0, a1) in enumerate(fixed):
        for other, b0, b1 in fixed[:i]:
            if a0 < b1 and b0 < a1:
                raise ImageError(f"{where}: the {name} overlaps the {other}")

    def inside(c: int) -> str | None:
        for name, a0, a1 in fixed:
            if a0 <= c < a1:
                return name
        return None

    refblocks: set[int] = set()
    for i, e in enumerate(refcount_table):
        c = (e & REFT_OFFSET_MASK) >> cb
        if c:
            hit = inside(c)
            if hit is not None:
                raise ImageError(f"{where}: refcount table entry {i} points into {_the(hit)}")
            refblocks.add(c)
    for i, e in enumerate(l1):
        c = (e & L1E_OFFSET_MASK) >> cb
        if c:
            hit = inside(c) or ("a refcount block" if c in refblocks else None)
            if hit is not None:
                raise ImageError(f"{where}: L1 table entry {i} points into {_the(hit)}")


def _the(name: str) -> str:
    return name if name.startswith("a ") else f"the {name}"


def check_l2_table(
    where: str, offset: int, table: Sequence[int], cluster_bits: int, regions: list[Region]
) -> None:
    """Refuse an L2 table (just read from ``offset``) whose standard clusters lie in the table
    itself or in the ``regions`` of metadata: a guest write in place there would overwrite the
    image's own tables (QEMU's overlap check, done once per table load instead of per write).

    :raise ImageError: naming the table and the entry.
    """
    own = offset >> cluster_bits
    for i, e in enumerate(table):
        if not e & L2E_OFFSET_MASK or e & OFLAG_COMPRESSED:
            continue
        host = e & L2E_OFFSET_MASK
        if host & ((1 << cluster_bits) - 1):
            raise ImageError(f"{where}: L2 entry {e:#x} is not cluster aligned")
        c = host >> cluster_bits
        hit = "the L2 table itself" if c == own else None
        for name, a0, a1 in regions:
            if a0 <= c < a1:
                hit = f"the {name}"
        if hit is not None:
            raise ImageError(f"{where}: L2 table at {offset:#x}, entry {i} points into {hit}")


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """What ``qemu-img info`` shows of one persistent dirty bitmap."""

    name: str
    granularity: int
    flags: tuple[str, ...]


def bitmap_directory_span(ext: Extensions, fsize: int, where: str) -> tuple[int, int, int]:
    """``(count, offset, length)`` of the bitmap directory the extension names, bounded.

    :raise ImageError: more bitmaps than QEMU allows, or a directory outside the file.
    """
    assert ext.bitmap_directory is not None
    nb, dsize, doff = ext.bitmap_directory
    if nb > MAX_BITMAPS or dsize > MAX_BITMAP_DIRECTORY_BYTES:
        raise ImageError(f"{where}: bitmap directory of {nb} bitmaps, {dsize} bytes, is too large")
    if doff % 8 or doff >= fsize or dsize > fsize - doff or dsize < nb * BITMAP_ENTRY.size:
        raise ImageError(f"{where}: bitmap directory is outside the file or too short")
    return nb, doff, dsize


def parse_bitmap_directory(buf: bytes, nb: int, where: str) -> list[BitmapInfo]:
    """The ``nb`` entries of a bitmap directory (== Bitmap directory ==).

    :raise ImageError: an entry runs past the directory, or a name is not UTF-8.
    """
    out = []
    pos = 0
    for _ in range(nb):
        if pos + BITMAP_ENTRY.size > len(buf):
            raise ImageError(f"{where}: bitmap directory entry past the directory's end")
        _, _, flags, _, gbits, name_size, extra = BITMAP_ENTRY.unpack_from(buf, pos)
        name_at = pos + BITMAP_ENTRY.size + extra
        end = name_at + name_size
        if end > len(buf) or gbits > 63:
            raise ImageError(f"{where}: bitmap directory entry is malformed")
        name = _text(bytes(buf[name_at:end]), where, "bitmap name")
        out.append(
            BitmapInfo(name, 1 << gbits, tuple(label for bit, label in BITMAP_FLAGS if flags & bit))
        )
        pos = end + (-end % 8)
    return out
