"""The floor: the thinnest pyfuse3 file system there can be, one file over one raw image.

Its read and write are one ``os.pread`` / ``os.pwrite`` each, in the event loop, with
``direct_io``; nothing else happens per request. Whatever blockfs does beyond this costs
blockfs's own code; what this costs is pyfuse3's request loop and the kernel. The benchmark
reports blockfs / floor beside blockfs / qemu-storage-daemon (issue 17: blockfs / floor >= 0.95
on every line is the standing rule for blockfs's own code).

    python -m benchmarks.floorfs IMAGE MNT [MAX_TASKS]   # serves MNT/disk until unmounted

``MAX_TASKS`` is pyfuse3's ``max_tasks`` (default its own, 99): the worker tasks that read and
serve requests.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
DISK = ROOT + 1
NAME = b"disk"


class Floor(pyfuse3.Operations):  # type: ignore[misc]
    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self.fd = fd
        self.size = size

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == ROOT:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o644, self.size, 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.attr_timeout = a.entry_timeout = 3600
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (ROOT, DISK):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent != ROOT or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(DISK)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(DISK), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != DISK:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=DISK, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fsync(self.fd)

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)  # the size is the image's: nothing changes


def main() -> int:
    image, mountpoint = sys.argv[1:3]
    max_tasks = int(sys.argv[3]) if len(sys.argv) > 3 else 99
    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size
    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floorfs"}
    pyfuse3.init(Floor(fd, size), mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(lambda: pyfuse3.main(min_tasks=1, max_tasks=max_tasks))
    finally:
        pyfuse3.close(unmount=True)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
