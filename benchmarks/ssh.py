"""The ssh lines: one raw image on a loopback OpenSSH sshd, reached three ways.

* blockfs mounting ``ssh://root@127.0.0.1:PORT/PATH?identity=KEY&host-key-check=sha256:FP``
  (``format=raw``): SFTP spoken by the daemon, the connection carried by OpenSSH's ``ssh`` (the
  default transport; ``BLOCKFS_BENCH_SSH_TRANSPORT=asyncssh`` measures the asyncssh relay);
* qemu-storage-daemon exporting over FUSE a ``driver=raw`` node over a ``driver=ssh`` node
  (QEMU's ssh driver, libssh, SFTP), authenticated through an ssh-agent holding the key;
* sshfs mounting the image's folder (OpenSSH's ``ssh`` client, SFTP), the file inside.

The sshd is the tests' fixture (``tests/sshd.py``: throwaway keys, ``sshd -D`` on 127.0.0.1, a
free port, its files in a scratch folder), loaded from its file: one server, one set of keys,
the same for the three sides. Each exposure is a context manager with ``side``, ``path`` (the
file fio runs on) and ``pid``; a side that cannot come up raises
:class:`~benchmarks.exposures.ExposureError` with why, and its lines are "n/a".
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import mmap
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Self

from benchmarks.exposures import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    ExposureError,
    QsdExport,
    _lazy_unmount,
    end_process,
    first_line,
    is_mounted,
    load_fixture,
)
from benchmarks.fio import FIO_JOBS, FioJob

#: the tests' sshd fixture
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "sshd.py"
#: the three sides of an ssh line, in the order they run
SIDES = ("blockfs", "qemu", "sshfs")
#: the fio jobs of the ssh lines: 1 MiB sequential at iodepth 4, 4 KiB random at iodepth 16
SSH_JOBS: tuple[FioJob, ...] = tuple(
    j
    for j in FIO_JOBS
    if j.name in ("seq read 1M qd4", "seq write 1M qd4", "rand read 4k qd16", "rand write 4k qd16")
)
#: what fio adds on a file that refuses O_DIRECT: buffered I/O, the page cache dropped before
#: the job (``invalidate``) and the written data flushed to the server before it ends
BUFFERED_ARGS = ("--direct=0", "--invalidate=1", "--end_fsync=1")


def ssh_specs() -> list[tuple[str, str, str]]:
    """(name, unit, better) of the ssh lines."""
    return [(f"ssh raw {j.name}", j.figure, j.better) for j in SSH_JOBS]


class SshUnavailable(RuntimeError):
    """The loopback sshd could not be started; the message says why (every ssh line is n/a)."""


def _fixture() -> ModuleType:
    return load_fixture(FIXTURE, SshUnavailable)


class SshSite:
    """A loopback sshd serving ``image`` (a local raw file, reached by its own path), the client
    key and a ``known_hosts`` file for it, and an ssh-agent holding the key (qemu's ssh driver
    authenticates with an agent only). An agent that does not start leaves ``agent_socket``
    None and ``agent_error`` set: then only the qemu side is n/a.
    """

    def __init__(self, folder: str, image: str) -> None:
        self.folder = Path(folder)
        self.image = image
        self.host = "127.0.0.1"
        self.user = "root"
        self.port = 0
        self.identity = ""
        self.known_hosts = ""
        self.fp_sha256 = ""  # unpadded base64, as ssh-keygen -l shows it
        self.sshd_pid = 0
        self.agent_socket: str | None = None
        self.agent_error = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise SshUnavailable("the loopback sshd needs root (privilege separation)")
        for tool in ("/usr/sbin/sshd", "ssh-keygen", "ssh"):
            if shutil.which(tool) is None:
                raise SshUnavailable(f"{tool} is not installed (make setup installs openssh)")
        fixture = _fixture()
        try:
            keys = fixture.SshKeys(self.folder / "keys")
            server = self._stack.enter_context(fixture.SshServer(self.folder / "sshd", keys))
        except (KeyboardInterrupt, SystemExit):
            self._stack.close()
            raise
        except BaseException as exc:  # pytest's skip (a BaseException) when openssh is missing
            self._stack.close()
            raise SshUnavailable(f"the loopback sshd did not start: {first_line(exc)}") from None
        self.port = int(server.port)
        self.identity = str(keys.identity)
        self.known_hosts = str(server.known_hosts)
        self.fp_sha256 = str(server.fp_sha256)
        self.sshd_pid = server.proc.pid if server.proc is not None else 0
        try:
            sock = self._stack.enter_context(fixture.ssh_agent([keys.identity]))
            self.agent_socket = str(sock)
        except (KeyboardInterrupt, SystemExit):
            self._stack.close()
            raise
        except BaseException as exc:
            self.agent_error = f"ssh-agent: {first_line(exc)}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def fp_sha256_hex(self) -> str:
        """The host key's SHA-256, in hex (qemu's ``host-key-check`` hash)."""
        fp = self.fp_sha256
        return base64.b64decode(fp + "=" * (-len(fp) % 4)).hex()

    def blockfs_location(self) -> str:
        """The image's ``ssh://`` location for blockfs: the key, the host key's fingerprint."""
        props = {"identity": self.identity, "host-key-check": f"sha256:{self.fp_sha256}"}
        transport = os.environ.get("BLOCKFS_BENCH_SSH_TRANSPORT")
        if transport:
            props["transport"] = transport
        query = urllib.parse.urlencode(props, safe="/:")
        path = urllib.parse.quote(self.image, safe="/")
        return f"ssh://{self.user}@{self.host}:{self.port}{path}?{query}"


class QsdSshExport(QsdExport):
    """qemu-storage-daemon: ``driver=raw`` over ``driver=ssh`` (the agent, the host key's hash),
    exported over FUSE as :class:`QsdExport` does with a local file."""

    def __init__(self, site: SshSite, workdir: str) -> None:
        super().__init__(site.image, "raw", workdir)
        self.site = site

    def __enter__(self) -> Self:
        if self.site.agent_socket is None:
            raise ExposureError(f"qemu's ssh driver needs an agent: {self.site.agent_error}")
        self.env = {**os.environ, "SSH_AUTH_SOCK": self.site.agent_socket}
        return super().__enter__()

    def blockdevs(self) -> list[str]:
        site = self.site
        ssh = {
            "driver": "ssh",
            "node-name": "file0",
            "server": {"host": site.host, "port": str(site.port)},
            "path": site.image,
            "user": site.user,
            "host-key-check": {"mode": "hash", "type": "sha256", "hash": site.fp_sha256_hex},
        }
        return [json.dumps(ssh), "driver=raw,node-name=fmt0,file=file0"]


class SshfsMount:
    """``sshfs -f`` of the image's folder (the key, our known_hosts, strict host key checking,
    no agent, no ssh_config); the file is MNT/NAME. ``direct`` tells whether the file takes
    O_DIRECT (probed once mounted); fio runs buffered with :data:`BUFFERED_ARGS` if not."""

    side = "sshfs"

    def __init__(self, site: SshSite, workdir: str) -> None:
        self.site = site
        self.mountpoint = os.path.join(workdir, "sshfs-mnt")
        self.path = os.path.join(self.mountpoint, os.path.basename(site.image))
        self.log = os.path.join(workdir, "sshfs.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.direct = True
        self.direct_error = ""

    def argv(self) -> list[str]:
        site = self.site
        options = [
            f"IdentityFile={site.identity}",
            "IdentitiesOnly=yes",
            f"UserKnownHostsFile={site.known_hosts}",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            f"port={site.port}",
        ]
        remote = f"{site.user}@{site.host}:{os.path.dirname(site.image)}"
        return ["sshfs", "-f", "-F", "/dev/null", "-o", ",".join(options), remote, self.mountpoint]

    def __enter__(self) -> Self:
        if shutil.which("sshfs") is None:
            raise ExposureError("sshfs is not installed (apt-get install sshfs; make setup)")
        os.makedirs(self.mountpoint, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}  # the key file only
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        self.pid = self.proc.pid
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (is_mounted(self.mountpoint) and os.path.exists(self.path)):
                if self.proc.poll() is not None:
                    raise ExposureError(f"sshfs exited {self.proc.returncode}: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise ExposureError("sshfs did not mount in time")
                time.sleep(0.02)
            self.direct, self.direct_error = _takes_o_direct(self.path)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " ".join(f.read().strip().splitlines()[-3:]) or "no message"
        except OSError:
            return "no message"

    def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if is_mounted(self.mountpoint):  # sshfs -f exits once unmounted
            subprocess.run(
                ["fusermount3", "-u", self.mountpoint], capture_output=True, timeout=60, check=False
            )
        end_process(proc, STOP_TIMEOUT / 4)
        _lazy_unmount(self.mountpoint)
        self.proc = None


def _takes_o_direct(path: str) -> tuple[bool, str]:
    """Whether ``path`` opens with O_DIRECT and reads 4 KiB so (an aligned buffer); if not,
    why."""
    buf = mmap.mmap(-1, 4096)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False, f"O_DIRECT refused ({os.strerror(exc.errno)})"
        raise
    finally:
        buf.close()
    return True, ""
