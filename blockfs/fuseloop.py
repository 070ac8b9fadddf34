"""The FUSE request loop: reader threads on cloned ``/dev/fuse`` descriptors (issue 17).

pyfuse3 mounts the file system and unmounts it; its own loop (one trio task reading the device,
one task per request) is not run. Instead :class:`FuseLoop` answers the INIT request itself
and then N threads read requests, each from its own descriptor cloned from the session's with
``FUSE_DEV_IOC_CLONE`` (the kernel hands each request to one reader, and takes its answer on
the descriptor that read it):

- READ and WRITE of an image whose root offers a thread-callable data path (a raw image on a
  local file: :meth:`blockfs.nodes.base.Node.direct_io`) are answered in the reader thread,
  through :meth:`Export.read_direct` / :meth:`Export.write_direct`: the export's checks,
  counters, in-flight count and gate, under its lock. A READ is one ``preadv`` into the
  thread's buffer and one ``write`` of the answer; a WRITE is one ``pwrite`` of a view of the
  request buffer (the payload is never copied). Every system call releases the GIL.
- READ and WRITE of a raw image on an ssh host (issue 14) are sent by the reader thread to the
  image's SFTP session itself (:meth:`Export.submit_read` / :meth:`Export.submit_write`,
  :meth:`blockfs.nodes.sftp.SftpSession.submit`), and answered in the event loop's thread
  straight from the session's reply, without a task; a request whose connection goes is
  served again by the event loop (:meth:`_handle`), through the retry filter, its deadline
  running from when it was first sent. Requests the kernel queued together go together: after
  such a request the thread reads on, from a second, non-blocking clone of its descriptor,
  holding the SFTP requests back (at most :data:`HOLD_MAX` of them), and sends them in one
  pipe write when the queue is empty (or before anything else: a local read, a hand-over),
  and only then blocks. One reader thread serves a mount whose threads only send (see
  :mod:`blockfs.daemon`): two split the queue and contend for the GIL.
  Measured (4 KiB random reads at queue depth 16, loopback sshd, 2 cores, all processes'
  CPU per request): a pipe write per request 120 us, ``ssh`` and ``sshd`` most of it; sent
  together (7 requests per write on average) 87 us; sshfs 113 us.
- Every other request (and a READ or WRITE the export declines: a job's filter in the graph,
  the gate shut for a graph change, a qcow2, VHDX or remote image) is copied and handed to the
  trio event loop, where a task decodes it, calls :class:`blockfs.fs.BlockfsOperations` as
  pyfuse3 would, and writes the answer on the reader's descriptor. At most ``max_tasks`` such
  requests are in the loop at once; beyond that a reader waits (as pyfuse3 stops reading), so
  a flood of requests stays in the kernel, not in this process's memory.

Measured on one 512 MiB raw image (benchmarks/README.md): a reader thread answers a 4 KiB
request in about a third of the time pyfuse3's loop takes (whose task switch, epoll round and
libfuse buffer handling are ~20 us of the ~28 us of the thinnest pyfuse3 file system), so two
threads pass qemu-storage-daemon's FUSE export on small requests.

The opcodes decoded are those a blockfs mount serves (LOOKUP, GETATTR, SETATTR, OPEN, READ,
WRITE, STATFS, RELEASE, FSYNC, FLUSH, OPENDIR, READDIR, RELEASEDIR, FORGET, BATCH_FORGET,
INTERRUPT, DESTROY); any other is answered ENOSYS, as pyfuse3's default ``Operations``
methods answer them (the kernel then stops sending most of them).

The protocol minor version is capped at :data:`PROTOCOL_MINOR`, so the structures are the ones
written here whatever newer kernel mounts it. Directories are listed with plain READDIR (no
READDIRPLUS: an entry costs no attributes and no lookup count).

**Fair share of the GIL** (:class:`_GilShare`): a reader thread needs the GIL back after every
system call (its ``readv``, ``pread``, ``write``). While the event loop is CPU-bound (a job's
bookkeeping) CPython hands it over badly: trio's loop drops the GIL for an instant at every
``epoll`` round, which wakes the waiting reader and restarts its 5 ms switch timer, but the loop
takes the GIL back long before the woken thread runs. Measured: while a backup of a 2 TiB sparse
qcow2 disk started, the worst 4 KiB read of another disk of the mount took 0.5-1.75 s through
the threads (6 ms in pyfuse3's loop, where the read waits for the job's next checkpoint); a
shorter switch interval did not help (0.2 ms: 477 ms). So while the threads run, the event
loop sleeps for an instant (``time.sleep(0)``, ~20 us with the main thread's timer slack at
1 us) after a task step whenever it has not been idle for a millisecond: a waiting reader then
takes the GIL. The same read then took 5-10 ms at worst; the loop loses at most ~2% of its time.

Stopping: when the file system is unmounted the kernel ends the connection and every reader
returns ENODEV; :meth:`serve` returns once they all have. :meth:`terminate` (a signal) makes
:meth:`serve` return at once; requests read after that are left unanswered (they fail when the
connection ends, as with pyfuse3's loop), and the daemon shuts every export's direct path
(:meth:`Export.close_direct`) before it closes the images, so no thread touches an image file
after that.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import logging
import os
import queue
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from blockfs.errors import BlockfsError
from blockfs.nodes.base import Held
from blockfs.nodes.retry import FIRST_SENT

log = logging.getLogger(__name__)

#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error, unique
OUT_HEADER = struct.Struct("<IiQ")
_IN = IN_HEADER.size  # 40
_OUT = OUT_HEADER.size  # 16
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
#: fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
#: fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
#: rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec (+ attr)
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy (+ attr)
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
RW_IN = struct.Struct("<QQII")  # fh offset size read_flags/write_flags (read and write)
WRITE_OUT = struct.Struct("<II")  # size padding
#: a WRITE's whole answer, header and fuse_write_out, packed at once (the threads' hot path)
WRITE_ANSWER = struct.Struct("<IiQII")
#: the most requests to remote images a reader thread holds back before it sends them
HOLD_MAX = 32
#: ... and the most bytes of written data
HOLD_BYTES = 256 << 10
FH_IN = struct.Struct("<QI")  # fh flags (release, fsync, flush: the fh comes first)
#: fuse_setattr_in: valid padding fh size lock_owner atime mtime ctime atimensec mtimensec
#: ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
#: fuse_kstatfs: blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino off namelen type (+ name, padded to 8)
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")  # parent namelen flags (+ name, NUL)

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
OPENDIR, READDIR, RELEASEDIR = 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
_NOTIFY_INVAL_ENTRY = 3

#: the protocol minor version spoken at most (7.31: every structure above has its final size)
PROTOCOL_MINOR = 31
_FUSE_ASYNC_READ = 1 << 0
_FUSE_ATOMIC_O_TRUNC = 1 << 3
_FUSE_BIG_WRITES = 1 << 5
_FUSE_AUTO_INVAL_DATA = 1 << 12
_FUSE_ASYNC_DIO = 1 << 15
_FUSE_PARALLEL_DIROPS = 1 << 18
_FUSE_HANDLE_KILLPRIV = 1 << 19
_FUSE_MAX_PAGES = 1 << 22
#: what libfuse asks for by default (pyfuse3's loop negotiated these), without READDIRPLUS
_WANTED = (
    _FUSE_ASYNC_READ | _FUSE_ATOMIC_O_TRUNC | _FUSE_BIG_WRITES | _FUSE_AUTO_INVAL_DATA
    | _FUSE_ASYNC_DIO | _FUSE_PARALLEL_DIROPS | _FUSE_HANDLE_KILLPRIV | _FUSE_MAX_PAGES
)  # fmt: skip
_FOPEN_DIRECT_IO, _FOPEN_KEEP_CACHE, _FOPEN_NONSEEKABLE = 1, 2, 4
_FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
#: pages per request (libfuse's FUSE_MAX_MAX_PAGES): 1 MiB with 4 KiB pages
_MAX_PAGES = 256
#: background requests (asynchronous reads, AIO on direct I/O) the kernel keeps in flight;
#: its default, 12, is below a qd16 workload
_MAX_BACKGROUND = 64
_CONGESTION_THRESHOLD = 48
#: the FATTR_* bits of fuse_setattr_in.valid
_FATTR = {
    "update_mode": 1, "update_uid": 2, "update_gid": 4, "update_size": 8, "update_atime": 16,
    "update_mtime": 32, "update_ctime": 1024,
}  # fmt: skip
_NS = 1_000_000_000
#: what a reader thread never takes (the signals the daemon handles)
_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE}


#: the longest the event loop runs without letting a reader thread take the GIL
GIL_SHARE_EVERY = 0.001
#: an ``epoll`` wait this long left the GIL free long enough for a waiting thread to take it
_IDLE_ENOUGH = 50e-6
_PR_SET_TIMERSLACK = 29


class _GilShare(trio.abc.Instrument):
    """Lets the reader threads take the GIL at least every :data:`GIL_SHARE_EVERY` seconds
    while the event loop is busy (see the module docstring): after a task step, if the loop
    has neither slept in ``epoll`` nor handed over for that long, it sleeps for an instant.
    Its cost is one clock read per task step and two per ``epoll`` round."""

    __slots__ = ("_last", "_io_start")

    def __init__(self) -> None:
        self._last = self._io_start = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        self._io_start = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        if now - self._io_start >= _IDLE_ENOUGH:
            self._last = now

    def after_task_step(self, task: Any) -> None:
        if time.perf_counter() - self._last >= GIL_SHARE_EVERY:
            time.sleep(0)
            self._last = time.perf_counter()


def _fine_timer_slack() -> None:
    """A 1 us timer slack for the calling thread (the event loop's): ``time.sleep(0)`` then
    costs ~20 us here instead of ~90 us (the default 50 us slack). Best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class LoopError(BlockfsError):
    """The FUSE session could not be taken over (no INIT, an unknown protocol)."""


class RequestContext:
    """Who asked (pyfuse3's ``RequestContext``: uid, gid, pid, umask)."""

    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, uid: int, gid: int, pid: int) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, gid, pid, 0


class SetattrFields:
    """Which attributes a SETATTR changes (pyfuse3's ``SetattrFields``)."""

    def __init__(self, valid: int) -> None:
        for name, bit in _FATTR.items():
            setattr(self, name, bool(valid & bit))


def session_fds() -> set[int]:
    """This process's descriptors open on ``/dev/fuse``."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.add(int(name))
        except OSError:
            continue
    return found


def _secs(timeout: float) -> tuple[int, int]:
    ns = max(0, int(timeout * _NS))
    return ns // _NS, ns % _NS


def _attr(a: Any) -> bytes:
    return ATTR.pack(
        a.st_ino, a.st_size, a.st_blocks,
        a.st_atime_ns // _NS, a.st_mtime_ns // _NS, a.st_ctime_ns // _NS,
        a.st_atime_ns % _NS, a.st_mtime_ns % _NS, a.st_ctime_ns % _NS,
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_blksize, 0,
    )  # fmt: skip


def _entry(a: Any) -> bytes:
    es, ens = _secs(a.entry_timeout)
    as_, ans = _secs(a.attr_timeout)
    return ENTRY_OUT.pack(a.st_ino, a.generation, es, as_, ens, ans) + _attr(a)


class FuseLoop:
    """Serve one FUSE session with reader threads (see the module docstring)."""

    def __init__(self, ops: Any, session_fd: int, *, threads: int, max_tasks: int) -> None:
        self.ops = ops
        self.session_fd = session_fd
        self.threads = max(1, threads)
        self.page = os.sysconf("SC_PAGESIZE")
        self.max_write = _MAX_PAGES * self.page
        self.bufsize = self.max_write + 2 * self.page
        self._slots = threading.BoundedSemaphore(max(1, max_tasks))
        #: requests read by the threads, waiting for the event loop (fd, request)
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._wake_pending = False
        self._fds: list[int] = []
        #: a non-blocking clone for each reader: what it reads while it holds requests back
        self._nb_fds: list[int] = []
        #: requests to remote images the readers sent, and the sends that carried them
        self.held_requests = self.held_sends = 0
        #: held while the notifier writes on a descriptor, and while they are closed
        self._fd_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._running = 0
        self._running_lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopping = False
        self._notify: queue.SimpleQueue[tuple[int, bytes]] | None = None
        #: the protocol minor version and flags agreed at INIT (for the log)
        self.minor = 0
        self.flags = 0

    # -- taking the session over -------------------------------------------------------------

    def handshake(self, timeout: float = 10.0) -> None:
        """Answer the INIT request the kernel queued at mount time (before any other), and
        clone a descriptor for each reader.

        :raise LoopError: no INIT came, its protocol is not FUSE 7, or no clone.
        """
        fd = self.session_fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise LoopError("the kernel sent no FUSE INIT request")
        buf = bytearray(self.bufsize)
        n = os.readv(fd, [buf])
        _, op, unique, _, _, _, _, _, _ = IN_HEADER.unpack_from(buf)
        if op != INIT or n < _IN + INIT_IN.size:
            raise LoopError(f"the first FUSE request is {op}, not INIT")
        major, minor, readahead, flags = INIT_IN.unpack_from(buf, _IN)
        if major != 7 or minor < 13:
            os.write(fd, OUT_HEADER.pack(_OUT, -errno.EPROTO, unique))
            raise LoopError(f"FUSE protocol {major}.{minor} is not supported (7.13 or later)")
        self.minor = min(minor, PROTOCOL_MINOR)
        self.flags = flags & _WANTED
        reply = INIT_OUT.pack(
            7, self.minor, readahead, self.flags, _MAX_BACKGROUND, _CONGESTION_THRESHOLD,
            self.max_write, 1, _MAX_PAGES, 0, 0, 0,
        )  # fmt: skip
        os.writev(fd, [OUT_HEADER.pack(_OUT + len(reply), 0, unique), reply])
        log.debug("FUSE 7.%d (kernel 7.%d), flags %#x", self.minor, minor, self.flags)
        try:
            for _ in range(self.threads):
                self._fds.append(self._clone())
                self._nb_fds.append(self._clone())
                os.set_blocking(self._nb_fds[-1], False)
        except OSError as exc:
            for clone in self._fds + self._nb_fds:
                os.close(clone)
            self._fds.clear()
            self._nb_fds.clear()
            raise LoopError(f"cannot clone the FUSE device: {exc.strerror}") from None

    def _clone(self) -> int:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _FUSE_DEV_IOC_CLONE, struct.pack("I", self.session_fd))
        except OSError:
            os.close(fd)
            raise
        return fd

    async def serve(self) -> None:
        """Start the readers; return when the session ends (unmounted) or at
        :meth:`terminate`, once the requests in the event loop are answered."""
        self._token = trio.lowlevel.current_trio_token()
        _fine_timer_slack()
        share = _GilShare()
        trio.lowlevel.add_instrument(share)
        try:
            await self._serve()
        finally:
            trio.lowlevel.remove_instrument(share)

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._running = len(self._fds)
            for i, fd in enumerate(self._fds):
                t = threading.Thread(
                    target=self._reader, args=(fd, self._nb_fds[i]), name=f"fuse-reader-{i}",
                    daemon=True,
                )  # fmt: skip
                self._workers.append(t)
                t.start()
            await self._stop.wait()
            self._stopping = True
        self._nursery = None

    def terminate(self) -> None:
        """Stop serving (from the event loop's thread): :meth:`serve` returns."""
        self._stopping = True
        self._stop.set()

    def close(self, timeout: float = 2.0) -> None:
        """After the session is unmounted: wait a little (``timeout`` in all) for the
        readers, close the descriptors of those that ended. A reader still blocked (a file
        under the lazily detached mount is still open) keeps its descriptor until the process
        exits, which ends the connection."""
        deadline = time.monotonic() + timeout
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        # the notifier writes on the first descriptor: not while it is being closed (a write
        # it is blocked in ends with the connection; then the descriptors stay to the exit)
        if not self._fd_lock.acquire(timeout=max(0.1, deadline - time.monotonic())):
            return
        try:
            for i, fd in enumerate(self._fds):
                if i >= len(self._workers) or not self._workers[i].is_alive():
                    os.close(fd)
                    os.close(self._nb_fds[i])
            self._fds = []
            self._nb_fds = []
        finally:
            self._fd_lock.release()
        self._workers.clear()

    # -- the reader threads --------------------------------------------------------------------

    def _reader(self, fd: int, nb_fd: int) -> None:
        # Signals go to the event loop's thread (trio's handlers), never to a reader.
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
        held: Held = set()
        tally = [0, 0]  # requests held back, sends
        try:
            self._read_loop(fd, nb_fd, held, tally)
        except Exception:
            log.exception("FUSE reader failed")
        finally:
            tally[1] += self._send_held(held)
            with self._running_lock:
                self.held_requests += tally[0]
                self.held_sends += tally[1]
                self._running -= 1
                last = self._running == 0
            if last:
                self._call_soon(self._stop.set)

    def _call_soon(self, fn: Any, *args: Any) -> bool:
        token = self._token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True

    def _read_loop(self, blocking_fd: int, nb_fd: int, held: Held, tally: list[int]) -> None:
        buf = bytearray(self.bufsize)
        view = memoryview(buf)
        # READ answers are built apart from the request: a direct read that declines may
        # have filled part of its range, and the request then goes to the event loop whole
        out = bytearray(_OUT + self.max_write)
        out_view = memoryview(out)
        readv = os.readv
        unpack_header, unpack_rw = IN_HEADER.unpack_from, RW_IN.unpack_from
        pack_out = OUT_HEADER.pack_into
        exports = self.ops.exports_by_handle
        count = size_held = 0  # held back now: requests, bytes of written data

        def send_held() -> None:
            nonlocal count, size_held
            count = size_held = 0
            tally[1] += self._send_held(held)

        while True:
            # a request is answered on the descriptor that read it
            fd = nb_fd if held else blocking_fd
            try:
                n = readv(fd, [buf])
            except BlockingIOError:  # no more requests at hand: send what is held
                send_held()
                continue
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.EBADF):
                    return  # the session ended (unmounted)
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue  # ENOENT: a request interrupted before it was read
                raise
            _, op, unique, _, _, _, _, _, _ = unpack_header(buf)
            if op == READ or op == WRITE:
                fh, off, size, _ = unpack_rw(buf, _IN)
                export = exports.get(fh)
                if export is not None:
                    try:
                        if export.submits:  # a remote image: sent soon, answered later
                            if op == READ:
                                req = bytes(view[: _IN + RW_IN.size])
                                answer = self._remote_answer(fd, req, unique, None)
                                sent = export.submit_read(off, size, answer, held)
                            else:
                                req = bytes(view[:n])  # kept: sent again if the connection goes
                                data = memoryview(req)[80 : 80 + size]
                                answer = self._remote_answer(fd, req, unique, size)
                                sent = export.submit_write(off, data, answer, held)
                                size_held += size if sent else 0
                            if sent:
                                count += 1
                                tally[0] += 1
                                if count >= HOLD_MAX or size_held >= HOLD_BYTES:
                                    send_held()
                                continue
                            # declined: the event loop serves it (below)
                        else:
                            if held:  # nothing waits behind a local read or write
                                send_held()
                            if op == READ:
                                got = export.read_direct(off, out_view[_OUT : _OUT + size])
                                if got is not None:
                                    pack_out(out, 0, _OUT + got, 0, unique)
                                    self._answer(fd, out_view[: _OUT + got])
                                    continue
                            else:
                                got = export.write_direct(off, view[80 : 80 + size])
                                if got is not None:
                                    self._answer(fd, WRITE_ANSWER.pack(24, 0, unique, got, 0))
                                    continue
                    except BlockfsError as exc:
                        self._answer(fd, OUT_HEADER.pack(_OUT, -exc.errno, unique))
                        continue
                    except Exception:
                        log.exception("%s of %s failed", "read" if op == READ else "write",
                                      export.name)  # fmt: skip
                        self._answer(fd, OUT_HEADER.pack(_OUT, -errno.EIO, unique))
                        continue
            elif op == INTERRUPT or op == FORGET or op == BATCH_FORGET:
                continue  # no answer; blockfs keeps no lookup counts, runs no long requests
            if held:
                send_held()
            if self._stopping:
                continue  # left unanswered: it fails when the connection ends
            self._slots.acquire()
            self._hand_over(fd, bytes(view[:n]))

    @staticmethod
    def _send_held(held: Held) -> int:
        """Send the requests the nodes held back (see :attr:`DirectIo.submit_read`); how
        many sends that took (one per SFTP session)."""
        sends = list(held)
        held.clear()
        for send in sends:
            try:
                send()
            except Exception:
                log.exception("sending requests to a remote image failed")
        return len(sends)

    def _remote_answer(
        self, fd: int, req: bytes, unique: int, written: int | None
    ) -> Callable[[bytes, int], None]:
        """How a request sent by a remote image's node from this thread is answered, in the
        event loop's thread once its reply came (:meth:`Export.submit_read`): the data read
        (``written`` None) or the length written, the errno, or (the connection went) the
        request served by the event loop after all, as if it had been handed over (retried
        there), without taking a slot."""
        sent = time.monotonic()

        def answer(data: bytes, err: int) -> None:
            if err == 0:
                if written is None:
                    self._answer_parts(fd, OUT_HEADER.pack(_OUT + len(data), 0, unique), data)
                else:
                    self._answer(fd, WRITE_ANSWER.pack(24, 0, unique, written, 0))
            elif err > 0:
                self._answer(fd, OUT_HEADER.pack(_OUT, -err, unique))
            elif self._nursery is not None and not self._stopping:
                self._nursery.start_soon(self._handle, fd, req, False, sent)

        return answer

    def _hand_over(self, fd: int, req: bytes) -> None:
        """Queue a request for the event loop; wake the loop only if no wake-up is pending
        (under load the loop takes many requests per wake-up, not one system call each)."""
        with self._queue_lock:
            self._queue.append((fd, req))
            if self._wake_pending:
                return
            self._wake_pending = True
        if not self._call_soon(self._start_queued):
            with self._queue_lock:  # the event loop is gone: nobody will answer these
                dropped = len(self._queue)
                self._queue.clear()
                self._wake_pending = False
            for _ in range(dropped):
                self._slots.release()

    @staticmethod
    def _answer(fd: int, data: bytes | memoryview) -> None:
        try:
            os.write(fd, data)
        except OSError as exc:
            # ENOENT: the request was interrupted meanwhile; ENODEV: the session ended
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("answering a FUSE request failed: %s", exc)

    @staticmethod
    def _answer_parts(fd: int, header: bytes, payload: bytes) -> None:
        try:
            os.writev(fd, (header, payload))  # the payload is not copied into one buffer first
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("answering a FUSE request failed: %s", exc)

    # -- requests in the event loop ------------------------------------------------------------

    def _start_queued(self) -> None:
        """In the event loop: a task for each request the readers queued."""
        with self._queue_lock:
            queued = list(self._queue)
            self._queue.clear()
            self._wake_pending = False
        nursery = self._nursery
        for fd, req in queued:
            if nursery is None or self._stopping:
                self._slots.release()
            else:
                nursery.start_soon(self._handle, fd, req)

    async def _handle(
        self, fd: int, req: bytes, slot: bool = True, sent: float | None = None
    ) -> None:
        _, op, unique, node, uid, gid, pid, _, _ = IN_HEADER.unpack_from(req)
        if sent is not None:  # handed back by a remote node: its deadline runs from then
            FIRST_SENT.set(trio.current_time() - (time.monotonic() - sent))
        try:
            reply = await self._dispatch(op, node, RequestContext(uid, gid, pid), req)
        except pyfuse3.FUSEError as exc:
            self._answer(fd, OUT_HEADER.pack(_OUT, -exc.errno, unique))
        except Exception:
            log.exception("FUSE request %d failed", op)
            self._answer(fd, OUT_HEADER.pack(_OUT, -errno.EIO, unique))
        else:
            if reply is not None:
                self._answer_parts(fd, OUT_HEADER.pack(_OUT + len(reply), 0, unique), reply)
        finally:
            if slot:
                self._slots.release()

    async def _dispatch(self, op: int, node: int, ctx: RequestContext, req: bytes) -> bytes | None:
        """The answer's payload (None: no answer). :raise pyfuse3.FUSEError: its errno."""
        ops = self.ops
        if op == READ:
            fh, off, size, _ = RW_IN.unpack_from(req, _IN)
            data: bytes = await ops.read(fh, off, size)
            return data
        if op == WRITE:
            fh, off, size, _ = RW_IN.unpack_from(req, _IN)
            done = await ops.write(fh, off, req[80 : 80 + size])
            return WRITE_OUT.pack(done, 0)
        if op == LOOKUP:
            name = req[_IN:].split(b"\0", 1)[0]
            return _entry(await ops.lookup(node, name, ctx))
        if op == GETATTR:
            a = await ops.getattr(node, ctx)
            return ATTR_OUT.pack(*_secs(a.attr_timeout), 0) + _attr(a)
        if op == SETATTR:
            f = SETATTR_IN.unpack_from(req, _IN)
            attr = pyfuse3.EntryAttributes()
            attr.st_size, attr.st_mode, attr.st_uid, attr.st_gid = f[3], f[11], f[13], f[14]
            attr.st_atime_ns = f[5] * _NS + f[8]
            attr.st_mtime_ns = f[6] * _NS + f[9]
            a = await ops.setattr(node, attr, SetattrFields(f[0]), f[2] if f[0] & 64 else None,
                                  ctx)  # fmt: skip
            return ATTR_OUT.pack(*_secs(a.attr_timeout), 0) + _attr(a)
        if op == OPEN:
            flags, _ = OPEN_IN.unpack_from(req, _IN)
            fi = await ops.open(node, flags, ctx)
            oflags = (_FOPEN_DIRECT_IO if fi.direct_io else 0) | (
                _FOPEN_KEEP_CACHE if fi.keep_cache else 0
            ) | (_FOPEN_NONSEEKABLE if fi.nonseekable else 0)  # fmt: skip
            return OPEN_OUT.pack(fi.fh, oflags, 0)
        if op == OPENDIR:
            return OPEN_OUT.pack(await ops.opendir(node, ctx), 0, 0)
        if op == READDIR:
            fh, off, size, _ = RW_IN.unpack_from(req, _IN)
            out = bytearray()
            for name, inode, mode in ops.dir_entries(fh, off):
                entry = DIRENT.pack(inode, inode, len(name), (mode >> 12) & 0o17) + name
                entry += bytes(-len(entry) % 8)
                if len(out) + len(entry) > size:
                    break
                out += entry
            return bytes(out)
        if op == RELEASE:
            await ops.release(FH_IN.unpack_from(req, _IN)[0])
            return b""
        if op == RELEASEDIR:
            await ops.releasedir(FH_IN.unpack_from(req, _IN)[0])
            return b""
        if op == FLUSH:
            await ops.flush(FH_IN.unpack_from(req, _IN)[0])
            return b""
        if op == FSYNC:
            fh, flags = FH_IN.unpack_from(req, _IN)
            await ops.fsync(fh, bool(flags & 1))
            return b""
        if op == STATFS:
            s = await ops.statfs(ctx)
            return STATFS_OUT.pack(
                s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize,
                s.f_namemax, s.f_frsize, 0,
            )  # fmt: skip
        if op == DESTROY:
            return b""
        if op == INIT:
            raise pyfuse3.FUSEError(errno.EPROTO)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -- notifications -----------------------------------------------------------------------

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Make the kernel forget the entry ``name`` of directory ``parent`` (it may have
        cached that the name does not exist, or that it does). Written by a thread of its own:
        the kernel takes the directory's lock first, which a request being answered may hold."""
        if self._notify is None:
            self._notify = queue.SimpleQueue()
            threading.Thread(target=self._notifier, name="fuse-notify", daemon=True).start()
        self._notify.put((parent, name))

    def _notifier(self) -> None:
        assert self._notify is not None
        while True:
            parent, name = self._notify.get()
            body = NOTIFY_INVAL_ENTRY.pack(parent, len(name), 0) + name + b"\0"
            msg = OUT_HEADER.pack(_OUT + len(body), _NOTIFY_INVAL_ENTRY, 0) + body
            with self._fd_lock:
                if not self._fds:
                    continue
                try:
                    os.write(self._fds[0], msg)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENODEV):
                        log.warning("invalidating %r failed: %s", name, exc)
