"""The copy engine and the job model below FUSE, on in-memory nodes, under trio's autojump
clock: each race is staged step by step (a request held at a gate), not left to luck.
"""

from __future__ import annotations

import trio
import trio.testing
from memnode import Gate, MemoryNode, pattern

from blockfs.errors import BlockfsError
from blockfs.jobs.blockcopy import BlockCopy, CopyError, RateLimiter
from blockfs.jobs.job import EventLog, Job, JobState
from blockfs.nodes.base import Status, chain_block_status
from blockfs.nodes.filter import WriteNotifyFilter

CS = 65536
SIZE = 16 * CS


async def _retry(exc: CopyError) -> bool:
    await trio.sleep(0.01)
    return True


def _engine(source: MemoryNode, target: MemoryNode, **kw: object) -> BlockCopy:
    copy = BlockCopy(source, target, CS, target_zero_init=False, **kw)  # type: ignore[arg-type]
    copy.bitmap.set_range(0, copy.clusters)
    return copy


def _reads_of(node: MemoryNode, cluster: int) -> int:
    return sum(1 for op, off, n in node.log if op == "read" and off <= cluster * CS < off + n)


async def test_a_cluster_redirtied_during_its_copy_is_copied_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bit is cleared when the copy claims the cluster, so a guest write landing while
    the copy reads sets it again: the cluster is copied a second time, with the new data.
    (Cleared when the copy finished, the bit would hide the write: the target would keep the
    old data and a mirror would be silently wrong.)"""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    target = MemoryNode(SIZE)
    copy = BlockCopy(disk, target, CS, target_zero_init=False, max_chunk=CS)
    guest = WriteNotifyFilter(disk, copy.mark_dirty)  # what a mirror puts above the disk
    copy.source = guest
    copy.bitmap.set_range(0, copy.clusters)
    gate = Gate("read", 3 * CS)
    disk.before = gate
    new = pattern(CS, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: copy.run(workers=2, on_error=_retry))
        await gate.reached.wait()
        assert copy.is_inflight(3) and not copy.bitmap.get(3)  # claimed: bit cleared
        await guest.write(3 * CS, new)  # the guest writes while the copy reads
        assert copy.bitmap.get(3), "the write must re-dirty the cluster being copied"
        gate.open()
    assert copy.dirty_count == 0 and not copy.busy
    assert bytes(target.data[3 * CS : 4 * CS]) == new
    assert target.data == disk.data
    assert _reads_of(disk, 3) == 2


async def test_copy_before_write_racing_a_worker_waits_for_its_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A guest write over a cluster a worker is copying waits for that copy (no second copy,
    no write before the old data reached the target)."""
    old = pattern(SIZE, 1)
    disk = MemoryNode(SIZE, fill=old)
    target = MemoryNode(SIZE)
    copy = _engine(disk, target, max_chunk=CS)
    gate = Gate("read", 5 * CS)
    disk.before = gate
    written = trio.Event()

    async def guest_write() -> None:
        assert await copy.copy_before_write(5 * CS + 100, 10, lambda *a: None)
        assert bytes(target.data[5 * CS : 6 * CS]) == old[5 * CS : 6 * CS]
        await disk.write(5 * CS + 100, b"N" * 10)
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: copy.run(workers=4, on_error=_retry))
        await gate.reached.wait()
        nursery.start_soon(guest_write)
        await trio.testing.wait_all_tasks_blocked()
        assert not written.is_set(), "the write went on before the cluster was copied"
        assert copy.is_pending(5)
        gate.open()
        await written.wait()
    assert _reads_of(disk, 5) == 1, "the cluster was copied twice"
    assert target.data == old  # the point in time: the guest write is not in the copy


async def test_copy_before_write_copies_itself_when_the_workers_copy_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old = pattern(SIZE, 1)
    disk = MemoryNode(SIZE, fill=old)
    target = MemoryNode(SIZE)
    copy = _engine(disk, target, max_chunk=CS)
    gate = Gate("write", 7 * CS, fail=BlockfsError("target is gone for a moment"))
    target.before = gate
    failures: list[CopyError] = []

    async def on_error(exc: CopyError) -> bool:
        failures.append(exc)
        await trio.sleep(1)  # the worker backs off: copy-before-write comes first
        return True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: copy.run(workers=2, on_error=on_error))
        await gate.reached.wait()

        async def cbw() -> None:
            assert await copy.copy_before_write(7 * CS, CS, lambda *a: None)

        nursery.start_soon(cbw)
        await trio.testing.wait_all_tasks_blocked()
        gate.open()
    assert len(failures) == 1
    assert target.data == old
    assert _reads_of(disk, 7) == 2  # the failed copy, then copy-before-write's own


class _CopyJob(Job):
    """A job that is only the engine: what backup, mirror and commit share."""

    type = "copy"

    def __init__(self, copy: BlockCopy, workers: int) -> None:
        super().__init__("j", "disk", EventLog())
        self.copy = copy
        self.workers = workers

    async def run(self) -> None:
        await self.copy.run(
            workers=self.workers,
            on_error=_retry,
            limiter=RateLimiter(lambda: self.speed),
            checkpoint=self.checkpoint,
            on_workers=self.set_body_tasks,
        )


async def test_pausing_with_n_workers_waits_for_every_worker_to_park(
    autojump_clock: trio.testing.MockClock,
) -> None:
    disk = MemoryNode(64 * CS, fill=pattern(64 * CS, 3))
    target = MemoryNode(64 * CS)
    copy = _engine(disk, target, max_chunk=CS)
    job = _CopyJob(copy, workers=4)
    gate = Gate("read", 0)  # one worker holds its copy
    disk.before = gate
    async with trio.open_nursery() as nursery:
        nursery.start_soon(job.main)
        await gate.reached.wait()
        job.pause()
        await trio.testing.wait_all_tasks_blocked()
        assert job.state is JobState.RUNNING, "paused while a worker still copies"
        assert job._parked == 3
        gate.open()
        await trio.testing.wait_all_tasks_blocked()
        assert job.state is JobState.PAUSED
        reads = len(disk.log)
        await trio.sleep(10)
        assert len(disk.log) == reads, "a paused job copied"
        job.resume()
        await job.wait_concluded()
    assert job.error is None and job.state is JobState.CONCLUDED
    assert target.data == disk.data


async def test_a_redirtied_bitmap_converges(autojump_clock: trio.testing.MockClock) -> None:
    """Writes keep re-dirtying clusters while the copy runs; once they stop, the copy ends
    with the target equal to the source, and wait_until_dirty wakes on the next write."""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 4))
    target = MemoryNode(SIZE)
    copy = BlockCopy(disk, target, CS, target_zero_init=False, max_chunk=2 * CS)
    guest = WriteNotifyFilter(disk, copy.mark_dirty)
    copy.source = guest
    copy.bitmap.set_range(0, copy.clusters)

    async def slow_reads(op: str, offset: int, length: int) -> None:
        await trio.sleep(0.01)

    disk.before = slow_reads

    async def writer() -> None:
        for k in range(200):
            await guest.write((k * 7 % 16) * CS + 512, pattern(4096, k % 251))
            await trio.sleep(0.003)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await copy.run(workers=3, on_error=_retry)
    # run() may end while writes still came; then it is run again, as a mirror does
    while copy.dirty_count:
        await copy.run(workers=3, on_error=_retry)
    assert target.data == disk.data
    stats = copy.statistics()
    assert stats.dirty == 0 and stats.in_flight == 0 and stats.bytes_copied > SIZE

    woke = trio.Event()

    async def waiter() -> None:
        await copy.wait_until_dirty()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        await guest.write(CS, b"x")
        await woke.wait()
    assert copy.dirty_count == 1


async def test_zero_runs_and_runs_below_the_base_are_not_copied(
    autojump_clock: trio.testing.MockClock,
) -> None:
    base = MemoryNode(SIZE, fill=pattern(SIZE, 5))
    top = MemoryNode(SIZE, backing=base)
    await top.write(1 * CS, pattern(CS, 6))
    await top.write_zeroes(4 * CS, CS, may_unmap=True)
    ext = await chain_block_status(top, 0, SIZE, base=base)
    assert ext.length == CS and not ext.status & (Status.ALLOCATED | Status.ZERO)
    ext = await chain_block_status(top, 4 * CS, CS, base=base)
    assert ext.status & Status.ZERO
    # commit's copy: what the chain above the base holds goes into the base
    copy = _engine(top, base, base=base)
    top.log.clear()
    await copy.run(workers=2, on_error=_retry)
    writes = [(op, off // CS) for op, off, _ in base.log if op != "read"]
    assert writes == [("write", 1), ("write_zeroes", 4)]
    assert [off // CS for op, off, _ in top.log if op == "read"] == [1]
    stats = copy.statistics()
    assert stats.bytes_copied == CS and stats.bytes_zeroed == CS
    assert stats.bytes_skipped == SIZE - 2 * CS


async def test_the_rate_limit_spreads_the_copy_over_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    size = 32 * CS  # 2 MiB at 512 KiB/s: about 3 s after the first chunk
    disk = MemoryNode(size, fill=pattern(size, 7))
    copy = _engine(disk, MemoryNode(size), max_chunk=CS)
    t0 = trio.current_time()
    await copy.run(workers=4, on_error=_retry, limiter=RateLimiter(lambda: 512 * 1024))
    assert 3.0 <= trio.current_time() - t0 <= 4.5


async def test_write_blocking_waits_for_a_copy_in_flight_and_keeps_partial_bits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A write-blocking write over a cluster being copied waits for that copy (else the old
    data read by the copy could land on the target after the new data); a cluster the write
    covers whole is clean after it, one it covers in part keeps its dirty bit."""
    disk = MemoryNode(SIZE, fill=pattern(SIZE, 1))
    target = MemoryNode(SIZE)
    copy = _engine(disk, target, max_chunk=CS)
    gate = Gate("read", 2 * CS)
    disk.before = gate
    new = pattern(CS + 512, 2)

    async def guest_write() -> None:
        await copy.write_blocking(
            2 * CS,
            len(new),
            lambda: disk.write(2 * CS, new),
            lambda: target.write(2 * CS, new),
            lambda exc: None,
        )

    async with trio.open_nursery() as nursery:
        claimed = copy.claim_run(2, 1)
        nursery.start_soon(copy.copy_claimed, *claimed)
        await gate.reached.wait()
        nursery.start_soon(guest_write)
        await trio.sleep(1)
        assert ("write", 2 * CS, len(new)) not in disk.log, "the write must wait for the copy"
        gate.open()
    assert bytes(target.data[2 * CS : 2 * CS + len(new)]) == new
    assert not copy.bitmap.get(2)  # covered whole: clean
    assert copy.bitmap.get(3)  # covered in part, dirty before: still dirty
    await copy.run(workers=1, on_error=_retry)
    assert bytes(target.data) == bytes(disk.data)
