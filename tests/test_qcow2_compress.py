"""Compressed-cluster writing in the qcow2 node (``Qcow2Node.write_compressed``), with qemu-img
as the oracle: after the writes ``qemu-img check`` is clean (no errors, no leaks), ``qemu-img
compare`` agrees with a raw file that got the same bytes, the clusters that compress are stored
compressed (``check`` counts them; QEMU 7.2's ``map`` prints no host offset for them) and the
image is much smaller than the data written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio

from blockfs.errors import ReadOnlyError, UsageError
from blockfs.nodes.base import Capability
from blockfs.nodes.qcow2 import Qcow2Node
from blockfs.nodes.registry import close_chain, open_image
from conftest import qemu_img

KiB = 1024
MiB = 1024 * KiB


def create(img: Path, size: int, cluster_size: int, *opts: str) -> None:
    o = ",".join([f"cluster_size={cluster_size}", *opts])
    qemu_img("create", "-q", "-f", "qcow2", "-o", o, str(img), str(size))


def check_json(img: Path) -> dict[str, int]:
    """``qemu-img check``: exit 0 is no corruption and no leaks."""
    res = qemu_img("check", "--output=json", str(img), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out: dict[str, int] = json.loads(res.stdout)
    assert out["check-errors"] == 0
    assert "leaks" not in out and "corruptions" not in out, out
    return out


def compare(img: Path, ref: bytes, tmp: Path) -> None:
    raw = tmp / (img.name + ".ref")
    raw.write_bytes(ref)
    res = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(raw), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def compressed_clusters(img: Path, cluster_size: int) -> dict[int, bool]:
    """Guest cluster -> stored compressed, for the clusters holding data. QEMU 7.2's ``map``
    has no ``compressed`` key; it gives no host ``offset`` for compressed data."""
    out = {}
    for e in json.loads(qemu_img("map", "--output=json", str(img)).stdout):
        if e["data"]:
            for c in range(
                e["start"] // cluster_size, -(-(e["start"] + e["length"]) // cluster_size)
            ):
                out[c] = "offset" not in e
    return out


def text(seed: int, n: int) -> bytes:
    """Compresses well, but not to a constant (decompression must be exact)."""
    rnd = random.Random(seed)
    words = [b"qcow2", b"cluster", b"refcount", b"backup", b"sector", b"compressed", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += b"%d %s " % (len(out), rnd.choice(words))
    return bytes(out[:n])


def cluster_data(kind: str, seed: int, n: int) -> bytes:
    if kind == "text":
        return text(seed, n)
    if kind == "random":
        return random.Random(seed).randbytes(n)
    if kind == "zero":
        return bytes(n)
    return bytes([seed & 0xFF, 0x5A]) * (n // 2)  # "repeat"


KINDS = ["text", "random", "zero", "repeat", "text"]


async def open_qcow2(img: Path) -> Qcow2Node:
    node = await open_image(str(img))
    assert isinstance(node, Qcow2Node)
    return node


@pytest.mark.parametrize(
    ("cluster_size", "clusters", "ctype"),
    [
        (4 * KiB, 160, "zlib"),
        (4 * KiB, 160, "zstd"),
        (64 * KiB, 40, "zlib"),
        (64 * KiB, 40, "zstd"),
        (2 * MiB, 20, "zlib"),
        (2 * MiB, 20, "zstd"),
    ],
)
async def test_mixed_clusters_are_packed_and_qemu_reads_them(
    tmp_path: Path, cluster_size: int, clusters: int, ctype: str
) -> None:
    cs = cluster_size
    size = clusters * cs - cs // 4  # a short last cluster, padded for compression
    img = tmp_path / "c.qcow2"
    create(img, size, cs, f"compression_type={ctype}")
    ref = bytearray(size)
    kinds = [KINDS[i % len(KINDS)] for i in range(clusters)]
    kinds[-1] = "text"
    order = list(range(clusters))
    random.Random(cs).shuffle(order)
    node = await open_qcow2(img)
    try:
        assert Capability.COMPRESSED_WRITES in node.capabilities
        for i in order:
            off = i * cs
            data = cluster_data(kinds[i], i, min(cs, size - off))
            await node.write_compressed(off, data)
            ref[off : off + len(data)] = data
        assert await node.read(0, size) == bytes(ref)
    finally:
        await close_chain(node)
    info = check_json(img)
    compare(img, bytes(ref), tmp_path)
    assert json.loads(qemu_img("info", "--output=json", str(img)).stdout)["format-specific"][
        "data"
    ]["compression-type"] == (ctype)
    n_random = kinds.count("random")
    assert info["compressed-clusters"] == clusters - n_random
    assert compressed_clusters(img, cs) == {i: k != "random" for i, k in enumerate(kinds)}
    # The compressible clusters take a fraction of their size: the disk holds little more than
    # the random clusters and the metadata (header, L1, refcount table and block, L2).
    compressible = (clusters - n_random) * cs
    disk = json.loads(qemu_img("info", "--output=json", str(img)).stdout)["actual-size"]
    assert disk <= (n_random + 6) * cs + compressible // 3
    assert info["image-end-offset"] < clusters * cs - compressible // 3
    # ... and not much more than what qemu-img itself makes of the same data (it packs at byte
    # granularity, not in sectors, and does not store zero clusters at all).
    qref = tmp_path / "q.qcow2"
    raw = tmp_path / "c.qcow2.ref"
    o = f"cluster_size={cs},compression_type={ctype}"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, str(raw), str(qref))
    qdisk = json.loads(qemu_img("info", "--output=json", str(qref)).stdout)["actual-size"]
    check_json(qref)
    assert disk <= qdisk * 1.1 + (clusters - n_random) * 512 + 2 * cs


async def test_reopened_image_reads_what_was_compressed(tmp_path: Path) -> None:
    cs = 64 * KiB
    img = tmp_path / "c.qcow2"
    create(img, 4 * MiB, cs)
    node = await open_qcow2(img)
    try:
        for i in range(8):
            await node.write_compressed(i * cs, text(i, cs))
    finally:
        await close_chain(node)
    node = await open_qcow2(img)
    try:
        for i in range(8):
            assert await node.read(i * cs, cs) == text(i, cs)
        assert await node.read(8 * cs, cs) == bytes(cs)
    finally:
        await close_chain(node)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_overwriting_allocated_clusters_releases_the_old_space(
    tmp_path: Path, compat: str
) -> None:
    cs = 64 * KiB
    size = 32 * cs
    img = tmp_path / "c.qcow2"
    create(img, size, cs, f"compat={compat}")
    ref = bytearray(size)
    node = await open_qcow2(img)
    try:

        async def write(off: int, data: bytes) -> None:
            await node.write(off, data)
            ref[off : off + len(data)] = data

        async def write_compressed(i: int, data: bytes) -> None:
            await node.write_compressed(i * cs, data)
            ref[i * cs : (i + 1) * cs] = data

        await write(0, random.Random(1).randbytes(8 * cs))  # clusters 0..7: plain data
        if compat == "1.1":
            await node.write_zeroes(2 * cs, cs)  # a zero cluster that keeps its host cluster
            ref[2 * cs : 3 * cs] = bytes(cs)
        await write_compressed(0, text(0, cs))  # data -> compressed
        await write_compressed(2, text(2, cs))  # (preallocated) zero -> compressed
        for rnd in range(3):  # compressed -> compressed, sharing host clusters with others
            for i in (1, 3, 4, 5):
                await write_compressed(i, text(10 * rnd + i, cs))
        await write_compressed(3, random.Random(3).randbytes(cs))  # compressed -> plain data
        await write(4 * cs + 1000, b"partial rewrite of a compressed cluster")
        await node.write_zeroes(5 * cs, cs)  # compressed -> zero
        ref[5 * cs : 6 * cs] = bytes(cs)
        await write_compressed(6, bytes(cs))  # data -> compressed zeroes
        await node.discard(1 * cs, cs)  # compressed -> unallocated
        ref[cs : 2 * cs] = bytes(cs)
        assert await node.read(0, size) == bytes(ref)
    finally:
        await close_chain(node)
    info = check_json(img)
    compare(img, bytes(ref), tmp_path)
    assert info["compressed-clusters"] == 3  # clusters 0, 2 and 6
    stored = compressed_clusters(img, cs)
    assert {i: stored[i] for i in (0, 2, 3, 4, 6, 7)} == {
        0: True,
        2: True,
        3: False,
        4: False,
        6: True,
        7: False,
    }
    assert 1 not in stored and 5 not in stored  # discarded, zeroed


async def test_normal_and_compressed_writes_interleave(tmp_path: Path) -> None:
    cs = 64 * KiB
    size = 48 * cs
    img = tmp_path / "c.qcow2"
    create(img, size, cs, "compression_type=zstd")
    ref = bytearray(size)
    rnd = random.Random(7)
    node = await open_qcow2(img)
    try:
        for step in range(200):
            i = rnd.randrange(48)
            if rnd.random() < 0.5:
                data = cluster_data(rnd.choice(KINDS), step, cs)
                await node.write_compressed(i * cs, data)
                ref[i * cs : (i + 1) * cs] = data
            else:
                off = rnd.randrange(size - 1)
                n = min(rnd.randrange(1, 3 * cs), size - off)
                data = rnd.randbytes(n) if rnd.random() < 0.5 else text(step, n)
                await node.write(off, data)
                ref[off : off + n] = data
            if step % 50 == 49:
                assert await node.read(0, size) == bytes(ref)
    finally:
        await close_chain(node)
    check_json(img)
    compare(img, bytes(ref), tmp_path)


@pytest.mark.parametrize(
    ("cluster_size", "opts"),
    [(4 * KiB, ()), (64 * KiB, ()), (64 * KiB, ("refcount_bits=1",))],
)
async def test_concurrent_compressed_writes_pack_safely(
    tmp_path: Path, cluster_size: int, opts: tuple[str, ...]
) -> None:
    # refcount_bits=1: a host cluster can never be shared by two compressed clusters
    cs = cluster_size
    clusters = 256
    size = clusters * cs
    img = tmp_path / "c.qcow2"
    create(img, size, cs, *opts)
    ref = bytearray(size)
    node = await open_qcow2(img)
    try:

        async def worker(w: int) -> None:
            for i in range(w, clusters, 32):
                data = cluster_data(KINDS[(i // 32) % len(KINDS)], i, cs)
                if i % 7 == 0:
                    await node.write(i * cs, data)  # allocations interleave with packing
                else:
                    await node.write_compressed(i * cs, data)
                ref[i * cs : (i + 1) * cs] = data
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for w in range(32):
                nursery.start_soon(worker, w)
        # the same clusters again, concurrently: old compressed clusters are released
        async with trio.open_nursery() as nursery:
            for w in range(0, 32, 2):
                nursery.start_soon(worker, w)
        assert await node.read(0, size) == bytes(ref)
    finally:
        await close_chain(node)
    check_json(img)
    compare(img, bytes(ref), tmp_path)


async def test_a_kill_leaves_only_leaks(tmp_path: Path) -> None:
    """Before close, the surplus references of the open compressed area are leaks (which
    ``qemu-img check -r leaks`` repairs), never corruption."""
    cs = 4 * KiB
    img = tmp_path / "c.qcow2"
    create(img, 1 * MiB, cs)
    node = await open_qcow2(img)
    try:
        for i in range(20):
            await node.write_compressed(i * cs, text(i, cs))
        res = qemu_img("check", "-U", "--output=json", str(img), check=False)
        out = json.loads(res.stdout)
        assert res.returncode == 3 and out.get("leaks", 0) > 0, res.stdout + res.stderr
        assert out["check-errors"] == 0 and "corruptions" not in out, out
    finally:
        await close_chain(node)
    check_json(img)


async def test_contract_is_checked(tmp_path: Path) -> None:
    cs = 64 * KiB
    img = tmp_path / "c.qcow2"
    create(img, 1 * MiB, cs)
    node = await open_qcow2(img)
    try:
        with pytest.raises(UsageError):
            await node.write_compressed(512, bytes(cs))
        with pytest.raises(UsageError):
            await node.write_compressed(0, bytes(cs - 1))
        with pytest.raises(UsageError):
            await node.write_compressed(1 * MiB, bytes(cs))
    finally:
        await close_chain(node)
    node = await open_image(str(img), read_only=True)
    try:
        assert isinstance(node, Qcow2Node)
        with pytest.raises(ReadOnlyError):
            await node.write_compressed(0, bytes(cs))
    finally:
        await close_chain(node)
    check_json(img)
