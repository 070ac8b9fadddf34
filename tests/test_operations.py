"""The FUSE operations called directly, without a mount: image files and control files
opened, read, written and released as the kernel would, on in-memory images. The daemon
builds the tree (the same code a mount runs) and is the jobs' host."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from memnode import MemoryNode, pattern

from blockfs.config import MountConfig
from blockfs.daemon import Daemon
from blockfs.export import Export
from blockfs.fs import BlockfsOperations

CS = 65536
SIZE = 16 * CS
CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)


class Fs:
    """Paths over the Operations, as the kernel would walk them."""

    def __init__(self, ops: BlockfsOperations) -> None:
        self.ops = ops

    async def inode(self, path: str) -> int:
        inode = pyfuse3.ROOT_INODE
        for part in path.split("/"):
            inode = (await self.ops.lookup(inode, part.encode(), CTX)).st_ino
        return inode

    async def open(self, path: str, flags: int) -> int:
        info = await self.ops.open(await self.inode(path), flags, CTX)
        return int(info.fh)

    async def cat(self, path: str) -> bytes:
        fh = await self.open(path, os.O_RDONLY)
        try:
            return await self.ops.read(fh, 0, 1 << 20)
        finally:
            await self.ops.release(fh)

    async def echo(self, path: str, text: str) -> bytes:
        """Write, then read the answer from the same open file; the errno of a refusal is
        raised as FUSEError after the answer is kept in ``self.answer``."""
        fh = await self.open(path, os.O_RDWR)
        try:
            try:
                await self.ops.write(fh, 0, text.encode())
            finally:
                self.answer = await self.ops.read(fh, len(text), 4096)
            return self.answer
        finally:
            await self.ops.flush(fh)
            await self.ops.release(fh)


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Fs, MemoryNode]]:
    daemon = Daemon(MountConfig(mountpoint=str(tmp_path), images=[]))
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    daemon.exports["disk"] = Export("disk", disk)
    daemon.build_tree()
    async with trio.open_nursery() as nursery:
        daemon.nursery = nursery
        yield daemon, Fs(daemon.ops), disk
        await daemon.jobs.aclose()
        nursery.cancel_scope.cancel()


async def test_image_file_reads_and_writes_reach_the_node(
    mounted: tuple[Daemon, Fs, MemoryNode],
) -> None:
    _daemon, fs, disk = mounted
    attrs = await fs.ops.getattr(await fs.inode("disk"), CTX)
    assert attrs.st_size == SIZE
    fh = await fs.open("disk", os.O_RDWR)
    assert await fs.ops.write(fh, 4096, b"hello") == 5
    assert await fs.ops.read(fh, 4096, 5) == b"hello"
    assert bytes(disk.data[4096:4101]) == b"hello"
    assert await fs.ops.read(fh, SIZE, 10) == b""  # past the end: empty
    with pytest.raises(pyfuse3.FUSEError) as err:
        await fs.ops.write(fh, SIZE, b"x")
    assert err.value.errno == errno.ENOSPC
    await fs.ops.fsync(fh, False)
    await fs.ops.release(fh)
    stats = json.loads(await fs.cat(".control/images/disk/stats"))
    assert stats["wr_bytes"] == 5 and stats["rd_operations"] == 1  # past the end: none


async def test_a_backup_started_and_dismissed_through_control_files(
    mounted: tuple[Daemon, Fs, MemoryNode], tmp_path: Path
) -> None:
    daemon, fs, disk = mounted
    target = tmp_path / "out" / "t.raw"
    target.parent.mkdir()
    assert await fs.echo(".control/jobs/backup", f"device=disk target={target} format=raw\n") == (
        b"disk\n"
    )
    job = daemon.jobs.jobs["disk"]
    await job.wait_concluded()
    status = json.loads(await fs.cat(".control/jobs/disk/status"))
    assert status["state"] == "concluded" and status["error"] is None
    assert target.read_bytes() == bytes(disk.data)
    assert await fs.echo(".control/jobs/disk/ctl", "dismiss\n") == b"ok\n"
    with pytest.raises(pyfuse3.FUSEError):
        await fs.inode(".control/jobs/disk")
    events = [json.loads(line)["event"] for line in (await fs.cat(".control/events")).split(b"\n")
              if line]  # fmt: skip
    assert "BLOCK_JOB_COMPLETED" in events


async def test_a_refused_spec_fails_the_write_and_the_same_file_says_why(
    mounted: tuple[Daemon, Fs, MemoryNode], tmp_path: Path
) -> None:
    daemon, fs, _disk = mounted
    with pytest.raises(pyfuse3.FUSEError) as err:
        await fs.echo(".control/jobs/backup", f"device=nope target={tmp_path}/t\n")
    assert err.value.errno == errno.ENOENT
    assert fs.answer == b"no device 'nope'\n"
    with pytest.raises(pyfuse3.FUSEError) as err:
        await fs.echo(".control/jobs/backup", "device=disk target=/t colour=red\n")
    assert err.value.errno == errno.EINVAL
    assert b"unknown key 'colour'" in fs.answer
    assert not daemon.jobs.jobs and not list(tmp_path.glob("*.part"))
