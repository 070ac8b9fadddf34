"""A thin binding to libgfapi (GlusterFS's client library, 6.0 and later), with ctypes.

Only what blockfs uses, written from the library's header (api/src/glfs.h) and its symbol
versions: since GFAPI_6.0, ``glfs_pread``/``glfs_pwrite``/``glfs_fsync``/``glfs_ftruncate``
and the ``*_async`` calls take ``struct glfs_stat *`` out-pointers (NULL here) and their
callbacks receive two of them; ``dlsym`` hands out those newest versions. Offsets are 64-bit.

Every call returns what the C call returns, and raises :class:`OSError` (with the C errno) when
it fails. A ctypes call releases the GIL for its duration: the synchronous calls are meant to
run in worker threads (:func:`trio.to_thread.run_sync`), never on the event loop. The
``*_async`` calls return at once; their completion callback runs on one of libgfapi's own
threads (see :class:`AsyncCalls`).

This module is the only one that knows libgfapi.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from blockfs.errors import UsageError

SEEK_DATA = 3
SEEK_HOLE = 4

_c = ctypes
_vp = _c.c_void_p
_off = _c.c_int64
_io_cbk = _c.CFUNCTYPE(None, _vp, _c.c_ssize_t, _vp, _vp, _vp, use_errno=True)


class Stat(_c.Structure):
    """``struct stat`` of x86_64 Linux (glfs_fstat and glfs_stat fill one)."""

    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("st_dev", _c.c_uint64), ("st_ino", _c.c_uint64), ("st_nlink", _c.c_uint64),
        ("st_mode", _c.c_uint32), ("st_uid", _c.c_uint32), ("st_gid", _c.c_uint32),
        ("_pad0", _c.c_int32), ("st_rdev", _c.c_uint64), ("st_size", _c.c_int64),
        ("st_blksize", _c.c_int64), ("st_blocks", _c.c_int64), ("_times", _c.c_int64 * 6),
        ("_reserved", _c.c_int64 * 3),
    ]  # fmt: skip


class StatGeneric(_c.Structure):
    """``struct stat`` of the generic Linux layout (aarch64, riscv64)."""

    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("st_dev", _c.c_uint64), ("st_ino", _c.c_uint64), ("st_mode", _c.c_uint32),
        ("st_nlink", _c.c_uint32), ("st_uid", _c.c_uint32), ("st_gid", _c.c_uint32),
        ("st_rdev", _c.c_uint64), ("_pad1", _c.c_uint64), ("st_size", _c.c_int64),
        ("st_blksize", _c.c_int32), ("_pad2", _c.c_int32), ("st_blocks", _c.c_int64),
        ("_times", _c.c_int64 * 6), ("_reserved", _c.c_int32 * 2),
    ]  # fmt: skip


_STAT: type[_c.Structure] = Stat if platform.machine() in ("x86_64", "AMD64") else StatGeneric

_lib: _c.CDLL | None = None
_lib_lock = threading.Lock()


def lib() -> _c.CDLL:
    """libgfapi, loaded once. :raise UsageError: it is not installed."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            try:
                try:
                    handle = _c.CDLL("libgfapi.so.0", use_errno=True)
                except OSError:  # another soname: ask the linker's cache (slow: ldconfig -p)
                    handle = _c.CDLL(ctypes.util.find_library("gfapi") or "libgfapi.so", use_errno=True)
            except OSError:
                raise UsageError(
                    "gluster:// needs libgfapi, which is not installed (apt-get install libgfapi0)"
                ) from None
            _declare(handle)
            _lib = handle
    return _lib


def _declare(h: _c.CDLL) -> None:
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "glfs_new": (_vp, [_c.c_char_p]),
        "glfs_set_volfile_server": (_c.c_int, [_vp, _c.c_char_p, _c.c_char_p, _c.c_int]),
        "glfs_set_logging": (_c.c_int, [_vp, _c.c_char_p, _c.c_int]),
        "glfs_init": (_c.c_int, [_vp]),
        "glfs_fini": (_c.c_int, [_vp]),
        "glfs_open": (_vp, [_vp, _c.c_char_p, _c.c_int]),
        "glfs_creat": (_vp, [_vp, _c.c_char_p, _c.c_int, _c.c_uint]),
        "glfs_close": (_c.c_int, [_vp]),
        "glfs_pread": (_c.c_ssize_t, [_vp, _vp, _c.c_size_t, _off, _c.c_int, _vp]),
        "glfs_pwrite": (_c.c_ssize_t, [_vp, _vp, _c.c_size_t, _off, _c.c_int, _vp, _vp]),
        "glfs_fstat": (_c.c_int, [_vp, _vp]),
        "glfs_stat": (_c.c_int, [_vp, _c.c_char_p, _vp]),
        "glfs_lstat": (_c.c_int, [_vp, _c.c_char_p, _vp]),
        "glfs_ftruncate": (_c.c_int, [_vp, _off, _vp, _vp]),
        "glfs_fsync": (_c.c_int, [_vp, _vp, _vp]),
        "glfs_discard": (_c.c_int, [_vp, _off, _c.c_size_t]),
        "glfs_zerofill": (_c.c_int, [_vp, _off, _off]),
        "glfs_lseek": (_off, [_vp, _off, _c.c_int]),
        "glfs_unlink": (_c.c_int, [_vp, _c.c_char_p]),
        "glfs_rename": (_c.c_int, [_vp, _c.c_char_p, _c.c_char_p]),
        "glfs_link": (_c.c_int, [_vp, _c.c_char_p, _c.c_char_p]),
        "glfs_realpath": (_vp, [_vp, _c.c_char_p, _c.c_char_p]),
        "glfs_pread_async": (_c.c_int, [_vp, _vp, _c.c_size_t, _off, _c.c_int, _io_cbk, _vp]),
        "glfs_pwrite_async": (_c.c_int, [_vp, _vp, _c.c_int, _off, _c.c_int, _io_cbk, _vp]),
        "glfs_fsync_async": (_c.c_int, [_vp, _io_cbk, _vp]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(h, name)
        fn.restype = res
        fn.argtypes = args


def _fail(what: str) -> OSError:
    code = ctypes.get_errno() or errno.EIO
    return OSError(code, f"{what}: {os.strerror(code)}")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise _fail(what)
    return ret


# -- the volume ------------------------------------------------------------------------------


def new(volume: str) -> int:
    fs = lib().glfs_new(volume.encode())
    if not fs:
        raise _fail("glfs_new")
    return int(fs)


def set_volfile_server(fs: int, transport: str, host: str, port: int) -> None:
    _check(lib().glfs_set_volfile_server(fs, transport.encode(), host.encode(), port), "server")


def set_logging(fs: int, logfile: str, level: int) -> None:
    _check(lib().glfs_set_logging(fs, logfile.encode(), level), "logging")


def init(fs: int) -> None:
    """Fetch the volume's layout and connect to its bricks (blocks: a worker thread)."""
    _check(lib().glfs_init(fs), "glfs_init")


def fini(fs: int) -> None:
    lib().glfs_fini(fs)


# -- files -----------------------------------------------------------------------------------


def open_(fs: int, path: str, flags: int) -> int:
    fd = lib().glfs_open(fs, path.encode(), flags)
    if not fd:
        raise _fail("open")
    return int(fd)


def creat(fs: int, path: str, flags: int, mode: int) -> int:
    fd = lib().glfs_creat(fs, path.encode(), flags, mode)
    if not fd:
        raise _fail("create")
    return int(fd)


def close(fd: int) -> None:
    _check(lib().glfs_close(fd), "close")


def fstat(fd: int) -> tuple[int, int, int]:
    """(mode, size, inode number)."""
    st = _STAT()
    _check(lib().glfs_fstat(fd, _c.byref(st)), "stat")
    return int(st.st_mode), int(st.st_size), int(st.st_ino)


def stat(fs: int, path: str) -> tuple[int, int, int]:
    """(mode, size, inode number) of ``path``, links not followed."""
    st = _STAT()
    _check(lib().glfs_lstat(fs, path.encode(), _c.byref(st)), "stat")
    return int(st.st_mode), int(st.st_size), int(st.st_ino)


#: a new bytes object of a given size whose contents are not yet set (CPython's own
#: constructor, called with a NULL source): libgfapi reads straight into it, so a read costs
#: neither a zero-filled buffer nor a copy out of it. Sound while the object is new and ours
#: alone (a fresh object of size 2 or more is never shared; size 0 is not asked for).
_new_bytes = _c.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = _c.py_object
_new_bytes.argtypes = [_vp, _c.c_ssize_t]
_bytes_data = _c.pythonapi.PyBytes_AsString
_bytes_data.restype = _vp
_bytes_data.argtypes = [_c.py_object]


def pread(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes (fewer at the end of the file)."""
    if length < 2:
        buf = _c.create_string_buffer(max(length, 1))
        n = _check(lib().glfs_pread(fd, buf, length, offset, 0, None), "read")
        return buf.raw[:n]
    out: bytes = _new_bytes(None, length)
    n = _check(lib().glfs_pread(fd, _bytes_data(out), length, offset, 0, None), "read")
    return out if n == length else out[:n]


def pwrite(fd: int, data: bytes, offset: int) -> int:
    return _check(lib().glfs_pwrite(fd, data, len(data), offset, 0, None, None), "write")


def ftruncate(fd: int, size: int) -> None:
    _check(lib().glfs_ftruncate(fd, size, None, None), "truncate")


def fsync(fd: int) -> None:
    _check(lib().glfs_fsync(fd, None, None), "fsync")


def discard(fd: int, offset: int, length: int) -> None:
    _check(lib().glfs_discard(fd, offset, length), "discard")


def zerofill(fd: int, offset: int, length: int) -> None:
    _check(lib().glfs_zerofill(fd, offset, length), "zerofill")


def lseek(fd: int, offset: int, whence: int) -> int:
    return _check(lib().glfs_lseek(fd, offset, whence), "lseek")


def unlink(fs: int, path: str) -> None:
    _check(lib().glfs_unlink(fs, path.encode()), "remove")


def rename(fs: int, old: str, new_path: str) -> None:
    _check(lib().glfs_rename(fs, old.encode(), new_path.encode()), "rename")


def link(fs: int, old: str, new_path: str) -> None:
    """A second name; fails (EEXIST) where ``new_path`` exists."""
    _check(lib().glfs_link(fs, old.encode(), new_path.encode()), "link")


def realpath(fs: int, path: str) -> str:
    out = _c.create_string_buffer(4096)
    if not lib().glfs_realpath(fs, path.encode(), out):
        raise _fail("realpath")
    return out.value.decode(errors="surrogateescape")


# -- asynchronous calls ------------------------------------------------------------------------


class AsyncCalls:
    """libgfapi's ``*_async`` calls, their completions handed to a callback of ours.

    One C callback serves every call; the ``data`` pointer is a request number that maps to
    what the call needs kept alive until it completes (its buffer, the data written) and to
    ``done(result)``, which the callback invokes on libgfapi's thread (with the GIL): it must
    be quick and thread-safe (blockfs hands it to trio with ``run_sync_soon``). A request whose
    waiter gave up still completes here, its buffer kept until then.
    """

    def __init__(self) -> None:
        self._pending: dict[int, tuple[Any, Callable[[int, Any], None]]] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._cbk = _io_cbk(self._completed)  # kept: libgfapi holds the pointer

    def _completed(self, fd: Any, ret: int, pre: Any, post: Any, data: Any) -> None:
        try:
            with self._lock:
                entry = self._pending.pop(int(data or 0), None)
            if entry is None:
                return
            keep, done = entry
            done(ret if ret >= 0 else -(ctypes.get_errno() or errno.EIO), keep)
        except BaseException:  # nothing may escape into C
            pass

    def _register(self, keep: Any, done: Callable[[int, Any], None]) -> int:
        with self._lock:
            n = self._next
            self._next = n + 1 if n < (1 << 62) else 1
            self._pending[n] = (keep, done)
        return n

    def _unregister(self, n: int) -> None:
        with self._lock:
            self._pending.pop(n, None)

    def pread(self, fd: int, length: int, offset: int, done: Callable[[int, Any], None]) -> None:
        """Start a read; ``done(n_or_minus_errno, buffer)``."""
        buf = _c.create_string_buffer(length)
        n = self._register(buf, done)
        if lib().glfs_pread_async(fd, buf, length, offset, 0, self._cbk, n) < 0:
            self._unregister(n)
            raise _fail("read")

    def pwrite(self, fd: int, data: bytes, offset: int, done: Callable[[int, Any], None]) -> None:
        n = self._register(data, done)
        if lib().glfs_pwrite_async(fd, data, len(data), offset, 0, self._cbk, n) < 0:
            self._unregister(n)
            raise _fail("write")

    def fsync(self, fd: int, done: Callable[[int, Any], None]) -> None:
        n = self._register(None, done)
        if lib().glfs_fsync_async(fd, self._cbk, n) < 0:
            self._unregister(n)
            raise _fail("fsync")
