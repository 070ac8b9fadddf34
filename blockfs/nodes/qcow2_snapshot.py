"""Internal snapshots of a qcow2 image: list, create, apply (revert) and delete.

Each operation works on a :class:`Qcow2Node` opened read-write that nothing else uses (the CLI
opens the file itself; a mounted image is never changed here). Refcounts follow QEMU's model,
the one ``qemu-img check`` verifies: a cluster's refcount is the number of paths to it from the
active L1 table and every snapshot's L1 table. The order of writes keeps a kill at any instant
to leaked clusters or stale COPIED flags (both repaired by ``qemu-img check -r all``), never a
reference to a freed cluster.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from array import array

from blockfs.errors import UsageError
from blockfs.nodes.qcow2 import Qcow2Node, _be_bytes, _u64_table
from blockfs.nodes.qcow2_format import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_SNAPSHOTS,
    OFF_L1,
    OFF_SNAPSHOTS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    Snapshot,
    l1_entries_needed,
)


def find_snapshot(node: Qcow2Node, key: str) -> Snapshot:
    """The snapshot whose ID, else whose name, is ``key``. :raise UsageError:"""
    for s in node.snapshots:
        if s.id == key:
            return s
    for s in node.snapshots:
        if s.name == key:
            return s
    raise UsageError(f"{node.filename}: no snapshot {key!r}")


async def _read_l1(node: Qcow2Node, offset: int, entries: int) -> array[int]:
    if not entries:
        return array("Q")
    return _u64_table(await node.child.read(offset, entries * 8))


async def _tree_deltas(node: Qcow2Node, l1: array[int], delta: int, deltas: dict[int, int]) -> None:
    """Add ``delta`` for every L2 table and host cluster reachable from ``l1``."""
    cb = node._cb
    cs = node._cs
    for l1e in l1:
        off = l1e & L1E_OFFSET_MASK
        if not off:
            continue
        deltas[off >> cb] = deltas.get(off >> cb, 0) + delta
        for e in _u64_table(await node.child.read(off, cs)):
            if e & OFLAG_COMPRESSED:
                x = 62 - (cb - 8)
                coff = e & ((1 << x) - 1)
                nsec = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
                last = coff + nsec * 512 - (coff & 511) - 1
                for c in range(coff >> cb, (last >> cb) + 1):
                    deltas[c] = deltas.get(c, 0) + delta
            elif e & L2E_OFFSET_MASK:
                c = (e & L2E_OFFSET_MASK) >> cb
                deltas[c] = deltas.get(c, 0) + delta


async def _change(node: Qcow2Node, deltas: dict[int, int]) -> None:
    freed = await node._change_refcounts(deltas)
    for c in freed:
        await node.child.discard(c << node._cb, node._cs)


async def _fix_copied_flags(node: Qcow2Node) -> None:
    """Set COPIED on exactly the active L1/L2 entries whose cluster has refcount 1."""
    cb = node._cb
    cs = node._cs
    l1 = node._l1
    for i, l1e in enumerate(l1):
        off = l1e & L1E_OFFSET_MASK
        if not off:
            continue
        table = _u64_table(await node.child.read(off, cs))
        changed = False
        for j, e in enumerate(table):
            if e & OFLAG_COMPRESSED:
                want = e & ~OFLAG_COPIED
            elif e & L2E_OFFSET_MASK:
                rc = await node._refcount((e & L2E_OFFSET_MASK) >> cb)
                want = (e | OFLAG_COPIED) if rc == 1 else (e & ~OFLAG_COPIED)
            else:
                want = e
            if want != e:
                table[j] = want
                changed = True
        if changed:
            await node.child.write(off, _be_bytes(table))
        rc = await node._refcount(off >> cb)
        want = (l1e | OFLAG_COPIED) if rc == 1 else (l1e & ~OFLAG_COPIED)
        if want != l1e:
            l1[i] = want
            await node.child.write(node._l1_off + i * 8, struct.pack(">Q", want))


async def _write_table(node: Qcow2Node, snaps: list[Snapshot]) -> None:
    """Write a new snapshot table, switch the header to it, free the old one."""
    version = node.header.version
    raw = b"".join(s.pack(version) for s in snaps)
    cb = node._cb
    new_off = 0
    if raw:
        n = (len(raw) + node._cs - 1) >> cb
        new_off = await node._alloc_clusters(n)
        await node.child.write(new_off, raw)
    old_off = node.header.snapshots_offset if node.header.nb_snapshots else 0
    old_len = len(b"".join(s.pack(version) for s in node.snapshots))
    await node.child.write(OFF_SNAPSHOTS, struct.pack(">IQ", len(snaps), new_off))
    node.header = dataclasses.replace(
        node.header, nb_snapshots=len(snaps), snapshots_offset=new_off
    )
    node.snapshots = list(snaps)
    if old_off and old_len:
        n = (old_len + node._cs - 1) >> cb
        await _change(node, {c: -1 for c in range(old_off >> cb, (old_off >> cb) + n)})


def _check_writable(node: Qcow2Node) -> None:
    if node.read_only:
        raise UsageError(f"{node.filename}: snapshots need the image opened read-write")
    if node._rc_max < 2:
        # a snapshot shares every cluster: refcounts of 2 must fit (qemu-img refuses too)
        raise UsageError(
            f"{node.filename}: snapshots need refcount_bits of at least 2 "
            f"(this image has {node._rc_bits})"
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
    async with node._meta_lock:
        node.drop_caches()
        cb = node._cb
        # 1. every cluster of the active tree gains a reference (leaks if we stop here)
        deltas: dict[int, int] = {}
        await _tree_deltas(node, node._l1, 1, deltas)
        await node._change_refcounts(deltas)
        # 2. nothing in the active tree is exclusively ours any more: clear COPIED
        await _fix_copied_flags(node)
        # 3. the snapshot's copy of L1
        l1 = node._l1
        l1_size = len(l1)
        l1_off = 0
        if l1_size:
            l1_off = await node._alloc_clusters((l1_size * 8 + node._cs - 1) >> cb)
            await node.child.write(l1_off, _be_bytes(l1))
        ids = [int(s.id) for s in node.snapshots if s.id.isdigit()]
        now = time.time_ns()
        snap = Snapshot(
            l1_table_offset=l1_off,
            l1_size=l1_size,
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
        node.drop_caches()
    return snap


async def delete_snapshot(node: Qcow2Node, key: str) -> Snapshot:
    """Delete the snapshot with ID or name ``key``. :raise UsageError: no such snapshot."""
    _check_writable(node)
    snap = find_snapshot(node, key)
    async with node._meta_lock:
        node.drop_caches()
        cb = node._cb
        await _write_table(node, [s for s in node.snapshots if s is not snap])
        deltas: dict[int, int] = {}
        l1 = await _read_l1(node, snap.l1_table_offset, snap.l1_size)
        await _tree_deltas(node, l1, -1, deltas)
        if snap.l1_size:
            first = snap.l1_table_offset >> cb
            for c in range(first, first + ((snap.l1_size * 8 + node._cs - 1) >> cb)):
                deltas[c] = deltas.get(c, 0) - 1
        await _change(node, deltas)
        await _fix_copied_flags(node)
        node.drop_caches()
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
    async with node._meta_lock:
        node.drop_caches()
        cb = node._cb
        cs = node._cs
        l1 = await _read_l1(node, snap.l1_table_offset, snap.l1_size)
        needed = l1_entries_needed(node.size, cb)
        if len(l1) < needed:
            l1.extend([0] * (needed - len(l1)))
        # 1. the snapshot's tree gains the reference of the active L1
        deltas: dict[int, int] = {}
        await _tree_deltas(node, l1, 1, deltas)
        await node._change_refcounts(deltas)
        # 2. a new active L1 (COPIED cleared: every cluster is shared with the snapshot now)
        for i, e in enumerate(l1):
            l1[i] = e & ~OFLAG_COPIED
        new_off = 0
        if l1:
            new_off = await node._alloc_clusters((len(l1) * 8 + cs - 1) >> cb)
            await node.child.write(new_off, _be_bytes(l1))
        old_l1, old_off = node._l1, node._l1_off
        await node.child.write(OFF_L1, struct.pack(">IQ", len(l1), new_off))
        node._l1 = l1
        node._l1_off = new_off
        node.header = dataclasses.replace(node.header, l1_size=len(l1), l1_table_offset=new_off)
        # 3. the old active tree loses its reference, the old L1 is freed
        deltas = {}
        await _tree_deltas(node, old_l1, -1, deltas)
        if old_l1:
            for c in range(old_off >> cb, (old_off >> cb) + ((len(old_l1) * 8 + cs - 1) >> cb)):
                deltas[c] = deltas.get(c, 0) - 1
        await _change(node, deltas)
        await _fix_copied_flags(node)
        node.drop_caches()
    return snap
