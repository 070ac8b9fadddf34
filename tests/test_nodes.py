"""The file and raw nodes on their own: concurrency, holes, zeroes, spec parsing."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from blockfs.errors import UsageError
from blockfs.imagespec import parse_image_spec
from blockfs.nodes.base import Status, chain_block_status
from blockfs.nodes.file import FileNode
from blockfs.nodes.registry import close_chain, open_image
from blockfs.nodes.threads import IoThreadPool
from blockfs.values import parse_size


async def test_pool_runs_calls_at_the_same_time() -> None:
    # Two calls that each wait for the other: they only finish if the pool overlaps them.
    pool = IoThreadPool(4)
    barrier = threading.Barrier(2, timeout=10)
    results: list[int] = []

    def meet(i: int) -> int:
        barrier.wait()  # raises BrokenBarrierError after 10 s if the other call never comes
        return i

    async def one(i: int) -> None:
        results.append(await pool.run(meet, i))

    async with trio.open_nursery() as n:
        n.start_soon(one, 1)
        n.start_soon(one, 2)
    assert sorted(results) == [1, 2]
    pool.close()


async def test_an_idle_pool_thread_keeps_nothing_alive() -> None:
    """A pool thread drops its last call, arguments and result once it has handed them
    over: idle threads holding their last 1 MiB read each were +24 MiB of peak RSS."""
    import gc
    import weakref

    class Big:
        pass

    pool = IoThreadPool(4)
    refs: list[weakref.ref[Big]] = []
    args: list[weakref.ref[Big]] = []

    def call(arg: Big) -> Big:
        out = Big()
        refs.append(weakref.ref(out))
        return out

    for _ in range(16):
        arg = Big()
        args.append(weakref.ref(arg))
        await pool.run(call, arg)
        del arg
    await trio.sleep(0.05)  # the last thread is past its hand-over
    gc.collect()
    assert [r() for r in refs + args] == [None] * 32
    pool.close()


async def test_pool_passes_exceptions_back() -> None:
    pool = IoThreadPool(1)
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 // 0)
    pool.close()


@pytest.mark.parametrize("mode", ["hybrid", "inline", "threads"])
async def test_file_node_io_modes_agree(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(1 << 20))
    node = await FileNode.open(str(p), mode=mode)
    try:
        await node.write(4096, b"abc" * 1000)
        assert await node.read(4096, 3000) == b"abc" * 1000
        assert await node.read(0, 4096) == p.read_bytes()[:4096]
    finally:
        await node.aclose()


async def test_large_reads_come_from_the_page_cache_or_the_pool(tmp_path: Path) -> None:
    """A large read is one non-blocking copy from the page cache into a new bytes object when
    every page is there; when it would block (pages dropped) or comes short (past the end),
    the pool reads it, and the bytes are the same either way."""
    from blockfs.nodes.file import _pread_nowait

    p = tmp_path / "f"
    data = os.urandom(8 << 20)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)  # cached
        assert _pread_nowait(fd, 1 << 20, 1 << 20) == data[1 << 20 : 2 << 20]
        assert _pread_nowait(fd, 1 << 20, len(data) - 4096) is None  # short: past the end
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages dropped
        assert _pread_nowait(fd, 1 << 20, 2 << 20) is None  # would block
    finally:
        os.close(fd)
    node = await FileNode.open(str(p), mode="hybrid")
    try:
        assert await node.read(2 << 20, 1 << 20) == data[2 << 20 : 3 << 20]  # through the pool
        assert await node.read(2 << 20, 1 << 20) == data[2 << 20 : 3 << 20]  # cached now
        assert node.io is not None and node.io.rd_operations == 2
        # beyond 4 MiB never copied in the event loop, cached or not: the pool reads it
        assert await node.read(0, len(data)) == data  # all cached now
        assert node._read_cached(4 << 20, 0) == data[: 4 << 20]
        assert node._read_cached((4 << 20) + 1, 0) is None
    finally:
        await node.aclose()


def test_dirty_gauge_keeps_large_writes_off_the_loop_near_throttling() -> None:
    """Large writes stay in the event loop only while dirty pages are far below the point
    where the kernel throttles writers; with thresholds of a few bytes they go to the pool."""
    from blockfs.nodes import file as file_mod

    class Tight(file_mod._DirtyGauge):
        @staticmethod
        def _sysctl(name: str) -> int:
            return {"dirty_bytes": 1, "dirty_background_bytes": 1}.get(name, 0)

    class Roomy(file_mod._DirtyGauge):
        @staticmethod
        def _sysctl(name: str) -> int:
            return {"dirty_bytes": 1 << 60, "dirty_background_bytes": 1 << 60}.get(name, 0)

    class Broken(file_mod._DirtyGauge):
        @staticmethod
        def _sysctl(name: str) -> int:
            raise OSError("no /proc")

    assert Roomy().room(0.0) is True
    assert Broken().room(0.0) is False  # what cannot be read sends writes to the pool
    tight = Tight()
    assert tight.room(0.0) is False  # no room below a threshold of a byte
    # read again only after the period
    tight._ok = True
    assert tight.room(0.01) is True and tight.room(1.0) is False


@pytest.mark.parametrize("room", [True, False])
async def test_large_writes_land_in_the_loop_or_the_pool(
    tmp_path: Path, room: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockfs.nodes import file as file_mod

    monkeypatch.setattr(file_mod._DIRTY, "room", lambda now: room)
    p = tmp_path / "f"
    p.write_bytes(bytes(4 << 20))
    data = os.urandom(1 << 20)
    node = await FileNode.open(str(p), mode="hybrid")
    try:
        await node.write(1 << 20, data)
        await node.flush()
    finally:
        await node.aclose()
    assert p.read_bytes()[1 << 20 : 2 << 20] == data


async def test_concurrent_reads_and_writes_overlap(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(1 << 22))
    node = await FileNode.open(str(p), mode="threads")
    try:
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(node.write, i * 65536, bytes([i]) * 65536)
        async with trio.open_nursery() as n:
            for i in range(64):

                async def check(i: int = i) -> None:
                    assert await node.read(i * 65536, 65536) == bytes([i]) * 65536

                n.start_soon(check)
    finally:
        await node.aclose()


async def test_holes_read_as_zero_and_report_as_zero(tmp_path: Path) -> None:
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"x" * 65536)
    node = await open_image(str(p))
    try:
        ext = await chain_block_status(node, 0, 8 << 20)
        assert ext.status & Status.ZERO and ext.length == 4 << 20
        ext = await chain_block_status(node, 4 << 20, 4 << 20)
        assert ext.status & Status.DATA and ext.length >= 65536
        await node.write_zeroes(4 << 20, 65536, may_unmap=True)
        assert await node.read(4 << 20, 65536) == bytes(65536)
    finally:
        await close_chain(node)


def test_spec_parsing() -> None:
    s = parse_image_spec("disk0=/srv/a.img,format=raw,read-only=on")
    assert (s.name, s.path, s.format, s.read_only) == ("disk0", "/srv/a.img", "raw", True)
    assert parse_image_spec("/srv/b.qcow2").name == "b.qcow2"
    assert parse_image_spec("/srv/x=y.img").path == "/srv/x=y.img"
    assert parse_image_spec("d=/srv/a,,b.img").path == "/srv/a,b.img"
    for bad in ["d=/x,foo=1", "d=/x,format", ".d=/x", "d=", "d=/x,format=raw,format=raw"]:
        with pytest.raises(UsageError):
            parse_image_spec(bad)


def test_sizes() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5M") == 3 << 19
    assert parse_size("2MiB") == 2 << 20
    for bad in ["", "ten", "-1", "1.0000001K", "5Q"]:
        with pytest.raises(UsageError):
            parse_size(bad)
