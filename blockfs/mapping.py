"""What ``blockfs map`` and ``MNT/.control/images/NAME/map`` say: where each byte of an image
comes from, as ``qemu-img map --output json`` says it (QEMU 7.2's MapEntry).

Each entry is ``{start, length, depth, present, zero, data[, offset]}``:

- ``depth``: the layer of the backing chain that answers (0 the image itself); for a range no
  layer holds, the bottom layer's depth;
- ``present``: some layer holds the range (False: it reads as zeroes because no layer has it);
- ``zero``: it reads as zeroes; ``data``: it is stored data (both may be true: a data cluster
  whose bytes in the file are a hole);
- ``offset``: where the data lies in that layer's file (raw: the same offset; a qcow2 data
  cluster: its host offset), when it lies in one place there.

The walk follows QEMU's rules, so the entries are the same: a layer that does not hold a range
passes it to its backing file (or reads as zeroes past a short backing file's end, or with
none); a range of stored data is looked up in the layer's file too, and where the file has a
hole there it reads as zeroes; adjacent entries that agree in everything (and whose offsets
continue) are one entry.

One deliberate difference: QEMU 7.2 has no block status for VHDX and reports every byte of a
VHDX image as data. blockfs reports what the BAT and the sector bitmaps say (absent blocks,
zero blocks, each block's file offset), which is what a script asking "where is the data"
wants; the tests check those claims by reading the image with qemu-io.
"""

from __future__ import annotations

from typing import Any

import trio

from blockfs.nodes.base import Node, Status
from blockfs.nodes.filter import FilterNode

#: entries between two checkpoints of the walk: a map of a fragmented image never holds the
#: event loop for more than a few milliseconds
_YIELD_EVERY = 64


def _skip_filters(node: Node) -> Node:
    while isinstance(node, FilterNode):
        node = node.child
    return node


async def _status_at(top: Node, offset: int, length: int) -> dict[str, Any]:
    """The entry for the run starting at ``offset`` (at most ``length`` bytes)."""
    node = _skip_filters(top)
    depth = 0
    while True:
        ext = await node.block_status(offset, length)
        st = ext.status
        n = ext.length
        if st & (Status.DATA | Status.ZERO):
            break
        backing = node.backing
        if backing is None or offset >= backing.size:
            # Nothing below holds it: zeroes, and no layer has it ("present": false).
            return _entry(offset, n, depth, False, True, False, None)
        node = _skip_filters(backing)
        length = min(n, backing.size - offset)
        depth += 1
    children = node.children()
    host = ext.host
    if not children:
        host = offset if host is None else host  # a protocol node: its own bytes
    zero = bool(st & Status.ZERO)
    data = bool(st & Status.DATA)
    if data and host is not None and children:
        # Stored data: what does the file hold there? A hole reads as zeroes.
        below = await children[0].block_status(host, n) if host < children[0].size else None
        if below is None:
            zero = True  # past the file's end
        else:
            n = min(n, below.length)
            zero = zero or bool(below.status & Status.ZERO)
    return _entry(offset, n, depth, bool(st & Status.ALLOCATED), zero, data, host)


def _entry(
    start: int, length: int, depth: int, present: bool, zero: bool, data: bool, host: int | None
) -> dict[str, Any]:
    e: dict[str, Any] = {
        "start": start,
        "length": length,
        "depth": depth,
        "present": present,
        "zero": zero,
        "data": data,
    }
    if host is not None:
        e["offset"] = host
    return e


def _mergeable(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for key in ("depth", "present", "zero", "data"):
        if a[key] != b[key]:
            return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


async def map_image(node: Node, *, max_entries: int | None = None) -> list[dict[str, Any]]:
    """The map of the image whose top node is ``node``, merged as qemu-img merges it.

    :raise OverflowError: more than ``max_entries`` entries.
    """
    out: list[dict[str, Any]] = []
    size = node.size
    pos = 0
    steps = 0
    while pos < size:
        e = await _status_at(node, pos, size - pos)
        if e["length"] <= 0:
            raise RuntimeError(f"block status at {pos} returned an empty run")
        pos += e["length"]
        if out and _mergeable(out[-1], e):
            out[-1]["length"] += e["length"]
        else:
            if max_entries is not None and len(out) >= max_entries:
                raise OverflowError(f"the map has more than {max_entries} entries")
            out.append(e)
        steps += 1
        if steps % _YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
    return out


def map_json(entries: list[dict[str, Any]]) -> str:
    """The text ``qemu-img map --output json`` prints: one entry per line, in a list, spaced
    as qemu-img spaces them (so that the two can be compared byte for byte)."""
    lines = []
    for e in entries:
        text = (
            f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
            f'"present": {_bool(e["present"])}, "zero": {_bool(e["zero"])}, '
            f'"data": {_bool(e["data"])}'
        )
        if "offset" in e:
            text += f', "offset": {e["offset"]}'
        lines.append(text + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _bool(v: bool) -> str:
    return "true" if v else "false"


def map_human(entries: list[dict[str, Any]], filenames: list[str]) -> str:
    """``qemu-img map``'s table: the ranges stored as data somewhere, and in which file."""
    # (entries with data but no offset: only compressed clusters; see below)
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and not e["zero"]:
            # qemu-img gives up on data stored in no one place (compressed clusters): the
            # table names those "compressed" and goes on
            at = _hex(e["offset"]) if "offset" in e else "compressed"
            cols = (_hex(e["start"]), _hex(e["length"]), at)
            lines.append("".join(f"{c:<16}" for c in cols) + filenames[e["depth"]])
    return "\n".join(lines) + "\n"


def _hex(n: int) -> str:
    return f"{n:#x}" if n else "0"
