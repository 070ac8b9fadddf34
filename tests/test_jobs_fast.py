"""Jobs, the registry and the graph verbs below FUSE: a backup on in-memory nodes through a
fake host (the seam is small enough to fake in a few lines), under trio's autojump clock."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from memnode import Gate, MemoryNode, pattern

from blockfs.errors import BlockfsError, JobError, UsageError
from blockfs.export import Export
from blockfs.jobs.backup import BackupJob, BackupSpec, CopyBeforeWriteFilter
from blockfs.jobs.job import EventLog, Job, JobState
from blockfs.jobs.mirror import MirrorJob, MirrorSpec
from blockfs.jobs.registry import JOB_KINDS, JobKind, JobRegistry
from blockfs.jobs.target import OpenedTarget
from blockfs.nodes.base import Node
from blockfs.nodes.filter import WriteNotifyFilter
from blockfs.nodes.registry import close_chain, open_image, protocol_file

CS = 65536
SIZE = 32 * CS


class FakeHost:
    """A JobHost: exports by name, an event log, published files in a list."""

    def __init__(self, nursery: trio.Nursery, *exports: Export) -> None:
        self.events = EventLog()
        self.nursery = nursery
        self.exports = {e.name: e for e in exports}
        self.published: dict[str, Export] = {}
        self.targets_in_use = False

    def export(self, name: str) -> Export | None:
        return self.exports.get(name)

    def publish_view(self, export: Export, *, like: Export) -> SimpleNamespace:
        self.published[export.name] = export
        return SimpleNamespace(name=export.name)

    def withdraw_view(self, file: SimpleNamespace) -> None:
        del self.published[file.name]

    def check_not_in_use(
        self,
        what: str,
        node: Node,
        *,
        with_backing: bool = False,
        as_writer: bool = False,
        except_device: str | None = None,
    ) -> None:
        if self.targets_in_use:
            raise UsageError(f"{what}: in use", errno=errno.EBUSY)


def _backup(host: FakeHost, export: Export, target: Node, extra: str = "") -> BackupJob:
    spec = BackupSpec.parse(f"device={export.name} target=/nowhere {extra}".encode())
    return BackupJob(spec, host, export, target, target_zero_init=True)


async def test_backup_keeps_the_point_in_time_while_the_guest_writes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old = pattern(SIZE, 1)
    disk = MemoryNode(SIZE, fill=old)
    export = Export("d", disk)
    target = MemoryNode(SIZE)

    async def slow(op: str, offset: int, length: int) -> None:
        await trio.sleep(0.01)

    disk.before = slow
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _backup(host, export, target, "view=on speed=4M")
        await job.start()
        assert isinstance(export.root, CopyBeforeWriteFilter)
        view = host.published["d@d"]
        nursery.start_soon(job.main)
        for k in range(40):  # the guest writes all over the disk while the job copies
            await export.write((k * 13 % 32) * CS + 4096, pattern(8192, 100 + k))
            if job.state is not JobState.RUNNING:  # no await between this and the read
                break
            assert await view.read(0, SIZE) == old  # the view stays the point in time
            await trio.sleep(0.02)
        await job.wait_concluded()
    assert job.error is None and job.state is JobState.CONCLUDED
    assert target.data == old
    assert export.root is disk and not host.published  # the filter and the view are gone
    assert job.offset == job.len == SIZE
    # A handle still open on the view once the job closed its target fails cleanly.
    with pytest.raises(BlockfsError) as exc:
        await view.read(0, 4096)
    assert exc.value.errno == errno.ENODEV


async def test_pausing_a_backup_with_four_workers(autojump_clock: trio.testing.MockClock) -> None:
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 2))
    export = Export("d", disk)
    gate = Gate("read", 0)
    disk.before = gate
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _backup(host, export, MemoryNode(SIZE))
        job.copy.max_run = 1  # one cluster per copy: four workers, four copies in flight
        await job.start()
        nursery.start_soon(job.main)
        await gate.reached.wait()
        job.pause()
        await trio.testing.wait_all_tasks_blocked()
        assert job.state is JobState.RUNNING and job.body_tasks == 4 and job._parked == 3
        gate.open()
        await trio.testing.wait_all_tasks_blocked()
        assert job.state is JobState.PAUSED
        copied = job.offset
        await trio.sleep(5)
        assert job.offset == copied
        # copy-before-write goes on while the job is paused
        await export.write(20 * CS, b"x" * 10)
        assert job.copy.dirty_count == 32 - copied // CS - 1
        job.resume()
        await job.wait_concluded()
    assert job.error is None


async def test_a_failing_target_under_report_fails_the_job_and_never_the_guest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 3))
    export = Export("d", disk)
    target = MemoryNode(SIZE)

    async def broken(op: str, offset: int, length: int) -> None:
        if op == "write":
            raise BlockfsError("no space", errno=errno.ENOSPC)

    target.before = broken
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _backup(host, export, target, "on-target-error=report")
        await job.start()
        await export.write(0, b"guest")  # copy-before-write fails; the write does not
        await job.main()
    assert job.error is not None and "no space" in job.error
    assert bytes(disk.data[:5]) == b"guest"
    assert export.root is disk


async def test_graph_verbs_wait_for_requests_in_flight_and_keep_filters_live(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = MemoryNode(SIZE, fill=pattern(SIZE, 4))
    disk = MemoryNode(SIZE, backing=base)
    export = Export("d", disk)
    gate = Gate("read", 0)
    disk.before = gate
    notified: list[tuple[int, int]] = []

    async def make(root: Node) -> WriteNotifyFilter:
        return WriteNotifyFilter(root, lambda o, n: notified.append((o, n)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(export.read, 0, 512)
        await gate.reached.wait()
        inserted: list[WriteNotifyFilter] = []

        async def insert() -> None:
            inserted.append(await export.insert_filter(make))

        nursery.start_soon(insert)
        await trio.testing.wait_all_tasks_blocked()
        assert not inserted, "the graph changed under a request in flight"
        gate.open()
    outer = inserted[0]
    assert export.root is outer and outer.backing is base and outer.size == SIZE
    inner = await export.insert_filter(make)
    await export.write(CS, b"abc")
    assert notified == [(CS, 3), (CS, 3)]
    # live, not copied: a chain change below shows through every filter
    disk.backing = None
    assert inner.backing is None and outer.backing is None
    # removing the lower filter rebinds the upper one's passed-through calls
    assert await export.remove_filter(outer)
    assert export.root is inner
    assert await export.remove_filter(inner)
    assert export.root is disk
    assert not await export.remove_filter(inner)
    await export.write(CS, b"abc")
    assert len(notified) == 2
    new = MemoryNode(SIZE)
    seen: list[object] = []

    async def to_new(old: object) -> MemoryNode:
        seen.append(old)
        return new

    old = await export.replace_root(to_new)
    assert old is disk and seen == [disk] and export.root is new

    async def too_big(old: object) -> MemoryNode:
        return MemoryNode(SIZE + 1)

    with pytest.raises(ValueError):
        await export.replace_root(too_big)
    assert export.root is new


class _StartFails(Job):
    type = "test"

    async def start(self) -> None:
        raise BlockfsError("cannot insert the filter", errno=errno.EIO)


async def test_registry_starts_every_kind_through_one_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A new kind is one row; busy and id checks, the shared-file check and the cleanup of a
    failed start come with it."""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 5))
    export = Export("d", disk)
    targets: list[MemoryNode] = []

    async def open_target(spec: BackupSpec, device: Export) -> OpenedTarget:
        node = MemoryNode(SIZE)
        targets.append(node)
        return OpenedTarget(node, zero_init=True, file=None, path=spec.target)

    def make_failing(spec: BackupSpec, host: object, device: Export, t: object) -> Job:
        return _StartFails(spec.id, device.name, EventLog())

    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        kinds = {
            "backup": JobKind(BackupSpec.parse, BackupJob.make, open_target),
            "broken": JobKind(BackupSpec.parse, make_failing, open_target),
        }
        assert set(JOB_KINDS) == {"backup", "mirror", "commit", "stream"}
        registry = JobRegistry(host, kinds)
        added: list[str] = []
        registry.on_added = lambda job: added.append(job.id)
        registry.on_removed = lambda job: added.remove(job.id)

        with pytest.raises(BlockfsError, match="cannot insert"):
            await registry.start("broken", b"device=d target=/t")
        assert not registry.jobs and not added and targets[-1].closed
        assert export.root is disk

        with pytest.raises(UsageError) as info:
            await registry.start("backup", b"device=nope target=/t")
        assert info.value.errno == errno.ENOENT

        disk.before = Gate("read", 0)  # keep the job running
        job = await registry.start("backup", b"device=d target=/t speed=1M")
        assert registry.jobs == {"d": job} and added == ["d"]
        opened = len(targets)
        with pytest.raises(JobError) as busy:
            await registry.start("backup", b"device=d target=/t2 id=other")
        assert busy.value.errno == errno.EBUSY and len(targets) == opened

        events = [e["event"] for e in host.events]
        assert events.count("JOB_START_FAILED") == 3
        await registry.aclose()  # cancels and waits: the filter left the graph
        assert job.state is JobState.CONCLUDED and job.cancelled
        assert export.root is disk
        registry.dismiss(job)
        assert not registry.jobs and not added

        host.targets_in_use = True  # the target is a file a mounted image uses
        with pytest.raises(UsageError, match="target /t: in use"):
            await registry.start("backup", b"device=d target=/t")
        assert targets[-1].closed and not registry.jobs and export.root is disk


async def test_a_read_only_image_reopens_read_write_in_place(tmp_path: Path) -> None:
    """What commit and stream need of a backing file: the same descriptor, now writable,
    and back; the data written is in the file."""
    path = tmp_path / "base.raw"
    path.write_bytes(pattern(SIZE, 9))
    node = await open_image(str(path), fmt="raw", read_only=True)
    try:
        fd = protocol_file(node).fd  # type: ignore[union-attr]
        await node.reopen(False)
        assert not node.read_only and protocol_file(node).fd == fd  # type: ignore[union-attr]
        await node.write(CS, b"written")
        await node.flush()
        await node.reopen(True)
        assert node.read_only and protocol_file(node).read_only  # type: ignore[union-attr]
        assert os.get_inheritable(fd) is False
    finally:
        await close_chain(node)
    assert path.read_bytes()[CS : CS + 7] == b"written"


# -- mirror -------------------------------------------------------------------------------


def _mirror(host: FakeHost, export: Export, target: Node, extra: str = "") -> MirrorJob:
    spec = MirrorSpec.parse(f"device={export.name} target=/nowhere {extra}".encode())
    opened = OpenedTarget(target, zero_init=True, file=None, path="/nowhere")
    return MirrorJob(spec, host, export, opened)


async def _until_ready(host: FakeHost, job: Job) -> None:
    while job.state is not JobState.READY:
        await host.events.wait_changed()


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
async def test_mirror_converges_under_writes_and_switches(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    """The guest writes all over the disk during the copy and while the job is ready; after
    complete the export serves the target, which holds every write, and the old disk is
    closed. In write-blocking mode the target holds each write the moment it completed."""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    export = Export("d", disk)
    target = MemoryNode(SIZE)

    async def slow(op: str, offset: int, length: int) -> None:
        await trio.sleep(0.01)

    disk.before = slow
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _mirror(host, export, target, f"copy-mode={mode} speed=2M")
        await job.start()
        nursery.start_soon(job.main)
        for k in range(60):
            data = pattern(8192, 100 + k)
            offset = (k * 13 % 32) * CS + 4096
            await export.write(offset, data)
            if mode == "write-blocking":
                assert bytes(target.data[offset : offset + 8192]) == data
        await _until_ready(host, job)
        await export.write(5 * CS, pattern(CS, 7))
        expected = bytes(disk.data)
        job.complete()
        await job.wait_concluded()
    assert job.error is None and job.switched
    assert export.root is target and disk.closed
    assert bytes(target.data) == expected
    names = [e["event"] for e in host.events]
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED")


async def test_mirror_cancel_in_ready_keeps_source_and_a_consistent_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    export = Export("d", disk)
    target = MemoryNode(SIZE)
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _mirror(host, export, target)
        await job.start()
        nursery.start_soon(job.main)
        await _until_ready(host, job)
        await export.write(3 * CS, pattern(100, 9))
        job.cancel()
        await job.wait_concluded()
        await export.write(4 * CS, pattern(100, 10))  # after the job: the source's alone
    assert job.error is None and not job.cancelled and not job.switched
    assert export.root is disk and not disk.closed and target.closed
    assert bytes(target.data[3 * CS : 3 * CS + 100]) == pattern(100, 9)
    assert bytes(target.data[4 * CS : 4 * CS + 100]) == pattern(SIZE, 1)[4 * CS : 4 * CS + 100]
    assert "BLOCK_JOB_COMPLETED" in [e["event"] for e in host.events]


async def test_mirror_write_blocking_target_failure_never_fails_the_guest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A target write that fails under write-blocking: the guest's write succeeds, the job
    fails (on-target-error=report) and steps aside; the disk holds the write."""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    export = Export("d", disk)
    target = MemoryNode(SIZE)
    async with trio.open_nursery() as nursery:
        host = FakeHost(nursery, export)
        job = _mirror(host, export, target, "copy-mode=write-blocking")
        await job.start()
        nursery.start_soon(job.main)
        await _until_ready(host, job)
        gate = Gate("write", 7 * CS, fail=BlockfsError("no space", errno=errno.ENOSPC))
        gate.open()  # fail at once
        target.before = gate
        await export.write(7 * CS, pattern(CS, 3))
        await job.wait_concluded()
    assert bytes(disk.data[7 * CS : 8 * CS]) == pattern(CS, 3)
    assert job.error is not None and "target write failed" in job.error
    assert export.root is disk
