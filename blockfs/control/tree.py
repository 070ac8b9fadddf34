"""A small tree of virtual files and directories, with inode numbers.

``fs.py`` maps FUSE inodes to the objects here and nothing more: each file knows how to render
itself for reading (:meth:`VFile.render`, called once per open so that one ``cat`` sees one
consistent snapshot) and how to act on a write (:meth:`VFile.write`). Image files are files of
this tree too (:class:`blockfs.fs.ImageFile`), handled on their own fast path.

Entries can come and go while the mount lives (a job's status directory, a backup's view file);
a removed entry keeps its inode until the tree is dropped, so a handle still open on it stays valid.
"""

from __future__ import annotations

import errno
import json
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3

from blockfs.errors import BlockfsError

ROOT_INODE = pyfuse3.ROOT_INODE


class VNode:
    mode: int = stat.S_IFREG | 0o444

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
    """A virtual file. Subclasses override ``render`` and, if writable, ``write``."""

    writable = False

    def __init__(self, name: str) -> None:
        super().__init__(name)
        if self.writable:
            self.mode = stat.S_IFREG | 0o644

    async def render(self) -> bytes:
        return b""

    async def write(self, data: bytes) -> bytes | None:
        """Act on what was written; return text for later reads of the same open file, or
        raise BlockfsError (its errno fails the write; its message is what reads return)."""
        raise BlockfsError("this file is read-only", errno=errno.EROFS)


class TextFile(VFile):
    """A read-only file whose content comes from a function (sync or async)."""

    def __init__(self, name: str, produce: Callable[[], Any]) -> None:
        super().__init__(name)
        self._produce = produce

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

    def remove(self, node: VNode) -> None:
        """Unlink ``node`` (and below it) from its directory; its inode stays valid."""
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
