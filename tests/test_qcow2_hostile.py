"""Hostile qcow2 images, made by editing the header or tables of a qemu-img image: each is
refused at open with a one-line ImageError, quickly and without a large allocation."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blockfs.errors import ImageError
from blockfs.nodes.registry import close_chain, open_image
from conftest import blockfs, qemu_img, run

MiB = 1024 * 1024


def make_image(tmp_path: Path, name: str = "h.qcow2", *opts: str) -> Path:
    img = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(img), "4M")
    qemu_img("snapshot", "-c", "s1", str(img))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(img)])
    return img


def header(img: Path) -> dict[str, int]:
    raw = img.read_bytes()[:104]
    names = [
        "version",
        "bf_off",
        "bf_size",
        "cluster_bits",
        "size",
        "crypt",
        "l1_size",
        "l1_off",
        "rt_off",
        "rt_clusters",
        "nb_snap",
        "snap_off",
    ]
    return dict(zip(names, struct.unpack(">IQIIQIIQQIIQ", raw[4:72]), strict=True))


def patch(img: Path, offset: int, fmt: str, *values: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _l1_entry_offset(img: Path) -> int:
    return header(img)["l1_off"]


def _rt_entry_offset(img: Path) -> int:
    return header(img)["rt_off"]


def _file_size(img: Path) -> int:
    return img.stat().st_size


# (id, edit(img), expected words in the message)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("l1-past-eof", lambda p: patch(p, 40, ">Q", 1 << 40), "L1 table"),
    (
        "l1-unaligned",
        lambda p: patch(p, 40, ">Q", header(p)["l1_off"] + 512),
        "not cluster aligned",
    ),
    ("l1-huge", lambda p: patch(p, 36, ">I", 0x7FFFFFFF), "L1 table"),
    ("l1-too-small", lambda p: patch(p, 36, ">I", 0), "L1 table too small"),
    ("rt-past-eof", lambda p: patch(p, 48, ">Q", 1 << 44), "refcount table"),
    ("rt-unaligned", lambda p: patch(p, 48, ">Q", header(p)["rt_off"] + 8), "not cluster aligned"),
    ("rt-huge", lambda p: patch(p, 56, ">I", 0xFFFFFFFF), "refcount table"),
    ("size-overflow", lambda p: patch(p, 24, ">Q", (1 << 64) - 512), "overflows"),
    ("size-huge", lambda p: patch(p, 24, ">Q", 1 << 62), "too large"),
    ("cluster-bits-small", lambda p: patch(p, 20, ">I", 8), "cluster_bits 8 out of range"),
    ("cluster-bits-large", lambda p: patch(p, 20, ">I", 31), "cluster_bits 31 out of range"),
    ("snapshots-absurd", lambda p: patch(p, 60, ">I", 0x7FFFFFFF), "snapshots"),
    ("snapshot-table-past-eof", lambda p: patch(p, 64, ">Q", 1 << 40), "snapshot table"),
    ("backing-name-absurd", lambda p: patch(p, 8, ">QI", 512, 0xFFFFFFFF), "backing file name"),
    ("backing-name-outside", lambda p: patch(p, 8, ">QI", (1 << 16) - 4, 100), "backing file"),
    ("refcount-order", lambda p: patch(p, 96, ">I", 9), "refcount_order"),
    ("header-length", lambda p: patch(p, 100, ">I", 0x7FFFFFF8), "header_length"),
    (
        "extension-absurd-length",
        lambda p: patch(p, 112, ">II", 0x12345678, 0xFFFFFFF0),
        "header extension",
    ),
    (
        "l2-past-eof",
        lambda p: patch(p, _l1_entry_offset(p), ">Q", (1 << 63) | (1 << 45)),
        "L1 table entry",
    ),
    (
        "refblock-past-eof",
        lambda p: patch(p, _rt_entry_offset(p), ">Q", 1 << 45),
        "refcount table entry",
    ),
    (
        "snapshot-id-absurd",
        lambda p: patch(p, header(p)["snap_off"] + 12, ">H", 0xFFFF),
        "snapshot table",
    ),
    ("snapshot-l1-past-eof", lambda p: patch(p, header(p)["snap_off"], ">Q", 1 << 44), "L1 table"),
    (
        "snapshot-l1-huge",
        lambda p: patch(p, header(p)["snap_off"] + 8, ">I", 0x7FFFFFFF),
        "too large",
    ),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:80]), "truncated"),
    ("version-9", lambda p: patch(p, 4, ">I", 9), "version 9"),
    ("encrypted", lambda p: patch(p, 32, ">I", 1), "encrypted"),
]


async def _open_refused(img: Path, words: str) -> ImageError:
    tracemalloc.start()
    try:
        with trio.fail_after(5):
            with pytest.raises(ImageError) as info:
                node = await open_image(str(img), read_only=True)
                await close_chain(node)  # pragma: no cover - only when the test fails
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert words in msg, msg
    assert "\n" not in msg and len(msg) < 300
    assert peak < 64 * MiB, f"opening allocated {peak} bytes"
    return info.value


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_image_refused_at_open(
    tmp_path: Path, edit: Callable[[Path], None], words: str
) -> None:
    img = make_image(tmp_path)
    edit(img)
    await _open_refused(img, words)


async def test_image_that_is_its_own_backing_file(tmp_path: Path) -> None:
    img = make_image(tmp_path, "self.qcow2")
    qemu_img("rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", str(img))
    await _open_refused(img, "loops")


async def test_backing_chain_loop(tmp_path: Path) -> None:
    a = make_image(tmp_path, "a.qcow2")
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    await _open_refused(b, "loops")


async def test_corrupt_l2_entry_fails_the_read_not_the_process(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    l1e = struct.unpack(">Q", img.read_bytes()[header(img)["l1_off"] :][:8])[0]
    l2_off = l1e & 0x00FFFFFFFFFFFE00
    patch(img, l2_off, ">Q", (1 << 63) | 0x10200)  # not cluster aligned
    node = await open_image(str(img), read_only=True)
    try:
        with pytest.raises(ImageError, match="not cluster aligned"):
            await node.read(0, 4096)
    finally:
        await close_chain(node)


async def test_corrupt_compressed_cluster_fails_the_read(tmp_path: Path) -> None:
    src = make_image(tmp_path, "src.qcow2")
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(img))
    l1e = struct.unpack(">Q", img.read_bytes()[header(img)["l1_off"] :][:8])[0]
    l2_off = l1e & 0x00FFFFFFFFFFFE00
    entry = struct.unpack(">Q", img.read_bytes()[l2_off : l2_off + 8])[0]
    coff = entry & ((1 << 54) - 1)
    patch(img, coff, ">Q", 0xFFFFFFFFFFFFFFFF)  # garbage where the deflate stream starts
    node = await open_image(str(img), read_only=True)
    try:
        with pytest.raises(ImageError, match="compressed cluster"):
            await node.read(0, 4096)
    finally:
        await close_chain(node)


def test_cli_reports_hostile_image_in_one_line(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    patch(img, 40, ">Q", 1 << 40)
    res = blockfs("info", str(img), check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("blockfs: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr


async def test_metadata_counted_free_is_never_overwritten(tmp_path: Path) -> None:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 64k", str(img)])
    h = header(img)
    raw = img.read_bytes()
    l2_off = struct.unpack(">Q", raw[h["l1_off"] : h["l1_off"] + 8])[0] & 0x00FFFFFFFFFFFE00
    rb_off = struct.unpack(">Q", raw[h["rt_off"] : h["rt_off"] + 8])[0]
    cluster = l2_off >> h["cluster_bits"]
    patch(img, rb_off + 2 * cluster, ">H", 0)  # the L2 table now looks free
    node = await open_image(str(img))
    try:
        with pytest.raises(ImageError, match="refcounts are corrupt"):
            await node.write(2 * MiB, b"\x01" * 4096)
    finally:
        await close_chain(node)
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x66 0 64k", str(img)])  # L2 table intact
