"""Protocol drivers: how a location names storage, and how a node over it is opened.

A location is a plain path (the ``file`` protocol) or a URI whose scheme names a driver
(``file:///srv/a.img``; ``ssh://host/path`` and ``gluster://host/volume/path`` once their
drivers exist). Each driver is an object in :data:`PROTOCOLS`, registered by name in that one
table: adding ssh is one class and one entry, and an unknown scheme is refused in one line that
names the known ones.

A driver owes four answers (:class:`ProtocolDriver`): open a protocol node, resolve a backing
name found inside an image relative to that image (qemu-img's rule: relative to the image's
folder, on the same storage), give the real location of an open node (for the confinement rule
of probed images), and, cheaply, the identity of a named location (the files a user named on the
command line). Remote drivers also give the :class:`~blockfs.nodes.retry.RetryPolicy` that the
registry wraps their nodes in.

This module knows no image format and nothing of FUSE.
"""

from __future__ import annotations

import abc
import importlib
import os
import re
from collections.abc import Hashable
from types import ModuleType
from typing import ClassVar

from blockfs.errors import UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.file import FileNode
from blockfs.nodes.retry import RetryPolicy

#: ``scheme://`` at the start of a location (RFC 3986 scheme characters)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(location: str) -> str | None:
    """The URI scheme of ``location`` (lower case), or None for a plain path."""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else None


class ProtocolDriver(abc.ABC):
    """One protocol: a scheme, and how to open, resolve and identify what it names."""

    #: the URI scheme, also the driver's name in :data:`PROTOCOLS`
    name: ClassVar[str]
    #: how the registry retries this protocol's transient errors; None: its errors are final
    retry: ClassVar[RetryPolicy | None] = None

    @abc.abstractmethod
    async def open(self, location: str, *, read_only: bool) -> Node:
        """Open the protocol node for ``location`` (a URI of this scheme, or a plain path for
        ``file``). :raise UsageError: it cannot be opened as an image."""

    @abc.abstractmethod
    def resolve(self, relative_to: str, name: str) -> str:
        """The location of ``name`` (a backing name without a scheme, found inside the image
        at ``relative_to``, a location of this protocol): absolute names as they are, relative
        ones against the folder of ``relative_to``, on the same storage. No I/O."""

    @abc.abstractmethod
    def real_location(self, node: Node) -> str:
        """Where the open ``node`` (made by :meth:`open`) really is, after every link, as a
        location whose folders nest as prefixes ("/a/b" lies in "/a"). No I/O."""

    def named_identity(self, location: str) -> Hashable | None:
        """The identity (as :meth:`Node.identity` will answer) of the storage a user named,
        if it can be learnt cheaply and without a connection; None otherwise."""
        return None

    def retry_for(self, location: str) -> RetryPolicy | None:
        """The retry policy of a node opened at ``location`` (a remote one may take it from
        the location's properties); :attr:`retry` by default."""
        return self.retry

    def found_location(self, name: str, relative_to: str) -> str:
        """A location of this protocol found inside the image at ``relative_to`` (a backing
        name with a scheme): what of it may be followed. Whatever the image's bytes say is
        hostile, so a driver drops what would make the daemon use its own secrets on the
        image's behalf. As written, by default."""
        return name

    async def create(self, location: str) -> Node:
        """A new, empty file at ``location`` (never an existing one), open read-write.

        :raise UsageError: (EEXIST) it exists; the protocol cannot make files.
        """
        raise UsageError(f"{location}: {self.name} cannot make new files here")

    async def remove(self, location: str) -> None:
        """Remove the file at ``location`` (a new file whose making failed)."""
        raise UsageError(f"{location}: {self.name} cannot remove files")

    async def exists(self, location: str) -> bool:
        """Whether something is at ``location``."""
        raise UsageError(f"{location}: {self.name} cannot look for files")

    async def rename(self, old: str, new: str) -> None:
        """Give the file at ``old`` the name ``new`` (same storage), never replacing a file
        there. :raise BlockfsError: (EEXIST) ``new`` exists."""
        raise UsageError(f"{old}: {self.name} cannot rename files")


class FileProtocol(ProtocolDriver):
    """Local files and block devices: plain paths, or ``file:///ABSOLUTE/PATH`` (taken as
    written: no percent-decoding)."""

    name = "file"

    @staticmethod
    def local_path(location: str) -> str:
        """The path a ``file`` location names. :raise UsageError: a ``file://`` URI whose path
        is not absolute (``file://host/...`` names a host, which local files have not)."""
        if scheme_of(location) != "file":
            return location
        path = location[len("file://") :]
        if not path.startswith("/"):
            raise UsageError(f"{location}: a file:// location takes an absolute path (file:///…)")
        return path

    async def open(self, location: str, *, read_only: bool) -> Node:
        return await FileNode.open(self.local_path(location), read_only=read_only)

    def resolve(self, relative_to: str, name: str) -> str:
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(self.local_path(relative_to)) or ".", name)

    def real_location(self, node: Node) -> str:
        assert isinstance(node, FileNode), node
        return node.real_path

    def named_identity(self, location: str) -> Hashable | None:
        try:
            st = os.stat(self.local_path(location))
        except (OSError, ValueError, UsageError):
            return None
        return (st.st_dev, st.st_ino)


class RemoteProtocol(ProtocolDriver):
    """A protocol whose driver is a module of its own, imported at the first use (it brings a
    library: asyncssh, libgfapi). The module names its location class ``LOCATION`` (``parse``,
    ``timeout``) and its node class ``NODE`` (``await NODE.open(loc, read_only=, create=)``):
    opening, creating and the retry policy are the same for every such protocol and are done
    here. Every other answer is the module's function of the same name (``remove``,
    ``exists``, ``rename``, ``resolve``, ``found_location``, ``real_location``)."""

    def __init__(self, name: str, module: str) -> None:
        self.name = name  # type: ignore[misc]
        self._module = module

    def _impl(self) -> ModuleType:
        return importlib.import_module(self._module)

    def retry_for(self, location: str) -> RetryPolicy | None:
        """Retries within the location's ``timeout=`` seconds of a request's first try, then
        EIO."""
        return RetryPolicy.within(self._impl().LOCATION.parse(location).timeout)

    async def open(self, location: str, *, read_only: bool) -> Node:
        impl = self._impl()
        node: Node = await impl.NODE.open(impl.LOCATION.parse(location), read_only=read_only)
        return node

    async def create(self, location: str) -> Node:
        """A new, empty file (made exclusively), open read-write.

        :raise UsageError: (EEXIST) it exists; (ENOENT, EACCES) no folder, no right."""
        impl = self._impl()
        loc = impl.LOCATION.parse(location)
        node: Node = await impl.NODE.open(loc, read_only=False, create=True)
        return node

    async def remove(self, location: str) -> None:
        await self._impl().remove(location)

    async def exists(self, location: str) -> bool:
        found: bool = await self._impl().exists(location)
        return found

    async def rename(self, old: str, new: str) -> None:
        await self._impl().rename(old, new)

    def resolve(self, relative_to: str, name: str) -> str:
        where: str = self._impl().resolve(relative_to, name)
        return where

    def found_location(self, name: str, relative_to: str) -> str:
        where: str = self._impl().found_location(name, relative_to)
        return where

    def real_location(self, node: Node) -> str:
        where: str = self._impl().real_location(node)
        return where


#: files on any host with an OpenSSH server: ``ssh://[USER@]HOST[:PORT]/PATH[?...]``
#: (:mod:`blockfs.nodes.ssh`)
SSH = RemoteProtocol("ssh", "blockfs.nodes.ssh")
#: files on a GlusterFS volume through libgfapi: ``gluster[+tcp|+unix|+rdma]://...``
#: (:mod:`blockfs.nodes.gluster`); one driver under its four schemes
GLUSTER = RemoteProtocol("gluster", "blockfs.nodes.gluster")

#: every protocol, by scheme (a plain path is ``file``)
PROTOCOLS: dict[str, ProtocolDriver] = {
    "file": FileProtocol(),
    "ssh": SSH,
    **{scheme: GLUSTER for scheme in ("gluster", "gluster+tcp", "gluster+unix", "gluster+rdma")},
}


def protocol_for(location: str) -> ProtocolDriver:
    """The driver of ``location``'s scheme (``file`` for a plain path).

    :raise UsageError: an unknown scheme (one line naming the known ones).
    """
    scheme = scheme_of(location) or "file"
    driver = PROTOCOLS.get(scheme)
    if driver is None:
        raise UsageError(
            f"{location}: unknown protocol {scheme!r} (known: {', '.join(sorted(PROTOCOLS))})"
        )
    return driver


def resolve_backing(relative_to: str, name: str) -> str:
    """The location of backing name ``name`` found in the image at ``relative_to``: a name
    with a scheme stands alone; any other is resolved by the overlay's own protocol.

    :raise UsageError: the overlay's (or the name's) scheme is unknown, or the name is
        malformed.
    """
    if scheme_of(name) is not None:
        return protocol_for(name).found_location(name, relative_to)
    return protocol_for(relative_to).resolve(relative_to, name)
