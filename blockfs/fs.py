"""The FUSE filesystem: pyfuse3 ``Operations`` over a :class:`VirtualTree`.

The root directory holds one regular file per image (an :class:`ImageFile`, served by its
:class:`Export`) and the hidden ``.control`` directory. This module maps inodes to tree objects,
and it is the one place where blockfs errors become ``pyfuse3.FUSEError``: nothing below raises
FUSE errors, and no exception other than FUSEError may escape a handler (pyfuse3 would end the
main loop).

The handle of an open image file is its inode, so the read and write path is one dict lookup
and one call; control files get a handle of their own holding the snapshot they render.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pyfuse3

from blockfs.control.tree import VDir, VFile, VirtualTree
from blockfs.errors import BlockfsError
from blockfs.export import Export

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: st_blocks is recomputed at most this often per image (it walks allocation metadata)
_ALLOC_CACHE_NS = 1_000_000_000


class ImageFile(VFile):
    """The file of one export under the mountpoint."""

    def __init__(self, export: Export) -> None:
        super().__init__(export.name)
        self.export = export
        self.mode = stat.S_IFREG | (0o444 if export.read_only else 0o644)
        self._alloc = 0
        self._alloc_at = 0


class _ControlHandle:
    __slots__ = ("file", "content", "reply", "reply_pos")

    def __init__(self, file: VFile, content: bytes) -> None:
        self.file = file
        self.content = content
        self.reply: bytes | None = None  # what a write answered; reads then return it
        self.reply_pos = 0


def _fuse_errors(
    fn: Callable[..., Coroutine[Any, Any, _T]],
) -> Callable[..., Coroutine[Any, Any, _T]]:
    """Translate every exception of a (non hot-path) handler into a FUSEError."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> _T:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except BlockfsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class BlockfsOperations(pyfuse3.Operations):
    def __init__(self, tree: VirtualTree) -> None:
        super().__init__()
        self.tree = tree
        self._exports: dict[int, Export] = {}  # inode (= handle) -> export
        self._handles: dict[int, _ControlHandle] = {}
        self._next_fh = 1 << 32  # control handles never collide with inodes
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._start_ns = time.time_ns()

    # -- the tree ---------------------------------------------------------------------------

    def add_image(self, parent: VDir, export: Export) -> ImageFile:
        node = ImageFile(export)
        self.tree.add(parent, node)
        self._exports[node.inode] = export
        return node

    def remove_image(self, node: ImageFile) -> None:
        parent = node.parent
        self.tree.remove(node)
        # Open handles keep working until released; new opens cannot find the name once the
        # kernel forgets the entry it cached.
        if parent is not None:
            pyfuse3.invalidate_entry_async(parent.inode, os.fsencode(node.name), ignore_enoent=True)

    def _node(self, inode: int) -> Any:
        try:
            return self.tree.by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def _attrs(self, node: Any) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_blksize = 65536
        if isinstance(node, ImageFile):
            export = node.export
            a.st_nlink = 1
            a.st_size = export.root.size
            now = time.monotonic_ns()
            if now - node._alloc_at > _ALLOC_CACHE_NS:
                try:
                    node._alloc = await export.allocated_bytes()
                except BlockfsError:
                    node._alloc = export.root.size
                node._alloc_at = now
            a.st_blocks = (node._alloc + 511) // 512
            a.st_mtime_ns = export.mtime_ns
            a.st_ctime_ns = export.mtime_ns
            a.st_atime_ns = export.mtime_ns
            # Attributes change only through this daemon (writes invalidate them in the
            # kernel); names come and go (backup views), so entries are kept briefly.
            a.attr_timeout = 60
            a.entry_timeout = 1
        else:
            a.st_nlink = 2 if isinstance(node, VDir) else 1
            a.st_size = 0
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self._start_ns
            a.attr_timeout = 0
            a.entry_timeout = 0
        return a

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return await self._attrs(self._node(inode))

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, VDir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        sname = os.fsdecode(name)
        if sname == ".":
            return await self._attrs(parent)
        if sname == "..":
            return await self._attrs(parent.parent or parent)
        child = parent.children.get(sname)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attrs(child)

    @_fuse_errors
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        # Behave as a block device: a size change (O_TRUNC of `cp`, `dd` without notrunc) is
        # ignored, the disk keeps its size; modes, owners and times are not stored.
        node = self._node(inode)
        if isinstance(node, ImageFile) and fields.update_size and node.export.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        return await self._attrs(node)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not isinstance(self._node(inode), VDir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        node = self._node(fh)
        assert isinstance(node, VDir)
        entries = sorted(node.children.values(), key=lambda n: n.inode)
        for child in entries:
            if child.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(
                token, os.fsencode(child.name), await self._attrs(child), child.inode
            ):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    @_fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        total = sum(e.root.size for e in self._exports.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.by_inode)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- opening and closing ----------------------------------------------------------------

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, VDir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        wants_write = flags & os.O_ACCMODE != os.O_RDONLY
        if isinstance(node, ImageFile):
            if wants_write and node.export.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            # direct_io, as qemu-storage-daemon's export does: no second copy of the data in
            # the FUSE file's page cache (the image file has its own), nothing acknowledged
            # that sits only in the kernel, and no GETATTR before every read after a write
            # (the kernel's auto_inval_data check, which pyfuse3 cannot turn off): measured,
            # mixed 4k random I/O 1.75x faster.
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        if wants_write and not node.writable:
            raise pyfuse3.FUSEError(errno.EACCES)
        content = b"" if wants_write else await node.render()
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _ControlHandle(node, content)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def flush(self, fh: int) -> None:
        pass  # close() is not fsync(); data already reached the image at each write

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        export = self._exports.get(fh)
        if export is not None:
            await export.flush()

    # -- data -------------------------------------------------------------------------------

    async def read(self, fh: int, off: int, size: int) -> bytes:
        export = self._exports.get(fh)
        if export is not None:
            try:
                return await export.read(off, size)
            except BlockfsError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                log.exception("read of %s at %d+%d failed", export.name, off, size)
                raise pyfuse3.FUSEError(errno.EIO) from None
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.reply is not None:
            # The answer to a write is read from the same open file, whose offset is past what
            # was written: serve it from its own start, whatever the offset.
            data = handle.reply[handle.reply_pos : handle.reply_pos + size]
            handle.reply_pos += len(data)
            return data
        return handle.content[off : off + size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        export = self._exports.get(fh)
        if export is not None:
            try:
                return await export.write(off, buf)
            except BlockfsError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except Exception:
                log.exception("write of %s at %d+%d failed", export.name, off, len(buf))
                raise pyfuse3.FUSEError(errno.EIO) from None
        handle = self._handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            reply = await handle.file.write(bytes(buf))
        except BlockfsError as exc:
            handle.reply = (str(exc) + "\n").encode()
            handle.reply_pos = 0
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            log.exception("write to control file %s failed", handle.file.name)
            handle.reply = f"internal error: {exc}\n".encode()
            handle.reply_pos = 0
            raise pyfuse3.FUSEError(errno.EIO) from None
        handle.reply = reply
        handle.reply_pos = 0
        return len(buf)
