"""The retry filter: on a transient error, reconnect the child and send the request again.

Remote protocol nodes (ssh, gluster) fail in two ways: the storage refuses (EIO, ENOSPC: final)
or the way to it breaks (a reset connection, a timeout: :class:`~blockfs.errors.TransientError`).
Retrying the second kind lives here, in one filter over the protocol node, not in loops spread
through the drivers (nbdkit's retry filter; s3ql's temporary-failure retries). The registry puts
it above the node of every protocol whose driver gives a :class:`RetryPolicy`.

The policy, per request:

- a non-transient error passes at once, untouched;
- after a transient one the request waits (``delay``, then ``backoff`` times longer each time,
  at most ``max_delay``), reconnects the child (:meth:`~blockfs.nodes.base.Node.reconnect`),
  and tries again; at most ``retries`` times, and never past ``deadline`` seconds after its
  first try (a wait that would end past it is not begun);
- requests that fail together reconnect once: a request whose connection was already replaced
  since it was sent retries without reconnecting again;
- a reconnect that fails transiently counts as a failed try; one that fails otherwise ends the
  request with that error;
- a ``flush`` whose reply was lost (``TransientError.reached``) is never retried: the storage
  reports a write-back error once, perhaps to the lost reply, so a second flush could succeed
  over lost data (G1, G4). A flush that never reached the storage is retried;
- giving up raises :class:`~blockfs.errors.BlockfsError` (EIO) naming the tries and the last
  error: not transient any more, so no filter above retries it again;
- cancelling a request while it waits cancels it at once (nothing is in flight then).

A write sent again is safe: it is not yet acknowledged, so it may land at any time before its
acknowledgement (twice, the same bytes). This module must not know any one protocol.
"""

from __future__ import annotations

import contextvars
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import trio

from blockfs.errors import BlockfsError, TransientError, UsageError
from blockfs.nodes.base import DirectIo, Extent, Node
from blockfs.nodes.filter import FilterNode

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a request is retried (defaults as nbdkit's retry filter: five
    retries, doubling waits; here from 1 s, and within one minute in all)."""

    #: tries after the first
    retries: int = 5
    #: seconds before the first retry
    delay: float = 1.0
    #: each wait is this many times the one before
    backoff: float = 2.0
    #: no wait is longer
    max_delay: float = 16.0
    #: seconds from a request's first try after which no further try begins
    deadline: float = 60.0

    @classmethod
    def within(cls, timeout: float) -> RetryPolicy:
        """A remote protocol's policy from its ``timeout=`` property: short, doubling waits,
        as many tries as fit, EIO once ``timeout`` seconds passed since the first."""
        return cls(
            retries=1000, delay=min(0.2, timeout / 10), backoff=2.0,
            max_delay=max(0.5, min(5.0, timeout / 4)), deadline=timeout,
        )  # fmt: skip

    def __post_init__(self) -> None:
        if self.retries < 0 or self.delay < 0 or self.backoff < 1 or self.max_delay < 0:
            raise UsageError(f"bad retry policy {self}")
        if self.deadline <= 0:
            raise UsageError(f"bad retry policy {self}: the deadline must be positive")


@dataclass(frozen=True)
class RetryStatistics:
    #: tries sent again after a transient error
    retries: int
    #: reconnects of the child that succeeded
    reconnects: int
    #: requests given up (retries or deadline spent, or a flush whose reply was lost)
    failures: int


#: when the request a task serves was first sent, on trio's clock, if that was before the task
#: (a request the FUSE reader threads sent, handed back when its connection went): the
#: deadline counts from then, so that a request fails ``timeout=`` after it was first sent
FIRST_SENT: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "blockfs_first_sent", default=None
)


class RetryFilter(FilterNode):
    """Retries its child's requests on :class:`~blockfs.errors.TransientError` as
    :class:`RetryPolicy` says (see the module docstring)."""

    passes_through: ClassVar[frozenset[str]] = frozenset(
        {
            "aclose",
            "reopen",
            "reconnect",
            "change_backing_file",
            "parent_will_change",
            "parent_settled",
        }
    )

    def __init__(self, child: Node, policy: RetryPolicy | None = None) -> None:
        super().__init__(child)
        self.policy = policy or RetryPolicy()
        # Bumped by every reconnect: a request sent before the last reconnect retries on the
        # new connection without reconnecting again.
        self._generation = 0
        self._reconnect_lock = trio.Lock()
        self._retries = 0
        self._reconnects = 0
        self._failures = 0

    def statistics(self) -> RetryStatistics:
        return RetryStatistics(self._retries, self._reconnects, self._failures)

    # -- the operations, each through one retry loop ------------------------------------------

    def direct_io(self) -> DirectIo | None:
        """The child's submitted requests (a remote node's): one that fails with the
        connection comes back to the event loop (:data:`~blockfs.nodes.base.RETRY`) and is
        retried here, as any other request."""
        below = self.child.direct_io()
        if below is None or (below.submit_read is None and below.submit_write is None):
            return None
        return below

    async def read(self, offset: int, length: int) -> bytes:
        return await self._retry("read", lambda: self.child.read(offset, length))

    async def write(self, offset: int, data: bytes) -> None:
        await self._retry("write", lambda: self.child.write(offset, data))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await self._retry(
            "write_zeroes", lambda: self.child.write_zeroes(offset, length, may_unmap)
        )

    async def discard(self, offset: int, length: int) -> None:
        await self._retry("discard", lambda: self.child.discard(offset, length))

    async def flush(self) -> None:
        await self._retry("flush", self.child.flush)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._retry("block_status", lambda: self.child.block_status(offset, length))

    async def truncate(self, size: int) -> None:
        await self._retry("truncate", lambda: self.child.truncate(size))

    async def allocated_bytes(self) -> int:
        return await self._retry("allocated_bytes", self.child.allocated_bytes)

    # -- the loop --------------------------------------------------------------------------------

    async def _retry(self, what: str, send: Callable[[], Awaitable[T]]) -> T:
        policy = self.policy
        first = FIRST_SENT.get()
        deadline = (trio.current_time() if first is None else first) + policy.deadline
        delay = policy.delay
        tries = 0
        while True:
            generation = self._generation
            try:
                return await send()
            except TransientError as exc:
                error: TransientError = exc
            tries += 1
            if what == "flush" and error.reached:
                raise self._give_up(what, tries, error, "its reply was lost")
            # Wait, reconnect, and wait again while reconnecting fails transiently.
            while True:
                if tries > policy.retries:
                    raise self._give_up(what, tries, error, "no retries left")
                if trio.current_time() + delay > deadline:
                    raise self._give_up(what, tries, error, "its deadline is near")
                log.warning(
                    "%s: %s failed (%s); retry %d of %d in %.3g s",
                    self.filename, what, error, tries, policy.retries, delay,
                )  # fmt: skip
                await trio.sleep(delay)
                delay = min(delay * policy.backoff, policy.max_delay)
                try:
                    await self._reconnect(generation)
                    break
                except TransientError as exc:
                    error = exc
                    tries += 1
            self._retries += 1

    async def _reconnect(self, generation: int) -> None:
        async with self._reconnect_lock:
            if self._generation != generation:
                return  # another request reconnected since this one was sent
            await self.child.reconnect()
            self._generation += 1
            self._reconnects += 1

    def _give_up(self, what: str, tries: int, error: TransientError, why: str) -> BlockfsError:
        self._failures += 1
        code = errno.errorcode.get(error.errno, str(error.errno))
        log.error("%s: %s failed %d times, %s; last error: %s", self.filename, what, tries, why,
                  error)  # fmt: skip
        return BlockfsError(
            f"{self.filename}: {what} failed after {tries} tries ({why}): {error} [{code}]",
            errno=errno.EIO,
        )
