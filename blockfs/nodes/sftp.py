"""An SFTP (version 3) client on trio, over a pair of pipes to a process that carries the bytes
to the server (:mod:`blockfs.nodes.ssh_relay`). Written from the protocol's draft
(draft-ietf-secsh-filexfer-02) and OpenSSH's PROTOCOL file for its extensions
(``fsync@openssh.com``, ``limits@openssh.com``, ``posix-rename@openssh.com``).

Why this shape (``benchmarks/README.md`` has the figures): asyncssh in a thread of the daemon
made every request cross two threads and share one GIL with FUSE; 1 MiB reads reached half
of sshfs's rate and 4 KiB reads a seventh. Here the daemon only frames and matches packets,
on its own trio loop, and the SSH layer (its ciphers and packets) runs in a process of its own
on the other core:

- a request is queued without awaiting anything (its header and its data, never copied), and
  one system task writes out all that is queued with ``os.writev`` once the tasks runnable
  now have had their turn: requests made together leave together, in order, and a request
  whose caller gave up still leaves the stream whole;
- one system task reads the replies in large pieces and wakes each waiting task directly
  (``trio.lowlevel.reschedule``); a task waits for all the parts of a split read or write at
  once;
- the server answers in order (OpenSSH's sftp-server handles one request at a time), so a
  flush sent after writes were answered covers them.

Everything the server sends is checked before it is believed: a packet longer than
:data:`MAX_PACKET` ends the session (never a huge allocation); a reply to an unknown request
is dropped; a malformed reply fails its request with EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import outcome
import trio

from blockfs.errors import BlockfsError, TransientError

# packet types
_INIT, _VERSION = 1, 2
OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 3, 4, 5, 6, 7, 8, 9, 10
REMOVE, REALPATH, STAT, RENAME, EXTENDED = 13, 16, 17, 18, 200
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS, _EXTENDED_REPLY = 101, 102, 103, 104, 105, 201
#: a DATA reply whose length does not match its packet (handed on as such, refused)
_BAD_DATA = -1

# open flags
FXF_READ, FXF_WRITE, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 0x01, 0x02, 0x08, 0x10, 0x20

# status codes
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE = 0, 1, 2, 3, 4
FX_BAD_MESSAGE, FX_NO_CONNECTION, FX_CONNECTION_LOST, FX_OP_UNSUPPORTED = 5, 6, 7, 8

_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_ACMODTIME = 0x1, 0x2, 0x4, 0x8
_ATTR_EXTENDED = 0x80000000

#: the longest packet taken from the server (OpenSSH's own limit is 256 KiB)
MAX_PACKET = 4 << 20
#: what one read of the pipe asks for
_READ_CHUNK = 1 << 20
#: the pipes are made this large where the system allows (Linux: F_SETPIPE_SZ), so that a
#: 1 MiB request fits without waiting
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
#: the most pieces one writev takes (Linux: IOV_MAX)
_IOV_MAX = 1024

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IBI")  # length, type, request id
#: the reply types a submitted request sees (:meth:`SftpSession.submit`)
STATUS_REPLY, DATA_REPLY = _STATUS, _DATA
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_READ_ARGS = struct.Struct(">QI")

_ERRNO = {
    FX_NO_SUCH_FILE: errno.ENOENT,
    FX_PERMISSION_DENIED: errno.EACCES,
    FX_OP_UNSUPPORTED: errno.EOPNOTSUPP,
}


def status_errno(code: int) -> int:
    """The errno of a STATUS code that is not OK."""
    return _ERRNO.get(code, errno.EIO)


def status_code(payload: bytes) -> int | None:
    """A STATUS reply's code (None: malformed)."""
    return int.from_bytes(payload[:4], "big") if len(payload) >= 4 else None


def read_packet(h: bytes, offset: int, length: int) -> tuple[int, tuple[bytes, ...]]:
    """A READ request: ``h`` is the handle as an SFTP string (:func:`sstr`)."""
    return READ, (h, _READ_ARGS.pack(offset, length))


def write_packet(
    h: bytes, offset: int, data: bytes | memoryview
) -> tuple[int, tuple[bytes | memoryview, ...]]:
    """A WRITE request of ``data`` (not copied): ``h`` is the handle as an SFTP string."""
    return WRITE, (h, _U64.pack(offset), _U32.pack(len(data)), data)


class SftpError(BlockfsError):
    """The server refused a request (its status code kept in ``code``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, errno=_ERRNO.get(code, errno.EIO))
        self.code = code


@dataclass
class Attrs:
    size: int | None = None
    permissions: int | None = None

    @property
    def is_regular(self) -> bool | None:
        if self.permissions is None:
            return None
        return (self.permissions & 0o170000) == 0o100000


def sstr(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return _U32.pack(len(data)) + data


class _Reader:
    """Fields of one reply, read in order; anything short is :class:`_Malformed`."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise _Malformed
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise _Malformed
        (v,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> bytes:
        n = self.u32()
        if self.pos + n > len(self.data):
            raise _Malformed
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def attrs(self) -> Attrs:
        flags = self.u32()
        a = Attrs()
        if flags & _ATTR_SIZE:
            a.size = self.u64()
        if flags & _ATTR_UIDGID:
            self.u32()
            self.u32()
        if flags & _ATTR_PERMISSIONS:
            a.permissions = self.u32()
        if flags & _ATTR_ACMODTIME:
            self.u32()
            self.u32()
        if flags & _ATTR_EXTENDED:
            for _ in range(min(self.u32(), 1 << 16)):
                self.string()
                self.string()
        return a


class _Malformed(Exception):
    pass


class _Waiter:
    """One task waiting for the replies to ``left`` requests."""

    __slots__ = ("task", "left", "replies")

    def __init__(self, n: int) -> None:
        self.task: Any = None
        self.left = n
        self.replies: list[tuple[int, bytes]] = [(0, b"")] * n


class SftpSession:
    """An SFTP session over ``send_fd`` (to the server) and ``recv_fd`` (from it), both
    non-blocking and owned by the session; ``where`` names the server in messages.

    A request fails with :class:`SftpError` when the server refuses it, and with
    :class:`~blockfs.errors.TransientError` when the session is gone (``reached`` tells
    whether it may have been carried out)."""

    def __init__(
        self,
        send_fd: int,
        recv_fd: int,
        where: str,
        pending: bytes = b"",
        *,
        stall_timeout: float | None = None,
    ) -> None:
        for fd in (send_fd, recv_fd):
            os.set_blocking(fd, False)
            try:
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only means more waits
        self.where = where
        self._send_fd = send_fd
        self._recv_fd = recv_fd
        self._buf = bytearray(pending)
        self._out: deque[bytes | memoryview] = deque()
        self._writer_parked: Any = None
        self._next_id = 1
        #: request id -> (its waiter, the reply's index), or (a callback, -1) for a request
        #: submitted from another thread (:meth:`submit`)
        self._waiting: dict[int, tuple[Any, int]] = {}
        #: held where a request id is taken, requests are queued or written, and the writer
        #: parks: :meth:`submit` runs in the FUSE reader threads
        self._tlock = threading.Lock()
        self._send_held = self.send_held  # what submit adds to ``held`` (made once)
        #: the event loop's (submitters in other threads reach it through this)
        self.token = trio.lowlevel.current_trio_token()
        self._wake_queued = False
        self._version_waiter: _Waiter | None = None
        self.dead: str | None = None
        self.extensions: dict[bytes, bytes] = {}
        self.max_read = 32 << 10
        self.max_write = 32 << 10
        trio.lowlevel.spawn_system_task(self._read_loop, name=f"sftp reader {where}")
        trio.lowlevel.spawn_system_task(self._write_loop, name=f"sftp writer {where}")
        #: replies taken so far (the watchdog's measure of progress)
        self._replies = 0
        if stall_timeout is not None:
            trio.lowlevel.spawn_system_task(
                self._watchdog, stall_timeout, name=f"sftp watchdog {where}"
            )

    # -- the session ------------------------------------------------------------------------

    async def start(self) -> None:
        """INIT, VERSION and the server's limits. :raise TransientError: no answer."""
        waiter = self._version_waiter = _Waiter(1)
        with self._tlock:
            self._out.append(_U32.pack(5) + bytes([_INIT]) + _U32.pack(3))
            self._wake_idle_writer()
        if self.dead is not None:
            raise TransientError(f"{self.where}: {self.dead}", reached=False)
        typ, payload = (await self._wait(waiter, ()))[0]
        r = _Reader(payload)
        try:
            version = r.u32()
            while r.pos < len(payload):
                name = r.string()
                self.extensions[name] = r.string()
        except _Malformed:
            raise self._protocol_error("a malformed VERSION") from None
        if version != 3:
            raise self._protocol_error(f"SFTP version {version}, not 3")
        if b"limits@openssh.com" in self.extensions:
            typ, payload = await self.request(EXTENDED, sstr("limits@openssh.com"))
            if typ == _EXTENDED_REPLY:
                r = _Reader(payload)
                try:
                    r.u64()
                    max_read, max_write = r.u64(), r.u64()
                except _Malformed:
                    max_read = max_write = 0
                # 0 means "no limit"; our own request size caps it in any case
                self.max_read = max_read or (256 << 10)
                self.max_write = max_write or (256 << 10)

    def close(self, why: str = "closed") -> None:
        """End the session: the relay sees the end of its input and exits; every waiting
        request fails. Idempotent."""
        if self.dead is None:
            self._fail_all(why)
        for attr in ("_send_fd", "_recv_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                trio.lowlevel.notify_closing(fd)
                os.close(fd)

    # -- requests ---------------------------------------------------------------------------

    async def request(self, typ: int, body: bytes) -> tuple[int, bytes]:
        """One request; its reply (type, payload after the id)."""
        return (await self.requests([(typ, (body,))]))[0]

    async def requests(
        self, packets: Sequence[tuple[int, Sequence[bytes | memoryview]]]
    ) -> list[tuple[int, bytes]]:
        """Several requests sent together, their replies in order; each packet is its type
        and the pieces of its body (a write's data goes in as it is, never copied)."""
        if self.dead is not None:
            raise TransientError(f"{self.where}: {self.dead}", reached=False)
        waiter = _Waiter(len(packets))
        with self._tlock:
            ids = [self._enqueue(typ, body, (waiter, i)) for i, (typ, body) in enumerate(packets)]
            self._wake_idle_writer()
        if self.dead is not None:  # the pipe broke while sending
            raise TransientError(f"{self.where}: {self.dead}", reached=True)
        return await self._wait(waiter, ids)

    async def _wait(self, waiter: _Waiter, ids: Sequence[int]) -> list[tuple[int, bytes]]:
        if waiter.left:
            waiter.task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                for rid in ids:
                    self._waiting.pop(rid, None)
                if waiter is self._version_waiter:
                    self._version_waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return waiter.replies

    def submit(
        self, typ: int, body: Sequence[bytes | memoryview], done: Any,
        held: set[Callable[[], None]] | None = None,
    ) -> bool:  # fmt: skip
        """One request from another thread (a FUSE reader's, issue 14): ``done(type,
        payload)`` is called in the event loop's thread with its reply, or with type -1 if the
        session ends first. Returns False (nothing sent) if the session is gone. The body's
        pieces must stay unchanged until the reply.

        The request is queued and, with ``held`` None, written at once (:meth:`send_held`).
        Else it is held back and :meth:`send_held` is added to ``held``: the caller calls it
        once it has no more requests at hand, and the requests made meanwhile leave in one
        ``writev``, one wake-up of ``ssh`` and one SSH packet (a reader thread sends a queue
        depth's worth of 4 KiB reads so: the machine's CPU per request went from 120 to 87 us,
        ``ssh`` and ``sshd`` most of the difference; ``benchmarks/README.md``)."""
        with self._tlock:
            if self.dead is not None:
                return False
            self._enqueue(typ, body, (done, -1))
        if held is None:
            self.send_held()
        else:
            held.add(self._send_held)
        return True

    def send_held(self) -> None:
        """Write what is queued from the calling thread (a reader's), unless the writer task
        is awake (it writes it). What the pipe does not take now is left to the writer task,
        woken through the event loop's token; a broken pipe too (it ends the session)."""
        wake = False
        with self._tlock:
            out = self._out
            if not out or self._writer_parked is None or self.dead is not None:
                return
            try:
                self._write_queued()
            except OSError:
                pass  # broken: the writer task finds it so too and fails every request
            if out and not self._wake_queued:
                self._wake_queued = wake = True
        if wake:
            try:
                self.token.run_sync_soon(self._wake_writer)
            except trio.RunFinishedError:
                pass

    def _wake_writer(self) -> None:
        with self._tlock:
            self._wake_queued = False
            task, self._writer_parked = self._writer_parked, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _enqueue(self, typ: int, body: Sequence[bytes | memoryview], entry: Any) -> int:
        """(Under ``_tlock``.) Queue one request (its pieces as they are, never copied) and
        note who waits for its reply (``entry``, see ``_waiting``); its id."""
        length = 5
        for piece in body:
            length += len(piece)
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF
        out = self._out
        out.append(_HEADER.pack(length, typ, rid))
        out.extend(body)
        self._waiting[rid] = entry
        return rid

    def _write_queued(self) -> int:
        """(Under ``_tlock``.) One ``writev`` of what is queued; what it took leaves the
        queue. The bytes written, or -1: the pipe is full. :raise OSError: it is broken."""
        out = self._out
        try:
            n = os.writev(self._send_fd, list(islice(out, _IOV_MAX)))
        except BlockingIOError:
            return -1
        left = n
        while left > 0:
            head = out[0]
            if left >= len(head):
                left -= len(head)
                out.popleft()
            else:
                out[0] = head[left:]
                left = 0
        return n

    def _wake_idle_writer(self) -> None:
        """(Under ``_tlock``, in the event loop.) Wake the writer task if it is idle: it sends
        all that is queued in one ``writev`` once the tasks runnable now have had their turn,
        so requests made together (the parts of a split read, the tasks' requests of one
        round) leave together, in one pipe write, one wake-up of ``ssh`` and often one SSH
        packet. A write per request was a sixth of the daemon's time under 4 KiB random
        reads."""
        task = self._writer_parked
        if task is not None:
            self._writer_parked = None
            trio.lowlevel.reschedule(task)

    def _unpark(self, _: Any) -> trio.lowlevel.Abort:
        with self._tlock:
            self._writer_parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _write_loop(self) -> None:
        out = self._out
        fd = self._send_fd
        lock = self._tlock
        try:
            while self.dead is None:
                with lock:
                    if out:
                        n = self._write_queued()
                    else:
                        self._writer_parked = trio.lowlevel.current_task()
                        n = -2
                if n == -2:
                    await trio.lowlevel.wait_task_rescheduled(self._unpark)
                elif n == -1:
                    await trio.lowlevel.wait_writable(fd)
        except trio.Cancelled:
            self._fail_all("closed")
            raise
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail_all(f"the connection is gone ({exc})")
        except Exception as exc:  # a system task may not raise: it would end the daemon
            self._fail_all(f"the session broke ({type(exc).__name__}: {exc})")

    async def _watchdog(self, stall: float) -> None:
        """End the session when requests have waited ``stall`` seconds and no reply at
        all came meanwhile: the server answers in order, so a request stuck that long means
        a connection that no longer carries anything (a host gone without a reset). Its
        waiters get a :class:`TransientError` (ETIMEDOUT) and the next request makes a new
        connection. One check every quarter of the timeout for the whole session, in place
        of a deadline on each request: a cancel scope with a deadline per request was a
        tenth of the daemon's time under 4 KiB reads."""
        seen = self._replies
        since = trio.current_time()
        try:
            while self.dead is None:
                await trio.sleep(stall / 4)
                now = trio.current_time()
                if self._replies != seen or not (self._waiting or self._version_waiter):
                    seen, since = self._replies, now
                elif now - since >= stall:
                    self._fail_all(f"no answer in {stall:g} s", errno.ETIMEDOUT)
                    return
        except trio.Cancelled:
            raise
        except Exception as exc:  # a system task may not raise: it would end the daemon
            self._fail_all(f"the session broke ({type(exc).__name__}: {exc})")

    # -- replies ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read the pipe into one buffer that is kept (``os.readv`` into its free end), and
        hand out each whole packet in it: a reply's payload is the only copy made here (a
        DATA reply's payload is its data, without the length in front)."""
        buf = bytearray(max(_READ_CHUNK, len(self._buf) * 2))
        filled = len(self._buf)
        buf[:filled] = self._buf
        self._buf = bytearray()
        fd = self._recv_fd
        try:
            while self.dead is None:
                if len(buf) - filled < _READ_CHUNK // 4:
                    buf.extend(bytes(_READ_CHUNK))
                with memoryview(buf) as view:
                    try:
                        n = os.readv(fd, [view[filled:]])
                    except BlockingIOError:
                        n = -1
                if n < 0:
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        return
                    continue
                if n == 0:
                    self._fail_all("the connection was lost")
                    return
                filled += n
                used = self._take(buf, filled)
                if used < 0:
                    return
                if used:
                    left = filled - used
                    if left:
                        buf[:left] = buf[used:filled]
                    filled = left
                    if len(buf) > 2 * _READ_CHUNK and filled < _READ_CHUNK:
                        del buf[_READ_CHUNK:]  # a large packet came and went
        except trio.Cancelled:
            self._fail_all("closed")
            raise
        except OSError as exc:
            self._fail_all(f"the connection was lost ({exc.strerror})")
        except Exception as exc:  # a system task may not raise: it would end the daemon
            self._fail_all(f"the session broke ({type(exc).__name__}: {exc})")

    def _take(self, buf: bytearray, end: int) -> int:
        """Deliver the whole packets in ``buf[:end]``; how many bytes they took (-1: the
        session ended on a bad packet)."""
        pos = need = 0
        waiting = self._waiting
        with memoryview(buf) as view:
            while end - pos >= 5:
                (length,) = _U32.unpack_from(buf, pos)
                if length > MAX_PACKET or length < 1:
                    self._fail_all(f"the server sent a packet of {length} bytes")
                    return -1
                if end - pos - 4 < length:
                    need = length + 4
                    break
                typ = buf[pos + 4]
                stop = pos + 4 + length
                self._replies += 1
                if typ == _VERSION:
                    waiter = self._version_waiter
                    self._version_waiter = None
                    if waiter is not None:
                        self._deliver(waiter, 0, typ, bytes(view[pos + 5 : stop]))
                elif length >= 5:
                    (rid,) = _U32.unpack_from(buf, pos + 5)
                    entry = waiting.pop(rid, None)
                    if entry is not None:
                        start = pos + 9
                        if typ == _DATA and length >= 9:
                            (n,) = _U32.unpack_from(buf, start)
                            if start + 4 + n == stop:
                                start += 4  # the data alone; a bad length stays for check()
                            else:
                                typ = _BAD_DATA
                        if entry[1] < 0:
                            self._deliver_direct(entry[0], typ, bytes(view[start:stop]))
                        else:
                            self._deliver(entry[0], entry[1], typ, bytes(view[start:stop]))
                pos = stop
        if need > len(buf) - pos:  # room for the whole packet once what came before is gone
            buf.extend(bytes(need - (len(buf) - pos) + _READ_CHUNK // 4))
        return pos

    def _deliver_direct(self, done: Any, typ: int, payload: bytes) -> None:
        try:
            done(typ, payload)
        except Exception as exc:  # it runs in the reader task: the session must go on
            log.exception("%s: a reply's callback failed: %s", self.where, exc)

    @staticmethod
    def _deliver(waiter: _Waiter, index: int, typ: int, payload: bytes) -> None:
        waiter.replies[index] = (typ, payload)
        waiter.left -= 1
        if waiter.left == 0 and waiter.task is not None:
            task, waiter.task = waiter.task, None
            trio.lowlevel.reschedule(task)

    def _fail_all(self, why: str, code: int = errno.ECONNRESET) -> None:
        with self._tlock:
            if self.dead is None:
                self.dead = why
            entries = list(self._waiting.values())
            self._waiting.clear()
            self._out.clear()
            writer, self._writer_parked = self._writer_parked, None
        waiters = {id(w): w for w, i in entries if i >= 0}
        if self._version_waiter is not None:
            waiters[id(self._version_waiter)] = self._version_waiter
            self._version_waiter = None
        for done, i in entries:
            if i < 0:
                self._deliver_direct(done, -1, why.encode())
        if writer is not None:
            trio.lowlevel.reschedule(writer)  # it sees the session dead and ends
        for w in waiters.values():
            if w.task is not None:
                task, w.task = w.task, None
                err = TransientError(f"{self.where}: {why}", errno=code, reached=True)
                trio.lowlevel.reschedule(task, outcome.Error(err))

    def _protocol_error(self, what: str) -> TransientError:
        self._fail_all(f"protocol error: {what}")
        return TransientError(f"{self.where}: protocol error: {what}", reached=False)

    # -- the operations blockfs uses --------------------------------------------------------

    def check(self, reply: tuple[int, bytes], what: str, want: int = _STATUS) -> _Reader:
        """The reply as a reader, if it is of type ``want`` (a STATUS of OK passes for
        ``want=_STATUS``). :raise SftpError: a refusal; BlockfsError: a malformed reply."""
        typ, payload = reply
        r = _Reader(payload)
        try:
            if typ == _STATUS:
                code = r.u32()
                if code == FX_OK and want == _STATUS:
                    return r
                message = r.string().decode(errors="replace")[:200] if r.pos < len(payload) else ""
                raise SftpError(f"{what}: {message or _CODE_NAMES.get(code, code)}", code)
            if typ != want:
                raise _Malformed
        except _Malformed:
            raise BlockfsError(
                f"{what}: a malformed reply from the server", errno=errno.EIO
            ) from None
        return r

    async def open(self, path: str, flags: int, mode: int | None = None) -> bytes:
        attrs = _U32.pack(_ATTR_PERMISSIONS) + _U32.pack(mode) if mode is not None else _U32.pack(0)
        reply = await self.request(OPEN, sstr(path) + _U32.pack(flags) + attrs)
        return self._string(reply, "open", _HANDLE)

    async def close_handle(self, handle: bytes) -> None:
        self.check(await self.request(CLOSE, sstr(handle)), "close")

    async def fstat(self, handle: bytes) -> Attrs:
        return self._attrs(await self.request(FSTAT, sstr(handle)), "stat")

    async def stat(self, path: str) -> Attrs:
        return self._attrs(await self.request(STAT, sstr(path)), "stat")

    async def truncate(self, handle: bytes, size: int) -> None:
        body = sstr(handle) + _U32.pack(_ATTR_SIZE) + _U64.pack(size)
        self.check(await self.request(FSETSTAT, body), "truncate")

    async def remove(self, path: str) -> None:
        self.check(await self.request(REMOVE, sstr(path)), "remove")

    async def rename(self, old: str, new: str) -> None:
        """SSH_FXP_RENAME: OpenSSH's server refuses it over an existing name."""
        self.check(await self.request(RENAME, sstr(old) + sstr(new)), "rename")

    async def realpath(self, path: str) -> str:
        r = self.check(await self.request(REALPATH, sstr(path)), "realpath", _NAME)
        try:
            if r.u32() < 1:
                raise _Malformed
            return r.string().decode(errors="surrogateescape")
        except _Malformed:
            raise BlockfsError("realpath: a malformed reply", errno=errno.EIO) from None

    async def fsync(self, handle: bytes) -> None:
        """:raise SftpError: (FX_OP_UNSUPPORTED) the server lacks ``fsync@openssh.com``."""
        if b"fsync@openssh.com" not in self.extensions:
            raise SftpError("fsync: not supported by the server", FX_OP_UNSUPPORTED)
        body = sstr("fsync@openssh.com") + sstr(handle)
        self.check(await self.request(EXTENDED, body), "fsync")

    async def read(self, handle: bytes, offset: int, length: int, step: int) -> bytes:
        """``length`` bytes from ``offset`` as requests of at most ``step`` bytes in flight
        together; short where the file ends (the caller fills with zeroes)."""
        h = sstr(handle)
        spans = [(pos, min(step, length - pos)) for pos in range(0, length, step)]
        replies = await self.requests(
            [read_packet(h, offset + pos, n) for pos, n in spans]
        )
        parts = []
        for (pos, n), reply in zip(spans, replies, strict=True):
            data = self._data(reply)
            if 0 < len(data) < n:  # a short answer before the end: ask for the rest
                data += await self.read(handle, offset + pos + len(data), n - len(data), step)
            parts.append(data)
            if len(data) < n:
                break  # the end of the file: what lies beyond is read as zeroes
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, handle: bytes, offset: int, data: bytes | memoryview, step: int) -> None:
        h = sstr(handle)
        view = memoryview(data)
        packets = [
            write_packet(h, offset + pos, view[pos : pos + step])
            for pos in range(0, len(view), step)
        ]
        for reply in await self.requests(packets):
            self.check(reply, "write")

    def _data(self, reply: tuple[int, bytes]) -> bytes:
        typ, payload = reply
        if typ == _DATA:
            return payload  # the reader took the length off
        if typ == _STATUS:
            r = _Reader(payload)
            try:
                if r.u32() == FX_EOF:
                    return b""
            except _Malformed:
                pass
        self.check(reply, "read", _DATA)
        raise BlockfsError("read: a malformed reply from the server", errno=errno.EIO)

    def _string(self, reply: tuple[int, bytes], what: str, want: int) -> bytes:
        r = self.check(reply, what, want)
        try:
            return r.string()
        except _Malformed:
            raise BlockfsError(f"{what}: a malformed reply", errno=errno.EIO) from None

    def _attrs(self, reply: tuple[int, bytes], what: str) -> Attrs:
        r = self.check(reply, what, _ATTRS)
        try:
            return r.attrs()
        except _Malformed:
            raise BlockfsError(f"{what}: a malformed reply", errno=errno.EIO) from None


_CODE_NAMES = {
    FX_EOF: "end of file",
    FX_NO_SUCH_FILE: "no such file",
    FX_PERMISSION_DENIED: "permission denied",
    FX_FAILURE: "failure",
    FX_BAD_MESSAGE: "bad message",
    FX_NO_CONNECTION: "no connection",
    FX_CONNECTION_LOST: "connection lost",
    FX_OP_UNSUPPORTED: "operation unsupported",
}
