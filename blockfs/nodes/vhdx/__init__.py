"""The ``vhdx`` format driver: Hyper-V's virtual hard disk v2 (MS-VHDX v1.00).

This is the driver's face, what the opener and the rest of blockfs import: :data:`FORMAT_NAME`,
:func:`probe`, :func:`open_node`, the node and image creation. The package is split by concern:

    format.py   on-disk structures (identifier, headers, region tables, metadata items, parent
                locator, BAT entries and geometry) and the validation of what they claim; no I/O
    log.py      the metadata log: entries parsed and serialised, the active sequence, replay
                onto the file or into memory (ReplayedFile)
    logwriter.py  the log written: entries appended, tails, checkpoints, the log GUID's life
    node.py     the node: opening, the mapping function and its fast paths, the BAT and sector
                bitmap caches, the parent, writing (payload blocks, BAT entries and sector
                bitmaps through the log, zeroes, discard), the failsafe, header updates
                (HeaderPair)
    create.py   new fixed, dynamic and differencing images written through a protocol node

A module here uses another only through what that one makes public (no leading underscore).
"""

from __future__ import annotations

from blockfs.nodes.base import Node
from blockfs.nodes.vhdx.create import create_vhdx
from blockfs.nodes.vhdx.format import FILE_SIGNATURE
from blockfs.nodes.vhdx.node import FORMAT_NAME, OpenContextLike, VhdxNode


def probe(header: bytes) -> bool:
    """The file type identifier (MS-VHDX 2.1.1): any file that starts with it is VHDX, never
    raw (its metadata would become guest data)."""
    return header[:8] == FILE_SIGNATURE


async def open_node(child: Node, ctx: OpenContextLike) -> Node:
    """Open a VHDX image over ``child`` (the opener's entry point)."""
    return await VhdxNode.open(child, ctx)


__all__ = ["FORMAT_NAME", "VhdxNode", "create_vhdx", "open_node", "probe"]
