"""The ssh protocol: images on any host that runs an OpenSSH server with sftp (nothing to
install there), reached over SFTP, the connection carried by OpenSSH's ``ssh`` or asyncssh.

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
``transport``                 what carries the connection: ``auto`` (the default: OpenSSH's
                              ``ssh`` where it is installed, else asyncssh), ``openssh``,
                              ``asyncssh``

The SSH layer runs in a process of its own for each connection, which authenticates, checks
the host key and then only carries the bytes of the SFTP channel over two pipes; the daemon
speaks SFTP itself over them, on its own trio loop (:mod:`blockfs.nodes.sftp`). That process
is OpenSSH's ``ssh -s HOST sftp`` (:mod:`blockfs.nodes.openssh`: every choice on its command
line, secrets through an askpass helper) or an asyncssh relay
(:mod:`blockfs.nodes.ssh_relay`). Both give the same errors for the same refusals; ``ssh``
costs less than half the relay's CPU per request (benchmarks/README.md). A request costs the
daemon one pipe write and its share of one pipe read, and no thread hand-off; the ciphers and
SSH packets run on another core. (The first bridge, an asyncio loop in a thread of the daemon,
and trio-asyncio were measured against the relay: see benchmarks/README.md.)

A raw image's reads and writes skip the event loop's tasks: the FUSE reader threads send them
to the session themselves (:meth:`SshNode.direct_io`, :meth:`SftpSession.submit`) and the
session's reader answers FUSE from the reply (blockfs.fuseloop). Measured on the loopback sshd:
the daemon's CPU per 4 KiB read fell from ~87 to ~30 us, and 4 KiB random reads went from
8.5-9.5k to 17-21k IOPS, sshfs's rate in the same runs (benchmarks/README.md).

One SSH connection per (host, port, user, credentials, host-key rule) serves every image on
it (a chain's backing files share their overlay's); SFTP carries many requests in flight on
it at once. A lost connection, or a request that takes longer than the connection's request
timeout, is a :class:`~blockfs.errors.TransientError`: the retry filter above the node
(:class:`~blockfs.nodes.retry.RetryFilter`, policy from ``timeout=``) reconnects and sends it
again, until the deadline, then EIO. A flush is ``fsync@openssh.com``: the remote file's data
reach its disk. A server without that extension gets no stronger promise than "the server has
the data" (logged once); the README says so.

Only the relay knows asyncssh or asyncio.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import posixpath
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import trio

from blockfs.errors import BlockfsError, TransientError, UsageError
from blockfs.nodes import openssh, sftp
from blockfs.nodes.base import (
    RETRY,
    DirectDone,
    DirectIo,
    Extent,
    Held,
    IoCounters,
    Node,
    Status,
    never_direct,
)
from blockfs.nodes.runpool import RunPool
from blockfs.nodes.sftp import SftpError, SftpSession

log = logging.getLogger(__name__)

T = TypeVar("T")

#: properties a location's query (or the mount spec) may give
QUERY_KEYS = (
    "identity", "identity-passphrase-file", "password-file", "host-key-check", "timeout",
    "transport",
)  # fmt: skip
#: what carries the SSH connection (``auto``: OpenSSH's ssh where installed, else asyncssh)
TRANSPORTS = ("auto", "openssh", "asyncssh")
#: the mount spec's options that name parts of the URI itself
URI_KEYS = ("host", "port", "user", "path")
DEFAULT_TIMEOUT = 30.0
#: the largest single SFTP read or write sent: the server's limits (OpenSSH announces 255
#: KiB through limits@openssh.com), or what every server must take (32 KiB) where it
#: announces none
MAX_REQUEST = 256 << 10
_SAFE_REQUEST = 32 << 10


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
    transport = options.get("transport")
    if transport is not None and transport not in TRANSPORTS:
        raise UsageError(f"{where}: transport={transport[:20]}: {', '.join(TRANSPORTS)}")
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


# -- the connection: a process carrying it and an SFTP session over its pipes ------------------


class _Connection:
    """One SSH connection (an ``ssh`` or :mod:`~blockfs.nodes.ssh_relay` process) and the
    SFTP session over its pipes. ``generation`` tells a node whether the session it used is
    still the current one."""

    def __init__(self, loc: SshLocation) -> None:
        self.loc = loc
        self.session: SftpSession | None = None
        self.proc: trio.Process | None = None
        self.users = 0
        self.generation = 0
        self.fsync_warned = False
        self._connecting = trio.Lock()

    async def ensure(self, generation: int | None = None) -> tuple[SftpSession, int]:
        """The SFTP session; a new connection if there is none, if it died, or if the
        caller's ``generation`` is the current one (the caller saw it fail)."""
        async with self._connecting:
            s = self.session
            if s is not None and s.dead is None and generation != self.generation:
                return s, self.generation
            self.close()
            with trio.fail_after(self.loc.timeout + _RELAY_START):
                self.session, self.proc = await _start_relay(self.loc)
            self.generation += 1
            return self.session, self.generation

    def close(self) -> None:
        session, proc = self.session, self.proc
        self.session = self.proc = None
        if session is not None:
            session.close()
        if proc is not None:
            trio.lowlevel.spawn_system_task(_reap, proc, name="ssh relay reaper")


#: seconds a relay process may take to start (Python and asyncssh), on top of the timeout
_RELAY_START = 10.0


async def _start_relay(loc: SshLocation) -> tuple[SftpSession, trio.Process]:
    """Start the process that carries ``loc``'s connection (OpenSSH's ``ssh``, or the
    asyncssh relay) and SFTP over its pipes.

    :raise UsageError: refused for the user's words (key, host key, credentials);
        TransientError: the host cannot be reached now.
    """
    transport = loc.opts.get("transport", "auto")
    tools = await openssh.find_tools() if transport != "asyncssh" else None
    if tools is not None:
        return await _start_openssh(loc, *tools)
    if transport == "openssh":
        raise UsageError(
            f"{loc.server}: transport=openssh: ssh (OpenSSH 8.5 or later) or "
            f"{openssh.HELPER} is not installed",
            errno=errno.ENOENT,
        )
    return await _start_asyncssh(loc)


async def _start_openssh(
    loc: SshLocation, ssh: str, helper: str
) -> tuple[SftpSession, trio.Process]:
    """``ssh -s HOST sftp`` (:mod:`blockfs.nodes.openssh`); SFTP over its standard input
    and output. When it ends before SFTP begins, its error output says why."""
    check = loc.opts.get("host-key-check", "known_hosts")
    try:
        launch = openssh.command(loc.host, loc.port, loc.user, loc.opts, loc.timeout, ssh, helper)
    except openssh.SecretError as exc:
        raise UsageError(str(exc), errno=exc.code) from None
    for warning in launch.warnings:
        log.warning("%s", warning)
    if launch.key_check is not None:
        res = await trio.run_process(
            launch.key_check, env=launch.env, stdin=b"", capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            text = openssh.last_complaint(
                res.stderr.decode(errors="replace"), f"ssh-keygen exited {res.returncode}"
            )
            raise UsageError(f"{loc.server}: identity {launch.key_check[-1]}: {text}",
                             errno=errno.EACCES)  # fmt: skip
    # ssh's complaints: a private file, gone when closed (ssh keeps its own descriptor)
    with tempfile.TemporaryFile() as errors:
        proc, to_child, from_child = await _spawn(
            loc, "ssh", launch.argv, stderr=errors.fileno(), env=launch.env
        )
        session = SftpSession(to_child, from_child, loc.server, stall_timeout=_stall(loc))
        try:
            try:
                await session.start()
            except BlockfsError:
                session.close()
                with trio.move_on_after(2):
                    await proc.wait()
                if proc.returncode is None:
                    raise
                errors.seek(0)
                text = errors.read(64 << 10).decode(errors="replace")
                raise openssh.refusal(loc.server, check, text, launch) from None
        except BaseException:
            session.close()
            with trio.CancelScope(shield=True):
                await _reap(proc)
            raise
    return session, proc


async def _spawn(
    loc: SshLocation, what: str, argv: list[str], **kwargs: Any
) -> tuple[trio.Process, int, int]:
    """``argv`` in a session of its own, its standard input and output pipes to us: the
    process, the descriptor we write to it, the one we read from it.

    :raise TransientError: it did not start."""
    to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
    from_child_r, from_child_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=to_child_r, stdout=from_child_w, start_new_session=True, **kwargs
        )
    except BaseException as exc:
        os.close(to_child_w)
        os.close(from_child_r)
        if isinstance(exc, OSError):
            raise TransientError(
                f"{loc.server}: {what} did not start: {exc.strerror}", reached=False
            ) from None
        raise
    finally:
        os.close(to_child_r)
        os.close(from_child_w)
    return proc, to_child_w, from_child_r


def _stall(loc: SshLocation) -> float:
    """A connection silent this long with requests waiting is given up (the session's
    watchdog): a third of ``timeout=``, so that a retry on a new one fits before the retry
    filter's deadline."""
    return max(1.0, loc.timeout / 3)


async def _start_asyncssh(loc: SshLocation) -> tuple[SftpSession, trio.Process]:
    """Start an asyncssh relay for ``loc``, wait for its word, start SFTP over it."""
    proc, to_child_w, from_child_r = await _spawn(
        loc, "the ssh relay", [sys.executable, "-I", "-m", "blockfs.nodes.ssh_relay"]
    )
    cfg = {
        "host": loc.host, "port": loc.port, "user": loc.user,
        "options": dict(loc.options), "timeout": loc.timeout,
    }  # fmt: skip
    session: SftpSession | None = None
    try:
        os.write(to_child_w, json.dumps(cfg).encode() + b"\n")
        line, rest = await _read_line(from_child_r)
        try:
            word = json.loads(line)
        except ValueError:
            word = {}
        if not word:
            raise TransientError(f"{loc.server}: the ssh relay exited", reached=False)
        if not word.get("ok"):
            message = str(word.get("message") or "refused")
            code = int(word.get("errno") or errno.EIO)
            if word.get("kind") == "usage":
                raise UsageError(message, errno=code)
            raise TransientError(message, errno=code, reached=False)
        for warning in word.get("warnings") or ():
            log.warning("%s", warning)
        session = SftpSession(
            to_child_w, from_child_r, loc.server, rest, stall_timeout=_stall(loc)
        )
        await session.start()
    except BaseException:
        if session is not None:
            session.close()
        else:
            os.close(to_child_w)
            os.close(from_child_r)
        with trio.CancelScope(shield=True):
            await _reap(proc)
        raise
    return session, proc


async def _read_line(fd: int) -> tuple[bytes, bytes]:
    """The relay's first line (its word on the connection) and whatever came after it."""
    os.set_blocking(fd, False)
    data = b""
    while b"\n" not in data:
        try:
            piece = os.read(fd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not piece:
            return b"", b""
        data += piece
        if len(data) > 1 << 20:
            return b"", b""
    line, _, rest = data.partition(b"\n")
    return line, rest


async def _reap(proc: trio.Process) -> None:
    """Wait for a relay whose input was closed; kill it (it is ours) if it lingers."""
    try:
        with trio.move_on_after(5):
            await proc.wait()
            return
        proc.kill()
        with trio.move_on_after(5):
            await proc.wait()
    except Exception:
        pass


#: connections by :meth:`SshLocation.connection_key`, for each trio run
_CONNECTIONS: RunPool[_Connection] = RunPool("blockfs_ssh_connections")


async def _acquire(loc: SshLocation) -> _Connection:
    return await _CONNECTIONS.acquire(loc.connection_key(), lambda: _Connection(loc))


def _release(conn: _Connection) -> None:
    _CONNECTIONS.release(conn.loc.connection_key(), conn)


# -- the node ------------------------------------------------------------------------------------


class SshNode(Node):
    """A file on a remote host, through SFTP (see the module docstring)."""

    format_name = "ssh"

    def __init__(self, loc: SshLocation, read_only: bool) -> None:
        self.loc = loc
        self.filename = loc.uri()
        self.read_only = read_only
        self.size = 0
        self.io: IoCounters = IoCounters()
        self._conn: _Connection | None = None
        self._session: SftpSession | None = None
        self._handle = b""
        self._generation = 0
        self._ident: Hashable | None = None
        self._real = loc.path
        self._closed = False
        self._max_read = self._max_write = _SAFE_REQUEST
        #: the session and the file's handle on it (as a packed SFTP string), replaced
        #: together (the FUSE reader threads read them as one: a handle of another session
        #: would be refused)
        self._pair: tuple[SftpSession, bytes] | None = None

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
        try:
            with trio.fail_after(loc.timeout + _RELAY_START):
                conn = await _acquire(loc)
        except trio.TooSlowError:
            raise TransientError(f"{loc.server}: no answer in time", reached=False) from None
        try:
            with trio.fail_after(loc.timeout):
                s = conn.session
                assert s is not None
                if create:
                    if await _exists(s, loc.path):
                        raise UsageError(f"{loc.uri()}: file exists", errno=errno.EEXIST)
                    flags = sftp.FXF_READ | sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_EXCL
                    handle = await s.open(loc.path, flags, 0o644)
                else:
                    handle = await s.open(loc.path, _flags(self.read_only))
                attrs = await s.fstat(handle)
                if attrs.is_regular is False:
                    await _close_quietly(s, handle)
                    raise UsageError(f"{loc.uri()}: not a regular file")
                try:
                    real = await s.realpath(loc.path)
                except SftpError:
                    real = loc.path
        except BaseException as exc:
            _release(conn)
            if isinstance(exc, trio.TooSlowError):
                raise TransientError(f"{loc.uri()}: open timed out", reached=False) from None
            if isinstance(exc, SftpError):
                if exc.errno == errno.ENOENT:
                    raise UsageError(f"{loc.uri()}: no such file", errno=errno.ENOENT) from None
                if exc.errno == errno.EACCES:
                    raise UsageError(
                        f"{loc.uri()}: permission denied", errno=errno.EACCES
                    ) from None
                if create:
                    raise UsageError(
                        f"{loc.uri()}: cannot be made ({exc})", errno=errno.EEXIST
                    ) from None
                raise BlockfsError(f"{loc.uri()}: open: {exc}", errno=exc.errno) from None
            raise
        self._conn, self._session, self._handle = conn, s, handle
        self._pair = (s, sftp.sstr(handle))
        self._generation = conn.generation
        self._real = real
        self._ident = ("ssh", loc.host, loc.port, real)
        self.size = attrs.size or 0
        self._max_read = min(MAX_REQUEST, s.max_read)
        self._max_write = min(MAX_REQUEST, s.max_write)

    # -- requests ---------------------------------------------------------------------------------

    async def _call(self, what: str, make: Callable[[SftpSession, bytes], Awaitable[T]]) -> T:
        s = self._session
        if s is None or s.dead is not None:
            raise TransientError(f"{self.filename}: {what}: not connected", reached=False)
        # no deadline here: the session's watchdog ends a connection that stops answering
        # (SftpSession: stall_timeout), and this request then fails as transient
        try:
            return await make(s, self._handle)
        except SftpError as exc:
            if exc.code in (sftp.FX_CONNECTION_LOST, sftp.FX_NO_CONNECTION):
                raise TransientError(f"{self.filename}: {exc}", reached=True) from None
            raise BlockfsError(f"{self.filename}: {exc}", errno=exc.errno) from None

    async def read(self, offset: int, length: int) -> bytes:
        step = self._max_read
        try:
            data = await self._call("read", lambda s, h: s.read(h, offset, length, step))
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
        step = self._max_write
        try:
            await self._call("write", lambda s, h: s.write(h, offset, data, step))
        except BlockfsError:
            self.io.failed_wr_operations += 1
            raise
        io = self.io
        io.wr_operations += 1
        io.wr_bytes += len(data)
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        pos, end = offset, offset + length
        zeroes = bytes(min(length, 1 << 20))
        while pos < end:
            n = min(end - pos, len(zeroes))
            await self.write(pos, zeroes if n == len(zeroes) else zeroes[:n])
            pos += n

    async def flush(self) -> None:
        if self.read_only:
            return
        conn = self._conn

        async def fsync(s: SftpSession, h: bytes) -> None:
            try:
                await s.fsync(h)
            except SftpError as exc:
                if exc.code != sftp.FX_OP_UNSUPPORTED:
                    raise
                if conn is not None and not conn.fsync_warned:
                    conn.fsync_warned = True
                    log.warning("%s: the server lacks fsync@openssh.com: a flush only "
                                "waits for its replies", self.loc.server)  # fmt: skip

        try:
            await self._call("flush", fsync)
        except BlockfsError:
            self.io.failed_flush_operations += 1
            raise
        self.io.flush_operations += 1

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(offset, length, Status.DATA | Status.ALLOCATED)

    async def truncate(self, size: int) -> None:
        if self.read_only:
            raise BlockfsError(f"{self.filename} is open read-only", errno=errno.EROFS)
        await self._call("truncate", lambda s, h: s.truncate(h, size))
        self.size = size

    async def reconnect(self) -> None:
        """A new connection (unless another node already made one since this node's broke)
        and the file opened again in the same mode."""
        conn = self._conn
        if conn is None or self._closed:
            raise BlockfsError(f"{self.filename}: closed", errno=errno.EIO)
        loc = self.loc
        try:
            with trio.fail_after(loc.timeout + _RELAY_START):
                s, gen = await conn.ensure(self._generation)
                handle = await s.open(loc.path, _flags(self.read_only))
        except trio.TooSlowError:
            raise TransientError(f"{self.filename}: reconnect timed out", reached=False) from None
        except SftpError as exc:
            raise BlockfsError(f"{self.filename}: reconnect: {exc}", errno=exc.errno) from None
        self._session, self._handle, self._generation = s, handle, gen
        self._pair = (s, sftp.sstr(handle))

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.read_only:
            return
        s = self._session
        if s is None or s.dead is not None:
            await self.reconnect()
            s = self._session
            assert s is not None
        try:
            with trio.fail_after(self.loc.timeout):
                handle = await s.open(self.loc.path, _flags(read_only))
        except trio.TooSlowError:
            raise TransientError(f"{self.filename}: reopen timed out", reached=False) from None
        except SftpError as exc:
            raise BlockfsError(f"{self.filename}: reopen: {exc}", errno=exc.errno) from None
        old, self._handle = self._handle, handle
        self._pair = (s, sftp.sstr(handle))
        self.read_only = read_only
        await _close_quietly(s, old)

    def identity(self) -> Hashable | None:
        return self._ident

    # -- the FUSE reader threads' path (issue 14) ------------------------------------------

    def direct_io(self) -> DirectIo | None:
        """Reads and writes sent by the FUSE reader threads themselves and answered from the
        session's reply (see :meth:`SftpSession.submit`): no event loop task per request. A
        request larger than one SFTP packet goes in parts; a broken session or a read-only
        file declines it to the event loop's path; a request whose connection goes is handed
        back (:data:`RETRY`) to be sent again there, with the retry filter."""
        return DirectIo(never_direct, None, self._submit_read, self._submit_write)

    def _submit_read(self, offset: int, length: int, done: DirectDone, held: Held) -> bool:
        pair = self._pair
        if pair is None:
            return False
        return _send_split(
            length, self._max_read, done, pair[0].token,
            lambda pos, n, cb: self._read_one(pair, offset + pos, n, cb, held),
        )  # fmt: skip

    def _submit_write(
        self, offset: int, data: memoryview, done: DirectDone, held: Held
    ) -> bool:
        pair = self._pair
        if pair is None or self.read_only:
            return False
        return _send_split(
            len(data), self._max_write, done, pair[0].token,
            lambda pos, n, cb: self._write_one(pair, offset + pos, data[pos : pos + n], cb, held),
        )  # fmt: skip

    def _read_one(
        self, pair: tuple[SftpSession, bytes], offset: int, length: int, done: DirectDone,
        held: Held,
    ) -> bool:  # fmt: skip
        s, handle = pair
        io = self.io

        def reply(typ: int, payload: bytes) -> None:
            if typ == sftp.DATA_REPLY and len(payload) == length:
                data = payload
            elif typ == sftp.STATUS_REPLY and sftp.status_code(payload) == sftp.FX_EOF:
                data = bytes(length)  # past the end of the file: zeroes
            else:
                self._direct_failed(typ, payload, done, "read")
                return
            io.rd_operations += 1
            io.rd_bytes += length
            done(data, 0)

        return s.submit(*sftp.read_packet(handle, offset, length), reply, held)

    def _write_one(
        self, pair: tuple[SftpSession, bytes], offset: int, data: memoryview, done: DirectDone,
        held: Held,
    ) -> bool:  # fmt: skip
        s, handle = pair
        length = len(data)
        io = self.io

        def reply(typ: int, payload: bytes) -> None:
            if typ != sftp.STATUS_REPLY or sftp.status_code(payload) != sftp.FX_OK:
                self._direct_failed(typ, payload, done, "write")
                return
            io.wr_operations += 1
            io.wr_bytes += length
            if offset + length > self.size:
                self.size = offset + length
            done(b"", 0)

        return s.submit(*sftp.write_packet(handle, offset, data), reply, held)

    def _direct_failed(self, typ: int, payload: bytes, done: DirectDone, what: str) -> None:
        """A submitted request that did not succeed: sent again by the event loop when the
        connection went or the answer is one the async path handles (a short read), else
        failed with the server's errno (counted as the async path counts it)."""
        code = sftp.status_code(payload) if typ == sftp.STATUS_REPLY else None
        if code is None or code in (sftp.FX_CONNECTION_LOST, sftp.FX_NO_CONNECTION):
            done(b"", RETRY)
            return
        if what == "read":
            self.io.failed_rd_operations += 1
        else:
            self.io.failed_wr_operations += 1
        log.debug("%s: %s: status %d", self.filename, what, code)
        done(b"", sftp.status_errno(code))

    @property
    def real_path(self) -> str:
        return self.loc.uri(self._real).partition("?")[0]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        s, handle, conn = self._session, self._handle, self._conn
        self._session = self._conn = self._pair = None
        with trio.CancelScope(shield=True):
            if s is not None and s.dead is None:
                await _close_quietly(s, handle)
            if conn is not None:
                _release(conn)

    def describe(self) -> dict[str, object]:
        d = super().describe()
        d["server"] = self.loc.server
        return d


def _send_split(
    length: int, step: int, done: DirectDone, token: trio.lowlevel.TrioToken,
    send: Callable[[int, int, DirectDone], bool],
) -> bool:  # fmt: skip
    """Send a request of ``length`` bytes as ``send(pos, n, done)`` calls of at most ``step``
    bytes: one, or parts gathered into one ``done``."""
    if length <= step:
        return send(0, length, done)

    def part(pos: int) -> Callable[[DirectDone], bool]:
        return lambda cb: send(pos, min(step, length - pos), cb)

    return _Gather(done, token).send([part(pos) for pos in range(0, length, step)])


class _Gather:
    """The parts of one submitted request larger than an SFTP packet: ``done`` is called
    once, in the event loop's thread, when every part that went has answered, with the
    parts' bytes joined, or with the first failure (RETRY if a part could not go)."""

    __slots__ = ("done", "token", "parts", "left", "err", "lock")

    def __init__(self, done: DirectDone, token: trio.lowlevel.TrioToken) -> None:
        self.done = done
        self.token = token
        self.parts: list[bytes] = []
        self.left = 0
        self.err = 0
        #: the replies (event loop) and the sending thread count down together
        self.lock = threading.Lock()

    def send(self, senders: list[Callable[[DirectDone], bool]]) -> bool:
        """Send the parts in order; False if none went (then nothing will be called)."""
        self.parts = [b""] * len(senders)
        with self.lock:
            self.left = len(senders) + 1  # one more, given back once all are sent
        sent = 0
        for i, send in enumerate(senders):
            if not send(self._part(i)):
                with self.lock:
                    self.err = self.err or RETRY  # the event loop serves it, whole
                break
            sent += 1
        if sent == 0:
            return False
        with self.lock:
            self.left -= len(senders) - sent + 1
            last = self.left == 0
        if last:  # every reply came while sending: finish in the event loop's thread
            try:
                self.token.run_sync_soon(self._finish)
            except trio.RunFinishedError:
                pass
        return True

    def _part(self, i: int) -> DirectDone:
        def part(data: bytes, err: int) -> None:  # the event loop's thread
            with self.lock:
                if err and not self.err:
                    self.err = err
                self.parts[i] = data
                self.left -= 1
                last = self.left == 0
            if last:
                self._finish()

        return part

    def _finish(self) -> None:
        if self.err:
            self.done(b"", self.err)
        else:
            self.done(b"".join(self.parts), 0)


def _flags(read_only: bool) -> int:
    return sftp.FXF_READ if read_only else sftp.FXF_READ | sftp.FXF_WRITE


async def _close_quietly(s: SftpSession, handle: bytes) -> None:
    with trio.move_on_after(5):
        try:
            await s.close_handle(handle)
        except BlockfsError:
            pass


async def _exists(s: SftpSession, path: str) -> bool:
    try:
        await s.stat(path)
    except SftpError as exc:
        if exc.code == sftp.FX_NO_SUCH_FILE:
            return False
        raise
    return True


# -- what the ssh driver (blockfs.nodes.protocols.SSH) delegates here ---------------------------


#: what :class:`blockfs.nodes.protocols.RemoteProtocol` opens and creates with
LOCATION = SshLocation
NODE = SshNode


async def remove(location: str) -> None:
    """Remove a remote file. :raise BlockfsError: (ENOENT) there is none."""
    await _sftp_call(location, "remove", lambda s, loc: s.remove(loc.path))


async def _sftp_call(
    location: str, what: str, act: Callable[[SftpSession, SshLocation], Awaitable[T]]
) -> T:
    """One SFTP call on a connection of ``location``'s (made if needed, released after)."""
    loc = SshLocation.parse(location)
    try:
        with trio.fail_after(loc.timeout + _RELAY_START):
            conn = await _acquire(loc)
            try:
                assert conn.session is not None
                return await act(conn.session, loc)
            finally:
                _release(conn)
    except trio.TooSlowError:
        raise TransientError(f"{loc.uri()}: {what} timed out", reached=False) from None
    except SftpError as exc:
        raise BlockfsError(f"{loc.uri()}: {exc}", errno=exc.errno) from None


async def exists(location: str) -> bool:
    return await _sftp_call(location, "stat", lambda s, loc: _exists(s, loc.path))


async def rename(old: str, new: str) -> None:
    """SFTP's rename (SSH_FXP_RENAME), which OpenSSH's server refuses over an existing name."""
    new_path = SshLocation.parse(new).path
    await _sftp_call(old, "rename", lambda s, loc: s.rename(loc.path, new_path))


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
