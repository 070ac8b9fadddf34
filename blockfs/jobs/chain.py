"""What commit, stream and external snapshots share: their spec, the chain of a device as a
list of layers, naming a layer, and the graph verbs that reshape a chain in use.

A device's chain is its root's layers below any filters, top (the *active layer*, depth 0)
first: ``[active, active.backing, ...]``. A spec names a layer by depth (``top=1``) or by file
name: the name a layer's ``info`` shows (as written, or normalised), or its base name when only
one layer has it. Names are compared, never looked up. The names are checked against the chain as it is when the job starts; the job then
holds the device (one job per device), so the chain cannot change under it.

Reshaping (:func:`stitch`) happens at a quiescent point of the device: the image above the
layers that leave records its new backing file in its own metadata (crash-safe: the old name
or the new one), then its ``backing`` pointer moves; no request is in flight meanwhile, so none
reads through a node that is about to close. Nodes that left the chain are closed after the
device runs again; their files are left on disk as they were.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from blockfs.errors import BlockfsError, UsageError
from blockfs.export import Export
from blockfs.jobs.blockcopy import BlockCopy
from blockfs.jobs.job import ErrorAction
from blockfs.nodes.base import Node, Status
from blockfs.nodes.filter import FilterNode
from blockfs.values import choice, job_id, parse_words, size_value

_ACTIONS = ["report", "ignore", "stop", "enospc"]
COMMIT_KEYS = ("device", "top", "base", "backing-file", "speed", "on-error", "id")
STREAM_KEYS = ("device", "base", "backing-file", "speed", "on-error", "id")


@dataclass(frozen=True)
class ChainSpec:
    """A commit or stream spec. ``top`` and ``base`` are layer names as written (None: the
    default, which the chain decides)."""

    device: str
    top: str | None
    base: str | None
    backing_file: str | None
    speed: int
    on_error: ErrorAction
    id: str

    @classmethod
    def parse_commit(cls, text: bytes | str) -> ChainSpec:
        """:raise UsageError: an unknown key or a bad value."""
        return cls._parse(text, COMMIT_KEYS)

    @classmethod
    def parse_stream(cls, text: bytes | str) -> ChainSpec:
        """:raise UsageError: an unknown key (``top`` too: a stream fills the active layer)."""
        return cls._parse(text, STREAM_KEYS)

    @classmethod
    def _parse(cls, text: bytes | str, keys: tuple[str, ...]) -> ChainSpec:
        w = parse_words(text, keys)
        if not w.get("device"):
            raise UsageError("device= is required")
        for key in ("top", "base", "backing-file"):
            if key in w and not w[key]:
                raise UsageError(f"{key}= is empty")
        return cls(
            device=w["device"],
            top=w.get("top"),
            base=w.get("base"),
            backing_file=w.get("backing-file"),
            speed=size_value(w, "speed"),
            on_error=ErrorAction(choice(w, "on-error", _ACTIONS, "report")),
            id=job_id(w, w["device"]),
        )


def active_layer(root: Node) -> Node:
    """The device's top image: its root below any filters."""
    while isinstance(root, FilterNode):
        root = root.child
    return root


def chain_layers(root: Node) -> list[Node]:
    """The device's layers, the active layer first."""
    layers = []
    node: Node | None = active_layer(root)
    while node is not None:
        layers.append(node)
        node = node.backing
    return layers


def find_layer(layers: list[Node], name: str, key: str, device: str) -> int:
    """The depth of the layer ``name`` names (see the module docstring).

    :raise UsageError: (ENOENT) no such layer, or a base name several layers share.
    """
    if name.isdigit() and len(name) < 6:
        depth = int(name)
        if depth >= len(layers):
            raise UsageError(
                f"{key}={name}: the chain of {device!r} has {len(layers)} layers (0 to "
                f"{len(layers) - 1})",
                errno=errno.ENOENT,
            )
        return depth
    for depth, layer in enumerate(layers):
        if layer.filename == name:
            return depth
    if os.path.isabs(name):
        # Compared as written (normalised), never resolved: a spec's path may lead into this
        # very mount, and a lookup there from the event loop would wait on itself.
        norm = os.path.normpath(name)
        for depth, layer in enumerate(layers):
            if os.path.isabs(layer.filename) and os.path.normpath(layer.filename) == norm:
                return depth
    hits = [d for d, layer in enumerate(layers) if os.path.basename(layer.filename) == name]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(f"{d}: {layer.filename}" for d, layer in enumerate(layers))
    shown = name if len(name) <= 60 else name[:57] + "..."
    if hits:
        raise UsageError(
            f"{key}={shown} names several layers of {device!r}; give a path or a depth ({names})",
            errno=errno.ENOENT,
        )
    raise UsageError(
        f"{key}={shown} is not in the chain of {device!r} ({names})", errno=errno.ENOENT
    )


def recorded_backing_name(node: Node) -> str | None:
    """The backing file name ``node``'s metadata records, as recorded."""
    name = node.describe().get("backing-filename")
    return name if isinstance(name, str) else None


def new_backing_name(above: Node, base: Node, given: str | None) -> str:
    """The name ``above`` is to record for ``base``: ``given`` (``backing-file=``), else a
    path relative to ``above``'s folder where the old name was relative, else ``base``'s
    file name as opened."""
    if given is not None:
        return given
    old = recorded_backing_name(above)
    target = base.filename
    if (
        old is not None
        and not os.path.isabs(old)
        and "://" not in old
        and os.path.isabs(target)
        and os.path.isabs(above.filename)
    ):
        return os.path.relpath(target, os.path.dirname(above.filename))
    return target


def check_can_back(above: Node, base: Node | None) -> None:
    """:raise UsageError: (EINVAL) ``above`` cannot record ``base`` as its backing file."""
    if above.format_name == "raw":
        raise UsageError(f"{above.filename} is a raw image: it cannot record a backing file")
    if base is not None and above.format_name == "vhdx" and base.format_name != "vhdx":
        raise UsageError(
            f"{above.filename} is a differencing VHDX: its parent must be a VHDX image, and "
            f"{base.filename} is {base.format_name}"
        )


async def allocated_between(
    top: Node, base: Node | None, offset: int, length: int
) -> tuple[bool, int]:
    """Whether some layer from ``top`` down to (not including) ``base`` decides what
    ``offset`` reads, and for how many bytes the answer holds. A layer that ends before
    ``offset`` decides too: it reads as zeroes there, whatever lies below."""
    node: Node | None = top
    n = length
    while node is not None and node is not base:
        if offset >= node.size:
            return True, n
        n = min(n, node.size - offset)
        ext = await node.block_status(offset, n)
        if ext.status & Status.ALLOCATED:
            return True, max(1, min(n, ext.length))
        n = max(1, min(n, ext.length))
        node = node.backing
    return False, n


#: the longest a walk of the chain runs before it lets other tasks in
_SLICE_SECONDS = 0.002
#: copies in flight at once for commit and stream
CHAIN_WORKERS = 4


async def mark_held_above(
    copy: BlockCopy,
    top: Node,
    base: Node | None,
    size: int,
    checkpoint: Callable[[], Awaitable[None]],
    *,
    unless_held_by: Node | None = None,
) -> None:
    """Mark in ``copy``'s bitmap, over ``[0, size)``, what a layer from ``top`` down to
    (not including) ``base`` decides (:func:`allocated_between`); ``unless_held_by``: not what
    that node holds itself (a stream's active layer). Calls ``checkpoint`` (a job's pause
    point) every few milliseconds, so a walk of a big chain never holds the event loop."""
    bitmap, cs = copy.bitmap, copy.cluster_size
    pos = 0
    deadline = trio.current_time() + _SLICE_SECONDS
    while pos < size:
        n = size - pos
        held = True
        if unless_held_by is not None:
            ext = await unless_held_by.block_status(pos, n)
            n = max(1, min(ext.length, n))
            held = not ext.status & Status.ALLOCATED
        if held:
            held, n = await allocated_between(top, base, pos, n)
        if held:
            first, last = pos // cs, (pos + n - 1) // cs
            bitmap.set_range(first, last + 1 - first)
        pos += n
        if trio.current_time() > deadline:
            await checkpoint()
            deadline = trio.current_time() + _SLICE_SECONDS


async def stitch(
    above: Node, base: Node | None, name: str | None, *, keep_writable: bool
) -> None:
    """Make ``above`` record ``base`` (as ``name``) as its backing file, then read through
    it. The caller holds the device quiesced. An ``above`` open read-only is made writable
    for the metadata write and read-only again (``keep_writable`` off).

    :raise BlockfsError: the metadata write failed; the chain is as it was in memory, and
        the image records the old name or the new one (both chains read the same then).
    """
    reopened = False
    if above.read_only:
        await above.reopen(False)
        reopened = True
    try:
        await above.change_backing_file(
            name, base.format_name if base is not None else None, base
        )
    finally:
        if reopened and not keep_writable:
            try:
                await above.reopen(True)
            except BlockfsError:
                pass  # it stays writable: no request writes to a backing layer
    above.backing = base


async def close_layers(layers: list[Node]) -> None:
    """Close layers that left a chain (each on its own: not the chain below them)."""
    for layer in layers:
        try:
            await layer.aclose()
        except BlockfsError:
            pass


SNAPSHOT_KEYS = ("snapshot", "format")


async def external_snapshot(export: Export, text: bytes | str) -> Node:
    """``snapshot=NEW [format=qcow2|vhdx]`` written to ``images/NAME/ctl``: a new image over
    the device's active layer becomes the active layer (QEMU's blockdev-snapshot-sync). The
    old active layer is flushed and made read-only; it is the new image's backing file, by its
    file name as opened. A relative ``NEW`` is taken from the active layer's folder. The new
    file is made under a temporary name and takes its name at the quiescent point where the
    device switches to it; guest requests wait for that instant. The caller makes sure no job
    holds the device.

    :raise UsageError: a bad spec, a read-only device (EROFS), a name that is taken (EEXIST),
        a folder that is refused (EACCES, ENOENT), a format that cannot read through the
        active layer (a vhdx image over a non-vhdx one); the device is as it was then.
    """
    from blockfs.jobs.target import open_job_target

    w = parse_words(text, SNAPSHOT_KEYS)
    if not w.get("snapshot"):
        raise UsageError("snapshot= is required (the new image's path)")
    fmt = choice(w, "format", ["qcow2", "vhdx"], "qcow2")
    if export.read_only:
        raise UsageError(f"device {export.name!r} is mounted read-only", errno=errno.EROFS)
    path = w["snapshot"]
    async with export.quiesced():
        root = export.root
        active = active_layer(root)
        if fmt == "vhdx" and active.format_name != "vhdx":
            raise UsageError(
                f"a vhdx image can read only through a vhdx parent, and {active.filename} is "
                f"{active.format_name}: use format=qcow2"
            )
        if not os.path.isabs(path) and os.path.isabs(active.filename):
            path = os.path.join(os.path.dirname(active.filename), path)
        above: FilterNode | None = None
        node = root
        while isinstance(node, FilterNode):
            if node.child is active:
                above = node
            node = node.child
        await active.flush()
        await active.reopen(True)
        try:
            try:
                target = await open_job_target(
                    path, mode="new", fmt=fmt, size=active.size, like=root, backing=active
                )
            except UsageError as exc:
                if exc.errno == errno.EEXIST:
                    raise UsageError(f"{path} exists already", errno=errno.EEXIST) from None
                raise
            tfile = target.file
            assert tfile is not None
            try:
                await tfile.publish()
            except BaseException:
                await target.discard()
                raise
        except BaseException:
            with trio.CancelScope(shield=True):
                await active.reopen(False)
            raise
        tfile.close()
        target.shared_backing = None  # the old active layer is the new image's chain now
        overlay = target.node
        if above is not None:
            above.set_child(overlay)
        else:
            export.root = overlay
    return overlay
