"""The VHDX metadata log (MS-VHDX 2.3): its structures, parsed and serialised in one place, the
search for the active sequence, and its replay, onto the file or into memory.

The log is a ring of 4 KiB sectors in the log region. An *entry* is a header sector whose first
64 bytes are :data:`ENTRY_HEADER`, followed by descriptors (32 bytes each, packed after the header
into as many sectors as they need), followed by one data sector per data descriptor. A data
descriptor and its data sector together carry one 4 KiB sector of the file: 8 leading bytes and
4 trailing bytes in the descriptor, 4084 in the sector (whose own first 8 and last 4 bytes hold a
signature and the split sequence number that ties it to its entry). A zero descriptor zeroes a
range. An entry is valid when its signature, log GUID and CRC-32C (over the whole entry) check out
and every descriptor and data sector carries the entry's sequence number.

The *active sequence* is the run of valid entries, consecutive in the ring and in sequence
number, that starts at the tail named by its last entry (the head); of all such runs, the one
whose head has the highest sequence number. Replaying it applies each entry's updates, tail
first, then extends the file to the head's LastFileOffset. An entry that fails its checksum is a
torn write and simply not part of any sequence (a writer killed while appending leaves one); an
entry whose checksum holds but whose contents lie (updates aimed at the headers or the log
itself, a descriptor count that does not fit, a file shorter than its FlushedFileOffset) is
hostile, and refused with a one-line :class:`ImageError`.

Bounds: only a log of at most :data:`MAX_REPLAY_LOG` bytes is replayed (it is read whole:
Hyper-V and QEMU make 1 MiB logs); the search walks and checksums at most a few times the ring,
however the entries chain (:class:`_Search`), so a hostile log costs bounded time and memory.

Which replay (the node chooses, see ``node.py``): an image opened writable is replayed onto the
file (:func:`replay_onto`); one opened read-only is replayed into memory: a
:class:`ReplayedFile` lays the replayed sectors over the file, the image is left untouched.

What the writing half needs is here too: :func:`encode_entry` serialises an entry from the same
structures that :func:`decode_entry` parses, and :func:`ring_spans` maps a run of the ring to
file ranges (an entry may wrap past the end of the log region).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from blockfs.errors import ImageError, ReadOnlyError
from blockfs.nodes.base import Node
from blockfs.nodes.vhdx.format import (
    LOG_TARGET_MIN,
    MAX_FILE_OFFSET,
    MiB,
    checksum,
    checksum_ok,
)

SECTOR = 4096
#: the largest log replayed (it is read whole); a clean log of any size is never read
MAX_REPLAY_LOG = 64 * MiB

# 2.3.1.1 Entry Header (64 bytes): signature "loge", checksum, EntryLength, Tail, SequenceNumber,
# DescriptorCount, reserved, LogGuid, FlushedFileOffset, LastFileOffset
ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
ENTRY_SIGNATURE = b"loge"
# 2.3.1.2 Zero Descriptor: signature "zero", reserved, ZeroLength, FileOffset, SequenceNumber
ZERO_DESCRIPTOR = struct.Struct("<4sIQQQ")
ZERO_SIGNATURE = b"zero"
# 2.3.1.3 Data Descriptor: signature "desc", TrailingBytes (4), LeadingBytes (8), FileOffset,
# SequenceNumber
DATA_DESCRIPTOR = struct.Struct("<4s4s8sQQ")
DATA_SIGNATURE = b"desc"
# 2.3.1.4 Data Sector: signature "data", SequenceHigh, Data (4084), SequenceLow
DATA_SECTOR = struct.Struct("<4sI4084sI")
SECTOR_SIGNATURE = b"data"
DESCRIPTOR = 32
assert ZERO_DESCRIPTOR.size == DATA_DESCRIPTOR.size == DESCRIPTOR
assert DATA_SECTOR.size == SECTOR and ENTRY_HEADER.size == 64


@dataclass(frozen=True, slots=True)
class EntryHeader:
    """A log entry's header (2.3.1.1)."""

    entry_length: int  # a multiple of 4 KiB: header, descriptor and data sectors
    tail: int  # ring offset of the first entry of the sequence this one ends
    sequence_number: int
    descriptor_count: int
    log_guid: uuid.UUID  # must be the header's LogGuid
    flushed_file_offset: int  # the file's size when the entry was written
    last_file_offset: int  # the size the file must have at least once replayed

    @property
    def sectors(self) -> int:
        return self.entry_length // SECTOR


@dataclass(frozen=True, slots=True)
class DataUpdate:
    """One 4 KiB sector of the file, as a data descriptor and its data sector carry it."""

    file_offset: int
    data: bytes  # 4096 bytes


@dataclass(frozen=True, slots=True)
class ZeroUpdate:
    """A range of the file to zero (a zero descriptor)."""

    file_offset: int
    length: int


Update = DataUpdate | ZeroUpdate


@dataclass(frozen=True, slots=True)
class LogEntry:
    header: EntryHeader
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Replay:
    """The active sequence, tail first (empty: nothing to replay)."""

    entries: tuple[LogEntry, ...]

    @property
    def last_file_offset(self) -> int:
        return self.entries[-1].header.last_file_offset if self.entries else 0

    @property
    def updates(self) -> list[Update]:
        return [u for e in self.entries for u in e.updates]


def descriptor_sectors(count: int) -> int:
    """Sectors the header and ``count`` descriptors take."""
    return -(-(ENTRY_HEADER.size + count * DESCRIPTOR) // SECTOR)


# -- serialising (used by the writer and by tests) ---------------------------------------------


def encode_entry(
    *,
    sequence_number: int,
    tail: int,
    log_guid: uuid.UUID,
    flushed_file_offset: int,
    last_file_offset: int,
    updates: Sequence[Update],
) -> bytes:
    """The bytes of one log entry, checksum filled in. A :class:`DataUpdate` carries a whole,
    4 KiB-aligned sector of the file; a :class:`ZeroUpdate` a 4 KiB-aligned range."""
    seq = sequence_number
    descs = []
    data_sectors = []
    for u in updates:
        if isinstance(u, DataUpdate):
            assert len(u.data) == SECTOR and not u.file_offset % SECTOR
            d = u.data
            descs.append(DATA_DESCRIPTOR.pack(DATA_SIGNATURE, d[4092:], d[:8], u.file_offset, seq))
            data_sectors.append(
                DATA_SECTOR.pack(SECTOR_SIGNATURE, seq >> 32, d[8:4092], seq & 0xFFFFFFFF)
            )
        else:
            assert u.length > 0 and not (u.length | u.file_offset) % SECTOR
            descs.append(ZERO_DESCRIPTOR.pack(ZERO_SIGNATURE, 0, u.length, u.file_offset, seq))
    nd = descriptor_sectors(len(descs))
    length = (nd + len(data_sectors)) * SECTOR
    head = ENTRY_HEADER.pack(
        ENTRY_SIGNATURE,
        0,
        length,
        tail,
        seq,
        len(descs),
        0,
        log_guid.bytes_le,
        flushed_file_offset,
        last_file_offset,
    )
    front = head + b"".join(descs)
    raw = front + bytes(nd * SECTOR - len(front)) + b"".join(data_sectors)
    return raw[:4] + struct.pack("<I", checksum(raw)) + raw[8:]


def ring_spans(log_offset: int, log_length: int, pos: int, length: int) -> list[tuple[int, int]]:
    """The file ranges (offset, length) of ``length`` bytes of the ring from ring offset
    ``pos``: one range, or two where the run wraps past the end of the log region."""
    assert 0 <= pos < log_length and 0 < length <= log_length
    first = min(length, log_length - pos)
    spans = [(log_offset + pos, first)]
    if first < length:
        spans.append((log_offset, length - first))
    return spans


# -- parsing -----------------------------------------------------------------------------------


def peek_entry_header(ring: bytes, pos: int, log_guid: uuid.UUID, where: str) -> EntryHeader | None:
    """The header of an entry of this log at ring offset ``pos``, or None (no entry there, or
    one of another log: an earlier session's, which is history, not hostility).

    :raise ImageError: a header of this log whose fields cannot be (its sector is written
        whole, so a torn write never makes one).
    """
    if ring[pos : pos + 4] != ENTRY_SIGNATURE:
        return None
    _, _, length, tail, seq, count, _, guid, flushed, last = ENTRY_HEADER.unpack_from(ring, pos)
    if uuid.UUID(bytes_le=guid) != log_guid:
        return None
    size = len(ring)
    at = f"{where}: log entry at {pos:#x}"
    if length == 0 or length % SECTOR or length > size:
        raise ImageError(f"{at} claims a length of {length:#x} (the log is {size:#x})")
    if tail % SECTOR or tail >= size:
        raise ImageError(f"{at} names a tail at {tail:#x}, outside the log")
    if descriptor_sectors(count) > length // SECTOR:
        raise ImageError(f"{at} claims {count} descriptors, more than its {length:#x} bytes hold")
    if flushed > MAX_FILE_OFFSET or last > MAX_FILE_OFFSET:
        raise ImageError(f"{at} claims a file of {max(flushed, last):#x} bytes")
    return EntryHeader(length, tail, seq, count, log_guid, flushed, last)


def decode_entry(raw: bytes, header: EntryHeader, where: str) -> LogEntry | None:
    """The entry whose header is ``header`` from its ``raw`` bytes (``entry_length`` of them,
    unwrapped), or None when its checksum fails (a torn write).

    :raise ImageError: a checksummed entry that lies (descriptors that do not fit its length,
        unknown descriptors, sequence numbers of another entry).
    """
    if not checksum_ok(raw):
        return None
    seq = header.sequence_number
    at = f"{where}: log entry {seq}"
    nd = descriptor_sectors(header.descriptor_count)
    updates: list[Update] = []
    data_at = nd * SECTOR
    for i in range(header.descriptor_count):
        off = ENTRY_HEADER.size + i * DESCRIPTOR
        sig = raw[off : off + 4]
        if sig == ZERO_SIGNATURE:
            _, _, zlen, foff, dseq = ZERO_DESCRIPTOR.unpack_from(raw, off)
            if dseq != seq:
                raise ImageError(f"{at}: a zero descriptor carries sequence number {dseq}")
            updates.append(ZeroUpdate(foff, zlen))
        elif sig == DATA_SIGNATURE:
            _, trailing, leading, foff, dseq = DATA_DESCRIPTOR.unpack_from(raw, off)
            if dseq != seq:
                raise ImageError(f"{at}: a data descriptor carries sequence number {dseq}")
            if data_at + SECTOR > len(raw):
                raise ImageError(f"{at}: more data descriptors than data sectors")
            updates.append(DataUpdate(foff, _data_sector(raw, data_at, leading, trailing, seq, at)))
            data_at += SECTOR
        else:
            raise ImageError(f"{at}: descriptor {i} has an unknown signature {sig!r}")
    if data_at != len(raw):
        raise ImageError(
            f"{at}: {header.entry_length:#x} bytes, but its descriptors fill {data_at:#x}"
        )
    return LogEntry(header, tuple(updates))


def _data_sector(
    raw: bytes, at_byte: int, leading: bytes, trailing: bytes, seq: int, at: str
) -> bytes:
    sig, high, data, low = DATA_SECTOR.unpack_from(raw, at_byte)
    if sig != SECTOR_SIGNATURE or high != seq >> 32 or low != seq & 0xFFFFFFFF:
        raise ImageError(f"{at}: data sector at +{at_byte:#x} does not belong to the entry")
    return bytes(leading + data + trailing)


def check_updates(entry: LogEntry, fsize: int, log_span: tuple[int, int], where: str) -> None:
    """:raise ImageError: an update aimed at the identifier or headers, at the log itself,
    unaligned, empty, or past both the file's end and the entry's LastFileOffset."""
    limit = max(fsize, entry.header.last_file_offset)
    log_start, log_end = log_span
    at = f"{where}: log entry {entry.header.sequence_number}"
    for u in entry.updates:
        length = u.length if isinstance(u, ZeroUpdate) else SECTOR
        start, end = u.file_offset, u.file_offset + length
        if start % SECTOR or length <= 0 or length % SECTOR:
            raise ImageError(f"{at} updates {start:#x}+{length:#x}, not 4 KiB aligned")
        if start < LOG_TARGET_MIN:
            raise ImageError(f"{at} updates {start:#x}, inside the file identifier or headers")
        if start < log_end and end > log_start:
            raise ImageError(f"{at} updates {start:#x}+{length:#x}, inside the log itself")
        if end > limit:
            raise ImageError(f"{at} updates {start:#x}+{length:#x}, past the file's end")


class _Search:
    """The search for the active sequence over a ring read whole. Work is bounded: entries are
    checksummed once each, and the walks and checks together may touch at most a few times the
    ring's sectors (a log that needs more is refused); only the sequence found is kept decoded,
    so memory stays within the ring's size."""

    def __init__(self, ring: bytes, log_guid: uuid.UUID, where: str) -> None:
        self.ring = ring
        self.where = where
        self.sectors = len(ring) // SECTOR
        self.heads: dict[int, EntryHeader] = {}
        for i in range(self.sectors):
            h = peek_entry_header(ring, i * SECTOR, log_guid, where)
            if h is not None:
                self.heads[i] = h
        self.intact: dict[int, bool] = {}
        self.budget = 4 * self.sectors + 64

    def spend(self, sectors: int) -> None:
        self.budget -= sectors
        if self.budget < 0:
            raise ImageError(
                f"{self.where}: the log's entries chain into no consistent sequence within "
                "bounds (hostile or corrupt log)"
            )

    def active(self) -> list[LogEntry]:
        """The active sequence, tail first; empty when no sequence of this log is valid."""
        order = sorted(self.heads, key=lambda i: (-self.heads[i].sequence_number, i))
        for head in order:
            walk = self.walk(head)
            if walk is None:
                continue
            if all(self.is_intact(i) for i in walk):  # else torn: an older head may do
                return [self.decode(i) for i in walk]
        return []

    def walk(self, head: int) -> list[int] | None:
        """Sector indices of the entries from ``head``'s tail to ``head``, consecutive in the
        ring and in sequence number; None if there is no such run.

        :raise ImageError: the run is longer than the ring (it wraps onto itself: the entries
            it passes twice cannot all be intact unless they were made to lie).
        """
        h = self.heads[head]
        pos = h.tail // SECTOR
        start = self.heads.get(pos)
        if start is None or start.sequence_number > h.sequence_number:
            return None
        if h.sequence_number - start.sequence_number >= self.sectors:
            return None  # more entries than sectors: a sequence that wraps onto itself
        expected = start.sequence_number
        used = 0
        out = []
        while True:
            e = self.heads.get(pos)
            if e is None or e.sequence_number != expected:
                return None
            used += e.sectors
            if used > self.sectors:
                raise ImageError(
                    f"{self.where}: log entries {start.sequence_number}..{e.sequence_number} "
                    "chain around the log onto themselves"
                )
            self.spend(1)
            out.append(pos)
            if pos == head:
                return out
            pos = (pos + e.sectors) % self.sectors
            expected += 1

    def is_intact(self, index: int) -> bool:
        """Does the entry at ``index`` pass its checksum (and say nothing it cannot)?"""
        if index not in self.intact:
            self.spend(self.heads[index].sectors)
            self.intact[index] = self.decode_or_none(index) is not None
        return self.intact[index]

    def decode(self, index: int) -> LogEntry:
        entry = self.decode_or_none(index)
        assert entry is not None  # is_intact said so
        return entry

    def decode_or_none(self, index: int) -> LogEntry | None:
        h = self.heads[index]
        return decode_entry(self.unwrapped(index, h.entry_length), h, self.where)

    def unwrapped(self, index: int, length: int) -> bytes:
        start = index * SECTOR
        end = start + length
        if end <= len(self.ring):
            return self.ring[start:end]
        return self.ring[start:] + self.ring[: end - len(self.ring)]


def find_replay(
    ring: bytes, log_guid: uuid.UUID, *, log_offset: int, fsize: int, where: str
) -> Replay:
    """The active sequence of the log whose whole region is ``ring`` (at ``log_offset`` in a
    file of ``fsize`` bytes), checked (:func:`check_updates`, FlushedFileOffset).

    :raise ImageError: a hostile log, or a file shorter than the log says it was.
    """
    entries = _Search(ring, log_guid, where).active()
    if not entries:
        return Replay(())
    head = entries[-1].header
    if head.flushed_file_offset > fsize:
        raise ImageError(
            f"{where}: the file is {fsize:#x} bytes, but its log was written when it had "
            f"{head.flushed_file_offset:#x} (truncated?)"
        )
    span = (log_offset, log_offset + len(ring))
    for e in entries:
        check_updates(e, fsize, span, where)
    return Replay(tuple(entries))


# -- replaying ---------------------------------------------------------------------------------


async def replay_onto(child: Node, replay: Replay) -> None:
    """Apply ``replay`` to the file under ``child`` (writable), then extend the file to the
    head's LastFileOffset. Idempotent: a replay cut short by a crash is simply done again, as
    the log is cleared only after this returned and was flushed (the caller's part)."""
    for u in replay.updates:
        if isinstance(u, DataUpdate):
            await child.write(u.file_offset, u.data)
        else:
            await child.write_zeroes(u.file_offset, u.length)
    if child.size < replay.last_file_offset:
        await child.truncate(replay.last_file_offset)


class ReplayedFile(Node):
    """The file under a read-only image with a dirty log, as the log's replay would leave it:
    reads see the replayed sectors over the file's own, and the file is never written. Only
    images opened read-only with a log to replay read through this (no cost otherwise)."""

    format_name = "vhdx-log-replay"

    def __init__(self, child: Node, replay: Replay) -> None:
        self.child = child
        self.filename = child.filename
        self.read_only = True
        self.size = max(child.size, replay.last_file_offset)
        self.limits = child.limits
        #: (start, end, data or None for zeroes), in the order of application
        self._updates: list[tuple[int, int, bytes | None]] = []
        for u in replay.updates:
            if isinstance(u, DataUpdate):
                self._updates.append((u.file_offset, u.file_offset + SECTOR, u.data))
            else:
                self._updates.append((u.file_offset, u.file_offset + u.length, None))
        self._lo = min((s for s, _, _ in self._updates), default=0)
        self._hi = max((e for _, e, _ in self._updates), default=0)

    async def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        inside = max(0, min(length, self.child.size - offset))
        data = await self.child.read(offset, inside) if inside else b""
        if inside < length:
            data += bytes(length - inside)
        if end <= self._lo or offset >= self._hi:
            return data
        buf = bytearray(data)
        for start, stop, new in self._updates:
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = (
                    new[lo - start : hi - start] if new is not None else bytes(hi - lo)
                )
        return bytes(buf)

    async def write(self, offset: int, data: bytes) -> None:
        raise ReadOnlyError(f"{self.filename}: a log replayed in memory is read-only")

    async def flush(self) -> None:
        return None

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        await self.child.aclose()
