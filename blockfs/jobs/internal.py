"""Live internal snapshots: ``create``, ``delete`` and ``apply`` on the qcow2 image a mount
serves, written to ``MNT/.control/images/NAME/snapshots`` (QEMU's
``blockdev-snapshot-internal-sync`` and ``snapshot-load`` on a running disk).

The operations are those of :mod:`blockfs.nodes.qcow2.snapshot`, which the CLI runs on an
image nothing else uses. Here the image is in use, so each runs at a quiescent point of the
device: guest requests wait (:meth:`Export.quiesced`) while the node first settles (its queued
refcount decrements applied and everything durable: a flush), then the snapshot tables are
rewritten, then a flush makes the result durable before the guest goes on. The wait is the time
the operation takes: one walk of the active tables for create and apply, of the snapshot's for
delete (milliseconds for a few GiB of data; the walk awaits I/O, so the event loop serves other
devices meanwhile). The write order of the snapshot module keeps a kill at any instant to
leaked clusters, which ``qemu-img check -r leaks`` repairs.

Refused: a device a job runs on (EBUSY, the caller checks), a read-only device (EROFS), an
active layer that is not qcow2 (EMEDIUMTYPE), an image whose refcounts cannot count to 2 or
whose metadata writes failed (EIO).
"""

from __future__ import annotations

import errno
import time
from typing import Any

from blockfs.errors import UsageError
from blockfs.export import Export
from blockfs.jobs.chain import active_layer
from blockfs.nodes.base import Node

VERBS = ("create", "delete", "apply")


def _qcow2_layer(export: Export) -> Any:
    """The device's active layer, if it is a qcow2 node. :raise UsageError: (EMEDIUMTYPE)"""
    from blockfs.nodes.qcow2 import Qcow2Node

    active: Node = active_layer(export.root)
    if not isinstance(active, Qcow2Node):
        raise UsageError(
            f"device {export.name!r}: internal snapshots need a qcow2 image, and its active "
            f"layer is {active.format_name}",
            errno=errno.EMEDIUMTYPE,
        )
    return active


def snapshot_table(export: Export) -> list[dict[str, object]]:
    """The snapshot table of the device's active layer (empty when it is not qcow2), each
    entry as ``qemu-img info`` lists it plus its ``disk-size``."""
    try:
        node = _qcow2_layer(export)
    except UsageError:
        return []
    snaps: list[dict[str, object]] = node.describe()["snapshots"]
    return snaps


def parse_verb(text: bytes | str) -> tuple[str, str]:
    """``VERB TAG`` (one line) -> (verb, tag). :raise UsageError:"""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise UsageError("a snapshot verb must be UTF-8 text") from None
    line = text.strip()
    if "\n" in line:
        raise UsageError("one verb per write: create TAG, delete TAG or apply TAG")
    verb, _, tag = line.partition(" ")
    tag = tag.strip()
    if verb not in VERBS:
        raise UsageError(f"unknown verb {verb[:40]!r} (create TAG, delete TAG, apply TAG)")
    if not tag:
        raise UsageError(f"{verb} needs a snapshot tag (or, for delete and apply, an ID)")
    return verb, tag


async def internal_snapshot(export: Export, verb: str, tag: str) -> dict[str, object]:
    """Run ``verb`` (create, delete, apply) with ``tag`` on the device's active layer while
    guest requests wait; returns the snapshot's entry. The caller makes sure no job holds the
    device.

    :raise UsageError: see the module docstring; the image is as it was then.
    """
    from blockfs.nodes.qcow2 import apply_snapshot, create_snapshot, delete_snapshot

    if export.read_only:
        raise UsageError(f"device {export.name!r} is mounted read-only", errno=errno.EROFS)
    op = {"create": create_snapshot, "delete": delete_snapshot, "apply": apply_snapshot}[verb]
    async with export.quiesced():
        node = _qcow2_layer(export)
        if node.write_failure is not None:
            raise UsageError(
                f"device {export.name!r} takes no more writes: {node.write_failure}",
                errno=errno.EIO,
            )
        await node.flush()  # settle: queued decrements applied, everything durable
        snap = await op(node, tag)
        await node.flush()
        if verb == "apply":
            export.mtime_ns = time.time_ns()  # the file's content changed
    for entry in snapshot_table(export):
        if entry["id"] == snap.id:
            return entry
    return {"id": snap.id, "name": snap.name}  # deleted: what it was
