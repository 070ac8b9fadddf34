"""Internal snapshots of a qcow2 image: list, create, apply (revert) and delete.

Each operation works on a :class:`Qcow2Node` opened read-write that nothing else uses (the CLI
opens the file itself; a mounted image is never changed here), inside the node's
:meth:`~Qcow2Node.rewriting_tables`, and only through the node's public interface: its
refcounts, :meth:`~Qcow2Node.write_metadata` (so the failsafe and the fault hooks see every
write), and the switches of the active L1 table and of the snapshot table.

Refcounts follow QEMU's model, the one ``qemu-img check`` verifies: a cluster's refcount is the
number of paths to it from the active L1 table and every snapshot's L1 table. The order of
writes keeps a kill at any instant to leaked clusters or stale COPIED flags (both repaired by
``qemu-img check -r all``), never a reference to a freed cluster.
"""

from __future__ import annotations

import time
from array import array

from blockfs.errors import UsageError
from blockfs.nodes.qcow2.compressed import CompressedEntry
from blockfs.nodes.qcow2.format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_SNAPSHOTS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    Snapshot,
    l1_entries_needed,
    pack_u64_table,
)
from blockfs.nodes.qcow2.node import Qcow2Node


def find_snapshot(node: Qcow2Node, key: str) -> Snapshot:
    """The snapshot whose ID, else whose name, is ``key``. :raise UsageError:"""
    for s in node.snapshots:
        if s.id == key:
            return s
    for s in node.snapshots:
        if s.name == key:
            return s
    raise UsageError(f"{node.filename}: no snapshot {key!r}")


def _clusters(node: Qcow2Node, offset: int, length: int) -> range:
    cb = node.cluster_bits
    return range(offset >> cb, (offset + length + node.cluster_size - 1) >> cb)


async def _tree_deltas(node: Qcow2Node, l1: array[int], delta: int, deltas: dict[int, int]) -> None:
    """Add ``delta`` for every L2 table and host cluster reachable from ``l1``."""
    cb = node.cluster_bits
    entries = node.cluster_size // 8
    for l1e in l1:
        off = l1e & L1E_OFFSET_MASK
        if not off:
            continue
        deltas[off >> cb] = deltas.get(off >> cb, 0) + delta
        for e in await node.read_table(off, entries):
            if e & OFLAG_COMPRESSED:
                for c in CompressedEntry.decode(e, cb).host_clusters(cb):
                    deltas[c] = deltas.get(c, 0) + delta
            elif e & L2E_OFFSET_MASK:
                c = (e & L2E_OFFSET_MASK) >> cb
                deltas[c] = deltas.get(c, 0) + delta


async def _fix_copied_flags(node: Qcow2Node) -> None:
    """Set COPIED on exactly the active L1/L2 entries whose cluster has refcount 1."""
    cb = node.cluster_bits
    entries = node.cluster_size // 8
    rc = node.refcounts
    for i, l1e in enumerate(node.active_l1):
        off = l1e & L1E_OFFSET_MASK
        if not off:
            continue
        table = await node.read_table(off, entries)
        changed = False
        for j, e in enumerate(table):
            if e & OFLAG_COMPRESSED:
                want = e & ~OFLAG_COPIED
            elif e & L2E_OFFSET_MASK:
                one = await rc.get((e & L2E_OFFSET_MASK) >> cb) == 1
                want = (e | OFLAG_COPIED) if one else (e & ~OFLAG_COPIED)
            else:
                want = e
            if want != e:
                table[j] = want
                changed = True
        if changed:
            await node.write_metadata("l2_update", off, pack_u64_table(table))
        one = await rc.get(off >> cb) == 1
        want = (l1e | OFLAG_COPIED) if one else (l1e & ~OFLAG_COPIED)
        if want != l1e:
            await node.set_l1_entry(i, want)


async def _write_l1_copy(node: Qcow2Node, l1: array[int]) -> int:
    """Write ``l1`` into newly allocated clusters; returns their offset (0 for an empty L1)."""
    if not l1:
        return 0
    raw = pack_u64_table(l1)
    off = await node.refcounts.alloc(len(_clusters(node, 0, len(raw))))
    await node.write_metadata("l1_alloc", off, raw)
    return off


async def _write_table(node: Qcow2Node, snaps: list[Snapshot]) -> None:
    """Write a new snapshot table, switch the header to it, free the old one."""
    version = node.header.version
    raw = b"".join(s.pack(version) for s in snaps)
    new_off = 0
    if raw:
        new_off = await node.refcounts.alloc(len(_clusters(node, 0, len(raw))))
        await node.write_metadata("snapshot_table", new_off, raw)
    old_off = node.header.snapshots_offset if node.header.nb_snapshots else 0
    old_len = len(b"".join(s.pack(version) for s in node.snapshots))
    await node.switch_snapshot_table(snaps, new_off)
    if old_off and old_len:
        await node.drop_references({c: -1 for c in _clusters(node, old_off, old_len)})


def _check_writable(node: Qcow2Node) -> None:
    if node.read_only:
        raise UsageError(f"{node.filename}: snapshots need the image opened read-write")
    if node.refcounts.max < 2:
        # a snapshot shares every cluster: refcounts of 2 must fit (qemu-img refuses too)
        raise UsageError(
            f"{node.filename}: snapshots need refcount_bits of at least 2 "
            f"(this image has {node.refcounts.bits})"
        )


async def create_snapshot(node: Qcow2Node, name: str) -> Snapshot:
    """Take an internal snapshot of the active disk state named ``name``.

    :raise UsageError: an empty or duplicate name, too many snapshots.
    """
    _check_writable(node)
    if not name:
        raise UsageError("a snapshot needs a name")
    if any(s.name == name for s in node.snapshots):
        raise UsageError(f"{node.filename}: a snapshot named {name!r} exists already")
    if len(node.snapshots) >= MAX_SNAPSHOTS:
        raise UsageError(f"{node.filename}: too many snapshots")
    async with node.rewriting_tables():
        # 1. every cluster of the active tree gains a reference (leaks if we stop here)
        deltas: dict[int, int] = {}
        await _tree_deltas(node, node.active_l1, 1, deltas)
        await node.refcounts.change(deltas)
        # 2. nothing in the active tree is exclusively ours any more: clear COPIED
        await _fix_copied_flags(node)
        # 3. the snapshot's copy of L1
        l1 = node.active_l1
        l1_off = await _write_l1_copy(node, l1)
        ids = [int(s.id) for s in node.snapshots if s.id.isdigit()]
        now = time.time_ns()
        snap = Snapshot(
            l1_table_offset=l1_off,
            l1_size=len(l1),
            id=str(max(ids, default=0) + 1),
            name=name,
            date_sec=now // 1_000_000_000,
            date_nsec=now % 1_000_000_000,
            vm_clock_nsec=0,
            vm_state_size=0,
            disk_size=node.size,
            extra=bytes(16),
        )
        # 4. the table with the new entry; the header switch makes the snapshot exist
        await _write_table(node, [*node.snapshots, snap])
    return snap


async def delete_snapshot(node: Qcow2Node, key: str) -> Snapshot:
    """Delete the snapshot with ID or name ``key``. :raise UsageError: no such snapshot."""
    _check_writable(node)
    snap = find_snapshot(node, key)
    async with node.rewriting_tables():
        await _write_table(node, [s for s in node.snapshots if s is not snap])
        deltas: dict[int, int] = {}
        l1 = await node.read_table(snap.l1_table_offset, snap.l1_size)
        await _tree_deltas(node, l1, -1, deltas)
        if snap.l1_size:
            for c in _clusters(node, snap.l1_table_offset, snap.l1_size * 8):
                deltas[c] = deltas.get(c, 0) - 1
        await node.drop_references(deltas)
        await _fix_copied_flags(node)
    return snap


async def apply_snapshot(node: Qcow2Node, key: str) -> Snapshot:
    """Revert the active disk state to the snapshot with ID or name ``key``.

    :raise UsageError: no such snapshot, or one taken at another disk size.
    """
    _check_writable(node)
    snap = find_snapshot(node, key)
    if snap.disk_size is not None and snap.disk_size != node.size:
        raise UsageError(
            f"{node.filename}: snapshot {key!r} has disk size {snap.disk_size}, the image "
            f"{node.size}; reverting across a resize is not supported"
        )
    async with node.rewriting_tables():
        l1 = await node.read_table(snap.l1_table_offset, snap.l1_size)
        needed = l1_entries_needed(node.size, node.cluster_bits)
        if len(l1) < needed:
            l1.extend([0] * (needed - len(l1)))
        # 1. the snapshot's tree gains the reference of the active L1
        deltas: dict[int, int] = {}
        await _tree_deltas(node, l1, 1, deltas)
        await node.refcounts.change(deltas)
        # 2. a new active L1 (COPIED cleared: every cluster is shared with the snapshot now)
        for i, e in enumerate(l1):
            l1[i] = e & ~OFLAG_COPIED
        new_off = await _write_l1_copy(node, l1)
        old_l1, old_off = node.active_l1, node.header.l1_table_offset
        await node.switch_active_l1(l1, new_off)
        # 3. the old active tree loses its reference, the old L1 is freed
        deltas = {}
        await _tree_deltas(node, old_l1, -1, deltas)
        if old_l1:
            for c in _clusters(node, old_off, len(old_l1) * 8):
                deltas[c] = deltas.get(c, 0) - 1
        await node.drop_references(deltas)
        await _fix_copied_flags(node)
    return snap
