"""The FUSE filesystem: pyfuse3 ``Operations`` over a :class:`VirtualTree`.

The root directory holds one regular file per image (an :class:`ImageFile`, served by its
:class:`Export`) and the hidden ``.control`` directory. This module maps inodes to tree objects,
and it is the one place where blockfs errors become ``pyfuse3.FUSEError``: nothing below raises
FUSE errors, and no exception other than FUSEError may escape a handler (pyfuse3 would end the
main loop).

The handle of an open image file is its inode, so the read and write path is one dict lookup
and one call; control files get a handle of their own holding the snapshot they render.

Image files show their image file's owner, group and mode (``--uid``/``--gid``/``--mode``
override; a read-only image loses its write bits), and the kernel enforces them (pyfuse3 mounts
with ``default_permissions``), so ``--allow-other`` shows a 0600 disk to its owner only.

Control handles are bounded per user (the caller's uid): at most :data:`MAX_CONTROL_HANDLES`
open, holding at most :data:`MAX_CONTROL_BYTES` of snapshots and gathered writes; handles of one
file share its rendering while the source's :meth:`VFile.version` is unchanged, and shared
content counts once. Beyond a limit ``open`` fails with EMFILE and a write with EDQUOT.

A write to a control file is gathered per handle and acted on when it is whole: a ``key=value``
spec (or verb) when a write ends with a newline, a JSON spec as soon as it parses (or, at a
write ending with a newline, cannot parse whatever follows), anything else at ``close``: FUSE
``flush``, whose error ``close(2)`` returns; what is left at ``release`` is acted on too.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pyfuse3

from blockfs.control.tree import (
    MAX_CONTROL_BYTES,
    MAX_CONTROL_HANDLES,
    ROOT_INODE,
    VDir,
    VFile,
    VirtualTree,
)
from blockfs.errors import BlockfsError
from blockfs.export import Export
from blockfs.nodes.registry import protocol_file
from blockfs.values import MAX_SPEC_BYTES

log = logging.getLogger(__name__)

assert ROOT_INODE == pyfuse3.ROOT_INODE, "the control tree's root inode must be FUSE's"

_T = TypeVar("_T")

#: st_blocks is recomputed at most this often per image (it walks allocation metadata)
_ALLOC_CACHE_NS = 1_000_000_000
#: handles of control files start here, so they never collide with inodes (image handles)
_CONTROL_FH_BASE = 1 << 32


def _invalidate_entry(parent: int, name: bytes) -> None:
    pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)


class ImageFile(VFile):
    """The file of one export under the mountpoint."""

    def __init__(self, export: Export) -> None:
        super().__init__(export.name)
        self.export = export
        self.mode = stat.S_IFREG | (0o444 if export.read_only else 0o644)
        self._alloc = 0
        self._alloc_at = 0


class _ControlHandle:
    __slots__ = ("file", "uid", "content", "reply", "reply_pos", "pending")

    def __init__(self, file: VFile, uid: int, content: bytes) -> None:
        self.file = file
        self.uid = uid
        self.content = content  # possibly shared with other handles of the same file
        self.reply: bytes | None = None  # what a write answered; reads then return it
        self.reply_pos = 0
        self.pending: bytearray | None = None  # written, not acted on yet


class _UserBudget:
    """What one uid holds through control handles; shared content is counted once."""

    __slots__ = ("handles", "bytes", "held", "warned")

    def __init__(self) -> None:
        self.handles = 0
        self.bytes = 0
        self.held: dict[int, list[Any]] = {}  # id(content) -> [content, handles holding it]
        self.warned = False

    def hold(self, content: bytes) -> bool:
        """Count ``content`` for one more handle; False if that would pass the byte limit."""
        if not content:
            return True
        entry = self.held.get(id(content))
        if entry is not None:
            entry[1] += 1
            return True
        if self.bytes + len(content) > MAX_CONTROL_BYTES:
            return False
        self.held[id(content)] = [content, 1]
        self.bytes += len(content)
        return True

    def unhold(self, content: bytes) -> None:
        entry = self.held.get(id(content))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.held[id(content)]
            self.bytes -= len(content)


def _spec_is_whole(pending: bytearray, ends_line: bool) -> bool:
    """Whether gathered control text is ready to be acted on (see the module docstring)."""
    if not pending.lstrip().startswith(b"{"):
        return ends_line
    if not ends_line and not pending.rstrip().endswith(b"}"):
        return False
    try:
        text = pending.decode()
    except UnicodeDecodeError:
        return True  # never valid: let the parser say so
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        at_end = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        return ends_line and not at_end
    except (RecursionError, ValueError):  # hostile nesting, a number of 5,000 digits
        return True  # never valid: let the parser say so
    return True


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
    def __init__(
        self,
        tree: VirtualTree,
        *,
        image_mode: int | None = None,
        image_uid: int | None = None,
        image_gid: int | None = None,
    ) -> None:
        super().__init__()
        self.tree = tree
        self._exports: dict[int, Export] = {}  # inode (= handle) -> export
        #: the same dict, read by the FUSE reader threads (blockfs.fuseloop)
        self.exports_by_handle = self._exports
        #: make the kernel forget a cached entry (parent inode, name); the daemon's FUSE loop
        #: replaces it when it serves the session itself
        self.invalidate_entry: Callable[[int, bytes], None] = _invalidate_entry
        self._handles: dict[int, _ControlHandle] = {}
        self._next_fh = _CONTROL_FH_BASE
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._start_ns = time.time_ns()
        self._image_mode = image_mode
        self._image_uid = image_uid
        self._image_gid = image_gid
        self._budgets: dict[int, _UserBudget] = {}  # uid -> what it holds
        self._shared: dict[int, tuple[object, bytes]] = {}  # inode -> (version, rendering)

    # -- the tree ---------------------------------------------------------------------------

    def add_image(self, parent: VDir, export: Export, *, like: Export | None = None) -> ImageFile:
        """Show ``export`` as a file; it takes the owner and mode of its image file, or of
        ``like``'s (a backup view shows what its device shows)."""
        node = ImageFile(export)
        self._set_owner(node, like or export)
        self.tree.add(parent, node)
        self._exports[node.inode] = export
        return node

    def _set_owner(self, node: ImageFile, like: Export) -> None:
        """Mirror the image file's owner, group and mode, then apply the mount's overrides."""
        uid, gid, perm = self._uid, self._gid, 0o600
        file = protocol_file(like.root)
        if file is not None:
            try:
                st = os.fstat(file.fd)
                uid, gid, perm = st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode) & 0o777
            except OSError as exc:
                log.warning("%s: cannot read the image file's owner: %s", node.name, exc)
        if self._image_mode is not None:
            perm = self._image_mode & 0o777
        if node.export.read_only:
            perm &= ~0o222
        node.mode = stat.S_IFREG | perm
        node.uid = uid if self._image_uid is None else self._image_uid
        node.gid = gid if self._image_gid is None else self._image_gid

    def remove_image(self, node: ImageFile) -> None:
        parent = node.parent
        if node in self.tree.remove(node):
            self._exports.pop(node.inode, None)
        # Open handles keep working until released (the last release drops the export); new
        # opens cannot find the name once the kernel forgets the entry it cached.
        if parent is not None:
            self.invalidate_entry(parent.inode, os.fsencode(node.name))

    def _node(self, inode: int) -> Any:
        try:
            return self.tree.by_inode[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def _attrs(self, node: Any) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_uid = self._uid if node.uid is None else node.uid
        a.st_gid = self._gid if node.gid is None else node.gid
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
        node = self._node(inode)
        if not isinstance(node, VDir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self.tree.opened(node)
        return inode

    def _children_after(self, fh: int, start_id: int) -> list[Any]:
        node = self._node(fh)
        if not isinstance(node, VDir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = sorted(node.children.values(), key=lambda n: n.inode)
        return [child for child in entries if child.inode > start_id]

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for child in self._children_after(fh, start_id):
            if not pyfuse3.readdir_reply(
                token, os.fsencode(child.name), await self._attrs(child), child.inode
            ):
                break

    def dir_entries(self, fh: int, start_id: int) -> list[tuple[bytes, int, int]]:
        """The entries of an open directory after ``start_id``, in order, as (name, inode,
        mode): a plain READDIR (blockfs.fuseloop) needs no attributes. Each entry's inode is
        where the next listing starts. :raise pyfuse3.FUSEError: not an open directory."""
        return [(os.fsencode(c.name), c.inode, c.mode) for c in self._children_after(fh, start_id)]

    async def releasedir(self, fh: int) -> None:
        self.tree.closed(fh)

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
            self.tree.opened(node)
            # direct_io, as qemu-storage-daemon's export does: no second copy of the data in
            # the FUSE file's page cache (the image file has its own), nothing acknowledged
            # that sits only in the kernel, and no GETATTR before every read after a write
            # (the kernel's auto_inval_data check, which pyfuse3 cannot turn off): measured,
            # mixed 4k random I/O 1.75x faster.
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)
        if wants_write and not node.writable:
            raise pyfuse3.FUSEError(errno.EACCES)
        uid: int = ctx.uid
        self._check_handles(uid)  # before rendering: a user at the limit costs no rendering
        content = b"" if wants_write else await self._snapshot(node)
        # No await from here on: the checks and the accounting are one step.
        self._check_handles(uid)
        budget = self._budgets.setdefault(uid, _UserBudget())
        if not budget.hold(content):
            self._refuse(uid, budget, "bytes of snapshots")
        budget.handles += 1
        self.tree.opened(node)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _ControlHandle(node, uid, content)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _check_handles(self, uid: int) -> None:
        budget = self._budgets.get(uid)
        if budget is not None and budget.handles >= MAX_CONTROL_HANDLES:
            self._refuse(uid, budget, "open control files")

    def _refuse(self, uid: int, budget: _UserBudget, what: str) -> None:
        # EMFILE, not ENFILE: the limit is the caller's own (like a per-process fd limit);
        # ENFILE would tell every other user that the whole system ran out.
        if not budget.warned:
            budget.warned = True
            log.warning(
                "uid %d reached its limit of %s (%d handles, %d bytes held): refusing opens",
                uid, what, budget.handles, budget.bytes,
            )  # fmt: skip
        if budget.handles == 0 and not budget.bytes:
            self._budgets.pop(uid, None)
        raise pyfuse3.FUSEError(errno.EMFILE)

    async def _snapshot(self, node: VFile) -> bytes:
        """The file's content for a new handle, shared with the open handles while the
        source's version is unchanged."""
        version = node.version()  # taken first: the rendering is at least this new
        if version is not None:
            cached = self._shared.get(node.inode)
            if cached is not None and cached[0] == version:
                return cached[1]
        content = await node.render()
        if version is not None:
            self._shared[node.inode] = (version, content)
        return content

    async def release(self, fh: int) -> None:
        if fh < _CONTROL_FH_BASE:  # an image file (its handle is its inode)
            if self.tree.closed(fh) is not None:
                self._exports.pop(fh, None)  # removed while open: now it goes
            return
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.pending:
            # Not acted on at flush (a dup()ed descriptor closed last, or no flush at all):
            # act now; nobody is left to hear the answer.
            try:
                await self._act(handle)
            except pyfuse3.FUSEError:
                pass
        budget = self._budgets.get(handle.uid)
        if budget is not None:
            budget.unhold(handle.content)
            budget.handles -= 1
            if budget.handles <= 0:
                del self._budgets[handle.uid]
        inode = handle.file.inode
        self.tree.closed(inode)
        if self.tree.open_count(inode) == 0:
            self._shared.pop(inode, None)

    async def flush(self, fh: int) -> None:
        # close() is not fsync() for images: data already reached the image at each write.
        # A control file acts here on what was written and not acted on yet, so that
        # close(2) returns the errno of a spec written without a final newline.
        handle = self._handles.get(fh)
        if handle is not None and handle.pending:
            await self._act(handle)

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
        pending = handle.pending
        held = len(pending) if pending is not None else 0
        # Past the spec limit nothing more is kept: one byte beyond it is enough for the file
        # to refuse the text in its own words (and log it), then the write fails with EINVAL.
        room = MAX_SPEC_BYTES + 1 - held
        too_long = len(buf) >= room
        chunk = buf[:room] if too_long else buf
        budget = self._budgets[handle.uid]
        if budget.bytes + len(chunk) > MAX_CONTROL_BYTES:
            self._answer(handle, b"too much written to open control files; close some\n")
            raise pyfuse3.FUSEError(errno.EDQUOT)
        if pending is None:
            pending = handle.pending = bytearray()
        pending += chunk
        budget.bytes += len(chunk)
        if too_long:
            await self._act(handle)
            self._answer(handle, f"spec longer than {MAX_SPEC_BYTES} bytes\n".encode())
            raise pyfuse3.FUSEError(errno.EINVAL)
        if _spec_is_whole(pending, pending.endswith(b"\n")):
            await self._act(handle)
        return len(buf)

    def _drop_pending(self, handle: _ControlHandle) -> bytes:
        pending = handle.pending
        handle.pending = None
        if not pending:
            return b""
        budget = self._budgets.get(handle.uid)
        if budget is not None:
            budget.bytes -= len(pending)
        return bytes(pending)

    @staticmethod
    def _answer(handle: _ControlHandle, reply: bytes | None) -> None:
        handle.reply = reply
        handle.reply_pos = 0

    async def _act(self, handle: _ControlHandle) -> None:
        """Act on what the handle gathered; its errno fails the write, flush or close that
        called, and a read of the same open file returns the reason."""
        data = self._drop_pending(handle)
        try:
            reply = await handle.file.write(data)
        except BlockfsError as exc:
            self._answer(handle, (str(exc) + "\n").encode())
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            log.exception("write to control file %s failed", handle.file.name)
            self._answer(handle, f"internal error: {exc}\n".encode())
            raise pyfuse3.FUSEError(errno.EIO) from None
        self._answer(handle, reply)
