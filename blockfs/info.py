"""What ``blockfs info`` and ``MNT/.control/images/NAME/info`` say about an image.

Each layer's fields come from :meth:`Node.describe`, which does no I/O; what must be asked of
the storage (``actual-size``: the bytes its file takes up) is awaited here, off every request
path, from the layer's protocol node.
"""

from __future__ import annotations

from typing import Any

from blockfs.nodes.base import Node


def _storage_of(node: Node) -> Node:
    """The node at the bottom of a layer (its protocol node), through formats and filters."""
    while children := node.children():
        node = children[0]
    return node


async def chain_info(node: Node) -> list[dict[str, Any]]:
    """One entry per layer of the backing chain, top first (like qemu-img --backing-chain).
    ``actual-size`` is None for a layer with no storage of its own (a view)."""
    layers = []
    layer: Node | None = node
    while layer is not None:
        d = layer.describe()
        storage = _storage_of(layer)
        d["actual-size"] = (
            await storage.allocated_bytes() if storage.identity() is not None else None
        )
        layers.append(d)
        layer = layer.backing
    return layers


async def export_info(name: str, node: Node, read_only: bool) -> dict[str, Any]:
    """The info document of a mounted image: its top layer's fields and the whole chain."""
    chain = await chain_info(node)
    doc: dict[str, Any] = {"name": name}
    doc.update(chain[0])
    doc["read-only"] = read_only
    doc["backing-chain"] = chain
    return doc
