"""What ``blockfs info`` and ``MNT/.control/images/NAME/info`` say about an image."""

from __future__ import annotations

from typing import Any

from blockfs.nodes.base import Node


def chain_info(node: Node) -> list[dict[str, Any]]:
    """One entry per layer of the backing chain, top first (like qemu-img --backing-chain)."""
    layers = []
    layer: Node | None = node
    while layer is not None:
        layers.append(layer.describe())
        layer = layer.backing
    return layers


def export_info(name: str, node: Node, read_only: bool) -> dict[str, Any]:
    """The info document of a mounted image: its top layer's fields and the whole chain."""
    chain = chain_info(node)
    doc: dict[str, Any] = {"name": name}
    doc.update(chain[0])
    doc["read-only"] = read_only
    doc["backing-chain"] = chain
    return doc
