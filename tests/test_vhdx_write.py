"""Writing VHDX, judged by tools no one here wrote: images written through the node and through
a mount (dd, qemu-io, fio --verify) read back as written, ``qemu-img compare`` agrees with a raw
reference and ``qemu-img check`` finds nothing (512-byte sectors: QEMU reads no other), and
libvhdi's ``vhdimount`` reads the same bytes (4096-byte sectors and differencing images too, for
which it is the only judge); QEMU's Hyper-V sample takes the write its README describes.

Crash safety, three ways: the node's writes to its file are recorded, and the file is rebuilt as
a kill at every instant would leave it (a prefix of the writes) and as a power loss would (what
was written since the last flush kept or dropped at will, 4 KiB at a time): each opens, replays
its log, and reads as a state the writes passed through, nothing flushed lost; QEMU replays the
same logs to the same bytes. Then kill -9 of a mounted daemon during fio and during a journalled
writer; and injected faults in the log, BAT, bitmap and header writes stop the image, which
reopens consistent.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from test_vhdx import layout, make, qemu_io, sample, vhdiinfo, vhdimount_read

from blockfs.nodes.base import Capability, Node, Status
from blockfs.nodes.registry import close_chain, open_image
from blockfs.nodes.vhdx import VhdxNode
from conftest import FULL, blockfs, have_fuse, is_mounted, need_tool, qemu_img, run

MiB = 1024 * 1024
KiB = 1024
SECTOR = 4096


# -- a file that remembers every change, to rebuild it as a crash would leave it ---------------


class RecordingFile(Node):
    """An image file in memory whose every write, zeroing, truncation and flush is recorded in
    order (writes and zeroings as the bytes they leave)."""

    format_name = "recording"
    capabilities = Capability.ZERO | Capability.DISCARD | Capability.RESIZE

    def __init__(self, data: bytes, filename: str) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.read_only = False
        self.filename = filename
        #: ("write", offset, bytes) | ("truncate", size, b"") | ("flush", 0, b"")
        self.ops: list[tuple[str, int, bytes]] = []

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return bytes(self.data[offset : offset + length]).ljust(length, b"\0")

    def _put(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.data):
            self.data.extend(bytes(offset + len(data) - len(self.data)))
        self.data[offset : offset + len(data)] = data
        self.size = len(self.data)
        self.ops.append(("write", offset, data))

    async def write(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._put(offset, bytes(data))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        self._put(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, max(0, min(length, self.size - offset)))

    async def truncate(self, size: int) -> None:
        await trio.lowlevel.checkpoint()
        if size > len(self.data):
            self.data.extend(bytes(size - len(self.data)))
        else:
            del self.data[size:]
        self.size = size
        self.ops.append(("truncate", size, b""))

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self.ops.append(("flush", 0, b""))

    async def aclose(self) -> None:
        pass


def rebuild(initial: bytes, ops: list[tuple[str, int, bytes]]) -> bytearray:
    out = bytearray(initial)
    for kind, offset, data in ops:
        if kind == "write":
            if offset + len(data) > len(out):
                out.extend(bytes(offset + len(data) - len(out)))
            out[offset : offset + len(data)] = data
        elif kind == "truncate":
            if offset > len(out):
                out.extend(bytes(offset - len(out)))
            else:
                del out[offset:]
    return out


class Ctx:
    """What VhdxNode.open needs of the opener: writable, parents opened read-only."""

    read_only = False

    async def open_backing(self, location: str, fmt: str | None, relative_to: str) -> Node:
        path = os.path.join(os.path.dirname(relative_to), location)
        return await open_image(path, fmt=fmt, read_only=True)


async def recorded(img: Path) -> tuple[bytes, RecordingFile, VhdxNode]:
    initial = img.read_bytes()
    rec = RecordingFile(initial, str(img))
    return initial, rec, await VhdxNode.open(rec, Ctx())


async def reopened_view(data: bytes, filename: Path, size: int) -> tuple[bytes, int]:
    """Open ``data`` as the image file ``filename`` (in memory, next to its parent) writable,
    replaying its log, and read the disk: its bytes and the number of log entries replayed."""
    node = await VhdxNode.open(RecordingFile(data, str(filename)), Ctx())
    try:
        return await node.read(0, size), node.log_outcome.entries
    finally:
        await close_chain(node)


def sectors_between(got: bytes, states: list[bytes], what: str) -> None:
    """Every 512-byte sector of ``got`` holds what one of ``states`` holds there."""
    for s in range(0, len(got), 512):
        g = got[s : s + 512]
        assert any(st[s : s + 512] == g for st in states), f"{what}: sector at {s:#x}"


# -- writing through the node ------------------------------------------------------------------

WRITE_CASES = [("dynamic", 512), ("fixed", 512), ("dynamic", 4096), ("fixed", 4096)]


@pytest.mark.parametrize(("subformat", "lss"), WRITE_CASES)
async def test_random_writes_read_back_alike_in_qemu_and_libvhdi(
    tmp_path: Path, subformat: str, lss: int
) -> None:
    size = 10 * MiB + lss
    img = await make(
        tmp_path / "w.vhdx", size, block_size=MiB, subformat=subformat, logical_sector_size=lss
    )
    rnd = random.Random(lss)
    model = bytearray(size)
    node = await open_image(str(img), fmt="vhdx")
    try:
        assert isinstance(node, VhdxNode)
        for i in range(120):
            off = rnd.randrange(size)
            n = min(size - off, rnd.choice([1, 511, 4096, 70000, MiB + 3, 3 * MiB]))
            r = rnd.random()
            if r < 0.15:
                await node.write_zeroes(off, n, may_unmap=rnd.random() < 0.5)
                model[off : off + n] = bytes(n)
            elif r < 0.22:
                await node.discard(off, n)  # may read back as anything: take what it reads
                model[off : off + n] = await node.read(off, n)
            else:
                data = rnd.randbytes(n)
                await node.write(off, data)
                model[off : off + n] = data
            if i % 25 == 24:
                await node.flush()
        assert await node.read(0, size) == model
    finally:
        await close_chain(node)
    node = await open_image(str(img), read_only=True)
    try:
        assert node.describe()["log-state"] == "clean"  # closed cleanly: the log is empty
        assert await node.read(0, size) == model
    finally:
        await close_chain(node)
    if have_fuse():
        assert vhdimount_read(img, tmp_path) == model
    if lss == 512:
        ref = tmp_path / "ref.raw"
        ref.write_bytes(model)
        qemu_img("compare", "-f", "vhdx", "-F", "raw", str(img), str(ref))
        assert "No errors were found" in qemu_img("check", str(img)).stdout


def header_fields(img: Path) -> dict[str, Any]:
    raw = img.read_bytes()[: 192 * KiB]
    lay = layout(img)
    h = lay["header"]
    return {
        "seq": max(lay["headers_seq"]),
        "file": uuid.UUID(bytes_le=raw[h + 16 : h + 32]),
        "data": uuid.UUID(bytes_le=raw[h + 32 : h + 48]),
        "log": uuid.UUID(bytes_le=raw[h + 48 : h + 64]),
    }


async def test_guids_change_before_the_first_change_after_an_open(tmp_path: Path) -> None:
    img = await make(tmp_path / "g.vhdx", 4 * MiB, block_size=MiB)
    first = header_fields(img)
    node = await open_image(str(img), fmt="vhdx")  # writable, but nothing written
    await node.read(0, MiB)
    await node.flush()
    await close_chain(node)
    assert header_fields(img) == first
    node = await open_image(str(img), fmt="vhdx")
    try:
        await node.write(MiB, b"\x11" * 4096)  # allocates: the log is used
        mid = header_fields(img)
        assert mid["file"] != first["file"] and mid["data"] != first["data"]
        assert mid["log"] != uuid.UUID(int=0)  # entries are live
        await node.write(MiB + 4096, b"\x22" * 4096)  # in place: no header update
        assert header_fields(img)["seq"] == mid["seq"]
    finally:
        await close_chain(node)
    last = header_fields(img)
    assert last["log"] == uuid.UUID(int=0)  # a clean close empties the log
    assert (last["file"], last["data"]) == (mid["file"], mid["data"])
    info = vhdiinfo(img)
    assert info["Identifier"] == str(last["data"])  # libvhdi's Identifier: the DataWriteGuid


async def test_concurrent_writes_allocate_each_block_once(tmp_path: Path) -> None:
    img = await make(tmp_path / "c.vhdx", 16 * MiB, block_size=MiB)
    start = img.stat().st_size
    node = await open_image(str(img), fmt="vhdx")
    pieces = {(b * MiB + k * 64 * KiB): random.Random(b * 100 + k).randbytes(64 * KiB)
              for b in (1, 5, 6, 9) for k in range(16)}  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            for off, data in pieces.items():
                nursery.start_soon(node.write, off, data)
        for off, data in pieces.items():
            assert await node.read(off, len(data)) == data
    finally:
        await close_chain(node)
    assert img.stat().st_size - start <= 4 * MiB + MiB  # four blocks (and MiB alignment)
    assert "No errors were found" in qemu_img("check", str(img)).stdout


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
async def test_concurrent_writers_share_blocks_bitmaps_and_the_log(
    tmp_path: Path, kind: str
) -> None:
    """32 tasks, each owning every 32nd slot of 3 KiB (so blocks, bitmap sectors and the log
    are shared; in the differencing image, of 4096-byte sectors, so are sectors: partial
    sectors filled from the parent), write, zero and flush at random; the disk then reads as
    the model, after a reopen too, and in libvhdi."""
    size = 8 * MiB
    if kind == "dynamic":
        img = await make(tmp_path / "d.vhdx", size, block_size=MiB)
        model = bytearray(size)
    else:
        img, parent = await differencing_pair(tmp_path, size, 4096)
        model = bytearray(parent)
    slot = 3 * KiB
    node = await open_image(str(img), fmt="vhdx")

    async def task(t: int) -> None:
        rnd = random.Random(t)
        for _ in range(40):
            idx = rnd.randrange(t, size // slot, 32)
            off = idx * slot
            if rnd.random() < 0.1:
                await node.write_zeroes(off, slot)
                model[off : off + slot] = bytes(slot)
            else:
                data = rnd.randbytes(slot)
                model[off : off + slot] = data
                await node.write(off, data)
            if rnd.random() < 0.05:
                await node.flush()

    try:
        async with trio.open_nursery() as nursery:
            for t in range(32):
                nursery.start_soon(task, t)
        assert await node.read(0, size) == model
    finally:
        await close_chain(node)
    node = await open_image(str(img), read_only=True)
    try:
        assert await node.read(0, size) == model
    finally:
        await close_chain(node)
    if have_fuse():
        assert vhdimount_read(img, tmp_path) == model
    if kind == "dynamic":
        assert "No errors were found" in qemu_img("check", str(img)).stdout


async def test_zeroes_and_discard_follow_the_block_states(tmp_path: Path) -> None:
    dyn = await make(tmp_path / "d.vhdx", 8 * MiB, block_size=MiB)
    fixed = await make(tmp_path / "f.vhdx", 8 * MiB, block_size=MiB, subformat="fixed")
    await make(tmp_path / "p.vhdx", 8 * MiB, block_size=MiB)
    node = await open_image(str(tmp_path / "p.vhdx"), fmt="vhdx")
    await node.write(0, b"\x77" * 8 * MiB)
    await close_chain(node)
    diff = await make(tmp_path / "c.vhdx", None, block_size=MiB, parent="p.vhdx")
    for img, caps in (
        (dyn, Capability.ZERO | Capability.DISCARD | Capability.EXTENTS),
        (fixed, Capability.ZERO | Capability.EXTENTS),
        (diff, Capability.ZERO | Capability.EXTENTS),
    ):
        node = await open_image(str(img), fmt="vhdx")
        try:
            assert node.capabilities == caps, img.name
            await node.write(0, b"\x55" * 4 * MiB)
            await node.flush()
            size_before = img.stat().st_size
            await node.write_zeroes(MiB, MiB)  # a whole block
            await node.write_zeroes(2 * MiB + 512, 1024)  # part of one
            await node.discard(3 * MiB, MiB)
            await node.write_zeroes(5 * MiB, MiB)  # a block that was never written
            ext = await node.block_status(MiB, MiB)
            zero = Status.ZERO | Status.ALLOCATED
            if img is dyn:
                assert ext.status == zero
                assert (await node.block_status(3 * MiB, MiB)).status == zero  # UNMAPPED
                assert (await node.block_status(5 * MiB, MiB)).status == zero
                assert await node.read(3 * MiB, MiB) == bytes(MiB)
            else:  # fixed: zeroed in place; differencing: present, over zeroes
                assert ext.status == Status.DATA | Status.ALLOCATED
                assert await node.read(3 * MiB, MiB) == b"\x55" * MiB  # discard: a no-op
            assert await node.read(MiB, MiB) == bytes(MiB)
            assert await node.read(5 * MiB, MiB) == bytes(MiB)  # hides the parent's 0x77
            part = await node.read(2 * MiB, MiB)
            assert part == b"\x55" * 512 + bytes(1024) + b"\x55" * (MiB - 1536)
            await node.write(MiB + 4096, b"\x66" * 4096)  # into the zeroed block again
            want = bytes(4096) + b"\x66" * 4096 + bytes(MiB - 8192)
            assert await node.read(MiB, MiB) == want
            if img is not diff:  # the zeroed block's space is used again: the file kept its size
                assert img.stat().st_size <= size_before + MiB
        finally:
            await close_chain(node)
        node = await open_image(str(img), read_only=True)
        try:
            mine = await node.read(0, node.size)
        finally:
            await close_chain(node)
        if have_fuse():
            assert vhdimount_read(img, tmp_path) == mine, img.name
        if img is not diff:
            assert "No errors were found" in qemu_img("check", str(img)).stdout


async def test_a_new_block_over_a_parent_without_data_needs_no_bitmap(tmp_path: Path) -> None:
    """Where no layer beneath holds data, a partly written block of a differencing image is
    simply fully present over zeroes (no bitmap, and later writes go in place); where the parent
    holds data, it is partly present."""
    size = 4 * MiB
    await make(tmp_path / "p.vhdx", size, block_size=MiB)
    node = await open_image(str(tmp_path / "p.vhdx"), fmt="vhdx")
    await node.write(2 * MiB, b"\x33" * 4096)  # block 2 holds data, the others none
    await close_chain(node)
    child = await make(tmp_path / "c.vhdx", None, block_size=MiB, parent="p.vhdx")
    node = await open_image(str(child), fmt="vhdx")
    try:
        assert isinstance(node, VhdxNode)
        await node.write(MiB + 512, b"\x44" * 1000)
        await node.write(2 * MiB + 8192, b"\x55" * 1000)
        states = [await node._entry(node.geometry.payload_index(b)) & 7 for b in range(4)]
        assert states == [0, 6, 7, 0]
        want = bytes(512) + b"\x44" * 1000 + bytes(MiB - 1512)
        assert await node.read(MiB, MiB) == want
        want = b"\x33" * 4096 + bytes(4096) + b"\x55" * 1000 + bytes(MiB - 9192)
        assert await node.read(2 * MiB, MiB) == want
    finally:
        await close_chain(node)
    if have_fuse():
        view = vhdimount_read(child, tmp_path)
        assert view[MiB : 2 * MiB] == bytes(512) + b"\x44" * 1000 + bytes(MiB - 1512)


# -- crash safety, simulated: every instant of a kill, power losses ------------------------------


async def guest_workload(
    node: VhdxNode, rec: RecordingFile, start: bytes, rnd: random.Random, ops: int, *, small: bool
) -> tuple[list[bytes], list[int]]:
    """Run ``ops`` requests one after the other (writes, some zeroes, a flush now and then),
    then close: the disk after each, and how many file operations had been recorded by then."""
    cur = bytearray(start)
    states, marks = [bytes(cur)], [len(rec.ops)]
    size = len(cur)
    sizes = [1, 512, 1000, 4096] if small else [512, 4096, 70000, MiB + 3]
    for _ in range(ops):
        off = rnd.randrange(size)
        n = min(size - off, rnd.choice(sizes))
        r = rnd.random()
        if r < 0.06:
            await node.flush()
        elif r < 0.14 and not small:
            block = off // MiB * MiB
            n = min(MiB, size - block)
            await node.write_zeroes(block, n, may_unmap=rnd.random() < 0.5)
            cur[block : block + n] = bytes(n)
        else:
            data = rnd.randbytes(n)
            await node.write(off, data)
            cur[off : off + n] = data
        states.append(bytes(cur))
        marks.append(len(rec.ops))
    await node.aclose()
    states.append(bytes(cur))
    marks.append(len(rec.ops))
    return states, marks


async def differencing_pair(tmp_path: Path, size: int, lss: int = 512) -> tuple[Path, bytes]:
    """A parent full of random data and an empty differencing child (1 MiB blocks)."""
    await make(tmp_path / "p.vhdx", size, block_size=MiB, logical_sector_size=lss)
    node = await open_image(str(tmp_path / "p.vhdx"), fmt="vhdx")
    try:
        await node.write(0, random.Random(lss).randbytes(size))
    finally:
        await close_chain(node)
    child = await make(tmp_path / "c.vhdx", None, block_size=MiB, parent="p.vhdx")
    node = await open_image(str(child), read_only=True)
    try:
        return child, await node.read(0, size)
    finally:
        await close_chain(node)


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
async def test_a_kill_at_any_instant_leaves_an_image_that_replays(
    tmp_path: Path, kind: str
) -> None:
    """A kill -9 leaves the file as a prefix of the node's writes (the page cache keeps what
    was written). At every such instant the image opens, replays its log, and reads as the
    disk before or after the request in flight, sector by sector."""
    size = 6 * MiB
    if kind == "dynamic":
        img = await make(tmp_path / "k.vhdx", size, block_size=MiB)
        start = bytes(size)
    else:
        img, start = await differencing_pair(tmp_path, size)
    initial, rec, node = await recorded(img)
    rnd = random.Random(11)
    small = kind == "differencing"  # partial sectors and bitmap runs
    states, marks = await guest_workload(node, rec, start, rnd, 100 if small else 50, small=small)
    step = 1 if FULL or not small else 2
    replayed = 0
    for k in range(0, len(rec.ops) + 1, step):
        got, n = await reopened_view(rebuild(initial, rec.ops[:k]), img, size)
        replayed += n > 0
        j = max(i for i, m in enumerate(marks) if m <= k)
        sectors_between(got, states[j : j + 2], f"kill after file operation {k}")
    assert replayed > len(rec.ops) // (3 * step)  # the log was live at most instants


async def test_qemu_replays_the_log_to_the_same_bytes(tmp_path: Path) -> None:
    """QEMU's own replay (``qemu-img check -r all``) of logs a kill left reads as blockfs's,
    across a ring full enough to start over with a new log GUID."""
    size = 16 * MiB
    img = await make(tmp_path / "q.vhdx", size, block_size=MiB)
    initial, rec, node = await recorded(img)
    rnd = random.Random(12)
    for i in range(400):  # each zeroing and each write into a zeroed block is a log entry
        block = rnd.randrange(16) * MiB
        if i % 2:
            await node.write_zeroes(block, MiB, may_unmap=rnd.random() < 0.5)
        else:
            await node.write(block + rnd.randrange(MiB - 4096), rnd.randbytes(4096))
        if i % 40 == 39:
            await node.flush()
    await node.aclose()
    guids = {op[2][48:64] for op in rec.ops if op[0] == "write" and op[1] in (64 * KiB, 128 * KiB)}
    assert len(guids) >= 3  # zero, and more than one log GUID: the ring started over
    mine, theirs = tmp_path / "mine.vhdx", tmp_path / "theirs.vhdx"
    for k in sorted(random.Random(1).sample(range(len(rec.ops)), 30 if FULL else 6)):
        data = rebuild(initial, rec.ops[:k])
        mine.write_bytes(data)
        theirs.write_bytes(data)
        node = await open_image(str(mine), fmt="vhdx")  # replays onto the file
        await close_chain(node)
        res = qemu_img("check", "-r", "all", str(theirs), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(mine), str(theirs))
        assert "No errors were found" in qemu_img("check", str(mine)).stdout


def power_loss(
    ops: list[tuple[str, int, bytes]], k: int, rnd: random.Random
) -> tuple[list[tuple[str, int, bytes]], int]:
    """The file operations a power loss at operation ``k`` may leave: everything up to the last
    flush, then each 4 KiB of what was written after it kept or dropped at will (and each
    truncation). Also returns the index of that flush."""
    last = max((i for i in range(k) if ops[i][0] == "flush"), default=-1)
    kept = list(ops[: last + 1])
    for kind, offset, data in ops[last + 1 : k]:
        if kind == "write":  # the file's 4 KiB pages, each reaching the disk or not
            at = offset
            while at < offset + len(data):
                stop = min(offset + len(data), (at // SECTOR + 1) * SECTOR)
                if rnd.random() < 0.5:
                    kept.append((kind, at, data[at - offset : stop - offset]))
                at = stop
        elif kind == "truncate" and rnd.random() < 0.5:
            kept.append((kind, offset, data))
    return kept, last


async def test_a_power_loss_keeps_every_flushed_write(tmp_path: Path) -> None:
    """After a power loss the image opens and each sector reads as it was at some point since
    the last completed flush: what a flush made durable is never lost, and nothing older comes
    back (a block zeroed, flushed, then partly written again keeps its zeroes)."""
    size = 8 * MiB
    img = await make(tmp_path / "p.vhdx", size, block_size=MiB)
    initial, rec, node = await recorded(img)
    rnd = random.Random(13)
    cur = bytearray(size)
    states, marks = [bytes(cur)], [0]

    async def step(what: str, off: int = 0, n: int = 0) -> None:
        if what == "write":
            data = rnd.randbytes(n)
            await node.write(off, data)
            cur[off : off + n] = data
        elif what == "zero":
            await node.write_zeroes(off, n, may_unmap=False)  # the space stays: reused below
            cur[off : off + n] = bytes(n)
        else:
            await node.flush()
        states.append(bytes(cur))
        marks.append(len(rec.ops))

    for b in range(8):
        await step("write", b * MiB, MiB)
    await step("flush")
    for _ in range(3):
        for b in rnd.sample(range(8), 3):
            await step("zero", b * MiB, MiB)
        await step("flush")
        for _ in range(12):
            await step("write", rnd.randrange(size - 70000), rnd.choice([512, 4096, 70000]))
            if rnd.random() < 0.2:
                await step("flush")
    await node.aclose()
    states.append(bytes(cur))
    marks.append(len(rec.ops))
    loss = random.Random(14)
    trials = 0
    for k in range(1, len(rec.ops) + 1, 1 if FULL else 3):
        ops, last = power_loss(rec.ops, k, loss)
        got, _ = await reopened_view(rebuild(initial, ops), img, size)
        durable = max(i for i, m in enumerate(marks) if m <= last + 1) if last >= 0 else 0
        now = max(i for i, m in enumerate(marks) if m <= k)
        sectors_between(got, states[durable : now + 2], f"power loss at file operation {k}")
        trials += 1
    assert trials > 20


# -- through a mount ---------------------------------------------------------------------------


def qemu_io_raw(path: Path, *cmds: str) -> None:
    """qemu-io on a mounted file (raw, as any program sees it)."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    res = run([*args, str(path)])
    assert "error" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def check_qemu(img: Path, expect: bytes, tmp: Path) -> None:
    """QEMU agrees: ``qemu-img compare`` against a raw file of ``expect``, and ``check``."""
    ref = tmp / (img.stem + ".ref.raw")
    ref.write_bytes(expect)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", str(img), str(ref))
    assert "No errors were found" in qemu_img("check", str(img)).stdout
    ref.unlink()


def test_images_written_by_dd_qemu_io_and_fio_through_a_mount(tmp_path: Path, mount: Any) -> None:
    need_tool("fio")
    need_tool("qemu-io")
    size = 40 * MiB
    imgs = {}
    for sub, lss in WRITE_CASES:
        name = f"{sub}{lss}"
        imgs[name] = tmp_path / f"{name}.vhdx"
        blockfs("create", "-f", "vhdx", "-o", f"subformat={sub},block_size=1M,logical_sector_size="
                f"{lss}", str(imgs[name]), str(size))  # fmt: skip
    m = mount(*(f"{n}={p},format=vhdx" for n, p in imgs.items()))
    rnd = random.Random(3)
    expect = {}
    for name in imgs:
        ref = bytearray(size)
        src = tmp_path / "src"
        data = rnd.randbytes(3 * MiB)
        src.write_bytes(data)
        run(["dd", f"if={src}", f"of={m / name}", "bs=1M", "seek=3", "conv=notrunc"])
        ref[3 * MiB : 6 * MiB] = data
        run(["dd", f"if={src}", f"of={m / name}", "bs=4k", "seek=1801", "count=300",
             "oflag=direct", "conv=notrunc"])  # fmt: skip
        ref[1801 * 4096 : 2101 * 4096] = data[: 300 * 4096]
        qemu_io_raw(m / name, "write -P 0x5a 9M 3M", "write -P 0xa5 12348k 100k",
                    "write -z 10M 512k", "write -P 0x3c 20971008 1536")  # fmt: skip
        ref[9 * MiB : 12 * MiB] = pattern(0x5A, 3 * MiB)
        ref[12348 * KiB : 12448 * KiB] = pattern(0xA5, 100 * KiB)
        ref[10 * MiB : 10 * MiB + 512 * KiB] = bytes(512 * KiB)
        ref[20971008 : 20971008 + 1536] = pattern(0x3C, 1536)
        res = run(["fio", "--name=verify", f"--filename={m / name}", "--rw=randwrite",
                   "--bsrange=4k-128k", "--offset=24M", "--size=8M", "--numjobs=2",
                   "--offset_increment=8M", "--ioengine=libaio", "--iodepth=16", "--direct=1",
                   "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--group_reporting"],
                  check=False, cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0 and "err= 0" in res.stdout, res.stdout + res.stderr
        seen = (m / name).read_bytes()
        assert seen[: 24 * MiB] == ref[: 24 * MiB], name
        ref[24 * MiB :] = seen[24 * MiB :]  # what fio wrote, and verified
        expect[name] = bytes(ref)
    m.umount()
    for name, img in imgs.items():
        assert vhdimount_read(img, tmp_path) == expect[name], name
        if name.endswith("512"):
            check_qemu(img, expect[name], tmp_path)


def test_differencing_images_written_through_a_mount_read_alike_in_libvhdi(
    tmp_path: Path, mount: Any
) -> None:
    """Writes into children over parents (partly written blocks: sector bitmaps), 512 and 4096
    sectors; vhdimount, the only other reader of differencing VHDX, reads what blockfs shows."""
    size = 12 * MiB
    specs = []
    views = {}
    for lss in (512, 4096):
        d = tmp_path / f"s{lss}"
        d.mkdir()
        child, parent_view = trio.run(differencing_pair, d, size, lss)
        views[f"c{lss}"] = (child, parent_view)
        specs.append(f"c{lss}={child},format=vhdx")
    m = mount(*specs)
    rnd = random.Random(5)
    expect = {}
    for name, (_, parent_view) in views.items():
        lss = int(name[1:])
        model = bytearray(parent_view)
        fd = os.open(m / name, os.O_RDWR)
        try:
            for _ in range(60):
                off = rnd.randrange(size - 200 * KiB)
                n = rnd.choice([1, 300, lss, 3 * lss, 5000, 64 * KiB, 150 * KiB])
                data = rnd.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                model[off : off + n] = data
            os.fsync(fd)
        finally:
            os.close(fd)
        qemu_io_raw(m / name, "write -P 0x71 2M 1M", "write -z 5M 1M", "write -P 0x72 7340544 512")
        model[2 * MiB : 3 * MiB] = pattern(0x71, MiB)
        model[5 * MiB : 6 * MiB] = bytes(MiB)
        model[7340544 : 7340544 + 512] = pattern(0x72, 512)
        assert (m / name).read_bytes() == model, name
        expect[name] = bytes(model)
    m.umount()
    for name, (child, _) in views.items():
        info = vhdiinfo(child)
        assert info["Disk type"] == "Differential", info
        assert vhdimount_read(child, tmp_path / f"s{name[1:]}") == expect[name], name
        assert trio.run(partial_states, child), f"{name}: no block was left partly present"


async def partial_states(img: Path) -> int:
    """How many payload blocks of ``img`` are PARTIALLY_PRESENT."""
    node = await open_image(str(img), read_only=True)
    try:
        assert isinstance(node, VhdxNode)
        g = node.geometry
        count = 0
        for b in range(g.data_blocks):
            count += (await node._entry(g.payload_index(b))) & 7 == 7
        return count
    finally:
        await close_chain(node)


def test_hyperv_sample_takes_the_write_its_readme_describes(tmp_path: Path, mount: Any) -> None:
    """QEMU's iotest 064: 0xc3 over 99M..157M allocates blocks that were ZERO; the rest of each
    new block still reads as zeroes, and nothing else changed."""
    need_tool("qemu-io")
    img = sample("iotest-dynamic-1G", tmp_path)
    m = mount(f"s={img},format=vhdx")
    qemu_io_raw(m / "s", "write -P 0xc3 99M 58M")
    m.umount()
    qemu_io(img, "read -P 0xa5 0 33M", "read -P 0x96 33M 33M", "read -P 0 66M 33M",
            "read -P 0xc3 99M 58M", "read -P 0 157M 867M")  # fmt: skip
    assert "No errors were found" in qemu_img("check", str(img)).stdout
    doc = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert doc["virtual-size"] == 1 << 30


# -- kill -9 of a mounted daemon ---------------------------------------------------------------


def _fio_crash_args(filename: Path, seed: int) -> list[str]:
    return ["fio", "--name=crash", f"--filename={filename}", "--rw=randwrite",
            "--bsrange=4k-64k", "--size=96M", "--ioengine=libaio", "--iodepth=16", "--direct=1",
            "--fsync=8", "--verify=crc32c", f"--randseed={seed}"]  # fmt: skip


def test_kill_during_fio_with_fsync_loses_no_acknowledged_write(mount: Any, tmp_path: Path) -> None:
    """kill -9 in the middle of fio (random writes, fsync every 8, 1 MiB blocks: allocations
    all along): the image opens again (its log replayed), fio verifies every write it saw
    complete, ``qemu-img check`` is clean, and QEMU's replay of the same log agrees."""
    need_tool("fio")
    img = tmp_path / "vm.vhdx"
    blockfs("create", "-f", "vhdx", "-o", "block_size=1M", str(img), "96M")
    rnd = random.Random(4321)
    replays = 0
    for i in range(10 if FULL else 3):
        for f in tmp_path.glob("*.state"):
            f.unlink()
        m = mount(f"vm={img},format=vhdx")
        pid = m.pid
        fio = subprocess.Popen(
            [*_fio_crash_args(m / "vm", 300 + i), "--do_verify=0", "--verify_state_save=1"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(rnd.uniform(0.3, 1.2))
        os.kill(pid, signal.SIGKILL)
        out, _ = fio.communicate(timeout=60)
        killed = fio.returncode != 0
        assert not killed or list(tmp_path.glob("*crash*verify.state")), out
        blockfs("umount", str(m.path))  # clears the dead mount
        assert not is_mounted(m.path)
        theirs = tmp_path / "theirs.vhdx"
        if i == 0:
            run(["cp", "--sparse=always", str(img), str(theirs)])
        m = mount(f"vm={img},format=vhdx")  # replays the log
        replays += m.info("vm")["format-specific"]["data"]["log-state"] == "replayed"
        state = ["--verify_state_load=1"] if killed else []
        res = run(
            [*_fio_crash_args(m / "vm", 300 + i), "--verify_only", *state, "--verify_fatal=0"],
            check=False,
            cwd=tmp_path,
        )
        m.umount()
        # fio counts the writes that failed when the daemon died as completed; there are at
        # most iodepth of those. Every other completed write must verify.
        bad = res.stdout.count("verify: ") + res.stderr.count("verify: ")
        assert bad <= 16, res.stdout + res.stderr
        assert "No errors were found" in qemu_img("check", str(img)).stdout
        if i == 0:
            res = qemu_img("check", "-r", "all", str(theirs), check=False)
            assert res.returncode == 0, res.stdout + res.stderr
            qemu_img("compare", "-f", "vhdx", "-F", "vhdx", str(img), str(theirs))
            theirs.unlink()
    assert replays, "no kill left a log to replay"


_WRITER = r"""
import mmap, os, random, sys, threading
path, journal, seed, slots, slot = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
order = list(range(slots)); random.Random(seed).shuffle(order)
lock = threading.Lock(); jf = open(journal, "a", buffering=1)
def pattern(idx):
    return (b"%08d:%08d;" % (seed, idx)) * (slot // 18) + b"#" * (slot % 18)
def work(k):
    buf = mmap.mmap(-1, slot)
    for idx in order[k::8]:
        buf.seek(0); buf.write(pattern(idx))
        with lock: jf.write("begin %d %d\n" % (idx, seed))
        try:
            os.pwrite(fd, buf, idx * slot)
        except OSError:
            return
        with lock: jf.write("done %d %d\n" % (idx, seed))
ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def test_kill_during_writes_into_a_differencing_image(mount: Any, tmp_path: Path) -> None:
    """A journalled writer (each write noted before and after pwrite returned) into a
    differencing image with 4096-byte sectors, 20 KiB slots: partly present blocks, bitmaps
    changing all along. After each kill -9 the image opens (replaying its log), every
    acknowledged slot holds its data, every other slot its old or new data; at the end
    vhdimount reads what blockfs reads."""
    size = 32 * MiB
    child, parent_view = trio.run(differencing_pair, tmp_path, size, 4096)
    slot = 20 * KiB
    slots = size // slot
    # what each slot holds as the round begins: the parent's data, then what the last round left
    held = [parent_view[i * slot : (i + 1) * slot] for i in range(slots)]
    journal = tmp_path / "journal"
    rnd = random.Random(77)

    def slot_data(seed: int, idx: int) -> bytes:
        return (b"%08d:%08d;" % (seed, idx)) * (slot // 18) + b"#" * (slot % 18)

    for i in range(6 if FULL else 2):
        journal.write_text("")
        m = mount(f"c={child},format=vhdx")
        pid = m.pid
        seed = 500 + i
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(m / "c"), str(journal), str(seed), str(slots),
             str(slot)]
        )  # fmt: skip
        time.sleep(rnd.uniform(0.3, 1.0))
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=60)
        blockfs("umount", str(m.path))
        state: dict[int, str] = {}  # slot -> "begin" or "done" (each slot is written once)
        for line in journal.read_text().splitlines():
            what, idx, _ = line.split()
            state[int(idx)] = what
        assert "done" in state.values(), "the writer acknowledged nothing before the kill"
        data = trio.run(_replayed_disk, child, size)
        for idx in range(slots):
            got = data[idx * slot : (idx + 1) * slot]
            new = slot_data(seed, idx)
            if state.get(idx) == "done":
                assert got == new, f"round {i}: acknowledged slot {idx} lost"
            elif state.get(idx) == "begin":  # in flight: old or new, sector by sector
                sectors_between(got, [held[idx], new], f"round {i}: slot {idx} in flight")
            else:
                assert got == held[idx], f"round {i}: slot {idx} never written changed"
            held[idx] = got
    assert vhdimount_read(child, tmp_path) == trio.run(_replayed_disk, child, size)


async def _replayed_disk(img: Path, size: int) -> bytes:
    node = await open_image(str(img), fmt="vhdx")  # writable: replays the log onto the file
    try:
        return await node.read(0, size)
    finally:
        await close_chain(node)


# -- injected faults: the failsafe -------------------------------------------------------------

REGION = 64 * KiB


def region_data(r: int) -> bytes:
    """Region ``r``: every 8-byte word holds its own offset and a tag."""
    from array import array

    base = r * REGION // 8
    return array("Q", range((0xB10C << 48) + base, (0xB10C << 48) + base + REGION // 8)).tobytes()


class RegionWriter:
    """O_DIRECT writes of whole regions through the mount."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, REGION)
        self.acked: list[int] = []
        self.failed: list[int] = []

    def write(self, r: int) -> int | None:
        self.buf[:] = region_data(r)
        try:
            os.pwrite(self.fd, self.buf, r * REGION)
        except OSError as exc:
            self.failed.append(r)
            return exc.errno
        self.acked.append(r)
        return None

    def fsync(self) -> int | None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            return exc.errno
        return None

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


#: (name, rule, regions written before the rule, the call that fails, does the image stop?)
FAULTS = [
    ("log", "op=write event=log_write errno=EIO", 8, "write", True),
    ("logland", "op=write event=log_write errno=EIO land=on", 8, "write", True),
    ("bat", "op=write event=bat_update errno=EIO", 8, "fsync", True),
    ("header", "op=write event=header_update errno=ENOSPC", 0, "write", True),
    ("flush", "op=flush errno=EIO nth=2", 8, "fsync", True),
    ("data", "op=write event=block_alloc errno=ENOSPC", 8, "write", False),
    ("bitmap", "op=write event=bitmap_update errno=EIO", 8, "fsync", True),  # differencing
]
DISK = 8 * MiB


def test_failed_metadata_writes_stop_the_image_which_reopens_consistent(
    mount: Any, tmp_path: Path
) -> None:
    """Whatever metadata write fails (a log entry, one that landed but was reported failed, a
    BAT or bitmap sector written in place, a header, a flush), the application gets the error,
    the image then refuses writes with EIO (a failed data write alone does not stop it), reads
    go on, and the image reopens (replaying its log): ``qemu-img check`` is clean, every
    acknowledged region reads back, every region never written reads as zeroes."""
    imgs = {}
    below = dict.fromkeys((n for n, *_ in FAULTS), bytes(DISK))  # what unwritten regions read
    for name, *_ in FAULTS:
        imgs[name] = tmp_path / f"{name}.vhdx"
        if name == "bitmap":  # a parent with data everywhere: partly present blocks, bitmaps
            (tmp_path / "bitmap").mkdir()
            imgs[name], below[name] = trio.run(differencing_pair, tmp_path / "bitmap", DISK)
        else:
            blockfs("create", "-f", "vhdx", "-o", "block_size=1M", str(imgs[name]), str(DISK))
    m = mount(*(f"{n}={p},format=vhdx,inject=on" for n, p in imgs.items()))
    outcomes = {}
    for name, rule, before, failing, stops in FAULTS:
        w = RegionWriter(m / name)
        try:
            for r in range(before):
                assert w.write(r) is None, name
            if before:
                assert w.fsync() is None
            (m / ".control" / "images" / name / "inject").write_text(rule + "\n")
            first: tuple[str, int] | None = None
            r = before
            while first is None and r < DISK // REGION - 2:
                err = w.write(r)
                if err is not None:
                    first = ("write", err)
                elif r % 4 == 3 and (err := w.fsync()) is not None:
                    first = ("fsync", err)
                r += 1
            assert first is not None and first[0] == failing, f"{name}: {first}"
            injected = errno.ENOSPC if "ENOSPC" in rule else errno.EIO
            assert first[1] == injected, f"{name}: {first}"
            after = w.write(r)
            if stops:
                assert after == errno.EIO, f"{name}: a stopped image took a write"
            else:
                assert after is None, f"{name}: a failed data write stopped the image"
            if failing == "fsync":
                assert w.fsync() == errno.EIO, f"{name}: a failed flush did not stay failed"
            with open(m / name, "rb") as f:  # reads go on
                for a in w.acked:
                    f.seek(a * REGION)
                    assert f.read(REGION) == region_data(a), f"{name}: region {a}"
            outcomes[name] = (list(w.acked), list(w.failed))
        finally:
            w.close()
    assert m.log_text().count("refuses writes until it is reopened") == sum(f[4] for f in FAULTS)
    m.umount()
    for name, *_ in FAULTS:
        img = imgs[name]
        acked, failed = outcomes[name]
        data = trio.run(_replayed_disk, img, DISK)
        for r in range(DISK // REGION):
            got = data[r * REGION : (r + 1) * REGION]
            if r in acked:
                assert got == region_data(r), f"{name}: acknowledged region {r}"
            elif r not in failed:
                was = below[name][r * REGION : (r + 1) * REGION]
                assert got == was, f"{name}: region {r} never written"
        if name != "bitmap":
            assert "No errors were found" in qemu_img("check", str(img)).stdout, name
        elif have_fuse():
            assert vhdimount_read(img, tmp_path / "bitmap") == data
