"""Creating qcow2 (and raw) images: what ``blockfs create`` and the block jobs' targets use.

The layout written is: header (+ extensions + backing file name) in cluster 0, then the refcount
table, the L1 table, the refcount blocks and, with ``preallocation=metadata``, the L2 tables and
the (sparse) data clusters. Refcounts are exact from the start, so ``qemu-img check`` is clean.
The image is written through a protocol node the caller opened (anything with ``write``,
``truncate`` and ``flush``: a local file today, a remote one tomorrow); this module opens no file
for the new image and never removes one (the caller made it, the caller cleans up). It opens the
backing file once, to check it and learn its size.

The one long part is writing the preallocated L2 tables (8 bytes per cluster: 128 MiB for a
1 TiB image of 64 KiB clusters); they are made and written 1 MiB at a time, and an
``on_progress`` callback is told after each piece.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.qcow2.format import (
    HEADER_V2_LEN,
    HEADER_V3_WRITTEN_LEN,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    OFLAG_COPIED,
    ExtensionType,
    Header,
    feature_table,
    l1_entries_needed,
    pack_extension,
)

COMPAT_VERSIONS = {"0.10": 2, "1.1": 3, "v2": 2, "v3": 3}
PREALLOCATION_MODES = ("off", "metadata")
#: L2 entries made and written at a time by ``preallocation=metadata`` (1 MiB of them)
_L2_PIECE = (1 << 20) // 8


def _div_up(a: int, b: int) -> int:
    return (a + b - 1) // b


async def create_qcow2(
    target: Node,
    size: int | None,
    *,
    cluster_size: int = 65536,
    compat: str = "1.1",
    backing: str | None = None,
    backing_fmt: str | None = None,
    preallocation: str = "off",
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a new qcow2 image into ``target``, an open, writable, empty protocol node (what
    it held is overwritten; the image is flushed before this returns). ``size`` may be None
    when ``backing`` is given (the backing file's size is used). A relative ``backing`` is
    stored as given and resolved against the folder of ``target.filename``, as qemu-img does.
    Every option is checked, and the backing file opened, before the first write.

    ``on_progress(done, total)`` is called as the image is written: ``done`` bytes of the
    ``total`` virtual size are mapped so far (with ``preallocation=metadata``, after each
    MiB of L2 tables; otherwise once, at the end).

    :raise UsageError: bad options, a backing file that cannot be opened, a write that failed
        (with its errno: ENOSPC, EFBIG, ...).
    """
    if (
        cluster_size <= 0
        or cluster_size & (cluster_size - 1)
        or not (1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS)
    ):
        raise UsageError(f"cluster size {cluster_size} must be a power of two, 512 B to 2 MiB")
    if compat not in COMPAT_VERSIONS:
        raise UsageError(f"unknown compat {compat!r} (0.10 or 1.1)")
    if preallocation not in PREALLOCATION_MODES:
        raise UsageError(f"unsupported preallocation {preallocation!r} (off, metadata)")
    version = COMPAT_VERSIONS[compat]
    cb = cluster_size.bit_length() - 1
    if backing is not None:
        if not backing or len(backing.encode()) > MAX_BACKING_NAME:
            raise UsageError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes")
        from blockfs.nodes.registry import close_chain, open_image

        path = target.filename
        where = backing
        if not os.path.isabs(backing) and "://" not in backing:
            where = os.path.join(os.path.dirname(path) or ".", backing)
        if os.path.realpath(where) == os.path.realpath(path):
            raise UsageError(f"{path}: an image cannot be its own backing file")
        try:
            node = await open_image(where, fmt=backing_fmt, read_only=True)
        except UsageError as exc:
            raise UsageError(f"cannot open backing file: {exc}") from None
        try:
            backing_fmt = backing_fmt or node.format_name
            if size is None:
                size = node.size
        finally:
            await close_chain(node)
    elif backing_fmt is not None:
        raise UsageError("a backing format needs a backing file")
    if size is None:
        raise UsageError("image size is required (or a backing file to take it from)")
    if size < 0 or size % 512:
        raise UsageError(f"image size {size} must be a non-negative multiple of 512")
    if l1_entries_needed(size, cb) * 8 > MAX_L1_BYTES:
        raise UsageError(f"image size {size} is too large for {cluster_size}-byte clusters")
    image = _layout(size, cb, version, backing, backing_fmt, preallocation)
    await _write(target, image, on_progress)


class _Image:
    def __init__(self, size: int = 0) -> None:
        #: the virtual size, what progress is counted in
        self.size = size
        self.chunks: list[tuple[int, bytes]] = []
        self.length = 0
        #: preallocated L2 tables, written after the chunks: where the first table is, the
        #: entry of the first data cluster, how many data clusters, and the cluster bits
        self.l2: tuple[int, int, int, int] | None = None

    def l2_pieces(self) -> Iterator[tuple[int, bytes, int]]:
        """The preallocated L2 tables, a piece at a time: where it goes, its bytes, and the
        virtual bytes mapped once it is written. The tables are contiguous and map the data
        clusters in order, so entry ``i`` is at ``at + 8 i`` and points to cluster
        ``first + i``."""
        if self.l2 is None:
            return
        at, first, count, cb = self.l2
        for start in range(0, count, _L2_PIECE):
            n = min(_L2_PIECE, count - start)
            entry = first + (start << cb)
            table = struct.pack(f">{n}Q", *range(entry, entry + (n << cb), 1 << cb))
            yield at + 8 * start, table, min((start + n) << cb, self.size)


def _layout(
    size: int,
    cb: int,
    version: int,
    backing: str | None,
    backing_fmt: str | None,
    prealloc: str,
) -> _Image:
    cs = 1 << cb
    l1_entries = l1_entries_needed(size, cb)
    l1c = _div_up(l1_entries * 8, cs)
    n_l2 = l1_entries if prealloc == "metadata" else 0
    n_data = _div_up(size, cs) if prealloc == "metadata" else 0
    rb_entries = cs * 8 // 16
    rtc = rbc = 1
    while True:
        total = 1 + rtc + l1c + rbc + n_l2 + n_data
        need_rbc = _div_up(total, rb_entries)
        need_rtc = _div_up(need_rbc * 8, cs)
        if (need_rbc, need_rtc) == (rbc, rtc):
            break
        rbc, rtc = max(rbc, need_rbc), max(rtc, need_rtc)
    rt_at = 1
    l1_at = rt_at + rtc
    rb_at = l1_at + l1c
    l2_at = rb_at + rbc
    data_at = l2_at + n_l2
    img = _Image(size)
    img.length = total * cs

    # cluster 0: header, extensions, backing name
    exts = b""
    if backing_fmt:
        exts += pack_extension(ExtensionType.BACKING_FORMAT, backing_fmt.encode())
    if version == 3:
        exts += pack_extension(ExtensionType.FEATURE_TABLE, feature_table())
    exts += bytes(8)  # end of extensions
    hlen = HEADER_V3_WRITTEN_LEN if version == 3 else HEADER_V2_LEN
    name = backing.encode() if backing else b""
    bf_off = hlen + len(exts) if name else 0
    if hlen + len(exts) + len(name) > cs:
        raise UsageError(f"header and backing file name do not fit in a {cs}-byte cluster")
    header = Header(
        version=version,
        backing_file_offset=bf_off,
        backing_file_size=len(name),
        cluster_bits=cb,
        size=size,
        crypt_method=0,
        l1_size=l1_entries,
        l1_table_offset=(l1_at << cb) if l1_entries else 0,
        refcount_table_offset=rt_at << cb,
        refcount_table_clusters=rtc,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=4,
        header_length=hlen,
    )
    img.chunks.append((0, header.pack() + exts + name))
    # refcount table and blocks: every cluster of the layout has refcount 1
    img.chunks.append(
        (rt_at << cb, b"".join(struct.pack(">Q", (rb_at + i) << cb) for i in range(rbc)))
    )
    img.chunks.append((rb_at << cb, b"\x00\x01" * total))
    if prealloc == "metadata":
        # host offsets < 2**56 and the flag is bit 63: "|" is "+", so a range makes the entries
        l1_first = (l2_at << cb) | OFLAG_COPIED
        l1 = struct.pack(f">{l1_entries}Q", *range(l1_first, l1_first + (l1_entries << cb), cs))
        img.chunks.append((l1_at << cb, l1))
        img.l2 = (l2_at << cb, (data_at << cb) | OFLAG_COPIED, n_data, cb)
    return img


async def _write(
    target: Node, img: _Image, on_progress: Callable[[int, int], None] | None = None
) -> None:
    what = target.filename
    try:
        for off, data in img.chunks:
            if data:
                await target.write(off, data)
        for off, data, mapped in img.l2_pieces():
            await target.write(off, data)
            if on_progress is not None:
                on_progress(mapped, img.size)
        await target.truncate(img.length)
        await target.flush()
        if on_progress is not None:
            on_progress(img.size, img.size)
    except BlockfsError as exc:
        raise UsageError(str(exc), errno=exc.errno) from None
    except OSError as exc:
        raise UsageError(f"{what}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
    except OverflowError:  # a size no file can have
        raise UsageError(f"{what}: file too large", errno=errno.EFBIG) from None


async def create_raw(target: Node, size: int) -> None:
    """Make ``target`` (as for :func:`create_qcow2`) a sparse raw image of ``size`` bytes.
    :raise UsageError:"""
    if size < 0:
        raise UsageError(f"image size {size} must not be negative")
    await _write(target, _raw_image(size))


def _raw_image(size: int) -> _Image:
    img = _Image(size)
    img.length = size
    return img
