"""The per-request cost of reaching asyncssh's asyncio from blockfs's trio, three ways,
measured side by side (``python -m benchmarks.bridge``; trio-asyncio must be installed for the
second):

- ``thread``: one asyncio loop in a daemon thread; a request is a task started there by
  ``call_soon_threadsafe``, and its completion wakes the trio task through trio's token
  (``run_sync_soon``). blockfs's first bridge, kept here only to be measured;
- ``trio-asyncio``: both loops in one thread (``trio_asyncio.aio_as_trio``);
- ``process``: what blockfs does now (:mod:`blockfs.nodes.ssh_relay`): asyncio in a process
  of its own, reached over two pipes with blockfs's SFTP session
  (:class:`blockfs.nodes.sftp.SftpSession`); the process here echoes each packet back, as
  the relay would carry it to the server and back, without the SSH layer.

Each round trip runs one scheduling step on the asyncio side (as a reply arriving would cost),
sequentially (the latency) and with 16 in flight (the throughput a queue depth of 16 sees).
The first two also share the daemon's GIL with FUSE, which this measure cannot show; the
third does not (the ssh lines of ``make bench`` show the whole).
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
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="bridge-asyncio", daemon=True).start()

    async def call() -> int:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[asyncio.Future[int]] = []

        def start() -> None:
            task = asyncio.ensure_future(_noop(), loop=loop)
            box.append(task)
            task.add_done_callback(lambda _: token.run_sync_soon(done.set, idempotent=True))

        loop.call_soon_threadsafe(start)
        await done.wait()
        return box[0].result()

    return await _measure(call)


def _trio_asyncio() -> tuple[float, float]:
    import trio_asyncio

    async def main() -> tuple[float, float]:
        async with trio_asyncio.open_loop():
            return await _measure(lambda: trio_asyncio.aio_as_trio(_noop)())

    return trio.run(main)


#: the echoing process: asyncio pipes both ways, as the relay holds them
_ECHO = """
import asyncio, os
class Out(asyncio.Protocol):
    pass
class In(asyncio.Protocol):
    def __init__(self, out, done): self.out, self.done = out, done
    def data_received(self, data): self.out.write(data)
    def eof_received(self): self.done.set_result(None)
async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    out, _ = await loop.connect_write_pipe(Out, os.fdopen(1, "wb", buffering=0))
    await loop.connect_read_pipe(lambda: In(out, done), os.fdopen(0, "rb", buffering=0))
    await done
asyncio.run(main())
"""


async def _process() -> tuple[float, float]:
    import os
    import sys

    from blockfs.nodes.sftp import READ, SftpSession

    to_r, to_w = os.pipe2(os.O_CLOEXEC)
    from_r, from_w = os.pipe2(os.O_CLOEXEC)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _ECHO], stdin=to_r, stdout=from_w
    )
    os.close(to_r)
    os.close(from_w)
    session = SftpSession(to_w, from_r, "echo")
    try:
        return await _measure(lambda: session.request(READ, b"x" * 29))  # a READ's size
    finally:
        session.close()
        await proc.wait()


def main() -> None:
    seq, par = trio.run(_thread)
    print(
        f"thread hand-off : {seq:6.1f} us per request in sequence, {par:6.1f} us at depth {DEPTH}"
    )
    seq, par = trio.run(_process)
    print(
        f"relay process   : {seq:6.1f} us per request in sequence, {par:6.1f} us at depth {DEPTH}"
    )
    try:
        seq, par = _trio_asyncio()
    except ImportError:
        print("trio-asyncio    : not installed")
        return
    print(
        f"trio-asyncio    : {seq:6.1f} us per request in sequence, {par:6.1f} us at depth {DEPTH}"
    )


if __name__ == "__main__":
    main()
