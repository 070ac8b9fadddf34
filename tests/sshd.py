"""A real OpenSSH server for the tests of the ssh node: ``/usr/sbin/sshd`` on 127.0.0.1.

Everything is throwaway and lives in a temporary directory: host keys, ``sshd_config``, the
pid file, ``authorized_keys/<user>``, the log, and the ``known_hosts`` files a client needs.

* :class:`SshKeys` — the user keys (a plain ed25519 one and a passphrase-protected one, the
  passphrase in a 0600 file), made once per session and authorized on every server.
* :class:`PasswordUser` — a throwaway local account with a random password (in a 0600 file),
  for password authentication. Its name holds the pytest pid (``blockfs-ssh-<pid>``) so two
  sessions running side by side never share it; it is removed at session end, and accounts a
  crashed session left behind (their pid is gone) are swept when the next one is created.
* :class:`SshServer` — one sshd listener: :meth:`~SshServer.start`, :meth:`~SshServer.stop`
  (same port, same keys), :meth:`~SshServer.kill_connections` (SIGKILL the per-connection
  processes of *this* listener only; it keeps accepting), :meth:`~SshServer.url`, ...
* :func:`ssh_agent` — an ``ssh-agent`` holding given keys, as a context manager.

Processes are only ever signalled by pid, after checking (``/proc/PID/stat``) that they are
descendants of our own listener and still the same process (start time).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from procs import preexec as _preexec
from procs import proc_stat as _stat
from procs import signal_if_same as _signal
from procs import wait_dead as _wait_dead

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"
#: sshd's privilege separation directory (Debian: created by the init script, not the package)
PRIVSEP_DIR = Path("/run/sshd")
USER_PREFIX = "blockfs-ssh-"
USER_COMMENT = "blockfs throwaway test user"


def need_openssh(*tools: str) -> None:
    """Skip the test when sshd, ssh-keygen (or one of ``tools``) is missing, or not root."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server)")
    for tool in ("ssh-keygen", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install openssh-client)")
    if os.geteuid() != 0:
        pytest.skip("the sshd fixture needs root (sshd privilege separation, useradd)")


def _run(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{list(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def _write_secret(path: Path, text: str) -> Path:
    """Write ``text`` (no trailing newline) to a new file of mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "", fmt: str = "") -> Path:
    """A new key pair at ``path`` / ``path.pub``; returns the private key's path. ``fmt``:
    ssh-keygen's ``-m`` (PKCS8, PEM; ed25519 keys are always in the OpenSSH format)."""
    cmd = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", f"blockfs-test-{path.name}"]
    if kind == "rsa":
        cmd += ["-b", "3072"]
    if fmt:
        cmd += ["-m", fmt]
    _run([*cmd, "-f", str(path)])
    return path


def fingerprints(pub: Path) -> tuple[str, str]:
    """``(sha256, md5)`` of an OpenSSH public key file, as ``ssh-keygen -l`` prints them
    without the ``SHA256:`` / ``MD5:`` prefix (unpadded base64; hex pairs with colons)."""
    out = []
    for algo in ("sha256", "md5"):
        line = _run(["ssh-keygen", "-l", "-E", algo, "-f", str(pub)]).stdout
        out.append(line.split()[1].split(":", 1)[1])  # "256 SHA256:xxxx comment (ED25519)"
    return out[0], out[1]


def fingerprints_of_blob(blob: bytes) -> tuple[str, str]:
    """The same two forms computed from the key blob (an independent check of the above)."""
    sha = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    md5 = ":".join(f"{b:02x}" for b in hashlib.md5(blob).digest())
    return sha, md5


# -- processes ------------------------------------------------------------------------------


def _descendants(root: int, depth: int | None = None) -> list[tuple[int, int]]:
    """``(pid, starttime)`` of every live descendant of ``root`` (down to ``depth``
    generations), parents first."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None and st[0] != "Z":
            children.setdefault(st[1], []).append((int(entry), st[2]))
    out: list[tuple[int, int]] = []
    todo = [(root, 0)]
    while todo:
        parent, level = todo.pop(0)
        if depth is not None and level >= depth:
            continue
        for child in children.get(parent, []):
            out.append(child)
            todo.append((child[0], level + 1))
    return out


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- keys and users -------------------------------------------------------------------------


class SshKeys:
    """The client side's keys, all authorized for root on every server:

    * ``identity``: plain ed25519;
    * ``identity_enc``: ed25519 under ``passphrase``, in the OpenSSH format (bcrypt KDF:
      asyncssh decrypts it only when the ``bcrypt`` package is installed);
    * ``identity_enc_pkcs8``: ECDSA P-256 under the same passphrase as encrypted PKCS#8
      (asyncssh decrypts it with ``cryptography`` alone);
    * ``passphrase_file``: the passphrase, mode 0600, no trailing newline.
    """

    def __init__(self, directory: Path) -> None:
        need_openssh()
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.identity = keygen(directory / "id_ed25519")
        self.passphrase = secrets.token_urlsafe(12)
        self.identity_enc = keygen(directory / "id_ed25519_enc", passphrase=self.passphrase)
        self.identity_enc_pkcs8 = keygen(
            directory / "id_ecdsa_enc_pkcs8", "ecdsa", self.passphrase, fmt="PKCS8"
        )
        self.passphrase_file = _write_secret(directory / "passphrase", self.passphrase)

    @property
    def authorized(self) -> str:
        """``authorized_keys`` lines for all the keys."""
        keys = (self.identity, self.identity_enc, self.identity_enc_pkcs8)
        return "".join(Path(f"{key}.pub").read_text() for key in keys)


class PasswordUser:
    """A throwaway local account ``blockfs-ssh-<pid>`` with a random password.

    ``home`` is a fresh directory under /tmp owned by the user (pytest's own temp dirs are
    0700 root, the user could not reach into them); :meth:`make_dir` gives it more folders.
    """

    def __init__(self, secret_dir: Path) -> None:
        need_openssh()
        for tool in ("useradd", "userdel", "chpasswd"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (passwd)")
        sweep_stale_users()
        self.name = f"{USER_PREFIX}{os.getpid()}"
        with contextlib.suppress(KeyError):  # a dead run's account under our (reused) pid
            pwd.getpwnam(self.name)
            subprocess.run(["userdel", "-f", self.name], capture_output=True)
        self.home = Path(tempfile.mkdtemp(prefix=f"{self.name}-home-"))
        _run(
            ["useradd", "-M", "-d", str(self.home), "-s", "/bin/sh", "-c", USER_COMMENT, self.name]
        )
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        os.chown(self.home, self.uid, self.gid)
        os.chmod(self.home, 0o700)
        self.password = secrets.token_urlsafe(18)
        # chpasswd writes the hash to /etc/shadow and unlocks the account (useradd left "!"):
        # with UsePAM no, sshd checks that hash itself (and refuses locked accounts).
        _run(["chpasswd"], input=f"{self.name}:{self.password}\n")
        secret_dir.mkdir(parents=True, exist_ok=True)
        self.password_file = _write_secret(secret_dir / "password", self.password)
        self._dirs = 0

    def make_dir(self, name: str | None = None) -> Path:
        """A new directory (in the user's home) the user owns and can reach."""
        self._dirs += 1
        path = self.home / (name or f"d{self._dirs}")
        path.mkdir()
        os.chown(path, self.uid, self.gid)
        return path

    def give(self, path: Path) -> Path:
        """chown ``path`` (recursively) to the user. Its parents must be reachable for it."""
        for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.chown(p, self.uid, self.gid, follow_symlinks=False)
        return path

    def remove(self) -> None:
        """Delete the account (``userdel -f``: even while a process of it still runs) and home."""
        subprocess.run(["userdel", "-f", self.name], capture_output=True, timeout=60)
        shutil.rmtree(self.home, ignore_errors=True)


def sweep_stale_users() -> None:
    """Remove ``blockfs-ssh-<pid>`` accounts whose pytest (``pid``) is gone."""
    for entry in pwd.getpwall():
        if not entry.pw_name.startswith(USER_PREFIX) or entry.pw_gecos != USER_COMMENT:
            continue
        pid = entry.pw_name[len(USER_PREFIX) :]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["userdel", "-f", entry.pw_name], capture_output=True, timeout=60)
            if entry.pw_dir.startswith(tempfile.gettempdir() + "/"):
                shutil.rmtree(entry.pw_dir, ignore_errors=True)


# -- the server -----------------------------------------------------------------------------


class SshServer:
    """One OpenSSH sshd on 127.0.0.1:``port`` with its files in ``dir``.

    Attributes: ``host``, ``port``, ``user`` (root), ``identity``, ``identity_enc``,
    ``identity_enc_pkcs8`` (see :class:`SshKeys`), ``passphrase_file``, ``password_user``, ``password``, ``password_file`` (None without a
    :class:`PasswordUser`), ``known_hosts``, ``wrong_known_hosts``, ``host_key`` (ed25519
    private key path), ``fp_sha256``, ``fp_md5`` (of that host key), ``config``, ``log``.
    """

    def __init__(
        self,
        directory: Path,
        keys: SshKeys,
        password_user: PasswordUser | None = None,
        *,
        rsa_host_key: bool = False,
        extra_config: Sequence[str] = (),
    ) -> None:
        need_openssh()
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.keys = keys
        self.host = HOST
        self.user = "root"
        self.identity = keys.identity
        self.identity_enc = keys.identity_enc
        self.identity_enc_pkcs8 = keys.identity_enc_pkcs8
        self.passphrase_file = keys.passphrase_file
        self.pw = password_user
        self.password_user = password_user.name if password_user else None
        self.password = password_user.password if password_user else None
        self.password_file = password_user.password_file if password_user else None
        self.extra_config = list(extra_config)

        self.host_key = keygen(directory / "ssh_host_ed25519_key")
        self.host_keys = [self.host_key]
        if rsa_host_key:
            self.host_keys.append(keygen(directory / "ssh_host_rsa_key", kind="rsa"))
        self.fp_sha256, self.fp_md5 = fingerprints(Path(f"{self.host_key}.pub"))
        # another key claiming to be this host, for host key mismatch tests
        self._impostor = keygen(directory / "impostor_ed25519_key")

        auth_dir = directory / "authorized_keys"
        auth_dir.mkdir()
        (auth_dir / "root").write_text(keys.authorized)
        self.config = directory / "sshd_config"
        self.pid_file = directory / "sshd.pid"
        self.log = directory / "sshd.log"
        self.known_hosts = directory / "known_hosts"
        self.wrong_known_hosts = directory / "known_hosts.wrong"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fd: IO[bytes] | None = None
        self.port = 0
        self._configure(free_port())

    # -- configuration

    def _configure(self, port: int) -> None:
        self.port = port
        lines = [
            f"ListenAddress {HOST}",
            # ::1 too (IPv6 locations), where the loopback has it
            *(["ListenAddress ::1"] if _have_ipv6_loopback() else []),
            f"Port {port}",
            *(f"HostKey {key}" for key in self.host_keys),
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.dir}/authorized_keys/%u",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "PermitEmptyPasswords no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin yes",
            "Subsystem sftp internal-sftp",
            "MaxSessions 64",
            "MaxStartups 64",
            "MaxAuthTries 20",
            "LoginGraceTime 30",
            "ClientAliveInterval 15",
            "ClientAliveCountMax 3",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "LogLevel VERBOSE",
            *self.extra_config,
        ]
        self.config.write_text("\n".join(lines) + "\n")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd -t checks it too
        _run([SSHD, "-t", "-f", str(self.config)])
        name = f"[{HOST}]:{port}"
        good = [Path(f"{key}.pub").read_text().split() for key in self.host_keys]
        bad = Path(f"{self._impostor}.pub").read_text().split()
        self.known_hosts.write_text("".join(f"{name} {k[0]} {k[1]}\n" for k in good))
        self.wrong_known_hosts.write_text(f"{name} {bad[0]} {bad[1]}\n")

    # -- helpers for tests

    def url(self, path: str | os.PathLike[str] = "/", user: str | None = None) -> str:
        """``ssh://USER@127.0.0.1:PORT/path`` (root unless ``user``)."""
        p = os.fspath(path)
        return f"ssh://{user or self.user}@{self.host}:{self.port}{'' if p.startswith('/') else '/'}{p}"

    def ssh_argv(
        self,
        *command: str,
        user: str | None = None,
        identity: Path | None = None,
        known_hosts: Path | None = None,
        options: Sequence[str] = (),
        batch: bool = True,
    ) -> list[str]:
        """An OpenSSH client command line that trusts only ``known_hosts`` (ours by default),
        uses only ``identity`` (the plain key by default), never asks anything (unless not
        ``batch``: then it may ask a passphrase through SSH_ASKPASS)."""
        return [
            "ssh", "-F", "/dev/null", "-p", str(self.port),
            "-i", str(identity or self.identity),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"BatchMode={'yes' if batch else 'no'}",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=5", *options,
            f"{user or self.user}@{self.host}", *command,
        ]  # fmt: skip

    def asyncssh_options(self, **kw: Any) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect``: root with the plain key, our
        known_hosts, no agent; ``kw`` overrides."""
        opts: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "username": self.user,
            "client_keys": [str(self.identity)],
            "known_hosts": str(self.known_hosts),
            "agent_path": None,
            "config": None,
        }
        opts.update(kw)
        return opts

    def agent(self) -> contextlib.AbstractContextManager[Path]:
        """``with server.agent() as sock:`` an ssh-agent holding the plain key."""
        return ssh_agent([self.identity])

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the listener (the same port and keys after a :meth:`stop`) and wait until it
        sends its SSH banner."""
        if self.running:
            raise RuntimeError("sshd is already running")
        first = self._log_fd is None and not self.log.exists()
        for attempt in range(5):
            if self._spawn(timeout):
                return
            # only the very first start may move elsewhere if another process took the port
            if first and attempt < 4 and "Address already in use" in self.log_tail():
                self._configure(free_port())
                continue
            raise RuntimeError(f"sshd did not start on port {self.port}:\n{self.log_tail()}")

    def _spawn(self, timeout: float) -> bool:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        if self._log_fd is None:
            self._log_fd = open(self.log, "ab")
        self._log_fd.write(f"--- starting sshd on {HOST}:{self.port}\n".encode())
        self._log_fd.flush()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fd,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if self._banner():
                break
            time.sleep(0.02)
        else:
            self._terminate()
            raise RuntimeError(f"sshd sent no banner within {timeout} s:\n{self.log_tail()}")
        # let the probe connection's process go, so connection_pids() starts out empty
        end = time.monotonic() + 2
        while self.connection_pids() and time.monotonic() < end:
            time.sleep(0.01)
        return True

    def _banner(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                data = b""
                while b"\n" not in data and len(data) < 256:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
                return data.startswith(b"SSH-2.0-")
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """End the listener (SIGTERM, then SIGKILL) and every connection it started."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._kill_descendants()
        self._terminate(timeout)

    def _terminate(self, timeout: float = 5.0) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._log_fd is not None:
            self._log_fd.close()
            self._log_fd = None

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (direct children of our listener)."""
        if not self.running:
            return []
        assert self.proc is not None
        return [pid for pid, _ in _descendants(self.proc.pid, depth=1)]

    def kill_connections(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process under our listener (each connection's sshd processes and
        what they run), not the listener: live connections drop, new ones are accepted."""
        if not self.running:
            return []
        return self._kill_descendants(timeout)

    def _kill_descendants(self, timeout: float = 5.0) -> list[int]:
        assert self.proc is not None
        listener = self.proc.pid
        killed: list[tuple[int, int]] = []
        # Freeze the listener so it forks no new connection while we collect its tree (a
        # connection arriving meanwhile waits in the backlog and is served after SIGCONT).
        os.kill(listener, signal.SIGSTOP)
        try:
            for _ in range(10):  # a connection process may fork while we kill: go again
                procs = _descendants(listener)
                if not procs:
                    break
                for pid, start in procs:
                    _signal(pid, start, signal.SIGKILL)
                killed += procs
                _wait_dead(procs, timeout)
        finally:
            os.kill(listener, signal.SIGCONT)
        return [pid for pid, _ in killed]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> SshServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- ssh-agent ------------------------------------------------------------------------------


@contextlib.contextmanager
def ssh_agent(identities: Sequence[Path], timeout: float = 10.0) -> Iterator[Path]:
    """Run ``ssh-agent -D`` on a socket in a fresh /tmp directory (short path: sockets are
    limited to 108 bytes), ``ssh-add`` the given unencrypted keys, yield the socket path."""
    need_openssh("ssh-agent", "ssh-add")
    tmp = Path(tempfile.mkdtemp(prefix="blockfs-agent-"))
    sock = tmp / "agent.sock"
    with open(tmp / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(sock)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ssh-agent did not start: {(tmp / 'agent.log').read_text()}")
            time.sleep(0.01)
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_ASKPASS", "DISPLAY")}
        env["SSH_AUTH_SOCK"] = str(sock)
        for key in identities:
            _run(["ssh-add", "-q", str(key)], env=env, stdin=subprocess.DEVNULL)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
