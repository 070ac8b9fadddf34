"""What ``blockfs info`` and ``MNT/.control/images/NAME/info`` say about an image.

The document has the shape and the names of ``qemu-img info --output json`` (QEMU 7.2's
``ImageInfo``), so that scripts written for qemu-img read it unchanged: ``filename`` (as given),
``format``, ``virtual-size``, ``actual-size``, ``cluster-size``, ``dirty-flag``, the backing
file's three names, ``snapshots`` and ``format-specific: {type, data}``. What only blockfs
knows goes under one ``blockfs`` key, never in place of a QEMU key. The one deliberate
addition inside QEMU's shape: ``format-specific`` for VHDX, which QEMU 7.2 does not report
(block size, sector sizes, log state, type and identifiers).

Each layer's fields come from :meth:`Node.describe`, which does no I/O; what must be asked of
the storage (``actual-size``: the bytes its file takes up) is awaited here, off every request
path, from the layer's protocol node.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from blockfs.nodes.base import Node

#: ``describe()`` keys of a qcow2 layer that ``format-specific.data`` holds, in QEMU's order
_QCOW2_V3 = ("compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits",
             "corrupt", "extended-l2")  # fmt: skip
_QCOW2_V2 = ("compat", "compression-type", "refcount-bits")
#: a VHDX layer's: describe() key -> format-specific key
_VHDX = {
    "subformat": "type",
    "block-size": "block-size",
    "logical-sector-size": "logical-sector-size",
    "physical-sector-size": "physical-sector-size",
    "log-state": "log-state",
    "virtual-disk-id": "virtual-disk-id",
    "data-write-guid": "data-write-guid",
    "file-write-guid": "file-write-guid",
    "log-guid": "log-guid",
    "parent-linkage": "parent-linkage",
}
#: describe() keys that have a QEMU name outside format-specific, or are dropped
_TOP_LEVEL = frozenset({"filename", "format", "virtual-size", "cluster-size", "dirty-flag",
                        "backing-filename", "backing-format", "snapshots"})  # fmt: skip
#: snapshot keys QEMU lists (blockfs adds disk-size, shown in the snapshots control file)
_SNAPSHOT_KEYS = ("id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
                  "vm-clock-nsec", "icount")  # fmt: skip
_NO_ICOUNT = (1 << 64) - 1


def combine(base: str, name: str) -> str:
    """The name of ``name`` (a backing file's, as an image records it) seen from ``base`` (the
    name of the image that records it): as QEMU's ``full-backing-filename``. An absolute name
    or a URI is itself; a relative one is in ``base``'s folder."""
    if name.startswith("/") or "://" in name:
        return name
    cut = base.rfind("/")
    return base[: cut + 1] + name if cut >= 0 else name


def _storage_of(node: Node) -> Node:
    """The node at the bottom of a layer (its protocol node), through formats and filters."""
    while children := node.children():
        node = children[0]
    return node


def _layers(node: Node) -> Iterable[Node]:
    layer: Node | None = node
    while layer is not None:
        yield layer
        layer = layer.backing


async def _actual_size(layer: Node) -> int | None:
    storage = _storage_of(layer)
    return await storage.allocated_bytes() if storage.identity() is not None else None


def _format_specific(d: dict[str, Any]) -> dict[str, Any] | None:
    fmt = d.get("format")
    if fmt == "qcow2":
        keys = _QCOW2_V2 if d.get("compat") == "0.10" else _QCOW2_V3
        data = {k: d[k] for k in keys if k in d}
        if not data.get("bitmaps"):
            data.pop("bitmaps", None)  # QEMU leaves the key out when there are none
        return {"type": "qcow2", "data": data}
    if fmt == "vhdx":
        data = {q: d[k] for k, q in _VHDX.items() if d.get(k) is not None}
        return {"type": "vhdx", "data": data}
    return None


def layer_info(d: dict[str, Any], filename: str, actual_size: int | None) -> dict[str, Any]:
    """One layer's ``describe()`` as QEMU's ``ImageInfo``, named ``filename``."""
    out: dict[str, Any] = {
        "filename": filename,
        "format": d["format"],
        "virtual-size": d["virtual-size"],
    }
    if actual_size is not None:
        out["actual-size"] = actual_size
    if "cluster-size" in d:
        out["cluster-size"] = d["cluster-size"]
    out["dirty-flag"] = bool(d.get("dirty-flag", False))
    backing = d.get("backing-filename")
    if backing:
        out["backing-filename"] = backing
        out["full-backing-filename"] = combine(filename, backing)
        if d.get("backing-format"):
            out["backing-filename-format"] = d["backing-format"]
    snaps = d.get("snapshots")
    if snaps:
        out["snapshots"] = [
            {k: s[k] for k in _SNAPSHOT_KEYS if k in s and s[k] != _NO_ICOUNT} for s in snaps
        ]
    specific = _format_specific(d)
    if specific is not None:
        out["format-specific"] = specific
    extra = {
        k: v
        for k, v in d.items()
        if k not in _TOP_LEVEL and k not in _VHDX and not _in_specific(d, k)
    }
    out["blockfs"] = extra
    return out


def _in_specific(d: dict[str, Any], key: str) -> bool:
    return d.get("format") == "qcow2" and key in _QCOW2_V3


async def chain_info(node: Node, filename: str | None = None) -> list[dict[str, Any]]:
    """One document per layer of the backing chain, top first (``qemu-img info
    --backing-chain``). The top layer is named ``filename`` (as the user gave it; default the
    node's own name), each layer below by the ``full-backing-filename`` of the one above, as
    QEMU names them. ``actual-size`` is left out for a layer with no storage of its own."""
    docs: list[dict[str, Any]] = []
    name = filename if filename is not None else node.filename
    for layer in _layers(node):
        doc = layer_info(layer.describe(), name, await _actual_size(layer))
        docs.append(doc)
        name = doc.get("full-backing-filename") or (
            layer.backing.filename if layer.backing is not None else ""
        )
    return docs


def nest(chain: list[dict[str, Any]]) -> dict[str, Any]:
    """A chain as one document: each layer under the one above as ``backing-image``, the way
    QEMU's ``query-block`` shows a device's image."""
    doc = dict(chain[-1])
    for layer in reversed(chain[:-1]):
        doc = {**layer, "backing-image": doc}
    return doc


async def export_info(
    name: str, node: Node, read_only: bool, jobs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The info document of a mounted image: its live chain, nested, each layer named by the
    file the daemon opened; ``blockfs`` adds the device name, its mode and the jobs on it."""
    chain = await chain_info(node)
    for layer, doc in zip(_layers(node), chain, strict=True):
        doc["filename"] = layer.filename
    doc = nest(chain)
    doc["blockfs"] = {**doc["blockfs"], "device": name, "read-only": read_only, "jobs": jobs}
    return doc
