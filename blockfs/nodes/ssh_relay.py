"""The ssh relay: one process per SSH connection, started by :mod:`blockfs.nodes.ssh` as
``python -I -m blockfs.nodes.ssh_relay``. It is the only place that knows asyncssh and asyncio.

It reads one line of JSON on its standard input (host, port, user, the location's properties),
connects with asyncssh (the agent, a key file and its passphrase file, a password file; the
host key checked against known_hosts or a fingerprint), opens the ``sftp`` subsystem and
writes one line of JSON on its standard output: ``{"ok": true, "warnings": [...]}`` or
``{"ok": false, "kind": "usage"|"transient", "message": ..., "errno": N}``. From then on it
only carries bytes: its input into the SFTP channel, the channel's data to its output, with
flow control both ways (a full pipe stops the channel's reading, a full window stops the
pipe's). The SFTP protocol itself is spoken by the daemon (:mod:`blockfs.nodes.sftp`).

Why a process and not a thread (``benchmarks/README.md`` has the figures): the SSH layer is
Python per packet (asyncssh: framing, the cipher calls, the window); in a thread of the
daemon it shared the GIL with FUSE and every request crossed two threads. In a process of its
own it runs on the other core; the daemon pays one pipe write and one pipe read per batch of
requests, and no thread hand-off at all.

It ends when its input ends (the daemon closed the connection or died), when the connection
drops, or when the server closes the channel. Secrets are read here, from the files the
user named, and never pass through a pipe or a command line.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
from typing import Any

from blockfs.nodes.openssh import KNOWN_HOSTS, SecretError, read_secret, read_small_file

#: the ciphers offered, in order (all that OpenSSH's server takes by default). AES-GCM first:
#: with AES-NI (through OpenSSL) it moved twice the data of asyncssh's default,
#: chacha20-poly1305, per CPU second here (1 MiB reads: 248 against 123 MB/s).
CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
)  # fmt: skip
#: the SFTP channel's receive window: 8 MiB keeps 1 MiB requests at depth 4 flowing (the
#: default, 2 MiB, is half of what they ask for at once). A larger packet size than the
#: default 32 KiB was tried and changed nothing: OpenSSH's server sends 32 KiB packets
#: whatever the client takes.
WINDOW = 8 << 20
_STDOUT = 1
#: output held in this process before the channel stops reading
_OUT_HIGH = 4 << 20


class Refused(Exception):
    """Why the connection could not be made: ``kind`` is "usage" (the user's words: a key,
    a host key, credentials) or "transient" (the host cannot be reached now)."""

    def __init__(self, kind: str, message: str, code: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _fingerprint_client(kind: str, want: str) -> Any:
    import asyncssh

    class Client(asyncssh.SSHClient):
        def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
            got = key.get_fingerprint(kind)  # "SHA256:..." / "MD5:..."
            return bool(got.partition(":")[2] == want.removeprefix(kind.upper() + ":"))

    return Client


async def connect(cfg: dict[str, Any], warnings: list[str]) -> Any:
    """The SSH connection ``cfg`` describes. :raise Refused:"""
    try:
        return await _connect(cfg, warnings)
    except SecretError as exc:  # a key or secret file that cannot be used
        raise Refused("usage", str(exc), exc.code) from None


async def _connect(cfg: dict[str, Any], warnings: list[str]) -> Any:
    import asyncssh

    host, port, user = str(cfg["host"]), int(cfg["port"]), str(cfg["user"])
    opts: dict[str, str] = dict(cfg.get("options") or {})
    timeout = float(cfg.get("timeout") or 30)
    server = f"{user}@[{host}]:{port}" if ":" in host else f"{user}@{host}:{port}"
    tried = []
    kwargs: dict[str, Any] = {
        "username": user,
        "config": None,
        "encryption_algs": CIPHERS,
        "connect_timeout": timeout,
        "keepalive_interval": max(1.0, min(15.0, timeout / 3)),
        "keepalive_count_max": 3,
    }
    if "identity" in opts:
        passphrase = None
        if "identity-passphrase-file" in opts:
            passphrase = read_secret(opts["identity-passphrase-file"], f"{server}: passphrase file")
        path = os.path.expanduser(opts["identity"])
        try:
            data = read_small_file(path, f"{server}: identity")
            key = asyncssh.import_private_key(data, passphrase)
        except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            raise Refused(
                "usage", f"{server}: identity {path}: {_describe(exc)}", errno.EACCES
            ) from None
        kwargs["client_keys"] = [key]
        kwargs["agent_path"] = None
        tried.append(f"key {path}")
    else:
        if os.environ.get("SSH_AUTH_SOCK"):
            tried.append("agent")
        tried.append("keys in ~/.ssh")
    if "password-file" in opts:
        kwargs["password"] = read_secret(opts["password-file"], f"{server}: password file")
        tried.append("password")
    check = opts.get("host-key-check", "known_hosts")
    client_factory = None
    if check == "known_hosts":
        files = [p for p in (os.path.expanduser(k) for k in KNOWN_HOSTS) if os.path.exists(p)]
        kwargs["known_hosts"] = files
    elif check == "none":
        warnings.append(f"{server}: host key not checked (host-key-check=none)")
        kwargs["known_hosts"] = None
    else:
        kind, _, want = check.partition(":")
        kwargs["known_hosts"] = ([], [], [])
        client_factory = _fingerprint_client(kind, want)
    try:
        return await asyncio.wait_for(
            asyncssh.connect(host, port, client_factory=client_factory, **kwargs), timeout
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise Refused(
            "usage", f"{server}: host key not trusted ({exc.reason}; host-key-check={check})",
            errno.EACCES,
        ) from None  # fmt: skip
    except asyncssh.PermissionDenied:
        raise Refused(
            "usage", f"{server}: authentication failed (tried: {', '.join(tried)})", errno.EACCES
        ) from None
    except (TimeoutError, OSError, asyncssh.Error) as exc:
        code = getattr(exc, "errno", None) or errno.EHOSTUNREACH
        raise Refused("transient", f"{server}: cannot connect: {_describe(exc)}", code) from None


class _BatchedTransport:
    """The connection's socket, written once per turn of the loop.

    asyncssh writes every SSH packet to its transport at once, and sends an empty IGNORE
    packet ahead of each (so two socket writes per packet); under 1 MiB writes those sends
    were a quarter of this process's time. Gathered here, a turn's packets leave in one
    send: this process's CPU per GiB written fell by a tenth (2.9 s against 3.2 s, three runs
    each). Everything else is the socket transport's own; closing it sends what is gathered
    first."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parts: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self._flush)
        self._parts.append(data)

    def _flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _batch_writes(conn: Any) -> None:
    """Put :class:`_BatchedTransport` under an established connection (an asyncssh
    internal: left alone where it is not what this was written against)."""
    transport = getattr(conn, "_transport", None)
    if isinstance(transport, asyncio.Transport) and hasattr(conn, "_send"):
        conn._transport = _BatchedTransport(transport)


class _Output(asyncio.Protocol):
    """Our standard output: when it backs up, the channel stops reading."""

    def __init__(self) -> None:
        self.chan: Any = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        _finish(self.closed)

    def pause_writing(self) -> None:
        if self.chan is not None:
            self.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.chan is not None:
            self.chan.resume_reading()


def _session_class() -> Any:
    import asyncssh

    class Session(asyncssh.SSHClientSession[bytes]):
        """The SFTP channel: its data to our output; a full window stops our input."""

        def __init__(self, out: asyncio.WriteTransport, done: asyncio.Future[None]) -> None:
            self.out = out
            self.done = done
            self.inp: asyncio.ReadTransport | None = None
            self.parts: list[bytes] = []
            self.loop = asyncio.get_running_loop()

        def data_received(self, data: bytes, datatype: Any) -> None:
            # gathered, and written once per turn of the loop: one read of the socket holds
            # up to eight 32 KiB packets of the server's, and a pipe write each was a sixth of
            # this process's time under 1 MiB reads
            if not self.parts:
                self.loop.call_soon(self.flush)
            self.parts.append(data)

        def flush(self) -> None:
            parts, self.parts = self.parts, []
            out = self.out
            if out.is_closing():
                return
            if out.get_write_buffer_size() == 0:
                try:
                    n = os.writev(_STDOUT, parts)
                except BlockingIOError:
                    n = 0
                except OSError:
                    _finish(self.done)
                    return
                while parts and n >= len(parts[0]):
                    n -= len(parts.pop(0))
                if parts and n:
                    parts[0] = parts[0][n:]
            for part in parts:
                out.write(part)  # the transport keeps the order and tells us when it is full

        def pause_writing(self) -> None:
            if self.inp is not None:
                self.inp.pause_reading()

        def resume_writing(self) -> None:
            if self.inp is not None:
                self.inp.resume_reading()

        def eof_received(self) -> bool:
            _finish(self.done)
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            _finish(self.done)

    return Session


class _Input(asyncio.Protocol):
    """Our standard input: into the channel, as it comes."""

    def __init__(self, chan: Any, done: asyncio.Future[None]) -> None:
        self.chan = chan
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.chan.write(data)

    def eof_received(self) -> bool:
        _finish(self.done)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        _finish(self.done)


def _finish(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _say(out: Any, message: dict[str, Any]) -> None:
    os.write(out, json.dumps(message).encode() + b"\n")


async def relay(cfg: dict[str, Any], stdin: Any, stdout_fd: int) -> int:
    loop = asyncio.get_running_loop()
    warnings: list[str] = []
    try:
        conn = await connect(cfg, warnings)
    except Refused as exc:
        _say(stdout_fd, {"ok": False, "kind": exc.kind, "message": str(exc), "errno": exc.code})
        return 1
    done: asyncio.Future[None] = loop.create_future()
    _batch_writes(conn)
    try:
        out_transport, out_proto = await loop.connect_write_pipe(
            _Output, os.fdopen(stdout_fd, "wb", buffering=0, closefd=False)
        )
        out_transport.set_write_buffer_limits(high=_OUT_HIGH)
        try:
            chan, session = await asyncio.wait_for(
                conn.create_session(
                    lambda: _session_class()(out_transport, done),
                    subsystem="sftp", encoding=None, window=WINDOW,
                ),
                float(cfg.get("timeout") or 30),
            )  # fmt: skip
        except Exception as exc:
            server = f"{cfg['user']}@{cfg['host']}:{cfg['port']}"
            _say(stdout_fd, {
                "ok": False, "kind": "transient", "errno": errno.EPROTO,
                "message": f"{server}: no sftp session: {_describe(exc)}",
            })  # fmt: skip
            return 1
        _say(stdout_fd, {"ok": True, "warnings": warnings})
        out_proto.chan = chan
        in_transport, _ = await loop.connect_read_pipe(lambda: _Input(chan, done), stdin)
        session.inp = in_transport
        await done
        # what the channel sent last still reaches the daemon: closing the pipe's transport
        # writes out its buffer first
        out_transport.close()
        try:
            await asyncio.wait_for(out_proto.closed, 10)
        except TimeoutError:
            pass
        return 0
    finally:
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 2)
        except (Exception, asyncio.CancelledError):
            pass


def main() -> int:
    logging.getLogger("asyncssh").addHandler(logging.NullHandler())
    logging.getLogger("asyncssh").propagate = False
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    line = b""
    while not line.endswith(b"\n"):
        piece = os.read(0, 1)  # byte by byte: what follows the line is the SFTP stream's
        if not piece:
            return 1
        line += piece
        if len(line) > 64 << 10:
            return 1
    try:
        cfg = json.loads(line)
    except ValueError:
        return 1
    try:
        return asyncio.run(relay(cfg, stdin, 1))
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
