"""The per-request cost of reaching asyncio (asyncssh's loop) from trio, two ways, measured
side by side (``python -m benchmarks.bridge``; trio-asyncio must be installed for the second):

- ``thread``: blockfs's bridge (:func:`blockfs.nodes.ssh._on_loop`): one asyncio loop in a
  daemon thread; a request is a task started there by ``call_soon_threadsafe``, and its
  completion wakes the trio task through trio's token (``run_sync_soon``);
- ``run_coroutine_threadsafe``: the same thread, through asyncio's own hand-off (a
  concurrent future chained to the task): what blockfs used first;
- ``trio-asyncio``: both loops in one thread (``trio_asyncio.aio_as_trio``).

Each round trip runs an asyncio coroutine that sleeps 0 (one scheduling step on the asyncio
side, as a reply arriving would cost), sequentially (the latency) and with 16 in flight (the
throughput a queue depth of 16 sees).
"""

from __future__ import annotations

import asyncio
import time

import trio

N = 20000
DEPTH = 16


async def _noop() -> int:
    await asyncio.sleep(0)
    return 1


async def _measure(call) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(500):  # warm-up
        await call()
    t0 = time.perf_counter()
    for _ in range(N):
        await call()
    seq = (time.perf_counter() - t0) / N * 1e6
    t0 = time.perf_counter()

    async def worker() -> None:
        for _ in range(N // DEPTH):
            await call()

    async with trio.open_nursery() as nursery:
        for _ in range(DEPTH):
            nursery.start_soon(worker)
    par = (time.perf_counter() - t0) / (N // DEPTH * DEPTH) * 1e6
    return seq, par


async def _thread() -> tuple[float, float]:
    from blockfs.nodes.ssh import _on_loop

    return await _measure(lambda: _on_loop(_noop))


def _trio_asyncio() -> tuple[float, float]:
    import trio_asyncio

    async def main() -> tuple[float, float]:
        async with trio_asyncio.open_loop():
            return await _measure(lambda: trio_asyncio.aio_as_trio(_noop)())

    return trio.run(main)


async def _threadsafe() -> tuple[float, float]:
    from blockfs.nodes.ssh import _Loop

    loop = _Loop.get()

    async def call() -> int:
        fut = asyncio.run_coroutine_threadsafe(_noop(), loop)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        fut.add_done_callback(lambda f: token.run_sync_soon(done.set, idempotent=True))
        await done.wait()
        return fut.result()

    return await _measure(call)


def main() -> None:
    seq, par = trio.run(_thread)
    print(f"thread hand-off : {seq:6.1f} us per request in sequence, {par:6.1f} us at depth {DEPTH}")
    seq, par = trio.run(_threadsafe)
    print(f"run_coroutine_threadsafe: {seq:6.1f} us in sequence, {par:6.1f} us at depth {DEPTH}")
    try:
        seq, par = _trio_asyncio()
    except ImportError:
        print("trio-asyncio    : not installed")
        return
    print(f"trio-asyncio    : {seq:6.1f} us per request in sequence, {par:6.1f} us at depth {DEPTH}")


if __name__ == "__main__":
    main()
