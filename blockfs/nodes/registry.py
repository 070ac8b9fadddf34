"""The registry of protocols and formats, and opening an image through them.

An image opens bottom up: the location's scheme picks a protocol driver
(:data:`blockfs.nodes.protocols.PROTOCOLS`: ``file`` for a plain path), which opens the protocol
node; the format (given, or probed from the first bytes) picks a format driver from
:data:`FORMATS`, which opens the format node over it and, through :class:`OpenContext`, its
backing chain. ``fs.py`` and the daemon only ever see the top node, so a new protocol or format
is one driver object and one table entry, and never touches them.

Nodes are told apart by :meth:`Node.identity`, not by their names: the loop check of backing
chains (an image that is its own backing file, A -> B -> A, through any link) and the shared-file
check (two users of one file, one writing) compare identities.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field

import trio

from blockfs.errors import ImageError, UsageError
from blockfs.nodes import qcow2, vhdx
from blockfs.nodes.base import Node
from blockfs.nodes.file import FileNode
from blockfs.nodes.inject import InjectFilter
from blockfs.nodes.protocols import protocol_for, resolve_backing
from blockfs.nodes.raw import RawNode
from blockfs.nodes.retry import RetryFilter

log = logging.getLogger(__name__)

#: how many images one chain may hold, the top included (QEMU has no fixed limit; a real chain
#: of more than a few hundred layers is a mistake or an attack)
MAX_CHAIN_DEPTH = 256
PROBE_BYTES = 4096


@dataclass(frozen=True)
class FormatDriver:
    name: str
    #: does a header (the first :data:`PROBE_BYTES`) say this format?
    probe: Callable[[bytes], bool]
    #: open the format node over an open child; the backing chain through the context
    open: Callable[[Node, OpenContext], Awaitable[Node]]


async def _open_raw(child: Node, ctx: OpenContext) -> Node:
    # A probed raw image must never turn into another format under its guest's writes.
    guard = probe_format if ctx.probed and not child.read_only else None
    return await RawNode.open(child, probe_guard=guard)


def _probe_raw(header: bytes) -> bool:
    return False  # raw is what is left when nothing else matches


#: every format, in probe order (raw last: it is what is left)
FORMATS: dict[str, FormatDriver] = {
    d.name: d
    for d in (
        FormatDriver(qcow2.FORMAT_NAME, qcow2.probe, qcow2.open_node),
        FormatDriver(vhdx.FORMAT_NAME, vhdx.probe, vhdx.open_node),
        FormatDriver("raw", _probe_raw, _open_raw),
    )
}


@dataclass(frozen=True)
class OpenPolicy:
    """Which paths found inside images may be followed, and where warnings go.

    The rule (QEMU learned it the hard way): a guest owns the bytes of its disk, so an image
    whose format was *probed* may be a raw disk whose guest wrote a qcow2 header naming a host
    file as its backing file. Such an image follows a backing file only when the file lies
    inside the image's own folder tree (real locations, after every symlink), inside one of
    ``backing_dirs``, or is one of the files named on the command line (``named``: their
    identities). An image whose format was given is trusted as QEMU trusts it.
    """

    #: folders (real paths) whose files any image may use as backing files
    backing_dirs: tuple[str, ...] = ()
    #: identities of the files the user named (command line, spec)
    named: frozenset[Hashable] = frozenset()
    #: where a probed format is reported (the daemon sends these to the mounting user)
    warn: Callable[[str], None] | None = None
    #: an open node the top image's backing file must be, used instead of a second open of
    #: the same file (a job target shares its source's chain: one cache of its metadata, so a
    #: read through the target never sees tables the source has since rewritten). The name
    #: the image records must reach this node's storage, or the open is refused.
    given_backing: Node | None = None

    @classmethod
    def for_paths(
        cls,
        paths: Iterable[str],
        backing_dirs: Iterable[str] = (),
        warn: Callable[[str], None] | None = None,
    ) -> OpenPolicy:
        named = set()
        for p in paths:
            try:
                ident = protocol_for(p).named_identity(p)
            except UsageError:
                continue  # an unknown scheme: refused when it is opened
            if ident is not None:
                named.add(ident)
        dirs = tuple(os.path.realpath(d) for d in backing_dirs)
        return cls(backing_dirs=dirs, named=frozenset(named), warn=warn)

    def report_probe(self, filename: str, fmt: str) -> None:
        msg = f"{filename}: format not given, probed as {fmt}; give format={fmt} to be sure"
        if self.warn is not None:  # a mount: the log and the user who mounts hear of it
            log.warning("%s", msg)
            self.warn(msg)
        else:  # a look (blockfs info): nothing is written, so nothing to warn of
            log.info("%s", msg)

    def check_backing(
        self, overlay_name: str, overlay_real: str, backing: Node, backing_real: str
    ) -> None:
        """:raise ImageError: (EACCES) a probed overlay (whose real location is
        ``overlay_real``) names a backing file (open as ``backing``, really at
        ``backing_real``) outside the folders it may use."""
        if backing.identity() in self.named:
            return
        roots = (os.path.dirname(overlay_real), *self.backing_dirs)
        for root in roots:
            if backing_real == root or backing_real.startswith(root.rstrip("/") + "/"):
                return
        raise ImageError(
            f"{overlay_name}: backing file {backing_real} lies outside {roots[0]}; the image's "
            "format was probed, so it may be a guest's raw disk: give format= to trust it, or "
            "allow the folder with backing-dirs=",
            errno=errno.EACCES,
        )


@dataclass
class OpenContext:
    """What a format needs to open the rest of its chain."""

    read_only: bool
    #: identities of the images above, top first (loop detection)
    chain: tuple[Hashable, ...] = ()
    #: options given in the image spec, passed down to the top format only
    options: dict[str, str] = field(default_factory=dict)
    #: the format of this image was probed, not given: paths in it are not trusted
    probed: bool = False
    policy: OpenPolicy = field(default_factory=OpenPolicy)
    #: the real location of the image's own storage (its folder is where a probed image may
    #: look for backing files)
    real_path: str = ""

    async def open_backing(self, location: str, fmt: str | None, relative_to: str) -> Node:
        """Open a backing image read-only. A ``location`` without a scheme is resolved by the
        protocol of ``relative_to`` (the overlay's filename): a relative file name against the
        overlay's folder, as qemu-img does. A probed overlay follows it only under
        :class:`OpenPolicy`'s rule.

        :raise ImageError: a loop, a chain too deep, a backing file the rule refuses, an unknown
            protocol, or one that cannot be opened.
        """
        if "\0" in location:
            raise ImageError(f"{relative_to}: backing file name holds a NUL byte")
        given = self.policy.given_backing
        if given is not None and len(self.chain) == 1:
            return await self._given_backing(given, location, relative_to)
        confine = self.real_path if self.probed else None
        try:
            return await open_image(
                resolve_backing(relative_to, location),
                fmt=fmt,
                read_only=True,
                policy=self.policy,
                _chain=self.chain,
                _confine=confine,
                _overlay_name=relative_to,
            )
        except UsageError as exc:
            raise ImageError(f"{relative_to}: cannot open backing file: {exc}") from None

    @staticmethod
    async def _given_backing(given: Node, location: str, relative_to: str) -> Node:
        """:raise ImageError: (EINVAL) ``location`` names storage other than ``given``'s.

        The name comes from an image: it is looked up (a stat, never an open) in a worker
        thread, so a name that leads into this very mount, or onto a hung network file
        system, cannot stop the event loop."""
        resolved = resolve_backing(relative_to, location)
        try:
            driver = protocol_for(resolved)
            ident = await trio.to_thread.run_sync(driver.named_identity, resolved)
        except UsageError:
            ident = None
        if ident is None or ident != given.identity():
            raise ImageError(
                f"{relative_to}: its backing file {location} is not {given.filename}",
                errno=errno.EINVAL,
            )
        return given


async def open_image(
    location: str,
    *,
    fmt: str | None = None,
    read_only: bool = False,
    options: dict[str, str] | None = None,
    policy: OpenPolicy | None = None,
    inject: bool = False,
    _chain: tuple[Hashable, ...] = (),
    _confine: str | None = None,
    _overlay_name: str | None = None,
) -> Node:
    """Open ``location`` (a path, or a URI of a known protocol) as a format node over its
    protocol node; probe the format unless ``fmt`` names it. Everything opened is closed again
    when this raises. ``inject`` puts an error-injection filter between the two (this image
    only, not its backing chain); a protocol whose driver has a retry policy gets a
    :class:`~blockfs.nodes.retry.RetryFilter` right above its node.

    :raise UsageError: no such file, not a regular file or block device, unknown protocol or
        format.
    :raise ImageError: the image is corrupt, hostile or unsupported; its chain loops.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    if len(_chain) >= MAX_CHAIN_DEPTH:
        raise ImageError(f"{location}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
    driver = protocol_for(location)
    if policy is None:
        policy = OpenPolicy.for_paths([location])
    child = await driver.open(location, read_only=read_only)
    try:
        real = driver.real_location(child)
        if _confine is not None:
            policy.check_backing(_overlay_name or location, _confine, child, real)
        if child.identity() in _chain:
            raise ImageError(
                f"{_overlay_name or location}: backing chain loops back to {real}",
                errno=errno.ELOOP,
            )
        retry = driver.retry_for(location)
        if retry is not None:
            child = RetryFilter(child, retry)
        if inject:
            child = InjectFilter(child)
        return await open_format(
            child,
            fmt=fmt,
            read_only=read_only,
            options=options,
            policy=policy,
            _chain=_chain,
            _real_location=real,
        )
    except BaseException:
        await child.aclose()
        raise


async def open_format(
    child: Node,
    *,
    fmt: str | None,
    read_only: bool,
    options: dict[str, str] | None = None,
    policy: OpenPolicy | None = None,
    _chain: tuple[Hashable, ...] = (),
    _real_location: str | None = None,
) -> Node:
    """Open a format node over an open protocol node (which the caller still owns and closes
    when this raises). ``fmt`` None probes, and says so through the policy.

    :raise UsageError, ImageError: as :func:`open_image`.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    policy = policy or OpenPolicy()
    probed = fmt is None
    if fmt is None:
        header = await child.read(0, min(PROBE_BYTES, child.size)) if child.size else b""
        fmt = probe_format(header)
        policy.report_probe(child.filename, fmt)
    ident = child.identity()
    chain = (*_chain, ident) if ident is not None else _chain
    ctx = OpenContext(
        read_only=read_only,
        chain=chain,
        options=options or {},
        probed=probed,
        policy=policy,
        real_path=_real_location or child.filename,
    )
    return await FORMATS[fmt].open(child, ctx)


def probe_format(header: bytes) -> str:
    for driver in FORMATS.values():
        if driver.probe(header):
            return driver.name
    return "raw"


def protocol_file(node: Node) -> FileNode | None:
    """The local file under a node (through filters and its format), or None (a node with no
    local file beneath it: a backup view, a remote protocol)."""
    while not isinstance(node, FileNode):
        children = node.children()
        if not children:
            return None
        node = children[0]
    return node


async def close_chain(node: Node) -> None:
    """Close a node, the nodes it owns, and its backing chain."""
    backing = node.backing
    await node.aclose()
    if backing is not None:
        await close_chain(backing)


def chain_files(node: Node, *, with_backing: bool = True) -> list[tuple[Hashable, bool, str]]:
    """Every piece of storage under ``node`` (and its backing chain): (identity, writable,
    name), one per protocol node (a node that owns no other; views, which have no identity,
    are left out). Used to refuse two users of one file where one of them writes it."""
    found = []
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        children = n.children()
        if not children:
            ident = n.identity()
            if ident is not None:
                found.append((ident, not n.read_only, n.filename))
        stack.extend(children)
        if with_backing and n.backing is not None:
            stack.append(n.backing)
    return found


def check_shared_files(
    name: str,
    node: Node,
    others: dict[str, Node],
    *,
    with_backing: bool = True,
    as_writer: bool = False,
) -> None:
    """:raise UsageError: (EBUSY) ``node`` uses a file that one of ``others`` uses, and one of
    the two writes it (``as_writer``: ``node`` is about to be written, open read-only as it
    may be still): a write through one would change the other under its feet."""
    mine = chain_files(node, with_backing=with_backing)
    for other_name, other in others.items():
        for ident, writable, filename in chain_files(other):
            for my_ident, my_writable, _ in mine:
                if ident == my_ident and (writable or my_writable or as_writer):
                    raise UsageError(
                        f"{name}: {filename} is in use by image {other_name}, and one of them "
                        "writes it",
                        errno=errno.EBUSY,
                    )
