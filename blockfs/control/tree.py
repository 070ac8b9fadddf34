"""A small tree of virtual files and directories, with inode numbers.

``fs.py`` maps FUSE inodes to the objects here and nothing more: each file knows how to render
itself for reading (:meth:`VFile.render`, called at open so that one ``cat`` sees one consistent
snapshot; :meth:`VFile.version` lets open handles share one rendering while the source has not
changed) and how to act on a write (:meth:`VFile.write`). Image files are files of this tree too
(:class:`blockfs.fs.ImageFile`), handled on their own fast path.

Entries come and go while the mount lives (a job's status directory, a backup's view file).
A removed entry leaves :attr:`VirtualTree.by_inode` at once unless a handle is open on it; then it
stays until the last handle is released (:meth:`VirtualTree.opened` / :meth:`VirtualTree.closed`),
so an open handle keeps working and nothing a dismissed job owned stays alive after it.
Inode numbers are never reused, so a stale inode the kernel still holds finds nothing (ENOENT).
"""

from __future__ import annotations

import errno
import json
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from blockfs.errors import BlockfsError

#: FUSE's root inode (FUSE_ROOT_ID, pyfuse3.ROOT_INODE; fs.py checks they agree): only fs.py
#: and daemon.py know pyfuse3
ROOT_INODE = 1

#: open control handles one uid may hold (far above what scripts and `blockfs job watch` use)
MAX_CONTROL_HANDLES = 4096
#: bytes of control snapshots and gathered writes one uid may hold (a full events file is ~1 MB)
MAX_CONTROL_BYTES = 64 * 1024 * 1024


class VNode:
    mode: int = stat.S_IFREG | 0o444
    #: owner and group shown for the entry; None: the daemon's
    uid: int | None = None
    gid: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.inode = 0
        self.parent: VDir | None = None


class VDir(VNode):
    mode = stat.S_IFDIR | 0o755

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.children: dict[str, VNode] = {}


class VFile(VNode):
    """A virtual file. Subclasses override ``render`` and, if writable, ``write``.

    ``private`` files reveal host paths (events, info, status): only the mount's owner may read
    them (the kernel enforces modes: pyfuse3 mounts with ``default_permissions``).
    """

    writable = False

    def __init__(self, name: str, *, private: bool = False) -> None:
        super().__init__(name)
        if self.writable:
            self.mode = stat.S_IFREG | (0o600 if private else 0o644)
        elif private:
            self.mode = stat.S_IFREG | 0o400

    async def render(self) -> bytes:
        return b""

    def version(self) -> object | None:
        """A value that changes whenever :meth:`render` would return something else, or None
        when that is not known (every open then renders anew)."""
        return None

    async def write(self, data: bytes) -> bytes | None:
        """Act on what was written; return text for later reads of the same open file, or
        raise BlockfsError (its errno fails the write; its message is what reads return)."""
        raise BlockfsError("this file is read-only", errno=errno.EROFS)


class TextFile(VFile):
    """A read-only file whose content comes from a function (sync or async).

    ``version``, if given, returns a value that changes whenever the content does (the event
    log's count of events): open handles then share one rendering.
    """

    def __init__(
        self,
        name: str,
        produce: Callable[[], Any],
        *,
        version: Callable[[], object] | None = None,
        private: bool = False,
    ) -> None:
        super().__init__(name, private=private)
        self._produce = produce
        self._version = version

    def version(self) -> object | None:
        return None if self._version is None else self._version()

    async def render(self) -> bytes:
        value = self._produce()
        if isinstance(value, Awaitable):
            value = await value
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode()
        return (json.dumps(value, indent=2) + "\n").encode()


class VirtualTree:
    """Inode table over a tree of VNodes; the root directory is inode 1."""

    def __init__(self) -> None:
        self.root = VDir("")
        self.root.inode = ROOT_INODE
        self.by_inode: dict[int, VNode] = {ROOT_INODE: self.root}
        self._next = ROOT_INODE + 1
        self._opens: dict[int, int] = {}  # inode -> open handles
        self._unlinked: set[int] = set()  # removed, kept in by_inode until the last release

    def add(self, parent: VDir, node: VNode) -> VNode:
        if node.name in parent.children:
            raise BlockfsError(f"{node.name} exists already", errno=errno.EEXIST)
        node.inode = self._next
        self._next += 1
        node.parent = parent
        parent.children[node.name] = node
        self.by_inode[node.inode] = node
        return node

    def mkdirs(self, parent: VDir, *names: str) -> VDir:
        """Return the directory parent/names..., creating what is missing."""
        for name in names:
            child = parent.children.get(name)
            if child is None:
                child = self.add(parent, VDir(name))
            assert isinstance(child, VDir)
            parent = child
        return parent

    def remove(self, node: VNode) -> list[VNode]:
        """Unlink ``node`` and everything below it; return the entries dropped from
        ``by_inode`` now (the others have open handles and go at their last release)."""
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        dropped: list[VNode] = []
        todo = [node]
        while todo:
            n = todo.pop()
            if isinstance(n, VDir):
                todo.extend(n.children.values())
            if self.by_inode.get(n.inode) is not n:
                continue
            if self._opens.get(n.inode):
                self._unlinked.add(n.inode)
            else:
                del self.by_inode[n.inode]
                dropped.append(n)
        return dropped

    def opened(self, node: VNode) -> None:
        """A handle on ``node`` was opened: keep it reachable until :meth:`closed`."""
        self._opens[node.inode] = self._opens.get(node.inode, 0) + 1

    def closed(self, inode: int) -> VNode | None:
        """A handle on ``inode`` was released; return the entry if that dropped it."""
        left = self._opens.get(inode, 0) - 1
        if left > 0:
            self._opens[inode] = left
            return None
        self._opens.pop(inode, None)
        if inode in self._unlinked:
            self._unlinked.discard(inode)
            return self.by_inode.pop(inode, None)
        return None

    def open_count(self, inode: int) -> int:
        return self._opens.get(inode, 0)
