"""The SFTP client (blockfs/nodes/sftp.py) against a server that misbehaves.

A real OpenSSH server (tests/test_ssh.py) never sends a hostile packet, so these cases talk to
a peer written here, over the same pair of pipes a relay process would hold: it answers with
bytes that the protocol draft forbids (a packet of 4 GiB announced, a DATA reply whose length
lies, a reply to no request, replies a byte at a time, a reply after the request gave up), and
the tests check that the client neither allocates what the header claims nor hangs, and that
one bad reply fails only its own request.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from typing import Any

import pytest
import trio

from blockfs.errors import BlockfsError, TransientError
from blockfs.nodes import sftp
from blockfs.nodes.sftp import SftpSession


class Peer:
    """The server's side of the pipes: reads requests, writes whatever a test tells it."""

    def __init__(self) -> None:
        self.to_client_r, self.to_client_w = os.pipe()
        self.to_server_r, self.to_server_w = os.pipe()
        self.inp = trio.lowlevel.FdStream(self.to_server_r)
        self.out = trio.lowlevel.FdStream(self.to_client_w)
        self.buf = b""

    def session(self) -> SftpSession:
        return SftpSession(self.to_server_w, self.to_client_r, "peer")

    async def packet(self) -> tuple[int, int, bytes]:
        """The next request: (type, id, the rest)."""
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = await self.inp.receive_some(1 << 20)
            assert chunk, "the client closed its side"
            self.buf += chunk
        (n,) = struct.unpack(">I", self.buf[:4])
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        if body[0] == 1:  # INIT: no id
            return 1, 0, body[1:]
        return body[0], struct.unpack(">I", body[1:5])[0], body[5:]

    async def send(
        self, typ: int, rid: int | None, payload: bytes, *, by_byte: bool = False
    ) -> None:
        body = bytes([typ]) + (struct.pack(">I", rid) if rid is not None else b"") + payload
        data = struct.pack(">I", len(body)) + body
        if by_byte:
            for i in range(len(data)):
                await self.out.send_all(data[i : i + 1])
                await trio.sleep(0.001)  # the client reads each byte alone
        else:
            await self.out.send_all(data)

    async def handshake(self, extensions: dict[bytes, bytes] | None = None) -> None:
        typ, _, _ = await self.packet()
        assert typ == 1
        ext = b"".join(sftp.sstr(k) + sftp.sstr(v) for k, v in (extensions or {}).items())
        await self.send(2, None, struct.pack(">I", 3) + ext)

    async def aclose(self) -> None:
        await self.inp.aclose()
        await self.out.aclose()


def status(code: int, message: str = "") -> bytes:
    return struct.pack(">I", code) + sftp.sstr(message) + sftp.sstr("")


def data(payload: bytes) -> bytes:
    return sftp.sstr(payload)


async def started() -> tuple[Peer, SftpSession]:
    peer = Peer()
    s = peer.session()
    async with trio.open_nursery() as n:
        n.start_soon(peer.handshake)
        with trio.fail_after(5):
            await s.start()
    return peer, s


async def test_replies_in_pieces_and_out_of_order_reach_their_requests() -> None:
    peer, s = await started()
    got: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        got[offset] = await s.read(b"h", offset, 4, 4)

    async with trio.open_nursery() as n:
        for off in (0, 4, 8):
            n.start_soon(read, off)
        reqs = [await peer.packet() for _ in range(3)]
        assert [r[0] for r in reqs] == [sftp.READ] * 3
        # answered last to first, one byte per pipe write, and a reply to no request first
        await peer.send(103, 0xDEAD, data(b"????"))
        for _, rid, rest in reversed(reqs):
            (offset,) = struct.unpack(">Q", rest[5:13])
            await peer.send(103, rid, data(b"%04d" % offset), by_byte=True)
    assert got == {0: b"0000", 4: b"0004", 8: b"0008"}
    s.close()
    await peer.aclose()


async def test_a_packet_longer_than_the_limit_ends_the_session_without_allocating_it() -> None:
    peer, s = await started()
    failed: list[BaseException] = []

    async def read() -> None:
        try:
            await s.read(b"h", 0, 4096, 4096)
        except TransientError as exc:
            failed.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        await peer.packet()
        # 4 GiB - 1 announced: the client must refuse it from the header alone
        await peer.out.send_all(struct.pack(">IB", 0xFFFFFFFF, 103))
    assert failed and "packet of 4294967295 bytes" in str(failed[0])
    assert s.dead is not None
    with pytest.raises(TransientError):
        await s.stat("/x")  # a dead session refuses at once, no hang
    s.close()
    await peer.aclose()


async def test_a_data_reply_whose_length_lies_fails_only_its_request() -> None:
    peer, s = await started()
    results: dict[str, object] = {}

    async def read(name: str) -> None:
        try:
            results[name] = await s.read(b"h", 0, 8, 8)
        except BlockfsError as exc:
            results[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(read, "bad")
        _, rid1, _ = await peer.packet()
        # the DATA string claims 1000 bytes, the packet carries 8
        await peer.send(103, rid1, struct.pack(">I", 1000) + b"12345678")
        await trio.sleep(0.05)
        n.start_soon(read, "good")
        _, rid2, _ = await peer.packet()
        await peer.send(103, rid2, data(b"abcdefgh"))
    bad = results["bad"]
    assert isinstance(bad, BlockfsError) and bad.errno == errno.EIO, bad
    assert results["good"] == b"abcdefgh"
    assert s.dead is None
    s.close()
    await peer.aclose()


async def test_a_reply_after_its_request_gave_up_is_dropped() -> None:
    peer, s = await started()
    with trio.move_on_after(0.1) as scope:
        await s.read(b"h", 0, 4, 4)
    assert scope.cancelled_caught
    _, rid_late, _ = await peer.packet()
    async with trio.open_nursery() as n:
        result: list[bytes] = []

        async def read() -> None:
            result.append(await s.read(b"h", 4, 4, 4))

        n.start_soon(read)
        _, rid, _ = await peer.packet()
        await peer.send(103, rid_late, data(b"late"))  # nobody waits for it any more
        await peer.send(103, rid, data(b"good"))
    assert result == [b"good"]
    s.close()
    await peer.aclose()


async def test_a_large_write_waits_for_the_pipe_and_keeps_its_order() -> None:
    """4 MiB written while the peer reads slowly: the pipe takes part of it, the rest waits
    in the client's queue; the peer gets every byte, in order, then a second write."""
    peer, s = await started()
    payload = bytes(range(256)) * (16 << 10)  # 4 MiB
    received = bytearray()

    async def serve() -> None:
        for _ in range(2):
            done = 0
            while done < len(payload) or not received:
                typ, rid, rest = await peer.packet()
                assert typ == sftp.WRITE
                (hl,) = struct.unpack(">I", rest[:4])
                (n,) = struct.unpack(">I", rest[4 + hl + 8 : 4 + hl + 12])
                received.extend(rest[4 + hl + 12 :])
                done += n
                await trio.sleep(0.001)  # slow
                await peer.send(101, rid, status(0))
                if done >= len(payload):
                    break

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        with trio.fail_after(20):
            await s.write(b"h", 0, payload, 256 << 10)
            await s.write(b"h", len(payload), payload[:1000] + payload[1000:], 256 << 10)
    assert bytes(received[: len(payload)]) == payload
    assert bytes(received[len(payload) :]) == payload
    s.close()
    await peer.aclose()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


async def test_requests_held_by_a_thread_leave_together_when_sent() -> None:
    """A reader thread's requests held back (``held``) reach the pipe only when it sends
    them, then all in one write; a request the event loop makes meanwhile goes after them
    (one stream, in order); each reply reaches its own callback in the event loop's thread."""
    peer, s = await started()
    loop_thread = threading.get_ident()
    replies: dict[int, tuple[int, bytes, bool]] = {}

    def callback(i: int) -> Any:
        def done(typ: int, payload: bytes) -> None:
            replies[i] = (typ, payload, threading.get_ident() == loop_thread)

        return done

    held: set[Any] = set()

    def hold() -> None:
        for i in range(5):
            assert s.submit(*sftp.read_packet(sftp.sstr(b"h"), i * 4, 4), callback(i), held)

    await trio.to_thread.run_sync(hold)
    assert len(held) == 1
    await trio.sleep(0.2)
    assert not _readable(peer.to_server_r), "a held request was written"
    await trio.to_thread.run_sync(lambda: [send() for send in held])
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(peer.to_server_r)
    first = os.read(peer.to_server_r, 1 << 20)  # one write: every request at once
    peer.buf = first
    reqs = [await peer.packet() for _ in range(5)]
    assert peer.buf == b"" and [r[0] for r in reqs] == [sftp.READ] * 5

    # held again; the event loop's own request, made meanwhile, follows them
    await trio.to_thread.run_sync(lambda: s.submit(
        *sftp.read_packet(sftp.sstr(b"h"), 40, 4), callback(5), held))  # fmt: skip
    got = {}

    async def own() -> None:
        got["own"] = await s.read(b"h", 44, 4, 4)

    async with trio.open_nursery() as n:
        n.start_soon(own)
        later = [await peer.packet() for _ in range(2)]
        offsets = [struct.unpack(">Q", r[2][5:13])[0] for r in later]
        assert offsets == [40, 44], offsets
        for _, rid, rest in reqs + later:
            (offset,) = struct.unpack(">Q", rest[5:13])
            await peer.send(103, rid, data(b"%04d" % offset))
    await trio.sleep(0.05)
    assert got == {"own": b"0044"}
    want = {i: (103, b"%04d" % (i * 4), True) for i in range(5)}
    assert replies == {**want, 5: (103, b"0040", True)}, replies
    held.clear()  # sent already by the event loop's writer: nothing left to send

    # held, then the session ends before they are sent: each callback hears of it
    await trio.to_thread.run_sync(lambda: s.submit(
        *sftp.read_packet(sftp.sstr(b"h"), 0, 4), callback(9), held))  # fmt: skip
    s.close()
    await trio.to_thread.run_sync(lambda: [send() for send in held])
    await trio.sleep(0.05)
    assert replies[9][0] == -1 and replies[9][2], replies[9]
    await peer.aclose()


async def test_the_peer_going_away_fails_what_waits_and_what_comes() -> None:
    peer, s = await started()
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await s.read(b"h", 0, 4, 4)
        except TransientError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(read)
        await peer.packet()
        await peer.aclose()  # the relay exited
    assert errors and errors[0].reached  # type: ignore[attr-defined]
    with trio.fail_after(2), pytest.raises(TransientError):
        await s.read(b"h", 0, 4, 4)
    s.close()


async def test_a_refusal_keeps_the_servers_status() -> None:
    peer, s = await started()
    async with trio.open_nursery() as n:

        async def answer() -> None:
            _, rid, _ = await peer.packet()
            await peer.send(101, rid, status(sftp.FX_NO_SUCH_FILE, "No such file"))

        n.start_soon(answer)
        with pytest.raises(sftp.SftpError) as caught:
            await s.stat("/nowhere")
    assert caught.value.errno == errno.ENOENT
    assert "No such file" in str(caught.value)
    s.close()
    await peer.aclose()


async def test_a_server_that_stops_answering_ends_the_session_in_time() -> None:
    """The watchdog: requests waiting ``stall_timeout`` seconds with no reply at all fail as
    transient (ETIMEDOUT) and the session is dead; one that answers slowly but steadily is
    left alone."""
    peer = Peer()
    s = SftpSession(peer.to_server_w, peer.to_client_r, "peer", stall_timeout=0.4)
    async with trio.open_nursery() as n:
        n.start_soon(peer.handshake)
        await s.start()

    # steady: 8 replies 0.2 s apart, each under the limit, 1.6 s in all
    async def steady() -> None:
        for _ in range(8):
            _, rid, _ = await peer.packet()
            await trio.sleep(0.2)
            await peer.send(103, rid, data(b"ok"))

    async with trio.open_nursery() as n:
        n.start_soon(steady)
        for _ in range(8):
            assert await s.read(b"h", 0, 2, 2) == b"ok"
    assert s.dead is None
    # silent: the request fails within the limit and a quarter of it (and some slack)
    t0 = trio.current_time()
    with trio.fail_after(3), pytest.raises(TransientError) as caught:
        await s.read(b"h", 0, 2, 2)
    took = trio.current_time() - t0
    assert caught.value.errno == errno.ETIMEDOUT and 0.35 <= took < 1.5, (caught.value, took)
    assert s.dead is not None
    s.close()
    await peer.aclose()
