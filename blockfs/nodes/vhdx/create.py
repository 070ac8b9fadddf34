"""Creating VHDX images: fixed, dynamic and differencing (with a parent locator).

The layout written (every region 1 MiB aligned, as MS-VHDX 2.2.3 asks)::

    0        file identifier ("vhdxfile", creator)
    64 KiB   header 1 (current, sequence 1)     128 KiB  header 2 (sequence 0)
    192 KiB  region table 1                     256 KiB  region table 2 (the same)
    1 MiB    the log (``log_size``; clean: LogGuid zero)
    then     the metadata region (1 MiB): its table, then the items from 64 KiB on
    then     the BAT region (whole MiBs)
    then     (fixed) every payload block, in order, FULLY_PRESENT (sparse until written)

A dynamic or differencing image's BAT is all NOT_PRESENT (zeroes: nothing written). The image
is written through a protocol node the caller opened (``write``, ``truncate``, ``flush``);
nothing here opens a file for the new image or removes one. A differencing image's parent is
opened once, read-only, to learn its size, sector sizes and DataWriteGuid (the linkage). The
locator's paths are made by :func:`parent_location` and :func:`locator_entries`, which the node
uses too when it records a new parent (``VhdxNode.change_backing_file``).
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import uuid
from array import array
from collections.abc import Callable, Iterator

from blockfs import __version__
from blockfs.errors import BlockfsError, ImageError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.vhdx.format import (
    BAT_ENTRY,
    BAT_GUID,
    FILE_PARAMETERS,
    HEADER_AREA,
    HEADER_OFFSETS,
    KEY_ABSOLUTE,
    KEY_LINKAGE,
    KEY_RELATIVE,
    LOGICAL_SECTOR_SIZE,
    METADATA_GUID,
    PARENT_LOCATOR,
    PHYSICAL_SECTOR_SIZE,
    REGION_TABLE_OFFSETS,
    SECTOR_SIZES,
    VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
    ZERO_GUID,
    BatGeometry,
    Header,
    MiB,
    ParentLocator,
    PayloadState,
    Region,
    bat_entry,
    check_block_size,
    check_virtual_size,
    linkage_text,
    pack_file_identifier,
    pack_file_parameters,
    pack_metadata,
    pack_region_table,
)
from blockfs.nodes.vhdx.log import MAX_REPLAY_LOG

SUBFORMATS = ("dynamic", "fixed")
#: Hyper-V's defaults: 32 MiB blocks, and 2 MiB for a differencing image (whose partially
#: present blocks cost a copy of the rest of the block from the parent)
DEFAULT_BLOCK_SIZE = 32 * MiB
DEFAULT_DIFFERENCING_BLOCK_SIZE = 2 * MiB
DEFAULT_LOG_SIZE = MiB
METADATA_REGION = MiB
#: BAT entries written per write of a fixed image's BAT (1 MiB)
_BAT_CHUNK = MiB // BAT_ENTRY


async def create_vhdx(
    target: Node,
    size: int | None,
    *,
    block_size: int | None = None,
    subformat: str = "dynamic",
    log_size: int | None = None,
    logical_sector_size: int | None = None,
    physical_sector_size: int | None = None,
    parent: str | None = None,
    parent_fmt: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a new VHDX image into ``target``, an open, writable, empty protocol node (the
    image is flushed before this returns). With ``parent`` the image is a differencing one: its
    size and sector sizes are the parent's (``size`` may be None), and a relative ``parent`` is
    resolved against the folder of ``target.filename``, as qemu-img resolves backing names.
    Every option is checked, and the parent opened, before the first write.

    ``on_progress(done, total)`` is called as the image is written: ``done`` bytes of the
    ``total`` virtual size are mapped so far (a fixed image: after each MiB of its BAT, the one
    long part; otherwise once, at the end).

    :raise UsageError: bad options, a parent that cannot be opened or is no VHDX image, a write
        that failed (with its errno: ENOSPC, EFBIG, ...).
    """
    log_size = DEFAULT_LOG_SIZE if log_size is None else log_size
    if subformat not in SUBFORMATS:
        raise UsageError(f"unknown subformat {subformat!r} (dynamic, fixed)")
    if log_size <= 0 or log_size % MiB or log_size > MAX_REPLAY_LOG:
        raise UsageError(f"log size {log_size} must be a multiple of 1 MiB, 1 MiB to 64 MiB")
    linkage: uuid.UUID | None = None
    locator: dict[str, str] = {}
    if parent is not None:
        if subformat != "dynamic":
            raise UsageError("a differencing image cannot be fixed")
        psize, plss, ppss, linkage, locator = await _parent_facts(
            target.filename, parent, parent_fmt
        )
        if size is not None and size != psize:
            raise UsageError(f"a differencing image has its parent's size ({psize}), not {size}")
        size = psize
        logical_sector_size = _same_as_parent(logical_sector_size, plss, "logical")
        physical_sector_size = _same_as_parent(physical_sector_size, ppss, "physical")
    elif parent_fmt is not None:
        raise UsageError("a parent format needs a parent (-b)")
    if size is None:
        raise UsageError("image size is required (or a parent to take it from)")
    lss = logical_sector_size or 512
    pss = physical_sector_size or 4096
    if block_size is None:
        block_size = DEFAULT_DIFFERENCING_BLOCK_SIZE if parent else DEFAULT_BLOCK_SIZE
    _check_options(size, block_size, lss, pss)
    g = BatGeometry(block_size, lss, size, parent is not None)
    items = [
        (
            FILE_PARAMETERS,
            pack_file_parameters(
                block_size, leave_allocated=subformat == "fixed", has_parent=parent is not None
            ),
        ),
        (VIRTUAL_DISK_SIZE, struct.pack("<Q", size)),
        (VIRTUAL_DISK_ID, uuid.uuid4().bytes_le),
        (LOGICAL_SECTOR_SIZE, struct.pack("<I", lss)),
        (PHYSICAL_SECTOR_SIZE, struct.pack("<I", pss)),
    ]
    if linkage is not None:
        items.append((PARENT_LOCATOR, ParentLocator(locator, linkage).pack()))
    await _write_image(
        target, g, items, log_size, fixed=subformat == "fixed", on_progress=on_progress
    )


def _check_options(size: int, block_size: int, lss: int, pss: int) -> None:
    """:raise UsageError: what the spec forbids (one line, as the CLI prints it)."""
    try:
        check_block_size(block_size, "block_size")
        check_virtual_size(size, lss, "image size")
    except ImageError as exc:
        raise UsageError(str(exc)) from None
    for kind, value in (("logical", lss), ("physical", pss)):
        if value not in SECTOR_SIZES:
            raise UsageError(f"{kind} sector size {value} must be 512 or 4096")
    if size < 0:
        raise UsageError(f"image size {size} must not be negative")


def _same_as_parent(given: int | None, parents: int, kind: str) -> int:
    if given is not None and given != parents:
        raise UsageError(f"a differencing image has its parent's {kind} sector size ({parents})")
    return parents


async def _parent_facts(
    child: str, parent: str, parent_fmt: str | None
) -> tuple[int, int, int, uuid.UUID, dict[str, str]]:
    """The parent's size, sector sizes and DataWriteGuid, and the locator's paths of it.
    :raise UsageError: it cannot be opened, is no VHDX image, or cannot be named."""
    from blockfs.nodes.registry import close_chain, open_image
    from blockfs.nodes.vhdx.node import VhdxNode

    if parent_fmt not in (None, "vhdx"):
        raise UsageError(f"a differencing VHDX image needs a VHDX parent, not {parent_fmt}")
    where = parent_location(child, parent)
    try:
        node = await open_image(where, fmt=parent_fmt, read_only=True)
    except BlockfsError as exc:
        raise UsageError(f"cannot open parent: {exc}", errno=exc.errno) from None
    try:
        if not isinstance(node, VhdxNode):
            raise UsageError(f"{where}: a differencing VHDX image needs a VHDX parent")
        m = node.metadata
        facts = (
            node.size,
            m.logical_sector_size,
            m.physical_sector_size,
            node.headers.current.data_write_guid,
        )
    finally:
        await close_chain(node)
    return (*facts, locator_entries(child, where, facts[3]))


def parent_location(child: str, parent: str) -> str:
    """Where the parent named ``parent`` (a POSIX path, relative to the folder of ``child``
    unless absolute, as qemu-img resolves backing names) is opened.

    :raise UsageError: a name a locator cannot record (empty, NUL, ``\\``), or ``child``
    itself."""
    if not parent or "\0" in parent or "\\" in parent:
        raise UsageError(f"parent file name {parent!r} cannot be recorded (empty, NUL or '\\')")
    where = parent
    if not os.path.isabs(parent):
        where = os.path.join(os.path.dirname(child) or ".", parent)
    if os.path.realpath(where) == os.path.realpath(child):
        raise UsageError(f"{child}: an image cannot be its own parent")
    return where


def locator_entries(child: str, parent: str, linkage: uuid.UUID) -> dict[str, str]:
    """The parent locator's entries of the image ``child`` whose parent is opened at
    ``parent`` (see :func:`parent_location`): the linkage, and the parent's path twice in
    Windows form (``\\`` separators): relative to the child's folder (``.\\base.vhdx``, as
    Hyper-V writes it), and absolute (``\\srv\\base.vhdx``: rooted but without a drive, so
    Windows looks for it on its current drive, if at all). Both read back here as paths of
    this system. Windows form, because readers take the file name after the last backslash
    (libvhdi finds a parent so, in the child's folder). Creation and
    :meth:`VhdxNode.change_backing_file` both write these."""
    child_dir = os.path.dirname(os.path.abspath(child))
    absolute = os.path.abspath(parent)
    rel = os.path.relpath(absolute, child_dir).replace("/", "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    return {
        KEY_LINKAGE: linkage_text(linkage),
        KEY_RELATIVE: rel,
        KEY_ABSOLUTE: absolute.replace("/", "\\"),
    }


async def _write_image(
    target: Node,
    g: BatGeometry,
    items: list[tuple[uuid.UUID, bytes]],
    log_size: int,
    *,
    fixed: bool,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    log_at = HEADER_AREA
    meta_at = log_at + log_size
    bat_at = meta_at + METADATA_REGION
    bat_len = max(MiB, -(-g.total_entries * BAT_ENTRY // MiB) * MiB)
    data_at = bat_at + bat_len
    length = data_at + (g.data_blocks * g.block_size if fixed else 0)
    first = uuid.uuid4()
    header = Header(1, first, uuid.uuid4(), ZERO_GUID, 0, 1, log_size, log_at)
    regions = pack_region_table(
        [
            Region(BAT_GUID, bat_at, bat_len, True),
            Region(METADATA_GUID, meta_at, METADATA_REGION, True),
        ]
    )
    chunks = [
        (0, pack_file_identifier(f"blockfs {__version__}")),
        (HEADER_OFFSETS[0], header.pack()),
        (
            HEADER_OFFSETS[1],
            Header(0, first, header.data_write_guid, ZERO_GUID, 0, 1, log_size, log_at).pack(),
        ),
        (REGION_TABLE_OFFSETS[0], regions),
        (REGION_TABLE_OFFSETS[1], regions),
        (meta_at, pack_metadata(items)),
    ]
    what = target.filename
    try:
        for off, data in chunks:
            await target.write(off, data)
        if fixed:
            for off, data, mapped in _fixed_bat(g, bat_at, data_at):
                await target.write(off, data)
                if on_progress is not None:
                    on_progress(mapped, g.virtual_size)
        await target.truncate(length)
        await target.flush()
        if on_progress is not None:
            on_progress(g.virtual_size, g.virtual_size)
    except BlockfsError as exc:
        raise UsageError(str(exc), errno=exc.errno) from None
    except OSError as exc:
        raise UsageError(f"{what}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
    except OverflowError:  # a size no file can have
        raise UsageError(f"{what}: file too large", errno=errno.EFBIG) from None


def _fixed_bat(g: BatGeometry, bat_at: int, data_at: int) -> Iterator[tuple[int, bytes, int]]:
    """The BAT of a fixed image, 1 MiB at a time: every payload block FULLY_PRESENT, in order
    after ``data_at``; sector bitmap entries NOT_PRESENT. With each piece, the virtual bytes
    its entries and those before it map."""
    per_chunk = g.chunk_ratio + 1
    state = int(PayloadState.FULLY_PRESENT)
    for start in range(0, g.total_entries, _BAT_CHUNK):
        table = array("Q")
        for idx in range(start, min(start + _BAT_CHUNK, g.total_entries)):
            if (idx + 1) % per_chunk == 0:
                table.append(0)
            else:
                block = idx - idx // per_chunk
                table.append(bat_entry(state, data_at + block * g.block_size))
        if sys.byteorder == "big":
            table.byteswap()
        end = min(start + _BAT_CHUNK, g.total_entries)
        mapped = min((end - end // per_chunk) * g.block_size, g.virtual_size)
        yield bat_at + start * BAT_ENTRY, table.tobytes(), mapped
