"""The ssh protocol: images on any host that runs an OpenSSH server with sftp (nothing to
install there), reached with asyncssh.

Location::

    ssh://[USER@]HOST[:PORT]/PATH[?KEY=VALUE&...]      (an IPv6 HOST in brackets)

The user defaults to the local one, the port to 22. The query carries the connection's
properties (the mount command line's ``user=``, ``port=``, ``host=``, ``path=`` and these are
folded into it, see :func:`fold_properties`):

``identity``                  a private key file (default: the agent, then ~/.ssh/id_*)
``identity-passphrase-file``  a file holding the key's passphrase
``password-file``             a file holding the password (never a password in a URI)
``host-key-check``            ``known_hosts`` (the default: ~/.ssh/known_hosts and
                              /etc/ssh/ssh_known_hosts), ``sha256:FINGERPRINT``,
                              ``md5:FINGERPRINT``, or ``none`` (only when asked; a warning)
``timeout``                   seconds a request may take, retries included, before it fails
                              with EIO (default 30); also the connect timeout

asyncssh runs on asyncio; blockfs on trio. The bridge is one asyncio loop in one daemon
thread for the whole process (:class:`_Loop`), started at the first use (after the daemon
forked): a request is a coroutine handed to that loop, whose completion wakes the trio task
through its token. That costs two thread wake-ups per request and no polling; trio-asyncio
would run both loops in one thread, but it pins the trio loop to asyncio's scheduler and its
per-request cost is not lower (see benchmarks/README.md for the figures).

One SSH connection per (host, port, user, credentials, host-key rule) serves every image on
it (a chain's backing files share their overlay's); SFTP carries many requests in flight on
it at once. A lost connection, or a request that takes longer than the connection's request
timeout, is a :class:`~blockfs.errors.TransientError`: the retry filter above the node
(:class:`~blockfs.nodes.retry.RetryFilter`, policy from ``timeout=``) reconnects and sends it
again, until the deadline, then EIO. A flush is ``fsync@openssh.com``: the remote file's data
reach its disk. A server without that extension gets no stronger promise than "the server has
the data" (logged once); the README says so.

This module and its thread are the only place that knows asyncssh or asyncio.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import logging
import os
import posixpath
import stat
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import trio

from blockfs.errors import BlockfsError, TransientError, UsageError
from blockfs.nodes.base import Extent, Node, Status
from blockfs.nodes.retry import RetryPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

#: properties a location's query (or the mount spec) may give
QUERY_KEYS = ("identity", "identity-passphrase-file", "password-file", "host-key-check", "timeout")
#: the mount spec's options that name parts of the URI itself
URI_KEYS = ("host", "port", "user", "path")
DEFAULT_TIMEOUT = 30.0
#: the largest single SFTP read or write sent: the server's limits (OpenSSH announces 255
#: KiB through limits@openssh.com), or what every server must take (32 KiB) where it
#: announces none
MAX_REQUEST = 256 << 10
_SAFE_REQUEST = 32 << 10
#: a secret file is read only if it is this small
MAX_SECRET_FILE = 64 << 10
_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
#: the ciphers offered, in order (all that OpenSSH's server takes by default)
_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
)  # fmt: skip


# -- the location -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SshLocation:
    """A parsed ``ssh://`` location."""

    host: str
    port: int
    user: str
    path: str
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def opts(self) -> dict[str, str]:
        return dict(self.options)

    @property
    def timeout(self) -> float:
        return float(self.opts.get("timeout", DEFAULT_TIMEOUT))

    @property
    def server(self) -> str:
        """``user@host:port``, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    def uri(self, path: str | None = None) -> str:
        """The canonical location (same connection properties, perhaps another path)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        p = urllib.parse.quote(path if path is not None else self.path, safe="/~._-+,@=:")
        query = urllib.parse.urlencode(self.options, safe="/~:.@")
        user = urllib.parse.quote(self.user, safe="._-")
        return f"ssh://{user}@{host}:{self.port}{p}" + (f"?{query}" if query else "")

    def connection_key(self) -> Hashable:
        opts = self.opts
        opts.pop("timeout", None)
        return (self.host, self.port, self.user, tuple(sorted(opts.items())))

    @classmethod
    def parse(cls, location: str) -> SshLocation:
        """:raise UsageError: anything malformed (one line naming it)."""
        where = location if len(location) <= 200 else location[:197] + "..."
        try:
            u = urllib.parse.urlsplit(location)
            port = u.port
        except ValueError as exc:
            raise UsageError(f"{where}: not an ssh:// URI ({exc})") from None
        if u.scheme.lower() != "ssh":
            raise UsageError(f"{where}: not an ssh:// URI")
        host = u.hostname or ""
        if not host:
            raise UsageError(f"{where}: no host (ssh://[USER@]HOST[:PORT]/PATH)")
        if u.fragment:
            raise UsageError(f"{where}: a fragment (#...) means nothing here")
        if u.password is not None:
            raise UsageError(f"{where}: no password in a URI: give password-file=")
        path = urllib.parse.unquote(u.path)
        if not path.startswith("/") or path == "/":
            raise UsageError(f"{where}: no absolute path to an image (ssh://HOST/PATH)")
        if "\0" in path:
            raise UsageError(f"{where}: the path holds a NUL byte")
        user = urllib.parse.unquote(u.username) if u.username else getpass.getuser()
        options: dict[str, str] = {}
        for key, value in urllib.parse.parse_qsl(u.query, keep_blank_values=True):
            if key not in QUERY_KEYS:
                raise UsageError(
                    f"{where}: unknown property {key[:40]!r} (known: {', '.join(QUERY_KEYS)})"
                )
            if key in options:
                raise UsageError(f"{where}: property {key!r} given twice")
            options[key] = value
        _check_options(options, where)
        return cls(host, port or 22, user, posixpath.normpath(path), tuple(sorted(options.items())))


def _check_options(options: dict[str, str], where: str) -> None:
    check = options.get("host-key-check")
    if check is not None and check not in ("known_hosts", "none"):
        kind, sep, value = check.partition(":")
        if not sep or kind not in ("sha256", "md5") or not value:
            raise UsageError(
                f"{where}: host-key-check={check[:60]}: known_hosts, sha256:FINGERPRINT, "
                "md5:FINGERPRINT or none"
            )
    if "timeout" in options:
        try:
            t = float(options["timeout"])
        except ValueError:
            t = -1
        if not 0 < t <= 86400:
            raise UsageError(f"{where}: timeout={options['timeout'][:20]}: seconds, 0 to 86400")
    for key in ("identity", "identity-passphrase-file", "password-file"):
        if key in options and not options[key]:
            raise UsageError(f"{where}: {key}= is empty")


def fold_properties(location: str, props: dict[str, str]) -> str:
    """The location with the mount spec's ssh properties folded in (``host=``, ``port=``,
    ``user=``, ``path=`` replace parts of the URI; the rest join its query).

    :raise UsageError: a malformed URI or property.
    """
    loc = SshLocation.parse(location)
    changes: dict[str, Any] = {}
    if "host" in props:
        changes["host"] = props["host"].strip("[]")
    if "port" in props:
        if not props["port"].isdigit() or not 0 < int(props["port"]) < 65536:
            raise UsageError(f"port={props['port'][:20]}: a port number, 1 to 65535")
        changes["port"] = int(props["port"])
    if "user" in props:
        changes["user"] = props["user"]
    if "path" in props:
        changes["path"] = props["path"]
    opts = loc.opts
    for key, value in props.items():
        if key in QUERY_KEYS:
            opts[key] = value
    _check_options(opts, location)
    loc = replace(loc, **changes, options=tuple(sorted(opts.items())))
    return SshLocation.parse(loc.uri()).uri()


# -- the asyncio side ----------------------------------------------------------------------------


class _Loop:
    """One asyncio loop in a daemon thread, for every ssh node of the process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid = 0

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        loop = cls._loop
        if loop is not None and cls._pid == os.getpid():
            return loop  # every request after the first: no lock
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=main, name="blockfs-ssh", daemon=True).start()
                ready.wait()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


async def _on_loop(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` as a task of the asyncio loop and wait for it in trio; cancelling the
    wait cancels the task. The hand-off is one ``call_soon_threadsafe`` there and one
    ``run_sync_soon`` back: ``python -m benchmarks.bridge`` measured it at 36 us per request
    with 16 in flight (77 us one at a time), against 48 (62) for trio-asyncio's
    ``aio_as_trio`` and 65 (200) for ``asyncio.run_coroutine_threadsafe``."""
    loop = _Loop.get()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: list[asyncio.Future[T]] = []
    abandoned = False

    def finished(_: object) -> None:
        token.run_sync_soon(done.set, idempotent=True)

    def start() -> None:
        if abandoned:
            return
        task = asyncio.ensure_future(make(), loop=loop)
        box.append(task)
        task.add_done_callback(finished)

    def cancel() -> None:
        if box:
            box[0].cancel()

    loop.call_soon_threadsafe(start)
    try:
        await done.wait()
    except BaseException:
        abandoned = True
        loop.call_soon_threadsafe(cancel)
        raise
    return box[0].result()


def _read_small_file(path: str, what: str) -> bytes:
    """The bytes of a small regular file the user named (a key, a passphrase, a password):
    opened once, without blocking (a FIFO would hang the connection forever); anything but a
    regular file (a FIFO, a device) is refused. :raise UsageError:"""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(os.path.expanduser(path), flags)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}", errno=exc.errno or errno.EIO) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{what} {path}: not a regular file", errno=errno.EINVAL)
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise UsageError(f"{what} {path}: larger than {MAX_SECRET_FILE} bytes")
    return data


def _read_secret(path: str, what: str) -> str:
    """The first line of a small file (a passphrase, a password). :raise UsageError:"""
    data = _read_small_file(path, what)
    return data.decode(errors="replace").splitlines()[0] if data.strip() else ""


class _Connection:
    """One SSH connection and its SFTP session (asyncio side). ``generation`` tells a node
    whether the connection it used is still the current one."""

    def __init__(self, loc: SshLocation) -> None:
        self.loc = loc
        self.conn: Any = None
        self.sftp: Any = None
        self.users = 0
        self.generation = 0
        self.fsync_warned = False
        self._connecting: asyncio.Lock | None = None

    async def ensure(self, generation: int | None = None) -> tuple[Any, int]:
        """The SFTP session; a new connection if there is none, or if the caller's
        ``generation`` is the current one (the caller saw it fail)."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.sftp is not None and generation != self.generation:
                return self.sftp, self.generation
            self.close()
            self.conn, self.sftp = await self._connect()
            self.generation += 1
            return self.sftp, self.generation

    async def _connect(self) -> tuple[Any, Any]:
        import asyncssh

        loc = self.loc
        opts = loc.opts
        tried = []
        kwargs: dict[str, Any] = {
            "username": loc.user,
            "config": None,
            # AES-GCM first: with AES-NI (through OpenSSL) it moved twice the data of
            # asyncssh's default, chacha20-poly1305, per CPU second here (1 MiB reads: 248
            # against 123 MB/s; 4 KiB at depth 16: 5,200 against 2,700 requests/s)
            "encryption_algs": _CIPHERS,
            "connect_timeout": loc.timeout,
            "keepalive_interval": max(1.0, min(15.0, loc.timeout / 3)),
            "keepalive_count_max": 3,
        }
        if "identity" in opts:
            passphrase = None
            if "identity-passphrase-file" in opts:
                passphrase = _read_secret(
                    opts["identity-passphrase-file"], f"{loc.server}: passphrase file"
                )
            path = os.path.expanduser(opts["identity"])
            try:
                data = _read_small_file(path, f"{loc.server}: identity")
                key = asyncssh.import_private_key(data, passphrase)
            except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                raise UsageError(
                    f"{loc.server}: identity {path}: {_describe(exc)}", errno=errno.EACCES
                ) from None
            kwargs["client_keys"] = [key]
            kwargs["agent_path"] = None
            tried.append(f"key {path}")
        else:
            if os.environ.get("SSH_AUTH_SOCK"):
                tried.append("agent")
            tried.append("keys in ~/.ssh")
        if "password-file" in opts:
            kwargs["password"] = _read_secret(opts["password-file"], f"{loc.server}: password file")
            tried.append("password")
        check = opts.get("host-key-check", "known_hosts")
        client_factory = None
        if check == "known_hosts":
            files = [p for p in (os.path.expanduser(k) for k in _KNOWN_HOSTS) if os.path.exists(p)]
            kwargs["known_hosts"] = files
        elif check == "none":
            log.warning("%s: host key not checked (host-key-check=none)", loc.server)
            kwargs["known_hosts"] = None
        else:
            kind, _, want = check.partition(":")
            kwargs["known_hosts"] = ([], [], [])
            client_factory = _fingerprint_client(kind, want)
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(loc.host, loc.port, client_factory=client_factory, **kwargs),
                loc.timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise UsageError(
                f"{loc.server}: host key not trusted ({exc.reason}; host-key-check={check})",
                errno=errno.EACCES,
            ) from None
        except asyncssh.PermissionDenied:
            raise UsageError(
                f"{loc.server}: authentication failed (tried: {', '.join(tried)})",
                errno=errno.EACCES,
            ) from None
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise TransientError(
                f"{loc.server}: cannot connect: {_describe(exc)}",
                errno=getattr(exc, "errno", None) or errno.EHOSTUNREACH,
                reached=False,
            ) from None
        try:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), loc.timeout)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            conn.close()
            raise TransientError(
                f"{loc.server}: no sftp session: {_describe(exc)}", reached=False
            ) from None
        return conn, sftp

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = self.sftp = None


def _fingerprint_client(kind: str, want: str) -> Callable[[], Any]:
    import asyncssh

    class Client(asyncssh.SSHClient):
        def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
            got = key.get_fingerprint(kind)  # "SHA256:..." / "MD5:..."
            return bool(got.partition(":")[2] == want.removeprefix(kind.upper() + ":"))

    return Client


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


#: connections by :meth:`SshLocation.connection_key` (asyncio side, touched only on its loop)
_CONNECTIONS: dict[Hashable, _Connection] = {}


async def _acquire(loc: SshLocation) -> _Connection:
    key = loc.connection_key()
    conn = _CONNECTIONS.get(key)
    if conn is None:
        conn = _CONNECTIONS[key] = _Connection(loc)
    conn.users += 1
    try:
        await conn.ensure()
    except BaseException:
        _release(conn)
        raise
    return conn


def _release(conn: _Connection) -> None:
    conn.users -= 1
    if conn.users <= 0:
        _CONNECTIONS.pop(conn.loc.connection_key(), None)
        conn.close()


# -- the node ------------------------------------------------------------------------------------


def _sftp_error(exc: BaseException, what: str, where: str, *, reached: bool) -> BlockfsError:
    """The exception a failed SFTP request becomes: a refusal of the server keeps its errno;
    anything on the way (a lost connection, a timeout) is transient."""
    import asyncssh

    if isinstance(exc, asyncssh.SFTPError):
        code = {
            asyncssh.FX_NO_SUCH_FILE: errno.ENOENT,
            asyncssh.FX_PERMISSION_DENIED: errno.EACCES,
            asyncssh.FX_EOF: errno.EIO,
            asyncssh.FX_OP_UNSUPPORTED: errno.EOPNOTSUPP,
        }.get(exc.code)
        if code is not None or exc.code == asyncssh.FX_FAILURE:
            return BlockfsError(f"{where}: {what}: {exc.reason}", errno=code or errno.EIO)
        if exc.code in (asyncssh.FX_CONNECTION_LOST, asyncssh.FX_NO_CONNECTION):
            return TransientError(f"{where}: {what}: {exc.reason}", reached=reached)
        return BlockfsError(f"{where}: {what}: {exc.reason}", errno=errno.EIO)
    if isinstance(exc, asyncio.TimeoutError):
        return TransientError(f"{where}: {what} timed out", errno=errno.ETIMEDOUT, reached=reached)
    if isinstance(exc, (OSError, asyncssh.Error, EOFError, ConnectionError)):
        return TransientError(
            f"{where}: {what}: {_describe(exc)}",
            errno=getattr(exc, "errno", None) or errno.ECONNRESET,
            reached=reached,
        )
    raise exc


class SshNode(Node):
    """A file on a remote host, through SFTP (see the module docstring)."""

    format_name = "ssh"

    def __init__(self, loc: SshLocation, read_only: bool) -> None:
        self.loc = loc
        self.filename = loc.uri()
        self.read_only = read_only
        self.size = 0
        self._conn: _Connection | None = None
        self._file: Any = None
        self._generation = 0
        self._ident: Hashable | None = None
        self._real = loc.path
        self._closed = False
        #: a request's own time limit, below the retry deadline so that a retry fits
        self._request_timeout = max(1.0, loc.timeout / 3)
        self._max_read = self._max_write = _SAFE_REQUEST

    @classmethod
    async def open(cls, loc: SshLocation, *, read_only: bool, create: bool = False) -> SshNode:
        """:raise UsageError: no such file, not a regular file, refused (EACCES, EEXIST);
        BlockfsError: the host cannot be reached in ``timeout`` seconds (EIO)."""
        node = cls(loc, read_only)
        try:
            await node._open(create=create)
        except TransientError as exc:
            raise BlockfsError(str(exc), errno=errno.EHOSTUNREACH) from None
        return node

    async def _open(self, *, create: bool = False) -> None:
        loc = self.loc

        async def go() -> tuple[_Connection, Any, int, str, int]:
            import asyncssh

            conn = await _acquire(loc)
            try:
                sftp = conn.sftp
                if create:
                    if await sftp.exists(loc.path):
                        raise UsageError(f"{loc.uri()}: file exists", errno=errno.EEXIST)
                    f = await sftp.open(
                        loc.path,
                        asyncssh.FXF_READ | asyncssh.FXF_WRITE | asyncssh.FXF_CREAT
                        | asyncssh.FXF_EXCL,
                        asyncssh.SFTPAttrs(permissions=0o644),
                        encoding=None,
                    )  # fmt: skip
                else:
                    f = await sftp.open(loc.path, "rb" if self.read_only else "rb+")
                attrs = await f.stat()
                if attrs.type not in (None, asyncssh.FILEXFER_TYPE_REGULAR):
                    await f.close()
                    raise UsageError(f"{loc.uri()}: not a regular file")
                try:
                    real = await sftp.realpath(loc.path)
                except asyncssh.SFTPError:
                    real = loc.path
                return conn, f, conn.generation, real, attrs.size or 0
            except BaseException:
                _release(conn)
                raise

        try:
            conn, f, gen, real, size = await _on_loop(
                lambda: asyncio.wait_for(go(), loc.timeout)
            )
        except (UsageError, TransientError):
            raise
        except Exception as exc:
            err = _sftp_error(exc, "open", loc.uri(), reached=False)
            if err.errno == errno.ENOENT:
                raise UsageError(f"{loc.uri()}: no such file", errno=errno.ENOENT) from None
            if err.errno == errno.EACCES:
                raise UsageError(f"{loc.uri()}: permission denied", errno=errno.EACCES) from None
            if isinstance(err, TransientError):
                raise err from None
            if create:
                raise UsageError(f"{loc.uri()}: cannot be made ({err})", errno=errno.EEXIST) from None
            raise err from None
        self._conn, self._file, self._generation = conn, f, gen
        limits = getattr(conn.sftp, "limits", None)
        self._max_read = min(MAX_REQUEST, getattr(limits, "max_read_len", 0) or _SAFE_REQUEST)
        self._max_write = min(MAX_REQUEST, getattr(limits, "max_write_len", 0) or _SAFE_REQUEST)
        self._real = real
        self._ident = ("ssh", loc.host, loc.port, real)
        self.size = size

    # -- requests ---------------------------------------------------------------------------------

    async def _call(
        self, what: str, make: Callable[[Any], Awaitable[T]], *, reached: bool = True
    ) -> T:
        f = self._file
        if f is None:
            raise TransientError(f"{self.filename}: {what}: not connected", reached=False)
        # The time limit is kept on the trio side (a deadline on a cancel scope costs nothing
        # there; asyncio.wait_for is one more task and timer per request): the asyncio task
        # is cancelled when it passes.
        try:
            with trio.fail_after(self._request_timeout):
                return await _on_loop(lambda: make(f))
        except trio.TooSlowError:
            raise TransientError(
                f"{self.filename}: {what} timed out", errno=errno.ETIMEDOUT, reached=reached
            ) from None
        except BlockfsError:
            raise
        except Exception as exc:
            raise _sftp_error(exc, what, self.filename, reached=reached) from None

    async def read(self, offset: int, length: int) -> bytes:
        step = self._max_read
        if length <= step:
            data: bytes = await self._call("read", lambda f: _read_at(f, offset, length))
        else:
            data = await self._call("read", lambda f: _read_split(f, offset, length, step))
        if len(data) < length:
            data += bytes(length - len(data))  # past the end of the file: zeroes
        return data

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise BlockfsError(f"{self.filename} is open read-only", errno=errno.EROFS)
        step = self._max_write
        await self._call("write", lambda f: _write_split(f, offset, data, step))
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, 1 << 20)
            await self.write(pos, bytes(n))
            pos += n

    async def flush(self) -> None:
        if self.read_only:
            return
        conn = self._conn

        async def fsync(f: Any) -> None:
            import asyncssh

            try:
                await f.fsync()
            except asyncssh.SFTPError as exc:
                if exc.code != asyncssh.FX_OP_UNSUPPORTED:
                    raise
                if conn is not None and not conn.fsync_warned:
                    conn.fsync_warned = True
                    log.warning("%s: the server lacks fsync@openssh.com: a flush only "
                                "waits for its replies", self.loc.server)  # fmt: skip

        await self._call("flush", fsync)

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise BlockfsError(f"{self.filename} is open read-only", errno=errno.EROFS)
        await self._call("truncate", lambda f: f.truncate(size))
        self.size = size

    async def reconnect(self) -> None:
        """A new connection (unless another node already made one since this node's broke)
        and the file opened again in the same mode."""
        conn = self._conn
        if conn is None or self._closed:
            raise BlockfsError(f"{self.filename}: closed", errno=errno.EIO)
        loc, gen, ro = self.loc, self._generation, self.read_only

        async def go() -> tuple[Any, int]:
            sftp, new_gen = await conn.ensure(gen)
            f = await sftp.open(loc.path, "rb" if ro else "rb+")
            return f, new_gen

        try:
            f, new_gen = await _on_loop(lambda: asyncio.wait_for(go(), loc.timeout))
        except BlockfsError:
            raise
        except Exception as exc:
            err = _sftp_error(exc, "reconnect", self.filename, reached=False)
            raise err from None
        self._file, self._generation = f, new_gen

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        conn, loc = self._conn, self.loc
        assert conn is not None

        async def go() -> Any:
            return await conn.sftp.open(loc.path, "rb" if read_only else "rb+")

        try:
            f = await _on_loop(lambda: asyncio.wait_for(go(), loc.timeout))
        except Exception as exc:
            raise _sftp_error(exc, "reopen", self.filename, reached=False) from None
        old, self._file = self._file, f
        self.read_only = read_only
        if old is not None:
            await _on_loop(lambda: _close_quietly(old))

    def identity(self) -> Hashable | None:
        return self._ident

    @property
    def real_path(self) -> str:
        return self.loc.uri(self._real).partition("?")[0]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        f, conn = self._file, self._conn
        self._file = self._conn = None

        async def go() -> None:
            if f is not None:
                await _close_quietly(f)
            if conn is not None:
                _release(conn)

        with trio.CancelScope(shield=True):
            await _on_loop(lambda: asyncio.wait_for(go(), 5))

    def describe(self) -> dict[str, object]:
        d = super().describe()
        d["server"] = self.loc.server
        return d


async def _close_quietly(f: Any) -> None:
    try:
        await f.close()
    except Exception:
        pass


async def _read_at(f: Any, offset: int, length: int) -> bytes:
    """One SFTP read of at most :data:`MAX_REQUEST` bytes (fewer at the end of the file).

    Straight to the session's request (``SFTPClientHandler.read``): the file object's own
    ``read`` runs a parallel reader with tasks of its own for every call, which the profile
    of 4 KiB reads showed as an eighth of the asyncio thread's time. A short answer (the
    server may cut a read) is completed by further requests."""
    handler, handle = f._handler, f._handle
    out = b""
    while len(out) < length:
        try:
            data, _ = await handler.read(handle, offset + len(out), length - len(out))
        except _eof_error():
            break
        if not data:
            break
        out = data if not out else out + data
    return out


async def _write_at(f: Any, offset: int, data: bytes) -> None:
    """One SFTP write (see :func:`_read_at`)."""
    await f._handler.write(f._handle, offset, data)


def _eof_error() -> type[BaseException]:
    import asyncssh

    return asyncssh.SFTPEOFError


async def _read_split(f: Any, offset: int, length: int, step: int) -> bytes:
    """A large read as requests of ``step`` bytes in flight together."""
    parts = await asyncio.gather(
        *(_read_at(f, offset + pos, min(step, length - pos)) for pos in range(0, length, step))
    )
    out = bytearray()
    for pos, part in zip(range(0, length, step), parts, strict=True):
        if len(out) < pos:
            out += bytes(pos - len(out))
        out += part
    return bytes(out)


async def _write_split(f: Any, offset: int, data: bytes, step: int) -> None:
    if len(data) <= step:
        await _write_at(f, offset, data)
        return
    view = memoryview(data)
    await asyncio.gather(
        *(
            _write_at(f, offset + pos, bytes(view[pos : pos + step]))
            for pos in range(0, len(data), step)
        )
    )


# -- what the ssh driver (blockfs.nodes.protocols.SshProtocol) delegates here --------------------


def retry_policy(location: str) -> RetryPolicy:
    """Retries within ``timeout=`` seconds of a request's first try, then EIO."""
    timeout = SshLocation.parse(location).timeout
    return RetryPolicy(
        retries=1000, delay=min(0.2, timeout / 10), backoff=2.0,
        max_delay=max(0.5, min(5.0, timeout / 4)), deadline=timeout,
    )  # fmt: skip


async def open_node(location: str, *, read_only: bool) -> Node:
    return await SshNode.open(SshLocation.parse(location), read_only=read_only)


async def create_node(location: str) -> Node:
    """A new, empty remote file (made exclusively), open read-write.

    :raise UsageError: (EEXIST) it exists; (ENOENT, EACCES) no folder, no right.
    """
    return await SshNode.open(SshLocation.parse(location), read_only=False, create=True)


async def remove(location: str) -> None:
    """Remove a remote file. :raise BlockfsError: (ENOENT) there is none."""

    async def act(sftp: Any, loc: SshLocation) -> None:
        await sftp.remove(loc.path)

    await _sftp_call(location, "remove", act)


async def _sftp_call(location: str, what: str, act: Callable[[Any, SshLocation], Awaitable[T]]) -> T:
    """One SFTP call on a connection of ``location``'s (made if needed, released after)."""
    loc = SshLocation.parse(location)

    async def go() -> T:
        conn = await _acquire(loc)
        try:
            return await act(conn.sftp, loc)
        finally:
            _release(conn)

    try:
        return await _on_loop(lambda: asyncio.wait_for(go(), loc.timeout))
    except BlockfsError:
        raise
    except Exception as exc:
        raise _sftp_error(exc, what, loc.uri(), reached=False) from None


async def exists(location: str) -> bool:
    async def act(sftp: Any, loc: SshLocation) -> bool:
        found: bool = await sftp.exists(loc.path)
        return found

    return await _sftp_call(location, "stat", act)


async def rename(old: str, new: str) -> None:
    """SFTP's rename (SSH_FXP_RENAME), which OpenSSH's server refuses over an existing name."""
    new_path = SshLocation.parse(new).path

    async def act(sftp: Any, loc: SshLocation) -> None:
        await sftp.rename(loc.path, new_path)

    await _sftp_call(old, "rename", act)


def resolve(relative_to: str, name: str) -> str:
    """A backing name found in the image at ``relative_to``: on the same host, through the
    same connection properties; a relative name from the image's folder."""
    loc = SshLocation.parse(relative_to)
    if name.startswith("/"):
        return loc.uri(posixpath.normpath(name))
    return loc.uri(posixpath.normpath(posixpath.join(posixpath.dirname(loc.path), name)))


def found_location(name: str, relative_to: str) -> str:
    """An ``ssh://`` backing name found inside an image: its properties are the image's
    words, not the user's, so none is kept (a ``password-file=/etc/shadow`` would send a
    secret of the daemon's to a host the image names; ``host-key-check=none`` would let
    anyone answer). On the overlay's own server (same host, port and user) it takes the
    overlay's properties, which the user gave; elsewhere the defaults (agent and keys,
    known_hosts) apply.

    :raise UsageError: a malformed name.
    """
    loc = SshLocation.parse(name)
    opts: tuple[tuple[str, str], ...] = ()
    if scheme_of_ssh(relative_to):
        over = SshLocation.parse(relative_to)
        if (over.host, over.port, over.user) == (loc.host, loc.port, loc.user):
            opts = over.options
    return replace(loc, options=opts).uri()


def scheme_of_ssh(location: str) -> bool:
    return location[:6].lower() == "ssh://"


def real_location(node: Node) -> str:
    assert isinstance(node, SshNode), node
    return node.real_path
