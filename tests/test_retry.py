"""The retry filter over an in-memory child that fails transiently N times, under trio's
autojump clock: backoff waits cost no real time, and the clock tells how long they were."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from blockfs.errors import BlockfsError, TransientError, UsageError
from blockfs.nodes.base import Extent, Node, Status
from blockfs.nodes.filter import NODE_OPERATIONS
from blockfs.nodes.retry import RetryFilter, RetryPolicy

SIZE = 1 << 20
#: the operations the filter retries (the rest are listed as passed through)
RETRIED = sorted(NODE_OPERATIONS - RetryFilter.passes_through)


class FlakyNode(Node):
    """Bytes in memory behind a "connection" that breaks: the next ``failures`` requests raise
    TransientError; a ``reconnect`` first fails ``reconnect_failures`` times."""

    format_name = "flaky"

    def __init__(self, failures: int = 0, *, reached: bool = True) -> None:
        self.size, self.read_only, self.filename = SIZE, False, "flaky://disk"
        self.data = bytearray(SIZE)
        self.failures = failures
        self.reached = reached
        self.reconnect_failures = 0
        self.reconnect_error: BlockfsError | None = None
        self.calls: Counter[str] = Counter()
        self.reconnects = 0
        self.final_error: BlockfsError | None = None

    def _request(self, op: str) -> None:
        self.calls[op] += 1
        if self.final_error is not None:
            raise self.final_error
        if self.failures:
            self.failures -= 1
            raise TransientError("connection reset", errno=errno.ECONNRESET, reached=self.reached)

    async def read(self, offset: int, length: int) -> bytes:
        self._request("read")
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self._request("write")
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._request("write_zeroes")
        self.data[offset : offset + length] = bytes(length)

    async def discard(self, offset: int, length: int) -> None:
        self._request("discard")

    async def flush(self) -> None:
        self._request("flush")

    async def block_status(self, offset: int, length: int) -> Extent:
        self._request("block_status")
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int) -> None:
        self._request("truncate")
        self.size = size

    async def allocated_bytes(self) -> int:
        self._request("allocated_bytes")
        return self.size

    async def reconnect(self) -> None:
        await trio.sleep(0.1)  # a connection takes time
        if self.reconnect_error is not None:
            raise self.reconnect_error
        if self.reconnect_failures:
            self.reconnect_failures -= 1
            raise TransientError("connection refused", errno=errno.ECONNREFUSED)
        self.reconnects += 1

    async def aclose(self) -> None:
        pass


CALLS: dict[str, Callable[[Node], Awaitable[object]]] = {
    "read": lambda n: n.read(0, 4),
    "write": lambda n: n.write(0, b"data"),
    "write_zeroes": lambda n: n.write_zeroes(0, 4),
    "discard": lambda n: n.discard(0, 4),
    "flush": lambda n: n.flush(),
    "block_status": lambda n: n.block_status(0, 4),
    "truncate": lambda n: n.truncate(SIZE),
    "allocated_bytes": lambda n: n.allocated_bytes(),
}


def test_the_filter_retries_every_operation_but_the_graph_ones() -> None:
    assert set(RETRIED) == set(CALLS)
    # graph changes and closing happen with no request in flight: nothing to retry there
    assert RetryFilter.passes_through == {
        "aclose", "reopen", "reconnect", "change_backing_file", "parent_will_change",
        "parent_settled",
    }  # fmt: skip


async def test_transient_failures_are_retried_after_backoff_and_a_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=3)
    child.data[:4] = b"abcd"
    node = RetryFilter(child, RetryPolicy(retries=5, delay=1, backoff=2))
    start = trio.current_time()
    assert await node.read(0, 4) == b"abcd"
    assert child.calls["read"] == 4 and child.reconnects == 3
    # waits of 1, 2 and 4 s, each followed by a 0.1 s reconnect
    assert trio.current_time() - start == pytest.approx(7.3)
    stats = node.statistics()
    assert (stats.retries, stats.reconnects, stats.failures) == (3, 3, 0)


@pytest.mark.parametrize("op", RETRIED)
async def test_every_operation_is_retried(op: str, autojump_clock: trio.testing.MockClock) -> None:
    child = FlakyNode(failures=1, reached=False)
    await CALLS[op](RetryFilter(child))
    assert child.calls[op] == 2 and child.reconnects == 1


async def test_it_gives_up_after_its_retries_with_a_final_eio(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=100)
    node = RetryFilter(child, RetryPolicy(retries=5, delay=1, backoff=2, max_delay=4))
    start = trio.current_time()
    with pytest.raises(BlockfsError) as err:
        await node.write(0, b"x")
    assert not isinstance(err.value, TransientError)  # nothing above retries it again
    assert err.value.errno == errno.EIO
    assert "after 6 tries" in str(err.value) and "ECONNRESET" in str(err.value)
    assert child.calls["write"] == 6 and child.reconnects == 5
    assert trio.current_time() - start == pytest.approx(1 + 2 + 4 + 4 + 4 + 5 * 0.1)
    assert node.statistics().failures == 1


async def test_no_try_begins_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    child = FlakyNode(failures=100)
    node = RetryFilter(child, RetryPolicy(retries=50, delay=1, backoff=2, deadline=10))
    start = trio.current_time()
    with pytest.raises(BlockfsError, match="deadline"):
        await node.read(0, 1)
    # tries at 0, 1.1, 3.2, 7.3; the next wait (8 s) would end past 10 s
    assert child.calls["read"] == 4
    assert trio.current_time() - start == pytest.approx(7.3)


async def test_the_deadline_runs_from_when_the_request_was_first_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request the FUSE reader threads sent first and handed back (its connection went)
    is given only what is left of its deadline: here 6 of 10 s were spent before."""
    from blockfs.nodes.retry import FIRST_SENT

    child = FlakyNode(failures=100)
    node = RetryFilter(child, RetryPolicy(retries=50, delay=1, backoff=2, deadline=10))
    start = trio.current_time()
    FIRST_SENT.set(start - 6)
    with pytest.raises(BlockfsError, match="deadline"):
        await node.read(0, 1)
    # tries at 0, 1.1, 3.2 (9.2 s after the first sending); the next wait would end past 10
    # (without the earlier start: 4 tries, until 7.3, as in the test above)
    assert child.calls["read"] == 3
    assert trio.current_time() - start == pytest.approx(3.2)


async def test_non_transient_errors_pass_at_once(autojump_clock: trio.testing.MockClock) -> None:
    child = FlakyNode()
    child.final_error = BlockfsError("no space", errno=errno.ENOSPC)
    node = RetryFilter(child)
    start = trio.current_time()
    with pytest.raises(BlockfsError) as err:
        await node.write(0, b"x")
    assert err.value is child.final_error
    assert child.calls["write"] == 1 and child.reconnects == 0
    assert trio.current_time() == start


async def test_a_flush_whose_reply_was_lost_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=1, reached=True)
    with pytest.raises(BlockfsError, match="reply was lost") as err:
        await RetryFilter(child).flush()
    assert err.value.errno == errno.EIO
    assert child.calls["flush"] == 1 and child.reconnects == 0
    unsent = FlakyNode(failures=1, reached=False)
    await RetryFilter(unsent).flush()  # never reached the storage: safe to send again
    assert unsent.calls["flush"] == 2


async def test_a_reconnect_that_fails_transiently_counts_as_a_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=1)
    child.reconnect_failures = 2
    node = RetryFilter(child, RetryPolicy(retries=5, delay=1, backoff=2))
    start = trio.current_time()
    assert await node.read(0, 1) == b"\0"
    assert child.calls["read"] == 2 and child.reconnects == 1
    assert trio.current_time() - start == pytest.approx(1 + 2 + 4 + 3 * 0.1)
    child = FlakyNode(failures=1)
    child.reconnect_failures = 10
    with pytest.raises(BlockfsError, match="after 3 tries"):
        await RetryFilter(child, RetryPolicy(retries=2)).read(0, 1)


async def test_a_reconnect_that_fails_for_good_ends_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=1)
    child.reconnect_error = BlockfsError("host key changed", errno=errno.EACCES)
    with pytest.raises(BlockfsError) as err:
        await RetryFilter(child).read(0, 1)
    assert err.value is child.reconnect_error
    assert child.calls["read"] == 1


async def test_requests_failing_together_reconnect_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=8)
    node = RetryFilter(child)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(node.write, i * 512, b"x" * 512)
    assert child.calls["write"] == 16 and child.reconnects == 1
    assert node.statistics().retries == 8


async def test_cancelling_during_backoff_cancels_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    child = FlakyNode(failures=100)
    node = RetryFilter(child, RetryPolicy(delay=10))
    start = trio.current_time()
    with trio.move_on_after(3) as scope:
        await node.read(0, 1)
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(3)
    assert child.calls["read"] == 1 and child.reconnects == 0
    assert node.statistics().failures == 0


def test_a_policy_that_makes_no_sense_is_refused() -> None:
    with pytest.raises(UsageError):
        RetryPolicy(backoff=0.5)
    with pytest.raises(UsageError):
        RetryPolicy(deadline=0)
