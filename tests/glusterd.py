"""A real GlusterFS server for the tests of the gluster node: glusterd in a network namespace.

glusterd refuses bricks on loopback addresses, so the server lives in a network namespace of
its own (``blockfs-gluster-<pid>-<n>``), joined to the root namespace by a veth pair on a
random /30 of the benchmark range 198.18.0.0/15: the namespace side (:attr:`GlusterServer.host`)
is what clients use in ``gluster://HOST/VOL/PATH``, the root side is the client's address.
Tests reach nothing else.

Everything is throwaway and lives in one temporary directory::

    glusterd.vol   our volfile (working-directory, run-directory, logging-directory,
                   glusterd-sockfile all point below)
    work/          glusterd's state (normally /var/lib/glusterd)
    run/           pid files, glusterd.socket (the CLI's socket), the bricks' unix sockets
    log/           glusterd.log, cli.log, bricks/*.log, glustershd.log, glfsheal-VOL.log
    bricks/VOL/bN  the bricks

glusterd 10 still writes a few hard-coded paths whatever its volfile says (the bricks' and the
self-heal daemon's unix sockets in /var/run/gluster, /var/lib/glusterd/ss_brick and
geo-replication/, glfsheal's log in /var/log/glusterfs). So glusterd runs in a private mount
namespace too (``unshare --mount``) where those three directories are bind mounts of ``run/``,
``work/`` and ``log/``: the processes it spawns (bricks, glustershd) inherit it, nothing lands
on the real ones, and a system glusterd (its socket, its state, its ports) is never touched.
That mount namespace holds no persistent mount: it vanishes with its last process. In it,
gsyncd (geo-replication's helper, run ~15 times by glusterd at start: 1.7 s, and once by every
CLI call) is replaced by a stub that only answers ``--version``: geo-replication is off.

* :func:`need_gluster` — skip unless root, glusterd installed and ``ip netns add`` works.
* :class:`GlusterServer` — the namespace, the veth pair and one glusterd; a context manager.
  :meth:`~GlusterServer.start` / :meth:`~GlusterServer.stop` the management daemon alone,
  :meth:`~GlusterServer.cli` (``gluster --mode=script`` on our socket),
  :meth:`~GlusterServer.create_volume`, :meth:`~GlusterServer.pids_in_namespace`, ...
* :class:`Volume` — :meth:`~Volume.url`, :meth:`~Volume.start` / :meth:`~Volume.stop`,
  :meth:`~Volume.brick_pids`, :meth:`~Volume.kill_brick`, :meth:`~Volume.start_bricks`,
  :meth:`~Volume.heal_info`, :meth:`~Volume.wait_healed`, :meth:`~Volume.local_path`.

Processes are only ever signalled by pid, after checking that they are still the process we
saw (``/proc/PID/stat`` start time); the ones we did not spawn ourselves (glusterd's bricks and
daemons) are found by their network namespace: everything in ours is ours. Namespaces a crashed
session left behind (their pid is gone) are swept when the next server is created.

A client cost to know of: libgfapi 10.3's ``glfs_fini`` waits for the RPC layer's 10 s
call-bail timer (gluster issues #2606, #3334), so every qemu-img/qemu-io run on ``gluster://``
lasts ~10 s whatever it does, twice that for ``qemu-img create -f qcow2`` (two connections).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest
from procs import preexec as _preexec
from procs import proc_stat as _stat
from procs import signal_if_same as _signal
from procs import wait_dead as _wait_dead

NETNS_PREFIX = "blockfs-gluster-"
NETNS_DIR = Path("/run/netns")
VETH_PREFIX = "bgl"
#: the benchmark range (RFC 2544): never routed, so nothing outside can be reached by mistake
NETWORK = ipaddress.ip_network("198.18.0.0/15")
GLUSTERD_PORT = 24007
#: directories glusterd and its children write to whatever their volfile says, and which our
#: private mount namespace covers with bind mounts: (path, our subdirectory)
SYSTEM_DIRS = (
    ("/var/run/gluster", "run"),
    ("/var/lib/glusterd", "work"),
    ("/var/log/glusterfs", "log"),
)
#: the volume options set on every new volume (none is needed for qemu as root: gluster 10
#: already defaults to server.allow-insecure on, auth.allow *)
DEFAULT_OPTIONS: Mapping[str, str] = {}

#: Stands in for gsyncd (geo-replication's python helper) in our mount namespaces when
#: ``stub_gsyncd``: glusterd runs it ~15 times at start (~1.7 s) and the CLI once per call.
GSYNCD_STUB = """#!/bin/sh
# blockfs test fixture: geo-replication is disabled in this glusterd's mount namespace
[ "$1" = --version ] && echo "gsyncd.py (blockfs fixture stub)"
exit 0
"""

_VOLNAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NETNS_NAME = re.compile(rf"^{re.escape(NETNS_PREFIX)}(\d+)-(\w+)$")
_VETH_NAME = re.compile(rf"^{VETH_PREFIX}(\d+)-\d+[hn]$")
_ids = itertools.count()
#: namespaces made by this process (a leftover with our pid but not in here is a stale one)
_OWN_NETNS: set[str] = set()
_probe_result: str | None = None


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def need_gluster() -> None:
    """Skip the test unless the machine can run the server: root, glusterd (and gluster,
    glusterfsd), the ``ip``/``nsenter``/``unshare``/``mount`` tools, and ``ip netns add``."""
    if os.geteuid() != 0:
        pytest.skip("the glusterd fixture needs root (network namespaces, glusterd)")
    for tool, package in (
        ("glusterd", "glusterfs-server"),
        ("glusterfsd", "glusterfs-server"),
        ("gluster", "glusterfs-cli"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("mount", "mount"),
    ):
        if _tool(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")
    reason = _probe_netns()
    if reason:
        pytest.skip(f"network namespaces are not available: {reason}")


def _probe_netns() -> str:
    """'' if ``ip netns add`` works here (tried once per process), else why not."""
    global _probe_result
    if _probe_result is None:
        name = f"{NETNS_PREFIX}{os.getpid()}-probe"
        _OWN_NETNS.add(name)
        res = _ip("netns", "add", name, check=False)
        if res.returncode == 0:
            _ip("netns", "del", name, check=False)
            _probe_result = ""
        else:
            _probe_result = f"`ip netns add` failed: {res.stderr.strip()}"
    return _probe_result


class GlusterError(RuntimeError):
    """A gluster command or the server itself failed (the message has the details)."""


def _run(
    cmd: Sequence[str], *, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        raise GlusterError(
            f"{list(cmd)} exited {res.returncode}: {(res.stderr or res.stdout).strip()}"
        )
    return res


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([_tool("ip") or "ip", *args], timeout=30, check=check)


# -- processes ------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def _ns_key(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The identity of a namespace file (``/proc/PID/ns/net``, ``/run/netns/NAME``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(ns_file: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """``(pid, starttime)`` of every live process whose network namespace is ``ns_file``."""
    key = _ns_key(ns_file)
    if key is None:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if _ns_key(f"/proc/{pid}/ns/net") != key:  # zombies have no namespace links left
            continue
        st = _stat(pid)
        if st is not None and st[0] != "Z":
            out.append((pid, st[2]))
    return out


def _kill_all(ns_file: str | os.PathLike[str], timeout: float) -> list[tuple[int, int]]:
    """SIGTERM every process in the namespace, SIGKILL what is left after ``timeout``; a few
    rounds in case one spawns another meanwhile. Returns the survivors (should be none)."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        procs = _pids_in(ns_file)
        if not procs:
            return []
        for pid, start in procs:
            _signal(pid, start, sig)
        _wait_dead(procs, timeout)
    return _pids_in(ns_file)


# -- namespaces -----------------------------------------------------------------------------


def _netns_names() -> list[str]:
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _remove_netns(name: str, timeout: float = 5.0) -> bool:
    """Kill everything in namespace ``name`` and delete it; False if a process survived."""
    path = NETNS_DIR / name
    if _kill_all(path, timeout):
        return False
    _ip("netns", "del", name, check=False)
    return not path.exists()


def _stale(name: str) -> bool:
    """Whether ``blockfs-gluster-<pid>-<n>`` belongs to a dead session: its pytest (``pid``)
    is gone, or it carries our own pid but this process did not make it (pid reused)."""
    m = _NETNS_NAME.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return name not in _OWN_NETNS
    return not Path(f"/proc/{pid}").exists()


def sweep_stale_namespaces() -> list[str]:
    """Remove what dead sessions left: their ``blockfs-gluster-<pid>-<n>`` namespaces (after
    killing what runs in them), the host ends of their veth pairs, their temporary
    directories. Returns the names of the namespaces removed."""
    swept = []
    for name in _netns_names():
        if _stale(name):
            _remove_netns(name)
            swept.append(name)
    res = _ip("-j", "link", "show", check=False)
    with contextlib.suppress(ValueError):
        for link in json.loads(res.stdout or "[]"):
            m = _VETH_NAME.match(str(link.get("ifname", "")))
            if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
                _ip("link", "del", link["ifname"], check=False)
    alive = set(_netns_names())  # a namespace whose processes survived keeps its directory
    for base in {Path(tempfile.gettempdir()), Path("/tmp")}:
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                netns = entry.name.rsplit("-", 1)[0]
                if (
                    entry.is_dir()
                    and not entry.is_symlink()
                    and _stale(netns)
                    and netns not in alive
                ):
                    shutil.rmtree(entry, ignore_errors=True)
    return swept


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on an interface or in a route of the root namespace."""
    nets: list[ipaddress.IPv4Network] = []
    with contextlib.suppress(ValueError, KeyError):
        for link in json.loads(_ip("-j", "-4", "addr", "show", check=False).stdout or "[]"):
            for a in link.get("addr_info", []):
                nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    with contextlib.suppress(ValueError, KeyError):
        for route in json.loads(
            _ip("-j", "-4", "route", "show", "table", "all", check=False).stdout or "[]"
        ):
            dst = route.get("dst", "")
            if dst and dst != "default":
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A random /30 of 198.18.0.0/15 that overlaps nothing the root namespace knows."""
    used = _used_networks()
    blocks = NETWORK.num_addresses // 4
    for _ in range(100):
        net = ipaddress.IPv4Network(
            (int(NETWORK.network_address) + 4 * random.randrange(blocks), 30)
        )
        if not any(net.overlaps(u) for u in used):
            return net
    raise GlusterError("no free /30 in 198.18.0.0/15")


# -- the server -----------------------------------------------------------------------------


class GlusterServer:
    """One glusterd in its own network namespace, with its files in a temporary directory.

    ``with GlusterServer() as server:`` sets up the namespace and starts glusterd; leaving the
    block stops and deletes every volume, stops glusterd, kills every process left in the
    namespace, deletes the namespace and the veth pair and removes the directory.

    Attributes: ``host`` (namespace side address, for ``gluster://HOST/...``), ``client_address``
    (the root namespace side), ``netns`` (its name), ``netns_path``, ``dir``, ``work_dir``,
    ``run_dir``, ``log_dir``, ``brick_root``, ``socket`` (glusterd's CLI socket), ``volfile``,
    ``log`` (glusterd.log), ``volumes`` (name -> :class:`Volume`), ``proc`` (glusterd's Popen).
    """

    def __init__(self, *, log_level: str = "INFO", stub_gsyncd: bool = True) -> None:
        need_gluster()
        self.id = next(_ids)
        self.netns = f"{NETNS_PREFIX}{os.getpid()}-{self.id}"
        self.netns_path = NETNS_DIR / self.netns
        _OWN_NETNS.add(self.netns)
        self.veth_host = f"{VETH_PREFIX}{os.getpid()}-{self.id}h"
        self.veth_ns = f"{VETH_PREFIX}{os.getpid()}-{self.id}n"
        self.log_level = log_level
        self.stub_gsyncd = stub_gsyncd
        self.dir: Path | None = None
        self.host = ""
        self.client_address = ""
        self.volumes: dict[str, Volume] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._out_fd: IO[bytes] | None = None
        self._network = False
        self.cleanup_errors: list[str] = []

    # -- paths (valid once open)

    def _path(self, *parts: str) -> Path:
        if self.dir is None:
            raise GlusterError("the server is not open")
        return self.dir.joinpath(*parts)

    @property
    def work_dir(self) -> Path:
        return self._path("work")

    @property
    def run_dir(self) -> Path:
        return self._path("run")

    @property
    def log_dir(self) -> Path:
        return self._path("log")

    @property
    def brick_root(self) -> Path:
        return self._path("bricks")

    @property
    def socket(self) -> Path:
        return self._path("run", "glusterd.socket")

    @property
    def volfile(self) -> Path:
        return self._path("glusterd.vol")

    @property
    def log(self) -> Path:
        return self._path("log", "glusterd.log")

    # -- lifecycle

    def open(self) -> GlusterServer:
        """Make the directory, the namespace and the veth pair, and start glusterd."""
        if self.dir is not None:
            raise GlusterError("the server is already open")
        try:
            sweep_stale_namespaces()
            # under /tmp unless TMPDIR is short: unix socket paths are limited to 108 bytes
            base = tempfile.gettempdir()
            if len(base) > 40:
                base = "/tmp"
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.netns}-", dir=base))
            # no stub where it could not run, or where there is no gsyncd to stand in for
            if os.statvfs(self.dir).f_flag & os.ST_NOEXEC or not (_libexec() / "gsyncd").exists():
                self.stub_gsyncd = False
            for sub in ("work", "run", "log", "bricks"):
                (self.dir / sub).mkdir()
            self._setup_network()
            self._write_volfile()
            self.start()
        except BaseException:
            self.close(check=False)
            raise
        return self

    def _setup_network(self) -> None:
        if self.netns in _netns_names():  # a dead session's, under our reused pid
            _remove_netns(self.netns)
        res = _ip("netns", "add", self.netns, check=False)
        if res.returncode != 0:
            pytest.skip(f"`ip netns add` failed: {res.stderr.strip()}")
        self._network = True
        for name in (self.veth_host, self.veth_ns):  # left by a dead session under our pid
            if Path(f"/sys/class/net/{name}").exists():
                _ip("link", "del", name, check=False)
        net = _pick_subnet()
        client, host = list(net.hosts())
        self.client_address, self.host = str(client), str(host)
        ns = ["-n", self.netns]
        _ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        _ip("link", "set", self.veth_ns, "netns", self.netns)
        _ip("addr", "add", f"{client}/30", "dev", self.veth_host)
        _ip("link", "set", self.veth_host, "up")
        _ip(*ns, "addr", "add", f"{host}/30", "dev", self.veth_ns)
        _ip(*ns, "link", "set", self.veth_ns, "up")
        _ip(*ns, "link", "set", "lo", "up")

    def _write_volfile(self) -> None:
        self.volfile.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.work_dir}\n"
            f"    option run-directory {self.run_dir}\n"
            f"    option logging-directory {self.log_dir}\n"
            f"    option glusterd-sockfile {self.socket}\n"
            "    option transport-type socket\n"
            "    option transport.address-family inet\n"
            "    option transport.socket.keepalive-time 10\n"
            "    option transport.socket.keepalive-interval 2\n"
            "    option transport.socket.read-fail-log off\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n"
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """glusterd's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.running else None

    def _wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in a fresh private mount namespace with our bind mounts over
        :data:`SYSTEM_DIRS`, and in our network namespace: unshare -> sh (the mounts) ->
        nsenter -> argv, each exec'ing the next, so a Popen's pid is that of ``argv``."""
        binds: list[str] = []
        for system_dir, ours in SYSTEM_DIRS:
            target = os.path.realpath(system_dir)
            if os.path.isdir(target):
                binds += [str(self._path(ours)), target]
        if self.stub_gsyncd:
            binds += [str(self._gsyncd_stub()), str(_libexec() / "gsyncd")]
        script = (
            'set -e; while [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done; shift; '
            'exec "$@"'
        )
        return [
            _tool("unshare") or "unshare", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", script, "sh", *binds, "--",
            _tool("nsenter") or "nsenter", f"--net={self.netns_path}", "--", *argv,
        ]  # fmt: skip

    def _gsyncd_stub(self) -> Path:
        stub = self._path("gsyncd-stub")
        if not stub.exists():
            stub.write_text(GSYNCD_STUB)
            stub.chmod(0o755)
        return stub

    def _glusterd_argv(self) -> list[str]:
        return self._wrap(
            [
                _tool("glusterd") or "glusterd", "-N", "-f", str(self.volfile),
                "-l", str(self.log), "-L", self.log_level,
                "-p", str(self.run_dir / "glusterd.pid"),
            ]
        )  # fmt: skip

    def start(self, timeout: float = 20.0) -> None:
        """Start glusterd (after a :meth:`stop`: with the same state, it restarts the bricks
        of started volumes that are not running) and wait until it answers the CLI on its
        socket and accepts TCP connections on HOST:24007 from the root namespace."""
        if self.running:
            raise GlusterError("glusterd is already running")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a stale one from a killed glusterd
        if self._out_fd is None:
            self._out_fd = open(self.log_dir / "glusterd.out", "ab")
        self.proc = subprocess.Popen(
            self._glusterd_argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._out_fd,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(),
        )
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise GlusterError(f"glusterd exited {code} at start:\n{self.log_tail(30)}")
            if self.socket.exists():
                res = self.cli("volume", "list", timeout=10)
                last = (res.stderr or res.stdout).strip()
                if res.returncode == 0 and self._tcp_ready():
                    return
            if time.monotonic() > deadline:
                self._terminate()
                raise GlusterError(
                    f"glusterd did not become ready within {timeout} s ({last}):\n"
                    f"{self.log_tail(30)}"
                )
            time.sleep(0.05)

    def _tcp_ready(self) -> bool:
        try:
            with socket.create_connection((self.host, GLUSTERD_PORT), timeout=2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop glusterd alone (SIGTERM, SIGKILL after ``timeout``): like stopping the
        management service, the bricks (and glustershd) keep running and serving I/O."""
        self._terminate(timeout)

    def _terminate(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def close(self, *, check: bool = True) -> None:
        """Tear everything down (see the class doc). Every step runs even if one fails; then,
        with ``check``, raise :class:`GlusterError` if something could not be cleaned."""
        errors = self.cleanup_errors
        if self.running:
            # glusterd stops bricks one by one, waiting ~1 s each: SIGTERM them all first (what
            # glusterd sends too), then `volume stop force` finds them gone and is quick
            # (except after a glusterd restart: then it still waits ~1 s per brick)
            procs = [
                p for v in self.volumes.values() for p in map(self._process_of, v.brick_pids()) if p
            ]
            for proc in procs:
                _signal(*proc, signal.SIGTERM)
            _wait_dead(procs, 5.0)
            for vol in reversed(list(self.volumes.values())):
                try:
                    vol.stop(check=False)
                    vol.delete()
                except Exception as e:  # keep tearing down
                    errors.append(f"volume {vol.name}: {e}")
        with contextlib.suppress(Exception):
            self._terminate()
        if self._out_fd is not None:
            self._out_fd.close()
            self._out_fd = None
        if self._network:
            if self.netns_path.exists():
                survivors = _kill_all(self.netns_path, 5.0)
                if survivors:
                    # keep the namespace: sweep_stale_namespaces() retries once we are gone
                    errors.append(f"processes survived SIGKILL in {self.netns}: {survivors}")
                else:
                    _ip("netns", "del", self.netns, check=False)
                    if self.netns_path.exists():
                        errors.append(f"`ip netns del {self.netns}` left {self.netns_path}")
            if Path(f"/sys/class/net/{self.veth_host}").exists():
                _ip("link", "del", self.veth_host, check=False)
            self._network = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.exists():
                errors.append(f"could not remove {self.dir}")
            self.dir = None
        self.volumes.clear()
        if check and errors:
            raise GlusterError("glusterd fixture cleanup: " + "; ".join(errors))

    def __enter__(self) -> GlusterServer:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    # -- processes

    def pids_in_namespace(self) -> list[int]:
        """Every live process in our network namespace: glusterd, the bricks, glustershd,
        and any CLI or glfsheal call in flight."""
        if not self._network:
            return []
        return [pid for pid, _ in _pids_in(self.netns_path)]

    def _process_of(self, pid: int) -> tuple[int, int] | None:
        """``(pid, starttime)`` if ``pid`` lives in our namespace."""
        st = _stat(pid)
        if st is None or st[0] == "Z":
            return None
        if not self._network or _ns_key(f"/proc/{pid}/ns/net") != _ns_key(self.netns_path):
            return None
        return pid, st[2]

    # -- the CLI

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``gluster --mode=script --glusterd-sock=OURS --log-file=log/cli.log ARGS`` in our
        network namespace (so "localhost" there is our glusterd) and, like glusterd, in a
        private mount namespace (every CLI call runs ``gsyncd --version``, which writes
        /var/lib/glusterd/geo-replication/). Never raises on a non-zero exit: see
        :meth:`cli_ok`."""
        cmd = self._wrap(
            [
                _tool("gluster") or "gluster", "--mode=script", f"--glusterd-sock={self.socket}",
                f"--log-file={self.log_dir / 'cli.log'}", f"--timeout={max(int(timeout), 1)}",
                *args,
            ]
        )  # fmt: skip
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL
        )

    def cli_ok(self, *args: str, timeout: float = 60) -> str:
        """:meth:`cli` that raises :class:`GlusterError` (with glusterd's log) on failure;
        returns stdout."""
        res = self.cli(*args, timeout=timeout)
        if res.returncode != 0:
            raise GlusterError(
                f"gluster {' '.join(args)} exited {res.returncode}: "
                f"{(res.stderr + res.stdout).strip()}\n--- glusterd.log:\n{self.log_tail()}"
            )
        return res.stdout

    def cli_xml(self, *args: str, timeout: float = 60) -> ET.Element:
        """``gluster ARGS --xml``, parsed; raises if the command failed (``opRet`` != 0)."""
        root = ET.fromstring(self.cli_ok(*args, "--xml", timeout=timeout))
        if root.findtext("opRet", "-1") != "0":
            raise GlusterError(f"gluster {' '.join(args)}: {root.findtext('opErrstr')}")
        return root

    # -- volumes

    def create_volume(
        self,
        name: str,
        replica: int = 1,
        bricks: int = 1,
        start: bool = True,
        options: Mapping[str, str] | None = None,
    ) -> Volume:
        """``gluster volume create NAME [replica N] HOST:BRICK... force`` on fresh brick
        directories ``bricks/NAME/b0``... (``force``: they are on the root filesystem, and
        replicas share one server), set ``options``, and start it unless not ``start``."""
        if not _VOLNAME.match(name):
            raise ValueError(f"bad volume name {name!r}")
        if name in self.volumes:
            raise GlusterError(f"volume {name} already exists")
        if replica < 1 or bricks < replica or bricks % replica:
            raise ValueError(f"{bricks} bricks cannot make replica {replica} sets")
        dirs = [self.brick_root / name / f"b{i}" for i in range(bricks)]
        for d in dirs:
            d.mkdir(parents=True)
        args = ["volume", "create", name]
        if replica > 1:
            args += ["replica", str(replica)]
        self.cli_ok(*args, *(f"{self.host}:{d}" for d in dirs), "force")
        vol = Volume(self, name, dirs, replica)
        self.volumes[name] = vol
        for key, value in {**DEFAULT_OPTIONS, **(options or {})}.items():
            self.cli_ok("volume", "set", name, key, value)
        if start:
            vol.start()
        return vol

    # -- logs

    def log_text(self, name: str = "glusterd.log") -> str:
        """A log of ours (``glusterd.log``, ``cli.log``, ``glustershd.log``,
        ``bricks/<path>.log``, ``glusterd.out``: glusterd's stdout and stderr)."""
        path = self.log_dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, n: int = 20, name: str = "glusterd.log") -> str:
        text = "\n".join(self.log_text(name).splitlines()[-n:])
        out = self.log_text("glusterd.out").strip()
        if out and name == "glusterd.log":
            text += "\n--- glusterd stdout/stderr:\n" + "\n".join(out.splitlines()[-n:])
        return text


class Volume:
    """A volume of a :class:`GlusterServer`: ``name``, ``bricks`` (their directories, in the
    order of ``gluster volume info``), ``replica``."""

    def __init__(self, server: GlusterServer, name: str, bricks: list[Path], replica: int) -> None:
        self.server = server
        self.name = name
        self.bricks = bricks
        self.replica = replica

    def __repr__(self) -> str:
        return f"<Volume {self.name} replica={self.replica} bricks={len(self.bricks)}>"

    def url(self, path: str | os.PathLike[str]) -> str:
        """``gluster://HOST/VOLNAME/PATH`` (a leading slash of ``path`` is dropped)."""
        return f"gluster://{self.server.host}/{self.name}/{os.fspath(path).lstrip('/')}"

    # -- state

    def start(self, force: bool = False, timeout: float = 30.0) -> None:
        """``gluster volume start VOL [force]`` and wait until every brick is online (with
        ``force`` on a started volume: restarts the dead bricks)."""
        self.server.cli_ok("volume", "start", self.name, *(["force"] if force else []))
        self.wait_online(timeout)

    def start_bricks(self, timeout: float = 30.0) -> None:
        """Bring dead bricks back: ``gluster volume start VOL force``."""
        self.start(force=True, timeout=timeout)

    def stop(self, *, check: bool = True, timeout: float = 30.0) -> None:
        """``gluster volume stop VOL force`` and wait until its brick processes are gone. With
        ``check`` false, a volume that is not started is no error."""
        procs = [p for p in map(self.server._process_of, self.brick_pids()) if p]
        res = self.server.cli("volume", "stop", self.name, "force")
        if res.returncode != 0 and (
            check or "not in the started state" not in res.stderr + res.stdout
        ):
            raise GlusterError(
                f"gluster volume stop {self.name} force: {(res.stderr + res.stdout).strip()}"
            )
        if not _wait_dead(procs, timeout):
            raise GlusterError(f"bricks of {self.name} still run after stop: {procs}")

    def delete(self) -> None:
        """``gluster volume delete VOL`` (stop it first). The brick directories stay."""
        self.server.cli_ok("volume", "delete", self.name)
        self.server.volumes.pop(self.name, None)

    def info(self) -> ET.Element:
        """The ``<volume>`` element of ``gluster volume info VOL --xml``."""
        vol = self.server.cli_xml("volume", "info", self.name).find("volInfo/volumes/volume")
        if vol is None:
            raise GlusterError(f"no volume {self.name} in gluster volume info")
        return vol

    def status(self) -> dict[str, dict[str, str]]:
        """``gluster volume status VOL --xml`` by node: brick path (or "Self-heal Daemon")
        -> {"status": "1"|"0", "pid", "port", ...}. Empty while the volume is stopped (or
        glusterd is)."""
        res = self.server.cli("volume", "status", self.name, "--xml")
        if res.returncode != 0:
            return {}
        root = ET.fromstring(res.stdout)
        out: dict[str, dict[str, str]] = {}
        for node in root.iterfind("volStatus/volumes/volume/node"):
            fields = {child.tag: (child.text or "") for child in node}
            key = (
                fields.get("path", "")
                if fields.get("hostname") == self.server.host
                else fields.get("hostname", "")
            )
            out[key] = fields
        return out

    def wait_online(self, timeout: float = 30.0) -> None:
        """Wait until ``volume status`` shows every brick online with a port (a client that
        connects earlier may find no port for a brick)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            online = [
                st.get(str(b), {}).get("status") == "1"
                and st.get(str(b), {}).get("port", "N/A") not in ("N/A", "0", "")
                for b in self.bricks
            ]
            if all(online):
                return
            if time.monotonic() > deadline:
                raise GlusterError(
                    f"bricks of {self.name} not online after {timeout} s: {online}\n"
                    f"{self.server.log_tail()}"
                )
            time.sleep(0.1)

    # -- bricks

    def brick_pids(self) -> list[int]:
        """The pid of each brick's glusterfsd, in brick order, 0 for a brick that is down: the
        process in our namespace serving ``--brick-name BRICK`` (works without glusterd)."""
        found: dict[str, int] = {}
        for pid in self.server.pids_in_namespace():
            args = _cmdline(pid)
            if not args or os.path.basename(args[0]) != "glusterfsd":
                continue
            with contextlib.suppress(ValueError, IndexError):
                found[args[args.index("--brick-name") + 1]] = pid
        return [found.get(str(b), 0) for b in self.bricks]

    def kill_brick(self, i: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` (SIGKILL) to brick ``i``'s glusterfsd and, for SIGKILL/SIGTERM, wait
        until it is gone. Returns its pid."""
        pid = self.brick_pids()[i]
        proc = self.server._process_of(pid) if pid else None
        if proc is None:
            raise GlusterError(f"brick {i} of {self.name} ({self.bricks[i]}) is not running")
        args = _cmdline(pid)
        _signal(*proc, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if not _wait_dead([proc], timeout):
                raise GlusterError(f"brick {i} of {self.name} (pid {pid}) survived signal {sig}")
            # Its pid file goes too, as with a crashed host's /run: glusterd trusts a pid file
            # whose pid is alive, and with pid_max at 32768 a busy test run soon gives that
            # pid to some other process ("discovered already-running brick": never restarted).
            with contextlib.suppress(ValueError, IndexError, OSError):
                Path(args[args.index("-p") + 1]).unlink()
        return pid

    # -- heal (replica volumes)

    def heal_info(self, timeout: float = 60) -> str:
        """``gluster volume heal VOL info``'s text. (The CLI runs glfsheal without our socket,
        so we run ``glfsheal VOL glusterd-sock OURS`` ourselves, in namespaces like the CLI's.)"""
        cmd = self.server._wrap([_glfsheal(), self.name, "glusterd-sock", str(self.server.socket)])
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if "Brick " not in res.stdout:  # (it exits non-zero while a brick is down)
            raise GlusterError(
                f"glfsheal {self.name} exited {res.returncode}: {(res.stderr + res.stdout).strip()}"
            )
        return res.stdout

    @staticmethod
    def parse_heal_info(text: str) -> list[tuple[str, str, int | None]]:
        """``[(brick, status, entries or None), ...]`` from heal info's text."""
        out: list[tuple[str, str, int | None]] = []
        for block in re.split(r"\n\s*\n", text.strip()):
            brick = re.search(r"^Brick (.+)$", block, re.M)
            status = re.search(r"^Status: (.+)$", block, re.M)
            entries = re.search(r"^Number of entries: (\S+)$", block, re.M)
            if brick:
                n = entries.group(1) if entries else ""
                out.append(
                    (
                        brick.group(1),
                        status.group(1) if status else "",
                        int(n) if n.isdigit() else None,
                    )
                )
        return out

    def healed(self, text: str | None = None) -> bool:
        """Whether heal info (``text``, or a fresh one) shows every brick connected with no
        entry to heal."""
        info = self.parse_heal_info(self.heal_info() if text is None else text)
        return len(info) == len(self.bricks) and all(
            status == "Connected" and entries == 0 for _, status, entries in info
        )

    def wait_healed(self, timeout: float = 60.0) -> None:
        """Trigger an index heal (``gluster volume heal VOL``) and wait until heal info shows
        every brick connected with no entry left; re-triggers every few seconds."""
        deadline = time.monotonic() + timeout
        next_trigger = 0.0
        while True:
            if time.monotonic() >= next_trigger:
                self.server.cli("volume", "heal", self.name, timeout=30)  # may fail: shd starting
                next_trigger = time.monotonic() + 3
            text = self.heal_info()
            if self.healed(text):
                return
            if time.monotonic() > deadline:
                raise GlusterError(
                    f"{self.name} not healed after {timeout} s:\n{text}\n--- glustershd.log:\n"
                    f"{self.server.log_tail(name='glustershd.log')}"
                )
            time.sleep(0.2)

    # -- files

    def brick_path(self, i: int, path: str | os.PathLike[str]) -> Path:
        """Where ``path`` lives on brick ``i`` (for a replica volume: that brick's copy)."""
        return self.bricks[i] / os.fspath(path).lstrip("/")

    def local_path(self, path: str | os.PathLike[str]) -> Path:
        """Where ``path`` lives on the brick of a plain 1-brick volume (for checks only:
        writing there bypasses gluster)."""
        if len(self.bricks) != 1:
            raise ValueError(f"{self.name} has {len(self.bricks)} bricks: use brick_path(i, ...)")
        return self.brick_path(0, path)


_libexec_dir: Path | None = None


def _libexec() -> Path:
    """Where glfsheal and gsyncd live (``glusterd --print-libexecdir``)."""
    global _libexec_dir
    if _libexec_dir is None:
        out = _run([_tool("glusterd") or "glusterd", "--print-libexecdir"], timeout=10).stdout
        _libexec_dir = Path(out.strip())
    return _libexec_dir


def _glfsheal() -> str:
    path = _libexec() / "glfsheal"
    if not os.access(path, os.X_OK):
        raise GlusterError(f"{path} is missing (glusterfs-server)")
    return str(path)
