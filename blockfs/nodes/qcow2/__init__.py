"""The ``qcow2`` format driver: QEMU's copy-on-write image format.

This is the driver's face, what the opener and the rest of blockfs import: :data:`FORMAT_NAME`,
:func:`probe`, :func:`open_node`, the node, image creation and internal snapshots. The package is
split by concern, as QEMU splits its qcow2 driver:

    node.py        the node: opening, the one mapping function and its fast path, L2 tables,
                   zeroes and discard, the failsafe, the table/header interface for snapshots
    refcount.py    refcounts and the allocation of host clusters (qcow2-refcount.c)
    ../cache.py    (shared) the metadata-table cache with pinning; knows no format (qcow2-cache.c)
    compressed.py  the compressed-cluster descriptor, (de)compression, the compressed area
    format.py      on-disk structures and the validation of what a header claims; no I/O
    snapshot.py    internal snapshots: create, apply, delete (qcow2-snapshot.c)
    create.py      new images (and raw ones) written through a protocol node

A module here uses another only through what that one makes public (no leading underscore).
"""

from __future__ import annotations

from blockfs.nodes.base import Node
from blockfs.nodes.qcow2.create import create_qcow2, create_raw
from blockfs.nodes.qcow2.format import MAGIC
from blockfs.nodes.qcow2.node import Qcow2Node
from blockfs.nodes.qcow2.snapshot import (
    apply_snapshot,
    create_snapshot,
    delete_snapshot,
    find_snapshot,
)

FORMAT_NAME = "qcow2"


def probe(header: bytes) -> bool:
    # Any version: an image with qcow2's magic is never handed out as raw (its header would
    # become guest data); an unsupported version is refused by the qcow2 driver instead.
    return header[:4] == MAGIC


async def open_node(child: Node, ctx: object) -> Node:
    """Open a qcow2 image over ``child`` (the opener's entry point)."""
    return await Qcow2Node.open(child, ctx)


__all__ = [
    "FORMAT_NAME",
    "Qcow2Node",
    "apply_snapshot",
    "create_qcow2",
    "create_raw",
    "create_snapshot",
    "delete_snapshot",
    "find_snapshot",
    "open_node",
    "probe",
]
