"""Checking a VHDX image, and replaying its log, as ``qemu-img check`` (QEMU 7.2) does.

What lives here: :func:`check_vhdx`. QEMU's check of a VHDX file is short, and this one says
the same: every FULLY_PRESENT entry of the BAT must place its block inside the file and clear
of the log and the regions (each entry that does not is one corruption); a log that needs
replaying refuses a check without repair, and is replayed by any repair (one corruption
fixed). Nothing else is repaired. :class:`VhdxCheckResult` carries the counters under QEMU's
names. What is said to a person belongs to the caller (``blockfs/cli/check.py``); this module
reports through ``on_message`` and ``on_progress`` and never prints.

The file is read and written with ``os.pread``/``os.pwrite`` on a descriptor the caller opened
(and locked). The identifier, headers, region tables, metadata and the log are parsed and
checked by ``format.py`` and ``log.py``; what they refuse is refused here in one line (QEMU
refuses to open most of it too).

The replay follows the order the node's replay keeps (MS-VHDX 2.3.3, ``node.py``): a header
update gives the file a new FileWriteGuid, the log's updates are written, the file is extended
to the head's LastFileOffset and flushed, and only then a second header update clears the
LogGuid. A kill anywhere in between leaves the log in place, to be replayed again (replaying
is idempotent).

Bounds: the log is replayed only up to ``log.MAX_REPLAY_LOG``; the BAT is read in pieces of
:data:`BAT_CHUNK` bytes, so a BAT region claimed for a 64 TiB disk costs time in proportion to
the file, never memory.
"""

from __future__ import annotations

import sys
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields

from blockfs.errors import ImageError, UnsupportedFeature
from blockfs.nodes.checkio import CheckIo as _FileIo
from blockfs.nodes.vhdx.format import (
    BAT_GUID,
    BAT_STATE_MASK,
    HEAD_BYTES,
    HEADER_OFFSETS,
    HEADER_SIZE,
    KNOWN_ITEMS,
    METADATA_GUID,
    METADATA_TABLE_SIZE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    ZERO_GUID,
    BatGeometry,
    Header,
    PayloadState,
    current_header,
    parse_file_identifier,
    parse_metadata,
    parse_metadata_table,
    parse_region_tables,
)
from blockfs.nodes.vhdx.log import MAX_REPLAY_LOG, DataUpdate, Replay, find_replay

#: the BAT is read this many bytes at a time
BAT_CHUNK = 8 * 1024 * 1024
#: FileOffsetMB of a BAT entry, as a byte offset (bits 20-63)
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000
INT64_MAX = (1 << 63) - 1


@dataclass(slots=True)
class VhdxCheckResult:
    """What a VHDX check found and fixed (QEMU's BdrvCheckResult, of which VHDX fills three)."""

    corruptions: int = 0
    corruptions_fixed: int = 0
    check_errors: int = 0

    def counts(self) -> dict[str, int]:
        """The counters under the names ``qemu-img check --output json`` gives them; those a
        VHDX check never fills are 0."""
        out = dict.fromkeys(
            (
                "corruptions",
                "leaks",
                "check-errors",
                "corruptions-fixed",
                "leaks-fixed",
                "image-end-offset",
                "total-clusters",
                "allocated-clusters",
                "fragmented-clusters",
                "compressed-clusters",
            ),
            0,
        )
        for f in fields(self):
            out[f.name.replace("_", "-")] = getattr(self, f.name)
        return out


MessageFn = Callable[[str], None]
ProgressFn = Callable[[int, int], None]


def check_vhdx(
    fd: int,
    where: str,
    repair: bool = False,
    *,
    on_message: MessageFn | None = None,
    on_progress: ProgressFn | None = None,
) -> VhdxCheckResult:
    """Check the VHDX image open on ``fd`` (read-write if ``repair``); ``where`` names it in
    errors. With ``repair``, a log that needs replaying is replayed first.

    :raise ImageError: the image cannot be opened for a check (a log to replay without
        ``repair``, a header, region table or metadata that ``format.py`` refuses, an I/O
        error), in one line.
    :raise UnsupportedFeature: a version, region or item this code does not know.
    """
    say = on_message or _ignore
    res = VhdxCheckResult()
    io = _FileIo(fd, where)
    if io.size < HEAD_BYTES:
        raise ImageError(f"{where}: {io.size} bytes is too short for a VHDX image")
    head = io.read(0, HEAD_BYTES)
    parse_file_identifier(head, where)
    first, second = (head[o : o + HEADER_SIZE] for o in HEADER_OFFSETS)
    header, slot = current_header(first, second, io.size, where)
    if header.log_dirty and _replay_log(io, header, slot, repair, where):
        res.corruptions_fixed += 1
        head = io.read(0, HEAD_BYTES)  # the log may have changed the region tables
    rt1, rt2 = (head[o : o + REGION_TABLE_SIZE] for o in REGION_TABLE_OFFSETS)
    regions = parse_region_tables(rt1, rt2, header, io.size, where)
    meta_region = regions[METADATA_GUID]
    table = io.read(meta_region.file_offset, METADATA_TABLE_SIZE)
    entries = parse_metadata_table(table, meta_region.length, where)
    values = {
        item: io.read(meta_region.file_offset + e.offset, e.length) if e.length else b""
        for item, e in entries.items()
        if item in KNOWN_ITEMS
    }
    metadata = parse_metadata(values, where)
    geometry = BatGeometry(
        metadata.block_size,
        metadata.logical_sector_size,
        metadata.virtual_size,
        metadata.has_parent,
    )
    bat = regions[BAT_GUID]
    geometry.check_bat_region(bat.length, where)
    # QEMU's list of regions: the log, then the region table's entries in order, each put at
    # the head (so an overlap is reported against the last one first)
    spans = [(header.log_offset, header.log_offset + header.log_length)]
    spans += [(r.file_offset, r.end) for r in regions.values()]
    spans.reverse()
    res.corruptions += _check_bat(io, bat.file_offset, geometry, spans, say, on_progress)
    return res


def _ignore(_: str) -> None:
    pass


def _replay_log(io: _FileIo, header: Header, slot: int, repair: bool, where: str) -> bool:
    """Replay the log the header names, when it holds a sequence to replay; True if it did.

    :raise ImageError: there is one, and ``repair`` is off (QEMU refuses to open the image).
    """
    if header.log_length > MAX_REPLAY_LOG:
        raise UnsupportedFeature(
            f"{where}: a log of {header.log_length} bytes to replay (at most {MAX_REPLAY_LOG} are)"
        )
    ring = io.read(header.log_offset, header.log_length)
    replay = find_replay(
        ring, header.log_guid, log_offset=header.log_offset, fsize=io.size, where=where
    )
    if not replay.entries:
        return False  # the GUID is set, but no entry was written: nothing to replay
    if not repair:
        raise ImageError(
            f"{where}: the VHDX log needs to be replayed, which only a repair does; run "
            f"'blockfs check -r all {where}'"
        )
    header, slot = _update_header(io, header, slot, file_write_guid=uuid.uuid4())
    _apply(io, replay)
    io.sync()
    _update_header(io, header, slot, log_guid=ZERO_GUID)
    return True


def _apply(io: _FileIo, replay: Replay) -> None:
    for u in replay.updates:
        if isinstance(u, DataUpdate):
            io.write(u.file_offset, u.data)
        else:
            io.zero(u.file_offset, u.length)
    io.extend(replay.last_file_offset)


def _update_header(
    io: _FileIo,
    header: Header,
    slot: int,
    *,
    file_write_guid: uuid.UUID | None = None,
    log_guid: uuid.UUID | None = None,
) -> tuple[Header, int]:
    """Write the next header over the other slot and flush (MS-VHDX 2.2.2.1: a kill leaves the
    old header or the new one current, never neither)."""
    new = header.next(file_write_guid=file_write_guid, log_guid=log_guid)
    other = 1 - slot
    io.write(HEADER_OFFSETS[other], new.pack())
    io.sync()
    return new, other


def _check_bat(
    io: _FileIo,
    bat_offset: int,
    g: BatGeometry,
    spans: list[tuple[int, int]],
    say: MessageFn,
    on_progress: ProgressFn | None,
) -> int:
    """vhdx_check_bat_entries: the corruptions among the FULLY_PRESENT entries.

    As QEMU does, to report what it reports: the length of a block near the end is taken from
    the virtual size and the entry's index (sector bitmap entries included), and the entries
    checked against the regions are counted among FULLY_PRESENT ones only, every
    chunk_ratio + 1-th skipped (as if it were a sector bitmap entry).
    """
    total = g.total_entries
    bs = g.block_size
    size = io.size
    disk_bytes = g.virtual_size
    payblocks = g.chunk_ratio
    errors = 0
    per_chunk = BAT_CHUNK // 8
    for first in range(0, total, per_chunk):
        n = min(per_chunk, total - first)
        raw = io.read(bat_offset + first * 8, n * 8)
        if on_progress is not None:
            on_progress(first + n, total)
        if raw.count(0) == len(raw):
            continue
        table = array("Q")
        table.frombytes(raw)
        if sys.byteorder == "big":
            table.byteswap()
        for k, e in enumerate(table):
            if e & BAT_STATE_MASK != PayloadState.FULLY_PRESENT:
                continue
            i = first + k
            offset = e & BAT_OFFSET_MASK
            left = (disk_bytes - i * bs) % (1 << 64)  # unsigned in QEMU: past the end, huge
            length = min(bs, left)
            if offset > INT64_MAX - bs:
                say(f"VHDX BAT entry {i} offset overflow.")
                errors += 1
            if offset >= size:
                say(
                    f"VHDX BAT entry {i} start offset {offset} points after end of file "
                    f"({size}). Image has probably been truncated."
                )
                errors += 1
            elif offset + length > size:
                say(
                    f"VHDX BAT entry {i} end offset {offset + length - 1} points after end of "
                    f"file ({size}). Image has probably been truncated."
                )
                errors += 1
            if payblocks:
                payblocks -= 1
                end = offset + bs
                for start, stop in spans:
                    if offset < stop and end > start:
                        say(f"VHDX region {offset}-{end} overlaps with region {start}-{stop}")
                        errors += 1
                        break
            else:
                payblocks = g.chunk_ratio
    return errors
