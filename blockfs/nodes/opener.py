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
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from blockfs.errors import ImageError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.file import FileNode
from blockfs.nodes.raw import RawNode

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
    return await RawNode.open(child)


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


@dataclass
class OpenContext:
    """What a format needs to open the rest of its chain."""

    read_only: bool
    #: real paths of the images above, top first (loop detection)
    chain: tuple[str, ...] = ()
    #: options given in the image spec, passed down to the top format only
    options: dict[str, str] = field(default_factory=dict)

    async def open_backing(self, location: str, fmt: str | None, relative_to: str) -> Node:
        """Open a backing image read-only. A relative ``location`` is resolved against the
        folder of ``relative_to`` (the overlay's filename), as qemu-img does.

        :raise ImageError: a loop, a chain too deep, or a backing file that cannot be opened.
        """
        if not os.path.isabs(location) and "://" not in location:
            location = os.path.join(os.path.dirname(relative_to) or ".", location)
        try:
            return await open_image(location, fmt=fmt, read_only=True, _chain=self.chain)
        except UsageError as exc:
            raise ImageError(f"{relative_to}: cannot open backing file: {exc}") from None


async def open_image(
    location: str,
    *,
    fmt: str | None = None,
    read_only: bool = False,
    options: dict[str, str] | None = None,
    _chain: tuple[str, ...] = (),
) -> Node:
    """Open ``location`` as a format node over its protocol node; probe the format unless
    ``fmt`` names it. Everything opened is closed again when this raises.

    :raise UsageError: no such file, unknown format.
    :raise ImageError: the image is corrupt, hostile or unsupported.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    real = os.path.realpath(location)
    if real in _chain:
        raise ImageError(f"{location}: backing chain loops back to {real}", errno=errno.ELOOP)
    if len(_chain) >= MAX_CHAIN_DEPTH:
        raise ImageError(f"{location}: backing chain deeper than {MAX_CHAIN_DEPTH} images")
    child = await FileNode.open(location, read_only=read_only)
    try:
        if fmt is None:
            header = await child.read(0, min(PROBE_BYTES, child.size)) if child.size else b""
            fmt = probe_format(header)
        ctx = OpenContext(read_only=read_only, chain=(*_chain, real), options=options or {})
        return await FORMATS[fmt].open(child, ctx)
    except BaseException:
        await child.aclose()
        raise


def probe_format(header: bytes) -> str:
    for driver in FORMATS.values():
        if driver.probe(header):
            return driver.name
    return "raw"


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
