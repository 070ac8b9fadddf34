"""The one bridge from trio to blocking calls: a pool of threads every protocol node shares.

Python pays per request, and ``trio.to_thread.run_sync`` costs a limiter, a cancel scope and a
task switch per call; :class:`IoThreadPool` costs one queue put and one ``run_sync_soon``. The
``file`` node sends its blocking calls here (``pread``/``pwrite`` past 64 KiB, reads that would
block, ``fdatasync``, ``fallocate``); the ``ssh`` and ``gluster`` nodes will send theirs here too
(a libgfapi call, a call into the asyncssh bridge), so the process has one bound on the threads
that block in storage calls, set by ``BLOCKFS_IO_THREADS``.

How a protocol node uses it:

- take :func:`shared_pool` once, when the node is made (never per request);
- ``await pool.run(fn, *args)`` for each blocking call; ``fn`` runs in a pool thread, its result
  or exception comes back to the awaiting task. ``fn`` must not touch trio objects;
- report ``Limits(max_inflight=pool.size)``: more requests than threads wait in the queue;
- cancellation *waits*: once queued, the call runs to its end and the cancelled task resumes
  only then (a pread cannot be taken back; see the cancellation rule in :mod:`blockfs.nodes.base`),
  so a buffer handed to ``fn`` is never freed under it;
- a call that might block for ever (a dead peer with no timeout) must carry its own timeout:
  it holds one of the pool's threads until it returns.

This module knows nothing of nodes, FUSE or any one protocol.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio


class IoThreadPool:
    """A fixed set of daemon threads that run blocking calls for trio tasks.

    Cheaper than ``trio.to_thread.run_sync`` on the hot path: no limiter, no cancel scope, one
    queue put and one ``run_sync_soon`` per call. A call cannot be cancelled once submitted
    (a pread cannot be taken back); the trio task waits for it.
    """

    def __init__(self, threads: int = 8) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any, Any] | None]
        self._queue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"blockfs-io-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def size(self) -> int:
        """How many calls run at once (more wait in the queue)."""
        return len(self._threads)

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            fn, args, token, task = item
            result = outcome.capture(fn, *args)
            try:
                if isinstance(task, _Abandonable):
                    token.run_sync_soon(task.finish, result)
                else:
                    token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the loop is gone; nobody waits any more
                pass
            # An idle thread must not keep its last call alive: its result (a 1 MiB read's
            # bytes) or its arguments would stay in memory until the thread's next call, one
            # such buffer per thread (+24 MiB of peak RSS under uncached 1 MiB reads).
            del item, fn, args, token, task, result

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a pool thread and return its result (or raise its exception).
        Cancellation waits for ``fn`` to return (see the module docstring)."""
        task = trio.lowlevel.current_task()
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), task))

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        # reschedule() was given the Outcome; wait_task_rescheduled unwraps it for us.
        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def run_abandoning(
        self, fn: Callable[..., Any], *args: Any, finished: Callable[[], None] | None = None
    ) -> Any:
        """:meth:`run`, but cancellation *abandons*: the task resumes at once and the call
        goes on in its thread, its result dropped. For calls into a remote's library that may
        block for as long as the remote stays silent: ``fn`` must own what it uses (its
        arguments are kept alive by the queue until it returns). ``finished()`` runs on the
        trio thread when the call ends, waited for or not (a node counts its calls in
        flight with it, to close only after the last)."""
        state = _Abandonable(trio.lowlevel.current_task(), finished)
        self._queue.put((fn, args, trio.lowlevel.current_trio_token(), state))

        def abort(_: Any) -> trio.lowlevel.Abort:
            state.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


class _Abandonable:
    """A call of :meth:`IoThreadPool.run_abandoning`: its task, until it gives up."""

    __slots__ = ("task", "finished")

    def __init__(self, task: Any, finished: Callable[[], None] | None) -> None:
        self.task = task
        self.finished = finished

    def finish(self, result: outcome.Outcome[Any]) -> None:  # the trio thread
        if self.finished is not None:
            self.finished()
        task, self.task = self.task, None
        if task is not None:
            trio.lowlevel.reschedule(task, result)


_shared_pool: IoThreadPool | None = None


def shared_pool() -> IoThreadPool:
    """The process-wide I/O pool (created on first use; ``BLOCKFS_IO_THREADS`` threads)."""
    global _shared_pool
    if _shared_pool is None:
        _shared_pool = IoThreadPool(int(os.environ.get("BLOCKFS_IO_THREADS", "16")))
    return _shared_pool
