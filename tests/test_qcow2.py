"""The qcow2 node against images qemu-img and qemu-io made: every read equals
``qemu-img convert -O raw``; after writes through the node ``qemu-img check`` is clean (no errors,
no leaks) and ``qemu-img compare`` agrees with a raw file that got the same writes."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from blockfs.cli.images import create_image_file
from blockfs.errors import ImageError, ReadOnlyError, UnsupportedFeature, UsageError
from blockfs.nodes.base import Node, Status, chain_block_status
from blockfs.nodes.qcow2 import Qcow2Node, create_qcow2
from blockfs.nodes.registry import close_chain, open_image
from conftest import qemu_img, run

MiB = 1024 * 1024


async def create_at(
    path: Path | str, size: int | None, overwrite: bool = False, **kwargs: Any
) -> None:
    """``create_qcow2`` into a new file node at ``path``, as ``blockfs create`` does."""

    async def write(target: Node) -> None:
        await create_qcow2(target, size, **kwargs)

    await create_image_file(str(path), overwrite, write)


def qemu_io(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    res = run([*args, str(img)])
    assert "error" not in res.stdout.lower() + res.stderr.lower(), res.stdout + res.stderr


def create(
    img: Path, size: int, cluster_size: int, compat: str, backing: Path | None = None
) -> None:
    """``qemu-img create`` a qcow2 with these options (and a qcow2 backing file)."""
    opts = ["-o", f"cluster_size={cluster_size},compat={compat}"]
    if backing is not None:
        opts += ["-b", str(backing), "-F", "qcow2"]
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(img), str(size))


def to_raw(img: Path, tmp: Path) -> bytes:
    out = tmp / (img.name + ".raw")
    qemu_img("convert", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def check_clean(img: Path) -> str:
    """``qemu-img check`` exit 0 means no corruption and no leaks."""
    res = qemu_img("check", str(img), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors were found" in res.stdout
    return res.stdout


def compare(img: Path, raw: Path) -> None:
    res = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(raw), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def judge(img: Path, ref: bytes | bytearray, tmp_path: Path) -> None:
    """The image is clean by ``qemu-img check`` and equals ``ref`` by ``qemu-img compare``."""
    check_clean(img)
    (tmp_path / "ref.raw").write_bytes(ref)
    compare(img, tmp_path / "ref.raw")


def random_patterns(rnd: random.Random, size: int, count: int, zero: bool) -> list[str]:
    """qemu-io commands writing random patterns (some unaligned) and zeroes."""
    cmds = []
    for _ in range(count):
        off = rnd.randrange(0, size - 1) // 512 * 512
        ln = min(rnd.randrange(512, 700 * 1024) // 512 * 512, size - off)
        if zero and rnd.random() < 0.25:
            cmds.append(f"write -z {off} {ln}")
        else:
            cmds.append(f"write -P {rnd.randrange(1, 256):#x} {off} {ln}")
    return cmds


async def read_all(node: Qcow2Node | object, size: int, rnd: random.Random) -> bytes:
    parts = []
    pos = 0
    while pos < size:
        n = min(size - pos, rnd.choice([1, 511, 4096, 65536 + 7, MiB, 3 * MiB + 5]))
        parts.append(await node.read(pos, n))  # type: ignore[attr-defined]
        pos += n
    return b"".join(parts)


# -- reading ----------------------------------------------------------------------------------

READ_CASES = [(512, "1.1"), (4096, "0.10"), (65536, "1.1"), (65536, "0.10"), (2 * MiB, "1.1")]


@pytest.mark.parametrize(("cluster_size", "compat"), READ_CASES)
async def test_reads_equal_qemu_img_convert(tmp_path: Path, cluster_size: int, compat: str) -> None:
    rnd = random.Random(cluster_size)
    size = 10 * MiB + 1536  # not a multiple of any cluster size above 512
    img = tmp_path / "a.qcow2"
    create(img, size, cluster_size, compat)
    qemu_io(img, *random_patterns(rnd, size, 30, zero=True), f"write -P 0x77 {size - 512} 512")
    expect = to_raw(img, tmp_path)
    node = await open_image(str(img), read_only=True)
    try:
        assert isinstance(node, Qcow2Node)
        assert node.size == size
        assert await read_all(node, size, rnd) == expect
        # block_status: ranges this layer does not hold read as zeroes (no backing file)
        pos = 0
        while pos < size:
            ext = await node.block_status(pos, size - pos)
            assert ext.length > 0
            if not ext.status & Status.ALLOCATED or ext.status & Status.ZERO:
                assert expect[pos : pos + ext.length] == bytes(ext.length)
            pos += ext.length
        assert await node.allocated_bytes() > 0
    finally:
        await close_chain(node)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
async def test_compressed_clusters_read_and_rewrite(tmp_path: Path, ctype: str) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "4M")
    qemu_io(src, "write -P 0x11 0 1M", "write -P 0x22 1M 100k", "write -P 0x33 3M 64k")
    # text-like data compresses, but not to a constant: decompression must be exact
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(30000))[: 900 * 1024]
    raw_src = tmp_path / "text.raw"
    raw_src.write_bytes(text)
    qemu_io(src, f"write -s {raw_src} 2M {len(text)}")
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", str(src), str(img))
    assert "compressed" in check_clean(img)
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    expect = to_raw(img, tmp_path)
    assert expect[2 * MiB : 2 * MiB + len(text)] == text
    node = await open_image(str(img))
    try:
        assert node.describe()["compression-type"] == ctype
        assert await read_all(node, node.size, random.Random(1)) == expect
        # partial rewrites of compressed clusters: the rest of each cluster must survive
        ref = bytearray(expect)
        for off, ln in [(100, 3000), (65536 * 3 + 5, 70000), (2 * MiB + 999, 12345)]:
            data = random.Random(off).randbytes(ln)
            await node.write(off, data)
            ref[off : off + ln] = data
        assert await node.read(0, node.size) == bytes(ref)
    finally:
        await close_chain(node)
    judge(img, ref, tmp_path)


async def test_three_deep_chain_with_relative_paths_and_short_base(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    base.write_bytes(random.Random(3).randbytes(3 * MiB + 4096))  # shorter than the overlays
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(mid), "6M")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        str(top),
        "8M",
    )
    qemu_io(mid, "write -P 0x44 1M 200k", "write -z 2M 64k", "write -P 0x45 5M 100k")
    qemu_io(top, "write -P 0x55 1100k 8k", "write -P 0x56 3M 1M", "write -z 3200k 4k")
    expect = to_raw(top, tmp_path)
    node = await open_image(str(top), read_only=True)
    try:
        assert node.backing is not None and node.backing.backing is not None
        assert node.backing.backing.format_name == "raw"
        assert await read_all(node, node.size, random.Random(2)) == expect
        assert expect[7 * MiB :] == bytes(MiB)  # past every backing file: zeroes
        ext = await chain_block_status(node, 2 * MiB, 64 * 1024)
        assert ext.depth == 1 and ext.status & Status.ZERO  # mid's zero cluster
        ext = await chain_block_status(node, 0, 4096)
        assert ext.depth == 2  # only the base holds it
        ext = await chain_block_status(node, 3 * MiB + 8192, 4096)
        assert ext.depth == 0  # top's data
        ext = await chain_block_status(node, 6 * MiB + 4096, 4096)
        assert ext.status == Status.ZERO  # past mid's end, nobody has it
    finally:
        await close_chain(node)


async def test_backing_format_probed_when_header_has_none(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "2M")
    qemu_io(base, "write -P 0x61 0 1M")
    top = tmp_path / "top.qcow2"
    await create_at(top, None, backing="base.qcow2")  # format probed, then recorded
    raw = bytearray(top.read_bytes())
    at = raw.index(bytes.fromhex("e2792aca"))  # turn the backing format extension into an
    raw[at : at + 4] = bytes.fromhex("12345678")  # unknown one, which readers must ignore
    top.write_bytes(raw)
    assert "backing-filename-format" not in qemu_img("info", "--output=json", str(top)).stdout
    node = await open_image(str(top), read_only=True)
    try:
        assert node.backing is not None and node.backing.format_name == "qcow2"
        assert await node.read(0, MiB) == b"\x61" * MiB
    finally:
        await close_chain(node)


# -- writing ----------------------------------------------------------------------------------

WRITE_CASES = [
    (512, "1.1", False),
    (4096, "0.10", True),
    (4096, "0.10", False),
    (65536, "1.1", True),
    (2 * MiB, "1.1", True),
]


@pytest.mark.parametrize(("cluster_size", "compat", "with_backing"), WRITE_CASES)
async def test_writes_zeroes_discards_match_raw_reference(
    tmp_path: Path, cluster_size: int, compat: str, with_backing: bool
) -> None:
    rnd = random.Random(cluster_size + with_backing)
    size = 8 * MiB + 3 * 512
    img = tmp_path / "w.qcow2"
    if with_backing:
        base = tmp_path / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(base), str(size - 512 * 7))
        qemu_io(base, *random_patterns(rnd, size - 512 * 7, 10, zero=False))
        create(img, size, cluster_size, compat, backing=base)
    else:
        create(img, size, cluster_size, compat)
    qemu_io(img, *random_patterns(rnd, size, 8, zero=compat == "1.1"))
    ref = bytearray(to_raw(img, tmp_path))
    node = await open_image(str(img))
    assert isinstance(node, Qcow2Node)
    try:
        for _ in range(120):
            off = rnd.randrange(0, size - 1)
            ln = rnd.randrange(1, min(3 * cluster_size + 5000, size - off) + 1)
            op = rnd.random()
            if op < 0.75:
                data = rnd.randbytes(ln)
                await node.write(off, data)
                ref[off : off + ln] = data
            elif op < 0.88:
                await node.write_zeroes(off, ln, may_unmap=rnd.random() < 0.5)
                ref[off : off + ln] = bytes(ln)
            else:
                await node.discard(off, ln)
                # whole clusters read as zeroes afterwards (v2 with a backing file keeps them)
                a = -(-off // cluster_size) * cluster_size
                b = (off + ln) // cluster_size * cluster_size
                if off + ln == size:
                    b = size
                if b > a and not (compat == "0.10" and with_backing):
                    ref[a:b] = bytes(b - a)
        assert await read_all(node, size, rnd) == bytes(ref)
        await node.flush()
    finally:
        await close_chain(node)
    judge(img, ref, tmp_path)


async def test_partial_cluster_write_over_backing_copies_the_rest(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_io(base, "write -P 0xaa 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    node = await open_image(str(top))
    try:
        await node.write(65536 + 100, b"\x01" * 10)
    finally:
        await close_chain(node)
    check_clean(top)
    m = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    top_data = [e for e in m if e["depth"] == 0 and e["data"]]
    assert [(e["start"], e["length"]) for e in top_data] == [(65536, 65536)]
    data = to_raw(top, tmp_path)
    assert data[:65636] == b"\xaa" * 65636
    assert data[65636:65646] == b"\x01" * 10
    assert data[65646:] == b"\xaa" * (MiB - 65646)


async def test_discard_with_backing_v3_does_not_resurface_old_data(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_io(base, "write -P 0xbb 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "write -P 0xcc 0 256k")
    node = await open_image(str(top))
    try:
        await node.discard(0, 512 * 1024)
        await node.write_zeroes(512 * 1024, 128 * 1024, may_unmap=True)
        assert await node.read(0, 640 * 1024) == bytes(640 * 1024)
    finally:
        await close_chain(node)
    check_clean(top)
    data = to_raw(top, tmp_path)
    assert data[: 640 * 1024] == bytes(640 * 1024)
    assert data[640 * 1024 :] == b"\xbb" * (384 * 1024)
    # the overlay holds no data any more, only zero flags over the backing file's data
    m = json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert not [e for e in m if e["depth"] == 0 and e["data"]]
    assert [e["length"] for e in m if e["depth"] == 0 and e["zero"]] == [640 * 1024]


async def test_discard_without_backing_frees_clusters(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(img), "2M")
    qemu_io(img, "write -P 0x12 0 2M")
    node = await open_image(str(img))
    try:
        before = await node.allocated_bytes()
        await node.discard(0, MiB)
        assert await node.allocated_bytes() == before - MiB
        assert await node.read(0, MiB) == bytes(MiB)
    finally:
        await close_chain(node)
    check_clean(img)
    m = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    assert sum(e["length"] for e in m if e["data"]) == MiB


async def test_concurrent_writes_to_same_and_different_clusters(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x5a 0 4M")
    img = tmp_path / "c.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        str(img),
    )
    ref = bytearray(b"\x5a" * 4 * MiB)
    writes = []
    # 64 writers share cluster 0 (disjoint 1000-byte pieces); 32 more fill their own clusters
    for k in range(64):
        writes.append((k * 1000, bytes([k + 1]) * 1000))
    for k in range(32):
        writes.append(((k + 8) * 65536 + 3, bytes([200 + k % 50]) * 60000))
    for off, data in writes:
        ref[off : off + len(data)] = data
    node = await open_image(str(img))
    try:
        async with trio.open_nursery() as nursery:
            for off, data in writes:
                nursery.start_soon(node.write, off, data)
        assert await node.read(0, node.size) == bytes(ref)
    finally:
        await close_chain(node)
    out = check_clean(img)  # a cluster allocated twice would be a leak
    m = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    top = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
    assert top == (1 + 32) * 65536  # cluster 0 once; clusters 8..39 once each
    assert "Image end offset" in out
    (tmp_path / "ref.raw").write_bytes(ref)
    compare(img, tmp_path / "ref.raw")


async def test_refcount_table_grows(tmp_path: Path) -> None:
    # 512-byte clusters: one refcount block covers 128 KiB, one table cluster 64 blocks
    img = tmp_path / "g.qcow2"
    await create_at(img, 32 * MiB, cluster_size=512)
    rnd = random.Random(9)
    ref = bytearray(32 * MiB)
    node = await open_image(str(img))
    try:
        for _ in range(40):
            off = rnd.randrange(0, 31 * MiB)
            data = rnd.randbytes(rnd.randrange(1, 400_000))
            await node.write(off, data)
            ref[off : off + len(data)] = data
    finally:
        await close_chain(node)
    out = check_clean(img)
    assert "Image end offset" in out
    (tmp_path / "ref.raw").write_bytes(ref)
    compare(img, tmp_path / "ref.raw")


async def test_write_through_survives_without_close(tmp_path: Path) -> None:
    # What a kill -9 leaves: the node is never flushed or closed, the file must still hold
    # every acknowledged write (leaks would be tolerable, corruption is not).
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    node = await open_image(str(img))
    await node.write(12345, b"\x42" * 200_000)
    await node.write_zeroes(MiB, 65536)
    data = to_raw(img, tmp_path)
    await close_chain(node)
    assert data[12345:212345] == b"\x42" * 200_000
    res = qemu_img("check", str(img), check=False)
    assert res.returncode in (0, 3), res.stdout  # 3: leaked clusters only


# -- creating ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({}, {"compat": "1.1", "cluster-size": 65536}),
        ({"compat": "0.10", "cluster_size": 512}, {"compat": "0.10", "cluster-size": 512}),
        ({"cluster_size": 2 * MiB, "preallocation": "metadata"}, {"cluster-size": 2 * MiB}),
        ({"cluster_size": 4096, "preallocation": "metadata", "compat": "0.10"}, {"compat": "0.10"}),
    ],
)
async def test_create_is_accepted_by_qemu_img(tmp_path: Path, kwargs: dict, expect: dict) -> None:  # type: ignore[type-arg]
    img = tmp_path / "n.qcow2"
    await create_at(img, 100 * MiB + 512, **kwargs)
    check_clean(img)
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["virtual-size"] == 100 * MiB + 512
    assert info["cluster-size"] == expect.get("cluster-size", info["cluster-size"])
    assert info["format-specific"]["data"]["compat"] == expect.get("compat", "1.1")
    if kwargs.get("preallocation") == "metadata":
        m = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
        assert all(e["data"] and "offset" in e for e in m)
    qemu_io(img, "write -P 0x31 1000 300k", "write -z 50M 1M")
    check_clean(img)
    node = await open_image(str(img))
    try:
        assert await node.read(1000, 300 * 1024) == b"\x31" * 300 * 1024
        await node.write(60 * MiB + 17, b"\x32" * 70000)
    finally:
        await close_chain(node)
    check_clean(img)
    qemu_io(img, "read -P 0x32 62914577 70000")


async def test_create_overlay_takes_size_from_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    await create_at(base, 10 * MiB)
    top = tmp_path / "top.qcow2"
    await create_at(top, None, backing="base.qcow2", backing_fmt="qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(top)).stdout)
    assert info["virtual-size"] == 10 * MiB
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    check_clean(top)


@pytest.mark.parametrize(
    ("size", "kwargs", "message"),
    [
        (-512, {}, "multiple of 512"),
        (1000, {}, "multiple of 512"),
        (MiB, {"cluster_size": 3000}, "power of two"),
        (MiB, {"cluster_size": 4 * MiB}, "power of two"),
        (MiB, {"compat": "2.0"}, "compat"),
        (MiB, {"preallocation": "full"}, "preallocation"),
        (1 << 62, {"cluster_size": 512}, "too large"),
        (None, {}, "size is required"),
        (MiB, {"backing": "missing.qcow2"}, "backing"),
    ],
)
async def test_create_refuses_bad_requests(
    tmp_path: Path,
    size: int | None,
    kwargs: dict,  # type: ignore[type-arg]
    message: str,
) -> None:
    with pytest.raises(UsageError, match=message):
        await create_at(tmp_path / "x.qcow2", size, **kwargs)
    assert not (tmp_path / "x.qcow2").exists()


async def test_create_refuses_existing_file_unless_asked(tmp_path: Path) -> None:
    img = tmp_path / "e.qcow2"
    img.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        await create_at(img, MiB)
    assert img.read_bytes() == b"precious"
    await create_at(img, MiB, overwrite=True)
    check_clean(img)


async def test_create_with_force_leaves_the_file_alone_until_the_options_hold(
    tmp_path: Path,
) -> None:
    img = tmp_path / "e.qcow2"
    img.write_bytes(b"precious")
    with pytest.raises(UsageError, match="cluster size"):
        await create_at(img, MiB, overwrite=True, cluster_size=3000)
    assert img.read_bytes() == b"precious"
    fifo = tmp_path / "f.qcow2"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        await create_at(fifo, MiB, overwrite=True)
    assert fifo.exists()


# -- changing the backing file ------------------------------------------------------------------


def info(img: Path) -> dict[str, object]:
    res = qemu_img("info", "--output=json", str(img))
    return dict(json.loads(res.stdout))


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_change_backing_file_rewrites_the_header(tmp_path: Path, compat: str) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    qemu_img("convert", "-O", "raw", str(base), str(tmp_path / "base2.raw"))
    create(top, 4 * MiB, 65536, compat, backing=base)
    qemu_io(top, "write -P 0x22 1M 64k")
    want = to_raw(top, tmp_path)
    node = await open_image(str(top))
    assert isinstance(node, Qcow2Node)
    try:
        with pytest.raises(UsageError, match="backing format needs"):
            await node.change_backing_file(None, "raw")
        await node.change_backing_file("base2.raw", "raw")
        assert node.describe()["backing-filename"] == "base2.raw"
        assert node.describe()["backing-format"] == "raw"
    finally:
        await close_chain(node)
    got = info(top)
    assert got["backing-filename"] == "base2.raw"
    assert got["backing-filename-format"] == "raw"
    check_clean(top)
    assert to_raw(top, tmp_path) == want  # the same disk, through the new backing file
    # and back to no backing file at all: unallocated clusters read as zeroes now
    node = await open_image(str(top))
    assert isinstance(node, Qcow2Node)
    try:
        await node.change_backing_file(None, None)
    finally:
        await close_chain(node)
    got = info(top)
    assert "backing-filename" not in got and "backing-filename-format" not in got
    check_clean(top)
    raw = to_raw(top, tmp_path)
    assert raw[MiB : MiB + 65536] == b"\x22" * 65536 and raw[:MiB] == bytes(MiB)


async def test_change_backing_file_is_refused_where_there_is_none_to_change(
    tmp_path: Path,
) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(bytes(MiB))
    node = await open_image(str(img), fmt="raw")
    try:
        with pytest.raises(UnsupportedFeature):
            await node.change_backing_file("x.qcow2", "qcow2")
    finally:
        await close_chain(node)
    q = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(q), "1M")
    node = await open_image(str(q), read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            await node.change_backing_file("x.qcow2", "qcow2")
    finally:
        await close_chain(node)
    node = await open_image(str(q))
    try:
        with pytest.raises(UsageError, match="do not fit"):
            await node.change_backing_file("x" * 1023, None)
    finally:
        await close_chain(node)
    check_clean(q)


async def test_reopen_of_a_backing_file_writes_and_leaves_no_leaks(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    create(top, 4 * MiB, 65536, "1.1", backing=base)
    node = await open_image(str(top))
    try:
        below = node.backing
        assert isinstance(below, Qcow2Node) and below.read_only
        await below.reopen(False)
        await below.write(MiB, b"\x33" * 70000)  # allocates: a reservation is taken
        await below.reopen(True)
        with pytest.raises(ReadOnlyError):
            await below.write(3 * MiB, b"\x44" * 4096)
        assert await node.read(MiB, 70000) == b"\x33" * 70000
    finally:
        await close_chain(node)
    check_clean(base)  # the unused rest of the reservation was given back at the reopen
    assert to_raw(base, tmp_path)[MiB : MiB + 70000] == b"\x33" * 70000


# -- features we refuse -----------------------------------------------------------------------


async def test_extended_l2_is_refused_by_name(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(img), "1M")
    with pytest.raises(UnsupportedFeature, match="extended L2"):
        await open_image(str(img), read_only=True)


async def test_external_data_file_is_refused_by_name(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'x.data'}", str(img), "1M"
    )
    with pytest.raises(UnsupportedFeature, match="external data file"):
        await open_image(str(img), read_only=True)


def _set_incompatible(img: Path, bits: int) -> None:
    with open(img, "r+b") as f:
        f.seek(72)
        old = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", old | bits))


async def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    _set_incompatible(img, 1 << 40)
    with pytest.raises(UnsupportedFeature, match="unknown incompatible features 0x10000000000"):
        await open_image(str(img), read_only=True)


async def test_dirty_image_opens_read_only_but_not_read_write(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    qemu_io(img, "write -P 0x21 0 64k")
    _set_incompatible(img, 1)
    with pytest.raises(ImageError, match=r"blockfs check -r all"):
        await open_image(str(img))
    node = await open_image(str(img), read_only=True)
    try:
        assert node.describe()["dirty-flag"] is True
        assert await node.read(0, 65536) == b"\x21" * 65536
    finally:
        await close_chain(node)


async def test_small_l2_cache_evicts_and_stays_exact(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # 512-byte clusters: one L2 table maps 32 KiB, so this image has 256 of them; a cache of
    # four tables must evict constantly while reads and writes stay exact.
    import blockfs.nodes.qcow2.node as qcow2_node
    import blockfs.nodes.qcow2.refcount as qcow2_refcount

    monkeypatch.setattr(qcow2_node, "L2_CACHE_BYTES", 0)
    monkeypatch.setattr(qcow2_refcount, "REFBLOCK_CACHE_BYTES", 0)
    rnd = random.Random(77)
    size = 8 * MiB
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), str(size))
    qemu_io(img, *random_patterns(rnd, size, 20, zero=True))
    ref = bytearray(to_raw(img, tmp_path))
    node = await open_image(str(img))
    assert isinstance(node, Qcow2Node)
    try:

        async def writer(k: int) -> None:
            for _ in range(15):
                off = (k * size // 8) + rnd.randrange(0, size // 8 - 70000)
                data = rnd.randbytes(rnd.randrange(1, 70000))
                await node.write(off, data)
                ref[off : off + len(data)] = data
                assert len(node.l2_cache) <= 4 + 8  # cap, plus tables pinned by writers

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(writer, k)
        assert await read_all(node, size, rnd) == bytes(ref)
        assert len(node.l2_cache) <= 4
    finally:
        await close_chain(node)
    judge(img, ref, tmp_path)


async def test_mapped_read_is_one_child_read(tmp_path: Path) -> None:
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_io(img, "write -P 0x71 0 4M")  # sequential: host clusters are contiguous
    node = await open_image(str(img), read_only=True)
    assert isinstance(node, Qcow2Node)
    try:
        await node.read(0, 512)  # loads the L2 table
        calls: list[tuple[int, int]] = []
        real_read = node.child.read

        async def counting_read(offset: int, length: int) -> bytes:
            calls.append((offset, length))
            return await real_read(offset, length)

        node.child.read = counting_read  # type: ignore[method-assign]
        assert await node.read(12345, 3 * MiB) == b"\x71" * 3 * MiB
        assert await node.read(100, 4000) == b"\x71" * 4000
        assert len(calls) == 2 and calls[0][1] == 3 * MiB
    finally:
        await close_chain(node)


async def test_preallocated_zero_cluster_reads_zero_and_is_rewritten_exactly(
    tmp_path: Path,
) -> None:
    img = tmp_path / "pz.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    # cluster 0: zero flag with its host cluster kept; cluster 1: zero flag, unmapped
    qemu_io(img, "write -P 0x11 0 256k", "write -z 0 64k", "write -z -u 64k 64k")
    m = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    assert m[0]["zero"] and "offset" in m[0]  # the case under test exists
    node = await open_image(str(img))
    try:
        assert await node.read(0, 128 * 1024) == bytes(128 * 1024)
        # two runs of zeroes: the preallocated cluster (with its host offset, as qemu-img map
        # shows it), then the unmapped one
        ext = await node.block_status(0, MiB)
        assert ext.status == Status.ZERO | Status.ALLOCATED and ext.length == 64 * 1024
        assert ext.host == m[0]["offset"]
        ext = await node.block_status(64 * 1024, MiB)
        assert ext.status == Status.ZERO | Status.ALLOCATED and ext.length == 64 * 1024
        assert ext.host is None
        await node.write(1000, b"\x22" * 100)  # the rest of the cluster must stay zero
        assert await node.read(0, 65536) == bytes(1000) + b"\x22" * 100 + bytes(64436)
    finally:
        await close_chain(node)
    check_clean(img)
    qemu_io(img, "read -P 0 0 1000", "read -P 0x22 1000 100", "read -P 0 1100 129972")
