"""The gluster protocol: images on a GlusterFS volume, reached through libgfapi (no GlusterFS
FUSE mount in the path).

Location (QEMU's syntax)::

    gluster[+tcp|+rdma]://[SERVER[:PORT]]/VOLUME/PATH
    gluster+unix:///VOLUME/PATH?socket=/path/to/glusterd.socket

SERVER is a host name, an IPv4 address or an IPv6 address in brackets (default: localhost);
PORT is glusterd's (0 or none: gluster's default, 24007). ``socket=`` belongs to ``unix`` alone,
which takes no server and no port. blockfs adds four properties, as mount options or in the
query (``?debug=5&server=h2``), and nothing else is taken:

``server``   one more volfile server for failover, ``HOST[:PORT]``; repeated for more
``debug``    libgfapi's log level, 0 to 9 (default 4: errors)
``logfile``  where libgfapi logs (default: nowhere, /dev/null)
``timeout``  seconds a request may take, retries included, before EIO (default 30); also how
             long opening the volume may take

One libgfapi instance (``glfs_t``: the volume's layout, connections to its bricks) serves every
image of a volume in the process (a chain's backing files share their overlay's). Every call
into libgfapi runs in a pool of threads of gluster's own (never on the event loop), with a
time limit: past it the request fails as transient and the call is left to finish in its
thread (``benchmarks/README.md`` has the measure of this against libgfapi's asynchronous
calls, which ``BLOCKFS_GLUSTER_IO=async`` selects); opening the volume is given up after
``timeout`` the same way, so that a server that does not answer holds no request of the
mount. A failure on the way to the bricks (ENOTCONN, ETIMEDOUT, ...) is a
:class:`~blockfs.errors.TransientError`: the retry filter reopens the file and sends the
request again until ``timeout`` passes, then EIO. Replication, healing and failover between
bricks are GlusterFS's own.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import stat as stat_mod
import urllib.parse
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import trio

from blockfs.errors import BlockfsError, TransientError, UsageError
from blockfs.nodes import gfapi
from blockfs.nodes.base import Capability, Extent, IoCounters, Node, Status
from blockfs.nodes.runpool import RunPool

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMES = ("gluster", "gluster+tcp", "gluster+unix", "gluster+rdma")
#: properties a location's query (or the mount spec) may give, beyond ``socket``
QUERY_KEYS = ("server", "debug", "logfile", "timeout")
DEFAULT_TIMEOUT = 30.0
DEFAULT_DEBUG = 4
_VOLUME_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: errors on the way to the bricks, not in them: the request may be sent again
_TRANSIENT = {
    errno.ENOTCONN, errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EBADFD, errno.ESHUTDOWN,
}  # fmt: skip
#: how data calls reach libgfapi: a pool of threads calling the synchronous API (the default),
#: or its asynchronous calls (``async``), kept to be measured against: a completion then runs
#: our callback on libgfapi's own thread, which must take the GIL, and the submission itself
#: runs libgfapi's client stack on the event loop's thread (benchmarks/README.md: 1 MiB reads
#: 585 against 697 MB/s, 4 KiB reads even)
IO_MODE = os.environ.get("BLOCKFS_GLUSTER_IO", "threads")


# -- the location -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlusterLocation:
    """A parsed ``gluster://`` location."""

    transport: str  # tcp, unix, rdma
    host: str  # "" for unix
    port: int  # 0: gluster's default
    socket: str  # unix only
    volume: str
    path: str  # absolute, inside the volume
    servers: tuple[str, ...] = ()  # more volfile servers, "HOST[:PORT]"
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # debug, logfile, timeout

    @property
    def opts(self) -> dict[str, str]:
        return dict(self.options)

    @property
    def timeout(self) -> float:
        return float(self.opts.get("timeout", DEFAULT_TIMEOUT))

    @property
    def server(self) -> str:
        """Where the volume is, for messages."""
        if self.transport == "unix":
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host

    def uri(self, path: str | None = None) -> str:
        """The canonical location (same volume and properties, perhaps another path)."""
        scheme = "gluster" if self.transport == "tcp" else f"gluster+{self.transport}"
        p = urllib.parse.quote(path if path is not None else self.path, safe="/~._-+,@=:")
        query: list[tuple[str, str]] = []
        if self.transport == "unix":
            query.append(("socket", self.socket))
            authority = ""
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            authority = f"{host}:{self.port}" if self.port else host
        query += [("server", s) for s in self.servers]
        query += list(self.options)
        q = urllib.parse.urlencode(query, safe="/~:.@[]")
        return f"{scheme}://{authority}/{self.volume}{p}" + (f"?{q}" if q else "")

    def volume_key(self) -> Hashable:
        """What one libgfapi instance serves (the volume, where it is fetched, the log)."""
        o = self.opts
        return (
            self.transport, self.host, self.port, self.socket, self.volume, self.servers,
            o.get("debug"), o.get("logfile"),
        )  # fmt: skip

    @classmethod
    def parse(cls, location: str) -> GlusterLocation:
        """:raise UsageError: anything malformed (one line naming it)."""
        where = location if len(location) <= 200 else location[:197] + "..."
        scheme, sep, _ = location.partition("://")
        scheme = scheme.lower()
        if not sep or not scheme.startswith("gluster"):
            raise UsageError(f"{where}: not a gluster:// URI")
        if scheme not in SCHEMES:
            raise UsageError(
                f"{where}: unknown gluster transport {scheme[8:]!r} (tcp, unix or rdma)"
            )
        transport = scheme.partition("+")[2] or "tcp"
        try:
            u = urllib.parse.urlsplit(location)
            port = u.port
        except ValueError as exc:
            raise UsageError(f"{where}: not a gluster:// URI ({exc})") from None
        if u.fragment:
            raise UsageError(f"{where}: a fragment (#...) means nothing here")
        if u.username is not None or u.password is not None:
            raise UsageError(f"{where}: gluster:// takes no user name or password")
        query: list[tuple[str, str]] = []
        try:
            query = urllib.parse.parse_qsl(u.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            if u.query:
                raise UsageError(f"{where}: a malformed query ({u.query[:60]})") from None
        socket = ""
        servers: list[str] = []
        options: dict[str, str] = {}
        for key, value in query:
            if key == "socket":
                if socket:
                    raise UsageError(f"{where}: socket= given twice")
                socket = value
            elif key == "server":
                servers.append(_check_server(value, where))
            elif key in QUERY_KEYS:
                if key in options:
                    raise UsageError(f"{where}: property {key!r} given twice")
                options[key] = value
            else:
                raise UsageError(
                    f"{where}: unknown property {key[:40]!r} "
                    f"(known: socket, {', '.join(QUERY_KEYS)})"
                )
        host = u.hostname or ""
        if transport == "unix":
            if u.netloc:
                raise UsageError(
                    f"{where}: gluster+unix takes no server or port (gluster+unix:///VOLUME/PATH?socket=...)"
                )
            if not socket:
                raise UsageError(f"{where}: gluster+unix needs socket=PATH (glusterd's socket)")
            if not socket.startswith("/") or "\0" in socket:
                raise UsageError(f"{where}: socket= takes an absolute path")
            if servers:
                raise UsageError(f"{where}: gluster+unix takes no other server")
        else:
            if socket:
                raise UsageError(f"{where}: socket= belongs to gluster+unix, not {transport}")
            if u.netloc and not host:
                raise UsageError(f"{where}: no server before the port")
            host = host or "localhost"
            if port is not None and not 0 <= port <= 65535:
                raise UsageError(f"{where}: port {port} out of range")
        raw_volume, _, raw_rest = u.path.lstrip("/").partition("/")
        volume, rest = urllib.parse.unquote(raw_volume), urllib.parse.unquote(raw_rest)
        if "\0" in rest:
            raise UsageError(f"{where}: the path holds a NUL byte")
        if not volume:
            raise UsageError(f"{where}: no volume (gluster://SERVER/VOLUME/PATH)")
        if not _VOLUME_NAME.fullmatch(volume):
            raise UsageError(f"{where}: {volume[:40]!r} is not a volume name")
        path = posixpath.normpath("/" + rest)
        if not rest.strip("/") or path == "/":
            raise UsageError(f"{where}: no image path inside volume {volume!r}")
        _check_options(options, where)
        return cls(
            transport, host, port or 0, socket, volume, path, tuple(servers),
            tuple(sorted(options.items())),
        )  # fmt: skip


def _check_server(value: str, where: str) -> str:
    """``HOST[:PORT]`` (an IPv6 host in brackets), checked."""
    try:
        u = urllib.parse.urlsplit("//" + value)
        port = u.port
    except ValueError as exc:
        raise UsageError(f"{where}: server={value[:60]}: {exc}") from None
    if not u.hostname or u.path or u.query or u.username or u.netloc != value:
        raise UsageError(f"{where}: server={value[:60]}: HOST or HOST:PORT")
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"{where}: server={value[:60]}: port out of range")
    return value


def _check_options(options: dict[str, str], where: str) -> None:
    if "debug" in options and options["debug"] not in {str(i) for i in range(10)}:
        raise UsageError(f"{where}: debug={options['debug'][:20]}: a level, 0 to 9")
    if "timeout" in options:
        try:
            t = float(options["timeout"])
        except ValueError:
            t = -1
        if not 0 < t <= 86400:
            raise UsageError(f"{where}: timeout={options['timeout'][:20]}: seconds, 0 to 86400")
    if "logfile" in options and not options["logfile"]:
        raise UsageError(f"{where}: logfile= is empty")


def fold_properties(location: str, props: dict[str, list[str]]) -> str:
    """The location with the mount spec's gluster properties folded in (``server=`` may come
    several times, each one more volfile server).

    :raise UsageError: a malformed URI or property.
    """
    loc = GlusterLocation.parse(location)
    opts = loc.opts
    servers = list(loc.servers)
    for key, values in props.items():
        if key == "server":
            servers += [_check_server(v, location) for v in values]
        elif key in QUERY_KEYS:
            if len(values) > 1:
                raise UsageError(f"{location}: option {key!r} given twice")
            opts[key] = values[0]
    _check_options(opts, location)
    loc = replace(loc, servers=tuple(servers), options=tuple(sorted(opts.items())))
    return GlusterLocation.parse(loc.uri()).uri()


# -- one libgfapi instance per volume ------------------------------------------------------------


class _Volume:
    """A ``glfs_t``: made and initialised in a worker thread, shared by every node of its
    volume in this trio run, finished when the last one lets go."""

    def __init__(self, loc: GlusterLocation) -> None:
        self.loc = loc
        self.fs = 0
        self.users = 0
        self._lock = trio.Lock()

    async def ensure(self) -> int:
        async with self._lock:
            if not self.fs:
                loc = self.loc
                try:
                    self.fs = await _blocking(loc, "connect", _init_volume, loc)
                except BlockfsError as exc:
                    if isinstance(exc, TransientError):
                        raise
                    what = (
                        f"no volume {loc.volume!r} there"
                        if exc.errno == errno.ENOENT
                        else f"volume {loc.volume!r} cannot be opened ({os.strerror(exc.errno)})"
                    )
                    raise UsageError(
                        f"{loc.server}: {what} (is it created and started?)", errno=exc.errno
                    ) from None
            return self.fs

    def close(self) -> None:
        fs, self.fs = self.fs, 0
        if fs:
            # glfs_fini waits for the bricks; it may take long with one gone: not awaited
            trio.lowlevel.spawn_system_task(_abandon, gfapi.fini, fs, name="glfs_fini")


def _init_volume(loc: GlusterLocation) -> int:
    fs = gfapi.new(loc.volume)
    try:
        if loc.transport == "unix":
            gfapi.set_volfile_server(fs, "unix", loc.socket, 0)
        else:
            gfapi.set_volfile_server(fs, loc.transport, loc.host, loc.port)
            for s in loc.servers:
                u = urllib.parse.urlsplit("//" + s)
                gfapi.set_volfile_server(fs, loc.transport, u.hostname or "", u.port or 0)
        opts = loc.opts
        gfapi.set_logging(
            fs, opts.get("logfile", "/dev/null"), int(opts.get("debug", DEFAULT_DEBUG))
        )
        gfapi.init(fs)
    except BaseException:
        gfapi.fini(fs)
        raise
    return fs


_IO_POOL: Any = None


def _io_pool() -> Any:
    """The threads that call into libgfapi: a pool of gluster's own, so that a volume that
    stops answering holds these and never the threads local files use. Its size is
    ``BLOCKFS_GLUSTER_THREADS`` (default 16)."""
    global _IO_POOL
    if _IO_POOL is None:
        from blockfs.nodes.threads import IoThreadPool

        _IO_POOL = IoThreadPool(int(os.environ.get("BLOCKFS_GLUSTER_THREADS", "16")))
    return _IO_POOL


async def _abandon(fn: Callable[..., Any], *args: Any) -> None:
    try:
        await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except Exception:
        pass


async def _blocking(loc: GlusterLocation, what: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread, given up after the location's timeout (the thread
    finishes on its own). :raise TransientError: timed out, or an error on the way; UsageError,
    BlockfsError: the volume's answer."""
    try:
        with trio.fail_after(loc.timeout):
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise TransientError(
            f"{loc.server}/{loc.volume}: {what}: no answer in {loc.timeout:g} s",
            errno=errno.ETIMEDOUT, reached=False,
        ) from None  # fmt: skip
    except OSError as exc:
        raise _error(exc, what, loc) from None


def _error(exc: OSError, what: str, loc: GlusterLocation, *, reached: bool = False) -> BlockfsError:
    code = exc.errno or errno.EIO
    where = f"{loc.uri().partition('?')[0]}"
    text = f"{where}: {what}: {os.strerror(code)}"
    if code in _TRANSIENT:
        return TransientError(text, errno=code, reached=reached)
    return BlockfsError(text, errno=code)


#: volumes by :meth:`GlusterLocation.volume_key`, for each trio run
_VOLUMES: RunPool[_Volume] = RunPool("blockfs_gluster_volumes")


async def _acquire(loc: GlusterLocation) -> _Volume:
    return await _VOLUMES.acquire(loc.volume_key(), lambda: _Volume(loc))


def _release(vol: _Volume) -> None:
    _VOLUMES.release(vol.loc.volume_key(), vol)


async def _with_volume(location: str, what: str, act: Callable[[int, GlusterLocation], T]) -> T:
    """``act(fs, loc)`` in a worker thread, on the volume of ``location``."""
    loc = GlusterLocation.parse(location)
    vol = await _acquire(loc)
    try:
        return await _blocking(loc, what, act, vol.fs, loc)
    finally:
        _release(vol)


# -- the node ----------------------------------------------------------------------------------


class GlusterNode(Node):
    """A file on a GlusterFS volume (see the module docstring).

    Cancellation *abandons*: a cancelled request's libgfapi call goes on, its buffer kept alive
    until it completes; :meth:`aclose` waits (a bounded time) for such calls before closing."""

    format_name = "gluster"
    capabilities = Capability.ZERO | Capability.DISCARD | Capability.EXTENTS | Capability.RESIZE

    def __init__(self, loc: GlusterLocation, read_only: bool) -> None:
        self.loc = loc
        self.filename = loc.uri()
        self.read_only = read_only
        self.size = 0
        self.io: IoCounters = IoCounters()
        self._vol: _Volume | None = None
        self._fd = 0
        self._closed = False
        self._real = loc.path
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        #: a request's own time limit, below the retry deadline so that a retry fits
        self._request_timeout = max(1.0, loc.timeout / 3)
        self._token: trio.lowlevel.TrioToken | None = None
        self._calls: Any = None
        self._can_zero = True
        self._can_seek = True

    @classmethod
    async def open(
        cls, loc: GlusterLocation, *, read_only: bool, create: bool = False
    ) -> GlusterNode:
        """:raise UsageError: no such volume or file, not a regular file, refused;
        BlockfsError: the volume cannot be reached in ``timeout`` seconds (EHOSTUNREACH)."""
        node = cls(loc, read_only)
        try:
            await node._open(create)
        except TransientError as exc:
            raise BlockfsError(
                f"{exc} (is the volume started?)", errno=errno.EHOSTUNREACH
            ) from None
        return node

    async def _open(self, create: bool) -> None:
        loc = self.loc
        self._token = trio.lowlevel.current_trio_token()
        self._calls = gfapi.AsyncCalls()
        vol = await _acquire(loc)
        try:
            fd, mode, size, real = await _blocking(
                loc, "open", _open_file, vol.fs, loc.path, self.read_only, create
            )
        except BlockfsError as exc:
            _release(vol)
            if isinstance(exc, TransientError):
                raise
            uri = loc.uri().partition("?")[0]
            if exc.errno == errno.ENOENT and create:
                folder = posixpath.dirname(loc.path)
                raise UsageError(
                    f"{uri}: no folder {folder} on volume {loc.volume}", errno=errno.ENOENT
                ) from None
            if exc.errno == errno.ENOENT:
                raise UsageError(f"{uri}: no such file", errno=errno.ENOENT) from None
            if exc.errno == errno.EEXIST:
                raise UsageError(f"{uri}: file exists", errno=errno.EEXIST) from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"{uri}: permission denied", errno=exc.errno) from None
            raise
        except BaseException:
            _release(vol)
            raise
        if not stat_mod.S_ISREG(mode):
            if fd:
                await _abandon(gfapi.close, fd)
            _release(vol)
            raise UsageError(f"{loc.uri().partition('?')[0]}: not a regular file")
        self._vol, self._fd, self.size, self._real = vol, fd, size, real

    # -- requests -------------------------------------------------------------------------------

    async def _async(
        self, what: str, start: Callable[[Callable[[int, Any], None]], None]
    ) -> tuple[int, Any]:
        """One asynchronous libgfapi call: ``start(done)`` begins it; its completion wakes this
        task. :raise TransientError, BlockfsError:"""
        token = self._token
        assert token is not None
        task = trio.lowlevel.current_task()
        box: list[tuple[int, Any]] = []
        waiting = [True]

        def wake() -> None:  # trio's thread, once the call completed
            if waiting[0]:
                waiting[0] = False
                trio.lowlevel.reschedule(task)
            else:
                self._end()  # a call given up on ends only now (aclose waits for it)

        def done(ret: int, keep: Any) -> None:  # libgfapi's thread
            box.append((ret, keep))
            try:
                token.run_sync_soon(wake)
            except trio.RunFinishedError:
                pass

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiting[0] = False
            return trio.lowlevel.Abort.SUCCEEDED

        self._begin()
        try:
            start(done)
        except OSError as exc:
            self._end()
            raise _error(exc, what, self.loc, reached=False) from None
        # cancelled or timed out: the call goes on in libgfapi, and wake() counts its end
        with trio.move_on_after(self._request_timeout) as scope:
            await trio.lowlevel.wait_task_rescheduled(abort)
        if scope.cancelled_caught:
            raise TransientError(
                f"{self.filename}: {what}: no answer in {self._request_timeout:g} s",
                errno=errno.ETIMEDOUT, reached=True,
            )  # fmt: skip
        self._end()
        ret, keep = box[0]
        if ret < 0:
            raise _error(OSError(-ret, os.strerror(-ret)), what, self.loc, reached=True)
        return ret, keep

    def _begin(self) -> None:
        self._inflight += 1
        if self._inflight == 1:
            self._idle = trio.Event()

    def _end(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A blocking libgfapi call on this node's file, in the gluster pool of threads,
        given up after the request timeout (the call goes on; :meth:`aclose` waits for it)."""
        self._begin()
        try:
            with trio.move_on_after(self._request_timeout) as scope:
                result: T = await _io_pool().run_abandoning(fn, *args, finished=self._end)
        except OSError as exc:
            raise _error(exc, what, self.loc, reached=True) from None
        if scope.cancelled_caught:
            raise TransientError(
                f"{self.filename}: {what}: no answer in {self._request_timeout:g} s",
                errno=errno.ETIMEDOUT, reached=True,
            )  # fmt: skip
        return result

    def _fd_or_fail(self, what: str) -> int:
        if not self._fd:
            raise TransientError(f"{self.filename}: {what}: not open", reached=False)
        return self._fd

    async def read(self, offset: int, length: int) -> bytes:
        fd = self._fd_or_fail("read")
        try:
            if IO_MODE == "threads":
                data = await self._call("read", gfapi.pread, fd, length, offset)
            else:
                calls = self._calls
                n, buf = await self._async(
                    "read", lambda done: calls.pread(fd, length, offset, done)
                )
                data = buf.raw if n == length else buf.raw[:n]
        except BlockfsError:
            self.io.failed_rd_operations += 1
            raise
        io = self.io
        io.rd_operations += 1
        io.rd_bytes += length
        if len(data) < length:
            data += bytes(length - len(data))  # past the end of the file: zeroes
        return data

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise BlockfsError(f"{self.filename} is open read-only", errno=errno.EROFS)
        fd = self._fd_or_fail("write")
        data = bytes(data)
        done_bytes = 0
        try:
            while done_bytes < len(data):
                piece = data if not done_bytes else data[done_bytes:]
                pos = offset + done_bytes
                if IO_MODE == "threads":
                    n = await self._call("write", gfapi.pwrite, fd, piece, pos)
                else:
                    n = await self._write_async(fd, piece, pos)
                if n <= 0:
                    raise BlockfsError(f"{self.filename}: write: nothing written", errno=errno.EIO)
                done_bytes += n
        except BlockfsError:
            self.io.failed_wr_operations += 1
            raise
        io = self.io
        io.wr_operations += 1
        io.wr_bytes += len(data)
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def _write_async(self, fd: int, data: bytes, offset: int) -> int:
        calls = self._calls
        n, _ = await self._async("write", lambda done: calls.pwrite(fd, data, offset, done))
        return n

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self._can_zero:
            try:
                await self._call(
                    "write_zeroes", gfapi.zerofill, self._fd_or_fail("zero"), offset, length
                )
                self.io.wr_operations += 1
                self.io.wr_bytes += length
                return
            except BlockfsError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_zero = False
        await super().write_zeroes(offset, length, may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self._call("discard", gfapi.discard, self._fd_or_fail("discard"), offset, length)
        except BlockfsError as exc:
            self.io.failed_unmap_operations += 1
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            return
        self.io.unmap_operations += 1
        self.io.unmap_bytes += length

    async def flush(self) -> None:
        if self.read_only:
            return
        fd = self._fd_or_fail("flush")
        try:
            if IO_MODE == "threads":
                await self._call("flush", gfapi.fsync, fd)
            else:
                calls = self._calls
                await self._async("flush", lambda done: calls.fsync(fd, done))
        except BlockfsError:
            self.io.failed_flush_operations += 1
            raise
        self.io.flush_operations += 1

    async def block_status(self, offset: int, length: int) -> Extent:
        """SEEK_DATA / SEEK_HOLE on the remote file, where the volume answers them."""
        whole = Extent(offset, length, Status.DATA | Status.ALLOCATED)
        if not self._can_seek:
            return whole
        fd = self._fd_or_fail("seek")
        try:
            data_at, hole_at = await self._call("block_status", _seek, fd, offset)
        except BlockfsError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                self._can_seek = False
                return whole
            raise
        end = offset + length
        if data_at < 0 or data_at > offset:  # a hole at offset (to the next data, or the end)
            stop = end if data_at < 0 else min(end, data_at)
            return Extent(offset, stop - offset, Status.ZERO | Status.ALLOCATED)
        return Extent(offset, max(1, min(end, hole_at) - offset), Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise BlockfsError(f"{self.filename} is open read-only", errno=errno.EROFS)
        await self._call("truncate", gfapi.ftruncate, self._fd_or_fail("truncate"), size)
        self.size = size

    async def allocated_bytes(self) -> int:
        return self.size

    async def reconnect(self) -> None:
        """The file opened again, in the same mode (libgfapi makes its own connections to the
        bricks again; a descriptor from before a volume restart is stale)."""
        vol = self._vol
        if vol is None or self._closed:
            raise BlockfsError(f"{self.filename}: closed", errno=errno.EIO)
        old, self._fd = self._fd, 0
        if old:
            trio.lowlevel.spawn_system_task(_abandon, gfapi.close, old, name="glfs_close")
        fd, _, _, _ = await _blocking(
            self.loc, "reopen", _open_file, vol.fs, self.loc.path, self.read_only, False
        )
        self._fd = _regular(fd, self.filename)

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        vol = self._vol
        assert vol is not None
        fd, _, _, _ = await _blocking(
            self.loc, "reopen", _open_file, vol.fs, self.loc.path, read_only, False
        )
        old, self._fd = self._fd, _regular(fd, self.filename)
        self.read_only = read_only
        if old:
            await _abandon(gfapi.close, old)

    def identity(self) -> Hashable | None:
        loc = self.loc
        return ("gluster", loc.transport, loc.host, loc.port, loc.socket, loc.volume, self._real)

    @property
    def real_path(self) -> str:
        return self.loc.uri(self._real).partition("?")[0]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(max(5.0, self._request_timeout)):
                await self._idle.wait()
            fd, self._fd = self._fd, 0
            vol, self._vol = self._vol, None
            if fd:
                with trio.move_on_after(5):
                    await _abandon(gfapi.close, fd)
            if vol is not None:
                _release(vol)

    def describe(self) -> dict[str, object]:
        d = super().describe()
        d["server"] = self.loc.server
        d["volume"] = self.loc.volume
        return d


def _open_file(fs: int, path: str, read_only: bool, create: bool) -> tuple[int, int, int, str]:
    """(fd, mode, size, real path) of ``path`` on the volume (worker thread); fd 0 and the
    mode where it is not a regular file (not opened)."""
    named = 0
    if create:
        fd = gfapi.creat(fs, path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    else:
        # Links are not followed into the open, and nothing but a regular file is opened. The
        # open goes by name again, so what it opened must be what was looked at (the same
        # inode): another client of the volume may swap a link in between.
        mode, _, named = gfapi.stat(fs, path)
        if stat_mod.S_ISLNK(mode):
            raise OSError(errno.ELOOP, "a symbolic link")
        if not stat_mod.S_ISREG(mode):
            return 0, mode, 0, path
        fd = gfapi.open_(fs, path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        mode, size, ino = gfapi.fstat(fd)
        if named and ino != named:
            raise OSError(errno.ELOOP, "replaced while it was opened")
        try:
            real = gfapi.realpath(fs, path)
        except OSError:
            real = path
    except BaseException:
        gfapi.close(fd)
        raise
    return fd, mode, size, real


def _regular(fd: int, where: str) -> int:
    """The descriptor :func:`_open_file` gave, or the refusal where it opened nothing."""
    if not fd:
        raise BlockfsError(f"{where}: no longer a regular file", errno=errno.EINVAL)
    return fd


def _seek(fd: int, offset: int) -> tuple[int, int]:
    """(next data at or after offset, or -1 past the last; next hole at or after it)."""
    try:
        data_at = gfapi.lseek(fd, offset, gfapi.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return -1, -1
        raise
    if data_at > offset:
        return data_at, offset
    return data_at, gfapi.lseek(fd, offset, gfapi.SEEK_HOLE)


# -- what the gluster driver (blockfs.nodes.protocols) delegates here -----------------------------


#: what :class:`blockfs.nodes.protocols.RemoteProtocol` opens and creates with
LOCATION = GlusterLocation
NODE = GlusterNode


async def remove(location: str) -> None:
    await _with_volume(location, "remove", lambda fs, loc: gfapi.unlink(fs, loc.path))


async def exists(location: str) -> bool:
    def act(fs: int, loc: GlusterLocation) -> bool:
        try:
            gfapi.stat(fs, loc.path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    return await _with_volume(location, "stat", act)


async def rename(old: str, new: str) -> None:
    """Never over an existing name (POSIX rename would replace it): a hard link to the new
    name, which fails where one exists, then the old name removed.

    :raise BlockfsError: (EEXIST) ``new`` exists."""
    new_path = GlusterLocation.parse(new).path

    def act(fs: int, loc: GlusterLocation) -> None:
        gfapi.link(fs, loc.path, new_path)
        gfapi.unlink(fs, loc.path)

    await _with_volume(old, "rename", act)


def resolve(relative_to: str, name: str) -> str:
    """A backing name found in the image at ``relative_to``: on the same volume, through the
    same properties; a relative name from the image's folder, an absolute one from the
    volume's root."""
    loc = GlusterLocation.parse(relative_to)
    if name.startswith("/"):
        return loc.uri(posixpath.normpath(name))
    return loc.uri(posixpath.normpath(posixpath.join(posixpath.dirname(loc.path), name)))


def found_location(name: str, relative_to: str) -> str:
    """A ``gluster://`` backing name found inside an image: its blockfs properties are the
    image's words, not the user's, so none is kept (a ``logfile=`` would make the daemon write
    where the image says); on the overlay's own volume server it takes the overlay's. A
    ``gluster+unix`` socket the image names is followed only if it is the overlay's own (the
    daemon would otherwise connect to whatever local socket an image names).

    :raise UsageError: a malformed name, or a socket of the image's own choosing.
    """
    loc = GlusterLocation.parse(name)
    base = replace(loc, servers=(), options=())
    if scheme_of_gluster(relative_to):
        over = GlusterLocation.parse(relative_to)
        same = (over.transport, over.host, over.port, over.socket) == (
            loc.transport, loc.host, loc.port, loc.socket,
        )  # fmt: skip
        if same:
            return replace(loc, servers=over.servers, options=over.options).uri()
    if loc.transport == "unix":
        raise UsageError(f"{name}: a backing file on a unix socket the image names is not followed")
    return base.uri()


def scheme_of_gluster(location: str) -> bool:
    return location.partition("://")[0].lower() in SCHEMES


def real_location(node: Node) -> str:
    assert isinstance(node, GlusterNode), node
    return node.real_path
