"""What commit and stream ask of a VHDX chain, at the node: a differencing image takes a new
parent (``change_backing_file``) or none (it becomes dynamic), and keeps opening over a parent a
commit writes into (``parent_will_change``). Judged by blockfs reopening the images, libvhdi's
``vhdiinfo`` (the parent it names) and, for a dynamic result, ``qemu-img check`` and
``qemu-img compare`` (QEMU reads no differencing VHDX). Crash safety: the child's file
operations are recorded and every prefix of them (a kill at that instant) opens and reads alike.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path

import pytest
from test_vhdx import make, vhdiinfo
from test_vhdx_write import Ctx, RecordingFile, partial_states, rebuild

from blockfs.errors import ReadOnlyError, UnsupportedFeature, UsageError
from blockfs.nodes.base import Node, Status, chain_block_status
from blockfs.nodes.registry import close_chain, open_image
from blockfs.nodes.vhdx import VhdxNode
from blockfs.nodes.vhdx.format import PARENT_LOCATOR, change_metadata_items
from conftest import qemu_img

MiB = 1024 * 1024
SIZE = 6 * MiB


async def filled(path: Path, data: bytes, upto: int | None = None, **kw: object) -> Path:
    """A dynamic VHDX (1 MiB blocks) holding ``data``, written through the node (its first
    ``upto`` bytes only: the rest, zeroes, left unallocated)."""
    await make(path, len(data), block_size=MiB, **kw)
    node = await open_image(str(path), fmt="vhdx")
    try:
        await node.write(0, data[:upto])
    finally:
        await close_chain(node)
    return path


async def scribble(node: Node, rnd: random.Random, count: int) -> None:
    """Writes of sizes that leave blocks fully, partially and not present."""
    for _ in range(count):
        n = rnd.choice([512, 4096, 70000, MiB])
        off = rnd.randrange(0, node.size - n, 512)
        await node.write(off, rnd.randbytes(n))


async def chain(
    tmp: Path, rnd: random.Random, *, half: bool = False
) -> tuple[Path, Path, bytes, bytes]:
    """base.vhdx (random data; with ``half``, in its first half only) under child.vhdx (random
    writes): the paths, the base's bytes and what the child reads as."""
    base_data = rnd.randbytes(SIZE // 2 if half else SIZE).ljust(SIZE, b"\0")
    base = await filled(tmp / "base.vhdx", base_data, SIZE // 2 if half else None)
    child = await make(tmp / "child.vhdx", None, block_size=MiB, parent="base.vhdx")
    node = await open_image(str(child), fmt="vhdx")
    try:
        await scribble(node, rnd, 12)
        view = await node.read(0, SIZE)
    finally:
        await close_chain(node)
    return base, child, base_data, view


async def read_image(path: Path) -> tuple[bytes, dict[str, object]]:
    node = await open_image(str(path), read_only=True)
    try:
        return await node.read(0, node.size), node.describe()
    finally:
        await close_chain(node)


async def swap_parent(node: VhdxNode, name: str, new: Node) -> None:
    """What a job does at its end: record the new parent, then swap the chain in memory."""
    await node.change_backing_file(name, "vhdx", new)
    old, node.backing = node.backing, new
    if old is not None:
        await close_chain(old)


# -- a new parent ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relative", "absolute", "elsewhere"])
async def test_a_copy_of_the_parent_takes_its_place(tmp_path: Path, form: str) -> None:
    base, child, base_data, view = await chain(tmp_path, random.Random(1))
    where = tmp_path / ("other" if form == "elsewhere" else "")
    where.mkdir(exist_ok=True)
    copy = await filled(where / "copy.vhdx", base_data)  # the same bytes, another GUID
    name = {"relative": "copy.vhdx", "absolute": str(copy), "elsewhere": "other/copy.vhdx"}[form]
    node = await open_image(str(child), fmt="vhdx")
    new = await open_image(str(copy), fmt="vhdx", read_only=True)
    try:
        assert isinstance(node, VhdxNode) and isinstance(new, VhdxNode)
        await swap_parent(node, name, new)
        d = node.describe()
        # the path that opens, as a reopen would find it: the relative one (both are recorded)
        assert d["backing-filename"] == "./" + os.path.relpath(copy, tmp_path)
        assert d["parent-linkage"] == str(new.headers.current.data_write_guid)
        assert await node.read(0, SIZE) == view
    finally:
        await close_chain(node)
    base.rename(tmp_path / "gone.vhdx")  # nothing may still lead to the old parent
    got, d = await read_image(child)
    assert got == view
    assert d["backing-filename"] == "./" + os.path.relpath(copy, tmp_path)
    info = vhdiinfo(child)
    assert info["Disk type"] == "Differential"
    assert info["Parent filename"] == str(copy).replace("/", "\\")
    assert info["Parent identifier"] == d["parent-linkage"]


async def test_another_parent_shows_under_the_child(tmp_path: Path) -> None:
    """A parent with other data: the child's sectors over the new parent's (writes of whole
    sectors, so no sector holds bytes of the old parent)."""
    rnd = random.Random(2)
    await filled(tmp_path / "base.vhdx", rnd.randbytes(SIZE))
    child = await make(tmp_path / "child.vhdx", None, block_size=MiB, parent="base.vhdx")
    other = rnd.randbytes(SIZE)
    await filled(tmp_path / "other.vhdx", other)
    expect = bytearray(other)
    node = await open_image(str(child), fmt="vhdx")
    new = await open_image(str(tmp_path / "other.vhdx"), read_only=True)
    try:
        assert isinstance(node, VhdxNode)
        for _ in range(10):
            n = rnd.choice([512, 8192, MiB + 512])
            off = rnd.randrange(0, SIZE - n, 512)
            data = rnd.randbytes(n)
            await node.write(off, data)
            expect[off : off + n] = data
        await swap_parent(node, "other.vhdx", new)
        assert await node.read(0, SIZE) == expect
        # and again, back: the locator changes size (a longer name) and place
        back = await open_image(str(tmp_path / "base.vhdx"), read_only=True)
        await swap_parent(node, "./../" + tmp_path.name + "/base.vhdx", back)
    finally:
        await close_chain(node)
    node = await open_image(str(child), fmt="vhdx")
    new = await open_image(str(tmp_path / "other.vhdx"), read_only=True)
    try:
        assert isinstance(node, VhdxNode)
        await swap_parent(node, "other.vhdx", new)
    finally:
        await close_chain(node)
    got, d = await read_image(child)
    assert got == expect and d["backing-filename"] == "./other.vhdx"
    assert vhdiinfo(child)["Parent filename"].endswith("\\other.vhdx")


async def test_what_cannot_be_a_parent_is_refused(tmp_path: Path) -> None:
    base, child, base_data, _ = await chain(tmp_path, random.Random(3))
    await filled(tmp_path / "small.vhdx", base_data[: 2 * MiB])
    await filled(tmp_path / "big4k.vhdx", base_data, logical_sector_size=4096)
    (tmp_path / "flat.raw").write_bytes(base_data)
    before = child.read_bytes()
    node = await open_image(str(child), read_only=True)
    try:
        assert isinstance(node, VhdxNode)
        with pytest.raises(ReadOnlyError):
            await node.change_backing_file("base.vhdx", "vhdx", node.backing)
    finally:
        await close_chain(node)
    node = await open_image(str(child), fmt="vhdx")
    try:
        assert isinstance(node, VhdxNode)
        raw = await open_image(str(tmp_path / "flat.raw"), fmt="raw", read_only=True)
        try:
            with pytest.raises(UnsupportedFeature, match="needs a VHDX parent"):
                await node.change_backing_file("flat.raw", "raw", raw)
            with pytest.raises(UnsupportedFeature, match="needs a VHDX parent"):
                await node.change_backing_file("flat.raw", None, raw)
        finally:
            await close_chain(raw)
        for name in ("small.vhdx", "big4k.vhdx"):
            other = await open_image(str(tmp_path / name), read_only=True)
            try:
                with pytest.raises(UsageError, match="sectors"):
                    await node.change_backing_file(name, "vhdx", other)
            finally:
                await close_chain(other)
        with pytest.raises(UsageError, match="its own parent"):
            await node.change_backing_file("child.vhdx", "vhdx", node)
        with pytest.raises(UsageError, match="cannot be recorded"):
            await node.change_backing_file("a\\b.vhdx", "vhdx", node.backing)
    finally:
        await close_chain(node)
    assert child.read_bytes() == before  # nothing was written, not even a header
    node = await open_image(str(base), fmt="vhdx")  # not differencing: it cannot gain one
    other = await open_image(str(tmp_path / "small.vhdx"), read_only=True)
    try:
        with pytest.raises(UnsupportedFeature, match="not a differencing"):
            await node.change_backing_file("small.vhdx", "vhdx", other)
        await node.change_backing_file(None, None)  # it has none: nothing to do
    finally:
        await close_chain(other)
        await close_chain(node)


def test_a_metadata_region_without_room_is_a_usage_error() -> None:
    """The item placement (pure): a locator that grows moves past the other items, into the
    lowest gap; when none fits, a one-line UsageError."""
    table = bytearray(64 * 1024)
    table[:12] = b"metadata" + (0).to_bytes(2, "little") + (2).to_bytes(2, "little")
    other = uuid.uuid4()  # a user item after the locator
    for i, (g, off, ln, flags) in enumerate(
        [(PARENT_LOCATOR, 65536, 100, 4), (other, 65536 + 104, 50, 1)]
    ):
        at = 32 + 32 * i
        table[at : at + 28] = (
            g.bytes_le
            + off.to_bytes(4, "little")
            + ln.to_bytes(4, "little")
            + flags.to_bytes(4, "little")
        )
    new, writes = change_metadata_items(bytes(table), MiB, {PARENT_LOCATOR: b"x" * 104}, "t")
    assert writes == [(65536, b"x" * 104)]  # fits where it was
    new, writes = change_metadata_items(bytes(table), MiB, {PARENT_LOCATOR: b"x" * 200}, "t")
    assert writes == [(65536 + 160, b"x" * 200)]  # past the user item (8-byte aligned)
    assert new[32 + 16 : 32 + 24] == (65536 + 160).to_bytes(4, "little") + (200).to_bytes(
        4, "little"
    )
    assert new[64:96] == bytes(table[64:96])  # the user item's entry as it was
    with pytest.raises(UsageError, match="no room") as info:
        change_metadata_items(bytes(table), 65536 + 300, {PARENT_LOCATOR: b"x" * 200}, "t")
    assert "\n" not in str(info.value)
    new, writes = change_metadata_items(bytes(table), MiB, {PARENT_LOCATOR: None}, "t")
    assert writes == [] and new[10] == 1 and new[32:48] == other.bytes_le
    assert new[64:96] == bytes(32)


# -- a commit writes into the parent -------------------------------------------------------


def snapshot(tmp: Path, files: list[Path], name: str) -> Path:
    """The files as they are now (a kill now), copied side by side into a new folder."""
    out = tmp / name
    out.mkdir()
    for f in files:
        shutil.copy(f, out / f.name)
    return out


async def test_the_child_opens_over_a_parent_a_commit_writes_into(tmp_path: Path) -> None:
    base, child, _, view = await chain(tmp_path, random.Random(4))
    files = [base, child]
    # the control: a write into the parent unlinks the child
    snap = snapshot(tmp_path, files, "control")
    parent = await open_image(str(snap / "base.vhdx"), fmt="vhdx")
    await parent.write(0, b"!" * 512)
    await close_chain(parent)
    with pytest.raises(Exception, match="data write GUID"):
        await read_image(snap / "child.vhdx")

    for round_ in range(2):  # the second time the linkage moves on
        node = await open_image(str(child), read_only=True)  # as in a chain: read-only
        try:
            assert isinstance(node, VhdxNode)
            parent = node.backing
            assert isinstance(parent, VhdxNode)
            await parent.reopen(False)
            before = parent.headers.current.data_write_guid
            await node.parent_will_change(parent)
            assert node.read_only and node.child.read_only  # back to read-only
            loc = node.metadata.parent
            assert loc is not None
            pending = parent.pending_data_write_guid()
            assert {loc.linkage, loc.linkage2} == {before, pending}
            # the GUID the parent will have comes first (libvhdi reads parent_linkage only)
            assert loc.linkage == pending
            await node.parent_will_change(parent)  # again: nothing more to record
            assert node.metadata.parent == loc
            snap = snapshot(tmp_path, files, f"before-{round_}")
            assert (await read_image(snap / "child.vhdx"))[0] == view
            # the commit: what the child holds goes into the parent (the child reads the same)
            pos = 0
            first = True
            while pos < SIZE:
                ext = await chain_block_status(node, pos, SIZE - pos)
                if ext.depth == 0 and ext.status & Status.ALLOCATED:
                    await parent.write(pos, await node.read(pos, ext.length))
                    if first:
                        assert parent.headers.current.data_write_guid == pending
                        snap = snapshot(tmp_path, files, f"during-{round_}")
                        assert (await read_image(snap / "child.vhdx"))[0] == view
                        first = False
                pos += ext.length
            await parent.flush()
            assert await node.read(0, SIZE) == view
            await node.parent_settled(parent)  # the commit is over: one linkage again
            loc = node.metadata.parent
            assert loc is not None and loc.linkage2 is None
            assert loc.linkage == parent.headers.current.data_write_guid == pending
            assert node.read_only
        finally:
            await close_chain(node)
        got, d = await read_image(child)
        assert got == view
        assert uuid.UUID(str(d["parent-linkage"])) == pending
        assert (await read_image(base))[0] == view  # the commit was complete


# -- no parent any more: stream without a base --------------------------------------------


async def stream(node: VhdxNode) -> None:
    """Copy into ``node`` every range its chain below provides data for."""
    pos = 0
    while pos < node.size:
        ext = await chain_block_status(node, pos, node.size - pos)
        if ext.depth > 0 and ext.status & Status.DATA:
            await node.write(pos, await node.read(pos, ext.length))
        pos += ext.length


async def test_dropping_the_parent_makes_a_dynamic_image(tmp_path: Path) -> None:
    base, child, _, _ = await chain(tmp_path, random.Random(5), half=True)
    node = await open_image(str(child), fmt="vhdx")
    try:
        assert isinstance(node, VhdxNode)
        await stream(node)
        view = await node.read(0, SIZE)
        assert await partial_count(node), "no block is left partly present: a weak test"
        await node.change_backing_file(None, None)
        old, node.backing = node.backing, None
        assert old is not None
        await close_chain(old)
        d = node.describe()
        assert d["subformat"] == "dynamic" and d["backing-filename"] is None
        assert await partial_count(node) == 0
        assert await node.read(0, SIZE) == view
        await node.write(SIZE - 4096, b"\x07" * 4096)  # a dynamic image's write
        view = view[:-4096] + b"\x07" * 4096
    finally:
        await close_chain(node)
    base.rename(tmp_path / "gone.vhdx")
    got, d = await read_image(child)
    assert got == view and d["subformat"] == "dynamic" and d["backing-format"] is None
    assert await partial_states(child) == 0
    assert vhdiinfo(child)["Disk type"] == "Dynamic"
    assert "No errors were found" in qemu_img("check", str(child)).stdout
    ref = tmp_path / "ref.raw"
    ref.write_bytes(view)
    qemu_img("compare", "-f", "vhdx", "-F", "raw", str(child), str(ref))


async def partial_count(node: VhdxNode) -> int:
    """Payload blocks partially present, and sector bitmap blocks present."""
    g = node.geometry
    states = [await node._entry(g.payload_index(b)) & 7 for b in range(g.data_blocks)]
    bitmaps = [
        await node._entry(g.bitmap_index(c * g.chunk_ratio)) & 7 for c in range(g.bitmap_blocks)
    ]
    return states.count(7) + bitmaps.count(6)


# -- a kill at any instant ---------------------------------------------------------------------


@pytest.mark.parametrize("step", ["new parent", "second linkage", "no parent"])
async def test_a_kill_at_any_instant_leaves_the_old_state_or_the_new(
    tmp_path: Path, step: str
) -> None:
    """The child's file operations during the step are recorded; the file as each prefix left
    it opens (its log replayed) over the parent it names, and reads as before."""
    _, child, base_data, view = await chain(tmp_path, random.Random(6), half=step == "no parent")
    await filled(tmp_path / "copy.vhdx", base_data)
    initial = child.read_bytes()
    rec = RecordingFile(initial, str(child))
    node = await VhdxNode.open(rec, Ctx())
    parent = node.backing
    assert isinstance(parent, VhdxNode)
    if step == "no parent":
        await stream(node)
        assert await partial_count(node)
    start = len(rec.ops)
    names: set[object] = {"./base.vhdx"}
    if step == "new parent":
        copy = await open_image(str(tmp_path / "copy.vhdx"), read_only=True)
        await swap_parent(node, "copy.vhdx", copy)
        names.add("./copy.vhdx")
    elif step == "second linkage":
        await parent.reopen(False)
        await node.parent_will_change(parent)
    else:
        await node.change_backing_file(None, None)
        names.add(None)
    await close_chain(node)
    ops = rec.ops
    assert len(ops) > start + 3
    seen = set()
    for k in range(start, len(ops) + 1):
        img = RecordingFile(rebuild(initial, ops[:k]), str(child))
        n = await VhdxNode.open(img, Ctx())
        try:
            name = n.describe()["backing-filename"]
            assert name in names, f"after file operation {k}: {name}"
            seen.add(name)
            assert await n.read(0, SIZE) == view, f"after file operation {k}"
        finally:
            await close_chain(n)
    assert seen == names or step == "second linkage"
