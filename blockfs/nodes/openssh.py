"""OpenSSH's own client as the ssh node's transport: ``ssh -s HOST sftp``.

The daemon speaks SFTP over two pipes to a process that carries the SSH connection (see
:mod:`blockfs.nodes.ssh`). That process is OpenSSH's ``ssh`` where it is installed, asyncssh
in :mod:`blockfs.nodes.ssh_relay` otherwise (or with ``transport=asyncssh``). Measured on the
loopback sshd of the benchmarks (benchmarks/README.md, "The ssh transport"): per 4 KiB request
``ssh`` spends 28 us of CPU where the asyncssh relay spends 62, and 1 MiB writes move 350 MB/s
against 233 (the relay was CPU-bound): the ciphers and packets are C all the way.

Everything a location asks for is said on ``ssh``'s command line, never through a user's
configuration (``-F /dev/null``, as asyncssh was given no config):

- **keys**: ``identity=`` is the only key (``IdentitiesOnly``, no agent); otherwise the agent
  (``SSH_AUTH_SOCK``) and the usual key files in ``~/.ssh``, ``~`` being ``$HOME`` as for the
  asyncssh relay (``ssh`` itself would take the password database's home);
- **secrets** (``identity-passphrase-file=``, ``password-file=``): ``ssh`` asks
  :func:`askpass_main` (``SSH_ASKPASS``, forced), which reads the file named in its
  environment; the secret never passes through a command line or a pipe of ours. A passphrase
  is tried first with ``ssh-keygen -y`` (through the same helper), so that a wrong one is
  named as such rather than as a refused login;
- **host keys**: ``known_hosts`` checks ``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``
  strictly and never writes them (``UpdateHostKeys=no``); a fingerprint pin lets only
  :func:`known_host_main` (``KnownHostsCommand``) vouch for the key, and only for a key with
  that fingerprint; ``none`` accepts any key (a warning);
- **timeouts**: ``ConnectTimeout`` is ``timeout=``; keepalives (``ServerAlive*``) end a
  silent connection after three missed answers, at most a third of ``timeout=`` apart.

Secret and key files are checked before ``ssh`` starts (a regular file, not too large:
a FIFO would hang it), and the whole start is bounded by the caller's deadline. ``ssh``'s
complaints go to a private unlinked file; when it ends before SFTP begins, :func:`refusal`
turns its last words into the one-line error the asyncssh relay gives.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, field

from blockfs.errors import BlockfsError, TransientError, UsageError

#: a secret file is read only if it is this small
MAX_SECRET_FILE = 64 << 10
KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")
#: the key files ``ssh`` would try by default, looked for under ``$HOME/.ssh``
DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_dsa")
#: AES-GCM first: with AES-NI it moves the most data per CPU second (as in the relay)
CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)
#: the helper program ``ssh`` runs as SSH_ASKPASS (pyproject's console script)
HELPER = "blockfs-ssh-askpass"
#: what the helper writes to ``ssh``'s error output when it hands out a secret
ASKED = "blockfs-ssh-askpass: asked for the "
_ENV_PASSPHRASE = "BLOCKFS_SSH_PASSPHRASE_FILE"
_ENV_PASSWORD = "BLOCKFS_SSH_PASSWORD_FILE"
_ENV_FINGERPRINT = "BLOCKFS_SSH_HOST_KEY"


class SecretError(Exception):
    """A secret or key file that cannot be used (the message names it)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def read_small_file(path: str, what: str) -> bytes:
    """The bytes of a small regular file the user named (a key, a passphrase, a password):
    opened once, without blocking (a FIFO would hang the connection forever); anything but a
    regular file (a FIFO, a device) is refused. :raise SecretError:"""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(os.path.expanduser(path), flags)
    except OSError as exc:
        raise SecretError(f"{what} {path}: {exc.strerror}", exc.errno or errno.EIO) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SecretError(f"{what} {path}: not a regular file", errno.EINVAL)
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise SecretError(f"{what} {path}: larger than {MAX_SECRET_FILE} bytes", errno.EINVAL)
    return data


def read_secret(path: str, what: str) -> str:
    """The first line of a small file (a passphrase, a password). :raise SecretError:"""
    data = read_small_file(path, what)
    return data.decode(errors="replace").splitlines()[0] if data.strip() else ""


#: the oldest OpenSSH that takes every option used here (KnownHostsCommand: 8.5)
MIN_VERSION = (8, 5)
_tools: list[tuple[str, str] | None] = []


async def find_tools() -> tuple[str, str] | None:
    """``ssh`` (OpenSSH :data:`MIN_VERSION` or later) and the askpass helper, or None when
    either is missing or too old (then asyncssh). Asked once per process."""
    if not _tools:
        _tools.append(await _find_tools())
    return _tools[0]


async def _find_tools() -> tuple[str, str] | None:
    import trio  # here: the askpass helper, which imports this module, needs no trio

    ssh = shutil.which("ssh")
    beside = os.path.join(os.path.dirname(sys.executable), HELPER)
    helper = beside if os.access(beside, os.X_OK) else shutil.which(HELPER)
    if ssh is None or helper is None or any(c.isspace() or c in "\"'" for c in helper):
        return None
    try:
        with trio.fail_after(10):
            res = await trio.run_process([ssh, "-V"], capture_stdout=True, capture_stderr=True,
                                         check=False, stdin=b"")  # fmt: skip
    except (OSError, trio.TooSlowError):
        return None
    return (ssh, helper) if openssh_version(res.stderr + res.stdout) >= MIN_VERSION else None


def openssh_version(text: bytes) -> tuple[int, int]:
    """(major, minor) from ``ssh -V``'s "OpenSSH_9.2p1 ..."; (0, 0) if it is not OpenSSH."""
    m = re.match(rb"\s*OpenSSH_(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@dataclass
class Launch:
    """How to start ``ssh`` for one location."""

    argv: list[str]
    env: dict[str, str]
    #: the ways to log in that were offered, for the refusal's message
    tried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: ``ssh-keygen -y`` to run first (a passphrase to check), or None
    key_check: list[str] | None = None


def command(
    host: str, port: int, user: str, opts: dict[str, str], timeout: float,
    ssh: str, helper: str,
) -> Launch:  # fmt: skip
    """The ``ssh`` command line and environment for a location's connection.

    :raise SecretError: a key or secret file that cannot be used.
    """
    server = f"{user}@[{host}]:{port}" if ":" in host else f"{user}@{host}:{port}"
    keepalive = max(1, min(15, int(timeout / 3)))
    o = [
        "BatchMode=yes", f"ConnectTimeout={max(1, round(timeout))}",
        f"ServerAliveInterval={keepalive}", "ServerAliveCountMax=3",
        "Ciphers=" + CIPHERS, "LogLevel=ERROR", "ControlMaster=no", "ControlPath=none",
        "CheckHostIP=no", "UpdateHostKeys=no", "ClearAllForwardings=yes",
        "PermitLocalCommand=no", "Compression=no", "VisualHostKey=no",
        "NumberOfPasswordPrompts=1", "HostName=" + host.replace("%", "%%"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SSH_AUTH_SOCK")}
    env.setdefault("PATH", "/usr/bin:/bin")
    launch = Launch([], env)
    asks = False
    if "identity" in opts:
        path = os.path.expanduser(opts["identity"])
        read_small_file(path, f"{server}: identity")
        o += ["IdentityFile=" + path.replace("%", "%%"), "IdentitiesOnly=yes", "IdentityAgent=none"]
        launch.tried.append(f"key {path}")
        if "identity-passphrase-file" in opts:
            secret = opts["identity-passphrase-file"]
            read_secret(secret, f"{server}: passphrase file")
            env[_ENV_PASSPHRASE] = os.path.abspath(os.path.expanduser(secret))
            asks = True
            keygen = shutil.which("ssh-keygen")
            if keygen is not None:
                launch.key_check = [keygen, "-y", "-f", path]
    else:
        if env.get("SSH_AUTH_SOCK"):
            launch.tried.append("agent")
        else:
            env.pop("SSH_AUTH_SOCK", None)
            o.append("IdentityAgent=none")
        home = os.path.expanduser("~/.ssh")
        o += ["IdentityFile=" + os.path.join(home, k).replace("%", "%%") for k in DEFAULT_KEYS]
        launch.tried.append("keys in ~/.ssh")
    if "password-file" in opts:
        secret = opts["password-file"]
        read_secret(secret, f"{server}: password file")
        env[_ENV_PASSWORD] = os.path.abspath(os.path.expanduser(secret))
        launch.tried.append("password")
        asks = True
    else:
        o += ["PasswordAuthentication=no", "KbdInteractiveAuthentication=no"]
    if asks:
        o[0] = "BatchMode=no"  # lets ssh ask the helper
        env.update(SSH_ASKPASS=helper, SSH_ASKPASS_REQUIRE="force")
    check = opts.get("host-key-check", "known_hosts")
    if check == "known_hosts":
        files = [os.path.expanduser(k) for k in KNOWN_HOSTS]
        o += ["StrictHostKeyChecking=yes", "UserKnownHostsFile=" + _quoted(files[0]),
              "GlobalKnownHostsFile=" + _quoted(files[1])]  # fmt: skip
    elif check == "none":
        launch.warnings.append(f"{server}: host key not checked (host-key-check=none)")
        o += ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
              "GlobalKnownHostsFile=/dev/null"]  # fmt: skip
    else:
        kind, _, want = check.partition(":")
        env[_ENV_FINGERPRINT] = want.removeprefix(kind.upper() + ":")
        o += ["StrictHostKeyChecking=yes", "UserKnownHostsFile=/dev/null",
              "GlobalKnownHostsFile=/dev/null", "FingerprintHash=" + kind,
              f"KnownHostsCommand={helper} --known-host %H %t %K %f"]  # fmt: skip
    argv = [ssh, "-F", "/dev/null", "-x", "-a", "-T", "-e", "none", "-p", str(port), "-l", user]
    for opt in o:
        argv += ["-o", opt]
    launch.argv = [*argv, "-s", "--", "blockfs-ssh-host", "sftp"]
    return launch


def _quoted(path: str) -> str:
    """A path for an ssh option that takes several (space-separated, quotes allowed)."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def last_complaint(text: str, default: str) -> str:
    """The last line ``ssh`` (or ``ssh-keygen``) wrote on its error output, the askpass
    helper's own notes left out; ``default`` if there is none."""
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith(ASKED)
    ]
    return lines[-1][:200] if lines else default


def refusal(server: str, check: str, text: str, launch: Launch) -> BlockfsError:
    """The one-line error for an ``ssh`` that ended before SFTP began (``text``: what it
    wrote on its error output)."""
    low = text.lower()
    last = last_complaint(text, "ssh ended")
    if "permission denied" in low or "too many authentication failures" in low:
        return UsageError(
            f"{server}: authentication failed (tried: {', '.join(launch.tried)})",
            errno=errno.EACCES,
        )
    if "host key verification failed" in low:
        if "has changed" in low:
            why = "the key changed"
        elif check.startswith(("sha256:", "md5:")):
            why = "another fingerprint"
        else:
            why = "not in known_hosts"
        return UsageError(
            f"{server}: host key not trusted ({why}; host-key-check={check})", errno=errno.EACCES
        )
    if "unprotected private key" in low or "bad permissions" in low:
        return UsageError(f"{server}: identity readable by others: ssh refuses it ({last})",
                          errno=errno.EACCES)  # fmt: skip
    if "subsystem request failed" in low:
        return TransientError(f"{server}: no sftp session ({last})", errno=errno.EPROTO,
                              reached=False)  # fmt: skip
    for words, code in (
        ("connection refused", errno.ECONNREFUSED), ("timed out", errno.ETIMEDOUT),
        ("no route to host", errno.EHOSTUNREACH), ("network is unreachable", errno.ENETUNREACH),
        ("could not resolve", errno.EHOSTUNREACH), ("connection reset", errno.ECONNRESET),
    ):  # fmt: skip
        if words in low:
            return TransientError(f"{server}: cannot connect: {last}", errno=code, reached=False)
    return TransientError(f"{server}: cannot connect: {last}", errno=errno.EIO, reached=False)


# -- the helper ssh runs ----------------------------------------------------------------------


def askpass_main() -> int:
    """``blockfs-ssh-askpass PROMPT`` (ssh's SSH_ASKPASS): the passphrase or the password,
    from the file the daemon named in the environment; ``--known-host HOST TYPE KEY FP``
    (ssh's KnownHostsCommand): a known_hosts line for the key if its fingerprint is the
    pinned one. Anything else (a question to confirm) is answered no."""
    args = sys.argv[1:]
    if len(args) >= 1 and args[0] == "--known-host":
        return _known_host(args[1:])
    if len(args) != 1:
        return 1
    prompt = args[0].lower()
    if "passphrase" in prompt:
        kind, var = "passphrase", _ENV_PASSPHRASE
    elif "password" in prompt:
        kind, var = "password", _ENV_PASSWORD
    else:
        return 1
    path = os.environ.get(var)
    if not path:
        return 1
    try:
        secret = read_secret(path, f"{kind} file")
    except SecretError as exc:
        print(f"blockfs-ssh-askpass: {exc}", file=sys.stderr)
        return 1
    print(ASKED + kind, file=sys.stderr)
    sys.stdout.write(secret + "\n")
    return 0


def _known_host(args: list[str]) -> int:
    want = os.environ.get(_ENV_FINGERPRINT, "")
    if len(args) != 4 or not want:
        return 0  # nothing vouched for: ssh's strict check refuses the key
    host, kind, key, fingerprint = args
    got = fingerprint.partition(":")[2]
    if fingerprint.upper().startswith("MD5:"):  # hex pairs: either case
        got, want = got.lower(), want.lower()
    if key and kind and got and got.rstrip("=") == want.rstrip("="):
        sys.stdout.write(f"{host} {kind} {key}\n")
    return 0


if __name__ == "__main__":
    sys.exit(askpass_main())
