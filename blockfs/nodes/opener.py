"""Opening an image: protocol node at the bottom, format node on top, backing chain below it.

Formats register here (:data:`FORMATS`); ``fs.py`` and the daemon only ever see the top node,
so a new format slots in by adding one entry, without touching them. Each format module offers
``probe(header: bytes) -> bool`` and ``async open(child, ctx) -> Node``.

Backing chains are opened through :meth:`OpenContext.open_backing`, which guards against loops
(an image that is its own backing file, A -> B -> A) and absurd depths.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from blockfs.errors import ImageError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.file import FileNode
from blockfs.nodes.inject import InjectFilter
from blockfs.nodes.raw import RawNode

log = logging.getLogger(__name__)

#: how many images one chain may hold, the top included (QEMU has no fixed limit; a real chain
#: of more than a few hundred layers is a mistake or an attack)
MAX_CHAIN_DEPTH = 256
PROBE_BYTES = 4096


@dataclass(frozen=True)
class FormatDriver:
    name: str
    probe: Callable[[bytes], bool]
    open: Callable[[Node, OpenContext], Awaitable[Node]]


async def _open_raw(child: Node, ctx: OpenContext) -> Node:
    # A probed raw image must never turn into another format under its guest's writes.
    guard = probe_format if ctx.probed and not child.read_only else None
    return await RawNode.open(child, probe_guard=guard)


def _probe_raw(header: bytes) -> bool:
    return False  # raw is what is left when nothing else matches


FORMATS: dict[str, FormatDriver] = {"raw": FormatDriver("raw", _probe_raw, _open_raw)}

# Format modules that register themselves into FORMATS when imported, in probe order.
_FORMAT_MODULES = ("blockfs.nodes.qcow2",)


def _load_formats() -> None:
    for name in _FORMAT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        driver = FormatDriver(mod.FORMAT_NAME, mod.probe, mod.open_node)
        FORMATS.setdefault(driver.name, driver)


_load_formats()


@dataclass(frozen=True)
class OpenPolicy:
    """Which paths found inside images may be followed, and where warnings go.

    The rule (QEMU learned it the hard way): a guest owns the bytes of its disk, so an image
    whose format was *probed* may be a raw disk whose guest wrote a qcow2 header naming a host
    file as its backing file. Such an image follows a backing file only when the file lies
    inside the image's own folder tree (real paths, after every symlink), inside one of
    ``backing_dirs``, or is one of the files named on the command line (``named``: (st_dev,
    st_ino) identities). An image whose format was given is trusted as QEMU trusts it.
    """

    #: folders (real paths) whose files any image may use as backing files
    backing_dirs: tuple[str, ...] = ()
    #: identities of the files the user named (command line, spec)
    named: frozenset[tuple[int, int]] = frozenset()
    #: where a probed format is reported (the daemon sends these to the mounting user)
    warn: Callable[[str], None] | None = None

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
                st = os.stat(p)
            except (OSError, ValueError):
                continue
            named.add((st.st_dev, st.st_ino))
        dirs = tuple(os.path.realpath(d) for d in backing_dirs)
        return cls(backing_dirs=dirs, named=frozenset(named), warn=warn)

    def report_probe(self, filename: str, fmt: str) -> None:
        msg = f"{filename}: format not given, probed as {fmt}; give format={fmt} to be sure"
        if self.warn is not None:  # a mount: the log and the user who mounts hear of it
            log.warning("%s", msg)
            self.warn(msg)
        else:  # a look (blockfs info): nothing is written, so nothing to warn of
            log.info("%s", msg)

    def check_backing(self, overlay_name: str, overlay_real: str, backing: FileNode) -> None:
        """:raise ImageError: (EACCES) a probed overlay (whose file's real path is
        ``overlay_real``) names a backing file outside the folders it may use."""
        if backing.identity in self.named:
            return
        real = backing.real_path
        roots = (os.path.dirname(overlay_real), *self.backing_dirs)
        for root in roots:
            if real == root or real.startswith(root.rstrip("/") + "/"):
                return
        raise ImageError(
            f"{overlay_name}: backing file {real} lies outside {roots[0]}; the image's format "
            "was probed, so it may be a guest's raw disk: give format= to trust it, or allow "
            "the folder with backing-dirs=",
            errno=errno.EACCES,
        )


@dataclass
class OpenContext:
    """What a format needs to open the rest of its chain."""

    read_only: bool
    #: identities (st_dev, st_ino) of the images above, top first (loop detection)
    chain: tuple[tuple[int, int], ...] = ()
    #: options given in the image spec, passed down to the top format only
    options: dict[str, str] = field(default_factory=dict)
    #: the format of this image was probed, not given: paths in it are not trusted
    probed: bool = False
    policy: OpenPolicy = field(default_factory=OpenPolicy)
    #: the real path of the image's own file (its folder is where a probed image may look)
    real_path: str = ""

    async def open_backing(self, location: str, fmt: str | None, relative_to: str) -> Node:
        """Open a backing image read-only. A relative ``location`` is resolved against the
        folder of ``relative_to`` (the overlay's filename), as qemu-img does. A probed overlay
        follows it only under :class:`OpenPolicy`'s rule.

        :raise ImageError: a loop, a chain too deep, a backing file the rule refuses, or one
            that cannot be opened.
        """
        if "\0" in location:
            raise ImageError(f"{relative_to}: backing file name holds a NUL byte")
        if not os.path.isabs(location) and "://" not in location:
            location = os.path.join(os.path.dirname(relative_to) or ".", location)
        confine = self.real_path if self.probed else None
        try:
            return await open_image(
                location,
                fmt=fmt,
                read_only=True,
                policy=self.policy,
                _chain=self.chain,
                _confine=confine,
                _overlay_name=relative_to,
            )
        except UsageError as exc:
            raise ImageError(f"{relative_to}: cannot open backing file: {exc}") from None


async def open_image(
    location: str,
    *,
    fmt: str | None = None,
    read_only: bool = False,
    options: dict[str, str] | None = None,
    policy: OpenPolicy | None = None,
    inject: bool = False,
    _chain: tuple[tuple[int, int], ...] = (),
    _confine: str | None = None,
    _overlay_name: str | None = None,
) -> Node:
    """Open ``location`` as a format node over its protocol node; probe the format unless
    ``fmt`` names it. Everything opened is closed again when this raises. ``inject`` puts an
    error-injection filter between the two (this image only, not its backing chain).

    :raise UsageError: no such file, not a regular file or block device, unknown format.
    :raise ImageError: the image is corrupt, hostile or unsupported.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    if len(_chain) >= MAX_CHAIN_DEPTH:
        raise ImageError(f"{location}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
    if policy is None:
        policy = OpenPolicy.for_paths([location])
    child = await FileNode.open(location, read_only=read_only)
    try:
        if _confine is not None:
            policy.check_backing(_overlay_name or location, _confine, child)
        if child.identity in _chain:
            raise ImageError(
                f"{_overlay_name or location}: backing chain loops back to {child.real_path}",
                errno=errno.ELOOP,
            )
        protocol: Node = InjectFilter(child) if inject else child
        return await open_format(
            protocol, fmt=fmt, read_only=read_only, options=options, policy=policy, _chain=_chain
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
    _chain: tuple[tuple[int, int], ...] = (),
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
    ident = getattr(child, "identity", None)
    chain = (*_chain, ident) if ident is not None else _chain
    ctx = OpenContext(
        read_only=read_only,
        chain=chain,
        options=options or {},
        probed=probed,
        policy=policy,
        real_path=getattr(child, "real_path", "") or os.path.realpath(child.filename),
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


def chain_files(
    node: Node, *, with_backing: bool = True
) -> list[tuple[tuple[int, int], bool, str]]:
    """Every file under ``node`` (and its backing chain): ((st_dev, st_ino), writable, name).
    Used to refuse two users of one file where one of them writes it."""
    found = []
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, FileNode):
            st = os.fstat(n.fd)
            found.append(((st.st_dev, st.st_ino), not n.read_only, n.filename))
            continue
        stack.extend(n.children())
        if with_backing and n.backing is not None:
            stack.append(n.backing)
    return found


def check_shared_files(
    name: str, node: Node, others: dict[str, Node], *, with_backing: bool = True
) -> None:
    """:raise UsageError: (EBUSY) ``node`` uses a file that one of ``others`` uses, and one of
    the two writes it: a write through one would change the other under its feet."""
    mine = chain_files(node, with_backing=with_backing)
    for other_name, other in others.items():
        for ident, writable, filename in chain_files(other):
            for my_ident, my_writable, _ in mine:
                if ident == my_ident and (writable or my_writable):
                    raise UsageError(
                        f"{name}: {filename} is in use by image {other_name}, and one of them "
                        "writes it",
                        errno=errno.EBUSY,
                    )
