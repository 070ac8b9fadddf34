"""The ``file`` protocol node: a local file or block device, read and written positionally.

Python pays per request, so the path of one request is kept short. The policy (``hybrid``, the
default) follows what the benchmarks measured against the alternatives:

1. Reads of up to 4 MiB try ``preadv2(..., RWF_NOWAIT)`` straight from the event loop: when the
   data is in the page cache this returns at once and costs no thread hop (from 128 KiB the
   data goes straight into the bytes object returned: one copy).
2. Writes of up to 64 KiB are plain ``pwrite`` calls in the event loop: a buffered write is a
   copy into the page cache, cheaper than any hop (ext4 refuses RWF_NOWAIT for buffered
   writes); writes of up to 1 MiB too, while the dirty-page gauge says the kernel is far from
   throttling writers (:class:`_DirtyGauge`).
3. Everything else (larger requests, reads that would block, writes near throttling) goes to
   the shared :class:`~blockfs.nodes.threads.IoThreadPool`, threads that wake the waiting trio
   task directly, at a fraction of the cost of ``trio.to_thread.run_sync``. Requests that may
   block overlap there and never wait for each other. Cancelling a request waits for its call.

``BLOCKFS_IO_MODE=inline|threads`` forces every request into the event loop or into the pool,
for measurements.

This module must not know about FUSE; it is only a node.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections.abc import Hashable
from typing import Any

import trio

from blockfs.errors import BlockfsError, ReadOnlyError, UsageError
from blockfs.nodes.base import Capability, DirectIo, Extent, IoCounters, Limits, Node, Status
from blockfs.nodes.threads import shared_pool

log = logging.getLogger(__name__)

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _oserror(exc: OSError, what: str, path: str) -> BlockfsError:
    if exc.errno == errno.EIO:
        log.error("%s %s: %s", what, path, exc.strerror)
    return BlockfsError(f"{what} {path}: {exc.strerror}", errno=exc.errno or errno.EIO)


#: flags of every image open: no controlling terminal, no hang on a FIFO, no leak to children
_SAFE_OPEN = os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _io_mode(mode: str | None) -> str:
    mode = mode or os.environ.get("BLOCKFS_IO_MODE", "hybrid")
    if mode not in ("hybrid", "inline", "threads"):
        raise UsageError(f"unknown I/O mode {mode!r} (hybrid, inline, threads)")
    return mode


class FileNode(Node):
    """A local file (or block device) as a node. ``size`` is the file's length."""

    format_name = "file"
    capabilities = Capability.ZERO | Capability.DISCARD | Capability.EXTENTS | Capability.RESIZE

    def __init__(self, path: str, fd: int, size: int, read_only: bool, mode: str) -> None:
        self.filename = path
        self.fd = fd
        self.size = size
        self.read_only = read_only
        self.io: IoCounters = IoCounters()
        self._is_blockdev = False
        self._pool = shared_pool()
        self.limits = Limits(max_inflight=self._pool.size)
        self._mode = mode
        self._inline = mode == "inline"  # everything in the event loop (for measurements)
        self._read_nowait = mode == "hybrid" and _RWF_NOWAIT != 0
        # Writes beyond 64 KiB go to the pool: a buffered write cannot be made non-blocking
        # (ext4 refuses RWF_NOWAIT for them) and a large one may wait for writeback. Reads of
        # any size are tried non-blocking first: a page-cache hit is a copy, cheaper in the
        # loop than the hop to a thread (measured on 1 MiB reads against the floor file
        # system, issue 17: 1.7 GB/s through the pool, 4.3 GB/s in the loop).
        self._inline_max = (1 << 62) if mode == "inline" else (0 if mode == "threads" else 65536)
        #: writes up to this size stay in the loop while the dirty-page gauge says so
        self._inline_write_max = _INLINE_WRITE_MAX if mode == "hybrid" else 0
        self._now = time.monotonic

        self._closed = False
        #: (st_dev, st_ino): what the file is, whatever name reached it (:meth:`identity`)
        self._identity: tuple[int, int] = (0, 0)
        #: the path of the open file after every symlink, read back from the descriptor
        self.real_path = path
        self.st_mode = 0o100600
        self.st_uid = 0
        self.st_gid = 0

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        read_only: bool = False,
        mode: str | None = None,
        nofollow: bool = False,
        dir_fd: int | None = None,
    ) -> FileNode:
        """Open ``path`` (relative to ``dir_fd`` if given; its last component must not be a
        symlink with ``nofollow``). Anything but a regular file or a block device is refused
        before it is opened, and again on the descriptor (a FIFO must not hang the daemon, a
        terminal must not become its controlling one, a swapped name must not slip through).

        :raise UsageError: the path cannot be opened as an image file.
        """
        mode = _io_mode(mode)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | _SAFE_OPEN
        if nofollow:
            flags |= os.O_NOFOLLOW
        try:
            # Both off the event loop: a stat of a hung network file system must not stop
            # every other disk. O_NONBLOCK: a FIFO that slipped in after the check returns.
            fd = await trio.to_thread.run_sync(_checked_open, path, flags, dir_fd, nofollow)
        except OSError as exc:
            if exc.errno == errno.ELOOP and nofollow:
                raise UsageError(
                    f"{path}: is a symbolic link; refused", errno=errno.ELOOP
                ) from None
            raise _path_error(exc, path) from None
        except ValueError:  # a NUL byte in the path
            raise UsageError(f"{path!r}: not a valid path") from None
        try:
            return cls.from_fd(fd, path, read_only=read_only, mode=mode)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(
        cls, fd: int, path: str, *, read_only: bool = False, mode: str | None = None
    ) -> FileNode:
        """A node over an open descriptor (which it then owns; the caller closes it when this
        raises). Used where the file was created by this process and must not be opened again
        by name. :raise UsageError: not a regular file or block device; locked by another."""
        st = os.fstat(fd)
        _check_kind(st, path)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        if fl & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        if stat.S_ISREG(st.st_mode):
            lock_against_writers(fd, path, read_only)
        node = cls(os.path.abspath(path), fd, size, read_only, _io_mode(mode))
        node._is_blockdev = stat.S_ISBLK(st.st_mode)
        node._identity = (st.st_dev, st.st_ino)
        node.st_mode = st.st_mode
        node.st_uid = st.st_uid
        node.st_gid = st.st_gid
        try:
            node.real_path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            node.real_path = os.path.realpath(path)
        return node

    # -- data path ------------------------------------------------------------------------------

    def _pread_full(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    if offset + got < self.size:
                        # Inside the size this node knows, the file ended: someone truncated
                        # it under the mount. Zeroes here would be silent corruption.
                        raise OSError(errno.EIO, "file is shorter than it was (truncated?)")
                    # Past it, a format reads its own file's tail (a compressed cluster's
                    # last sector may lie beyond EOF): zeroes, as QEMU reads them.
                    parts.append(bytes(length - got))
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    async def read(self, offset: int, length: int) -> bytes:
        io = self.io
        try:
            if self._inline:
                data = self._pread_full(length, offset)
            else:
                found = self._read_cached(length, offset) if self._read_nowait else None
                if found is None:
                    found = await self._pool.run(self._pread_full, length, offset)
                data = found
        except OSError as exc:
            io.failed_rd_operations += 1
            raise _oserror(exc, "read from", self.filename) from None
        io.rd_operations += 1
        io.rd_bytes += length
        return data

    def _read_cached(self, length: int, offset: int) -> bytes | None:
        """The range if the page cache holds all of it, read in the event loop without
        blocking; None when the pool must read it: it would block, it came short (past the
        end, or partly cached), or it is too large to copy in the loop.

        :raise OSError: a real read error.
        """
        if length > _CACHED_READ_MAX:
            return None
        try:
            if length >= _ZERO_COPY_MIN:
                return _pread_nowait(self.fd, length, offset)
            buf = bytearray(length)
            return bytes(buf) if os.preadv(self.fd, [buf], offset, _RWF_NOWAIT) == length else None
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._read_nowait = False  # the file system cannot: the pool from now on
            return None

    def _pwrite_full(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        try:
            n = len(data)
            if n <= self._inline_max or (n <= self._inline_write_max and _DIRTY.room(self._now())):
                # A buffered write is a copy into the page cache: a thread hop costs more than
                # the copy (measured: 2.4x the 4k write IOPS, half the latency). Beyond 64 KiB
                # only while the kernel is far from throttling writers (see _DirtyGauge).
                self._pwrite_full(data, offset)
            else:
                await self._pool.run(self._pwrite_full, data, offset)
        except OSError as exc:
            self.io.failed_wr_operations += 1
            raise _oserror(exc, "write to", self.filename) from None
        io = self.io
        io.wr_operations += 1
        io.wr_bytes += len(data)
        if offset + len(data) > self.size:
            self.size = offset + len(data)  # format nodes append to their file

    # -- the data path of the FUSE reader threads (blockfs.fuseloop) ---------------------------

    def direct_io(self) -> DirectIo | None:
        """Reads from the page cache and buffered writes, in the reader thread. A read that
        the cache cannot answer is declined: it goes to the event loop and the pool, so that
        the few reader threads never wait on the disk while other requests queue behind them.
        ``BLOCKFS_IO_MODE=threads`` (everything through the pool, for measurements): none."""
        if self._mode == "threads":
            return None
        return DirectIo(self._readinto_direct, self._write_direct)

    def _readinto_direct(self, offset: int, view: memoryview) -> bool:
        """Fill ``view`` from ``offset`` in the calling thread: a non-blocking ``preadv2``
        (False when it would block or comes short: part of the range is not cached, or the
        file ended); in inline mode, or where the file system cannot read non-blocking, a
        blocking read (a short read inside the size is EIO, as in :meth:`_pread_full`)."""
        fd, want = self.fd, len(view)
        try:
            if self._read_nowait:
                try:
                    if os.preadv(fd, [view], offset, _RWF_NOWAIT) != want:
                        return False
                except BlockingIOError:
                    return False
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    self._read_nowait = False  # the file system cannot: blocking from now on
                    return False
            else:
                got = 0
                while got < want:
                    n = os.preadv(fd, [view[got:]], offset + got)
                    if n == 0:
                        if offset + got < self.size:
                            raise OSError(errno.EIO, "file is shorter than it was (truncated?)")
                        view[got:] = bytes(want - got)
                        break
                    got += n
        except OSError as exc:
            self.io.failed_rd_operations += 1
            raise _oserror(exc, "read from", self.filename) from None
        io = self.io
        io.rd_operations += 1
        io.rd_bytes += want
        return True

    def _write_direct(self, offset: int, view: memoryview) -> bool:
        """Store ``view`` at ``offset`` in the calling thread (``pwrite``). Unlike the event
        loop, a reader thread may be made to wait by the kernel's dirty-page throttling, as
        any storage daemon's I/O thread is: that is the backpressure a writer should feel.
        (Declining to the pool past the dirty-page gauge's mark, as the event loop does, cost
        two thirds of the write throughput in a run whose image copies had left 2 GiB dirty:
        1,868 against 4,836 MB/s for qemu-storage-daemon, which the kernel did not hold.)"""
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        try:
            self._pwrite_full(view, offset)
        except OSError as exc:
            self.io.failed_wr_operations += 1
            raise _oserror(exc, "write to", self.filename) from None
        io = self.io
        io.wr_operations += 1
        io.wr_bytes += len(view)
        return True

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        io, zeroed = self.io, length
        end = offset + length
        if end > self.size and not self._is_blockdev:
            # Growing the file: a hole past the old end already reads as zeroes.
            old = self.size
            await self._pool.run(os.ftruncate, self.fd, end)
            self.size = end
            if offset >= old:
                io.wr_operations += 1
                io.wr_bytes += zeroed
                return
            length = old - offset
        # FALLOC_FL_ZERO_RANGE keeps the space allocated, PUNCH_HOLE frees it; both read as 0.
        try:
            await self._pool.run(_fallocate_zero, self.fd, offset, length, may_unmap)
        except OSError:
            await super().write_zeroes(offset, length, may_unmap)  # counts its writes
            return
        io.wr_operations += 1
        io.wr_bytes += zeroed

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        try:
            await self._pool.run(_fallocate_zero, self.fd, offset, length, True)
        except OSError:
            self.io.failed_unmap_operations += 1
            return  # discard is a hint
        self.io.unmap_operations += 1
        self.io.unmap_bytes += length

    async def flush(self) -> None:
        if self.read_only:
            return
        try:
            await self._pool.run(os.fdatasync, self.fd)
        except OSError as exc:
            self.io.failed_flush_operations += 1
            raise _oserror(exc, "flush", self.filename) from None
        self.io.flush_operations += 1

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.filename} is open read-only")
        await self._pool.run(os.ftruncate, self.fd, size)
        self.size = size

    async def block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        zero = Status.ZERO | Status.ALLOCATED
        data = Status.DATA | Status.ALLOCATED
        try:
            found = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to EOF
                return Extent(offset, length, zero, 0, offset)
            return Extent(offset, length, data, 0, offset)
        if found > offset:
            return Extent(offset, min(found, end) - offset, zero, 0, offset)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = end
        return Extent(offset, max(1, min(hole, end) - offset), data, 0, offset)

    async def allocated_bytes(self) -> int:
        if self._is_blockdev:
            return self.size
        return os.fstat(self.fd).st_blocks * 512

    async def reopen(self, read_only: bool) -> None:
        """Open the same file again in the other mode and put it in place of the old
        descriptor (``dup2``: the number stays, so requests and pool threads never see a
        closed one); the new open file description takes over the image lock.

        :raise UsageError: the file cannot be opened so (EACCES), or another process forbids
            writers (EBUSY); the node keeps its old mode.
        """
        if read_only == self.read_only:
            return
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
        try:
            # Through the descriptor, not the name: the same file even if it was renamed.
            new = os.open(f"/proc/self/fd/{self.fd}", flags)
        except OSError as exc:
            raise _path_error(exc, self.filename) from None
        try:
            st = os.fstat(new)
            if (st.st_dev, st.st_ino) != self._identity:
                raise UsageError(f"{self.filename}: changed while reopening", errno=errno.EBUSY)
            if stat.S_ISREG(st.st_mode):
                # The old description's lock would refuse the new one: it goes first, and
                # comes back if the new one is refused.
                _unlock(self.fd)
                try:
                    lock_against_writers(new, self.filename, read_only)
                except BaseException:
                    lock_against_writers(self.fd, self.filename, self.read_only)
                    raise
            os.dup2(new, self.fd, inheritable=False)
        finally:
            os.close(new)
        self.read_only = read_only

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def identity(self) -> Hashable:
        return self._identity


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


#: the largest write done in the event loop while the dirty-page gauge allows it
_INLINE_WRITE_MAX = 1 << 20


class _DirtyGauge:
    """Whether a buffered write would pass the kernel without being throttled.

    The kernel lets a writer through ``balance_dirty_pages`` at once while dirty and
    writeback pages stay below its "freerun" point, halfway between the background and the
    foreground dirty thresholds (``vm.dirty_background_*``, ``vm.dirty_*``, taken of the
    dirtyable memory: free pages and file pages). Past it, writers are made to sleep (up to
    200 ms a time), and a write in the event loop would stall every request. The gauge reads
    ``/proc/vmstat`` at most every 50 ms and says yes only below half the freerun point: the
    margin covers what other writers dirty meanwhile (at 1 MiB per write, thousands of writes
    before the point). Anything it cannot read makes it say no: the pool takes the write.
    """

    PERIOD = 0.05

    def __init__(self) -> None:
        self._checked = -1.0
        self._ok = False

    def room(self, now: float) -> bool:
        if now - self._checked >= self.PERIOD:
            self._checked = now
            try:
                self._ok = self._measure()
            except (OSError, ValueError, KeyError):
                self._ok = False
        return self._ok

    @staticmethod
    def _sysctl(name: str) -> int:
        with open(f"/proc/sys/vm/{name}", "rb") as f:
            return int(f.read())

    def _measure(self) -> bool:
        with open("/proc/vmstat", "rb") as f:
            stats = dict(line.split() for line in f.read().splitlines())
        page = os.sysconf("SC_PAGE_SIZE")
        dirtyable = (
            int(stats[b"nr_free_pages"])
            + int(stats[b"nr_inactive_file"])
            + int(stats[b"nr_active_file"])
        ) * page
        fg = self._sysctl("dirty_bytes") or dirtyable * self._sysctl("dirty_ratio") // 100
        bg = (
            self._sysctl("dirty_background_bytes")
            or dirtyable * self._sysctl("dirty_background_ratio") // 100
        )
        dirty = (int(stats[b"nr_dirty"]) + int(stats[b"nr_writeback"])) * page
        return dirty < (fg + bg) // 4  # half the freerun point


_DIRTY = _DirtyGauge()

#: the largest read copied from the page cache in the event loop (~1 ms of copying here): a
#: job's larger reads go to the pool, so that no one request holds the loop for long
_CACHED_READ_MAX = 4 << 20
#: reads from this size on are read non-blocking straight into a new bytes object (one copy,
#: from the page cache); below it the ctypes call costs more than the copy it saves
_ZERO_COPY_MIN = 128 * 1024


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_data = ctypes.pythonapi.PyBytes_AsString
_bytes_data.restype = ctypes.c_void_p
_bytes_data.argtypes = (ctypes.py_object,)
_preadv2: Any = None


def _pread_nowait(fd: int, length: int, offset: int) -> bytes | None:
    """``length`` bytes at ``offset`` if the page cache holds them all (``preadv2`` with
    RWF_NOWAIT, into a bytes object made for it: nothing else holds it yet, so filling it is
    safe); None when the read would block or came short (past the end, or partly cached:
    the pool then reads it whole).

    :raise OSError: a real read error, or EOPNOTSUPP (the file cannot be read non-blocking).
    """
    global _preadv2
    if _preadv2 is None:
        fn = ctypes.CDLL(None, use_errno=True).preadv2  # libc, without find_library's ldconfig
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = (ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, ctypes.c_int64,
                       ctypes.c_int)  # fmt: skip
        _preadv2 = fn
    out = _new_bytes(None, length)
    iov = _Iovec(_bytes_data(out), length)
    n = _preadv2(fd, ctypes.byref(iov), 1, offset, _RWF_NOWAIT)
    if n == length:
        return out  # type: ignore[no-any-return]
    if n < 0:
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err))
    return None


def _fallocate_zero(fd: int, offset: int, length: int, unmap: bool) -> None:

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc, without find_library's ldconfig run
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE) if unmap else _FALLOC_FL_ZERO_RANGE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc: Any = None


# Image locking, in the byte-range scheme QEMU uses (open file description locks on bytes
# 100 + permission bit, "I hold it", and 200 + permission bit, "I do not share it"), so that
# blockfs and QEMU processes see each other. blockfs takes the shared lock on 200 + WRITE on
# every image file it opens ("nobody else may write this"), and not 100 + WRITE: qemu-img info
# and check can still read a mounted image, but a VM, qemu-io or another blockfs that wants to
# write it is refused, and blockfs refuses a file a QEMU process writes (it holds 100 + WRITE).
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_PERM_WRITE_BIT = 1
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86-64 and aarch64


def _lock_held(fd: int, byte: int) -> bool:
    """Does another open file description hold a lock on ``byte``?"""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)


def _unlock(fd: int) -> None:
    """Drop the lock :func:`lock_against_writers` took on ``fd``'s open file description."""
    byte = _LOCK_SHARED_BASE + _PERM_WRITE_BIT
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0))
    except OSError:
        pass  # no OFD locks here: nothing was taken


def lock_against_writers(fd: int, path: str, read_only: bool) -> None:
    """:raise UsageError: (EBUSY) another process writes the file, or forbids writers."""
    write_held = _LOCK_PERM_BASE + _PERM_WRITE_BIT
    write_unshared = _LOCK_SHARED_BASE + _PERM_WRITE_BIT
    try:
        if _lock_held(fd, write_held):
            raise UsageError(
                f"{path}: another process writes this image (a VM or qemu?)", errno=errno.EBUSY
            )
        if not read_only and _lock_held(fd, write_unshared):
            raise UsageError(
                f"{path}: in use by someone that forbids writers (another image of this "
                "mount, a VM, qemu or blockfs?)",
                errno=errno.EBUSY,
            )
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, write_unshared, 1, 0)
        )
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # a filesystem without OFD locks: no protection, as with QEMU there
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise UsageError(f"{path}: locked by another process", errno=errno.EBUSY) from None
        raise


def _path_error(exc: OSError, path: str) -> UsageError:
    """The one-line error for a path that cannot be used as an image."""
    messages = {errno.ENOENT: "no such file", errno.EEXIST: "file exists",
                errno.EISDIR: "is a directory"}  # fmt: skip
    code = exc.errno or errno.EIO
    return UsageError(f"{path}: {messages.get(code, exc.strerror)}", errno=code)


#: ``st_dev`` of the file systems this process serves (its own FUSE mount, added once it is
#: up). A file there is answered by the event loop that would read it: one request from the
#: loop and the daemon waits on itself forever. Such a file is refused (EBUSY) by a check made
#: off the event loop (a stat served by the loop meanwhile), before the file is ever opened.
SERVED_DEVICES: set[int] = set()


def check_not_served(st: os.stat_result, path: str) -> None:
    """:raise UsageError: (EBUSY) ``st`` is of a file system this process serves."""
    if st.st_dev in SERVED_DEVICES:
        raise UsageError(
            f"{path} lies inside this blockfs mount (the daemon would wait on itself); refused",
            errno=errno.EBUSY,
        )


def _check_kind(st: os.stat_result, path: str) -> None:
    check_not_served(st, path)
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: is a directory", errno=errno.EISDIR)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path}: is a symbolic link; refused", errno=errno.ELOOP)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file"
        raise UsageError(f"{path}: is {kind}, not a regular file or block device")


def _checked_open(path: str, flags: int, dir_fd: int | None, nofollow: bool) -> int:
    """Refuse what is not a regular file or block device before it is opened, then open it.
    :raise UsageError, OSError:"""
    _check_kind(os.stat(path, dir_fd=dir_fd, follow_symlinks=not nofollow), path)
    return os.open(path, flags, dir_fd=dir_fd)


def check_image_file(path: str) -> None:
    """Cheap checks before opening, for one-line errors. :raise UsageError:"""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _path_error(exc, path) from None
    except ValueError:
        raise UsageError(f"{path!r}: not a valid path") from None
    _check_kind(st, path)
