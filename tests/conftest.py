"""Shared fixtures: real mounts through the real CLI, and the external oracles.

A test that mounts gets a :class:`Mount` from the ``mount`` fixture factory; every mount is
unmounted at teardown whatever happened (``blockfs umount``, then a lazy ``fusermount3 -u -z``),
so a failing test never leaves a FUSE mount behind.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.cli.jobs import write_control as _write_control

REPO = Path(__file__).resolve().parent.parent
#: the one opt-in flag for long runs: soak, fuzz and fault loops at full counts
FULL = os.environ.get("BLOCKFS_FULL") == "1"
SHARED = REPO.parent / "shared"
BLOCKFS = [sys.executable, "-m", "blockfs"]


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


needs_fuse = pytest.mark.skipif(not have_fuse(), reason="FUSE (/dev/fuse, fusermount3) is absent")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make setup installs it)")
    return path


def run(
    cmd: list[str], *, check: bool = True, timeout: float = 300, **kw: object
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and res.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
        )
    return res


def blockfs(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return run([*BLOCKFS, *args], check=check, timeout=timeout)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["qemu-img", *args], check=check)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class Mount:
    """A live blockfs mount made by the CLI."""

    def __init__(self, mnt: Path, log: Path) -> None:
        self.path = mnt
        self.log = log

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def pid(self) -> int:
        return int((self.path / ".control" / "pid").read_text())

    def info(self, name: str) -> dict:  # type: ignore[type-arg]
        return json.loads((self.path / ".control" / "images" / name / "info").read_text())

    def chain(self, name: str) -> list[dict]:  # type: ignore[type-arg]
        """The layers of the image's live chain, top first (the info file nests each under
        the one above as "backing-image", as QEMU's query-block does)."""
        layers = []
        doc: dict | None = self.info(name)  # type: ignore[type-arg]
        while doc is not None:
            layers.append(doc)
            doc = doc.get("backing-image")
        return layers

    def stats(self, name: str) -> dict:  # type: ignore[type-arg]
        return json.loads((self.path / ".control" / "images" / name / "stats").read_text())

    def umount(self) -> None:
        blockfs("umount", str(self.path))
        assert not is_mounted(self.path)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``m = mount("disk0=/path", ..., options=["--read-only"])`` mounts under tmp_path."""
    if not have_fuse():
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    made: list[Mount] = []

    def make(*specs: str, options: tuple[str, ...] = (), name: str = "mnt") -> Mount:
        mnt = tmp_path / f"{name}{len(made)}"
        mnt.mkdir()
        log = tmp_path / f"{name}{len(made)}.log"
        blockfs("mount", *options, "--log", str(log), str(mnt), *specs)
        m = Mount(mnt, log)
        made.append(m)
        return m

    yield make
    for m in made:
        if is_mounted(m.path):
            try:
                pid = m.pid
            except (OSError, ValueError):
                pid = None
            subprocess.run([*BLOCKFS, "umount", str(m.path)], capture_output=True, timeout=120)
            force_unmount(m.path)
            if pid is not None:
                _reap(pid)
        text = m.log_text()
        # Unexpected tracebacks in the daemon's log fail the test that caused them.
        assert "Traceback" not in text, f"daemon log of {m.path} holds a traceback:\n{text}"


def wait_gone(pid: int, timeout: float = 30) -> bool:
    """Wait for a process to end; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    """End a daemon this test started that did not go away by itself."""
    if not wait_gone(pid):
        os.kill(pid, signal.SIGKILL)


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    path.write_bytes(rnd.randbytes(size))
    return path


def fio_verify(path: Path, cwd: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """fio random writes with crc32c verification over 32 MiB per job, run in ``cwd`` (where
    fio leaves its verify state). ``options`` add or override (--numjobs=, --bs=, ...)."""
    need_tool("fio")
    return run(
        [
            "fio", "--name=verify", f"--filename={path}", "--rw=randwrite", "--bs=4k",
            "--numjobs=4", "--size=32M", "--offset_increment=32M", "--ioengine=libaio",
            "--iodepth=16", "--direct=1", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--group_reporting", *options,
        ],
        check=False,
        cwd=cwd,
    )  # fmt: skip


# -- jobs through the control files ------------------------------------------------------


def status(m, job_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return json.loads((m.path / ".control" / "jobs" / job_id / "status").read_text())


def start(m, spec: str, kind: str = "backup") -> str:  # type: ignore[no-untyped-def]
    return _write_control(str(m.path / ".control" / "jobs" / kind), spec)


def ctl(m, job_id: str, verb: str) -> None:  # type: ignore[no-untyped-def]
    _write_control(str(m.path / ".control" / "jobs" / job_id / "ctl"), verb)


def wait_state(m, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while True:
        s = status(m, job_id)
        if s["state"] in states:
            return s
        assert time.monotonic() < deadline, f"job {job_id} stuck: {s}"
        time.sleep(0.05)


def wait_ready(m, job_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Wait until a mirror is in sync (``"ready": true``); fails if it concludes first."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(m, job_id)
        if s["ready"]:
            return s
        assert s["state"] not in ("concluded", "null"), f"job {job_id} ended unready: {s}"
        assert time.monotonic() < deadline, f"job {job_id} not ready: {s}"
        time.sleep(0.05)


def events(m) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    text = (m.path / ".control" / "events").read_text()
    return [json.loads(line) for line in text.splitlines()]


# -- a real OpenSSH server (tests/sshd.py) ---------------------------------------------------


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The client keys every ``sshd`` server authorizes for root (session: made once)."""
    from sshd import SshKeys

    return SshKeys(tmp_path_factory.mktemp("ssh-keys"))


@pytest.fixture(scope="session")
def ssh_password_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    """A throwaway local account with a random password (session: created once, removed at
    the end)."""
    from sshd import PasswordUser

    user = PasswordUser(tmp_path_factory.mktemp("ssh-user"))
    yield user
    user.remove()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, ssh_keys, ssh_password_user) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """A running sshd on 127.0.0.1 shared by a test module (don't stop it; use ``sshd_fn``)."""
    from sshd import SshServer

    with SshServer(tmp_path_factory.mktemp("sshd"), ssh_keys, ssh_password_user) as server:
        yield server


@pytest.fixture
def sshd_fn(tmp_path, ssh_keys, ssh_password_user) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """A running sshd of the test's own, free to stop/start."""
    from sshd import SshServer

    with SshServer(tmp_path / "sshd", ssh_keys, ssh_password_user) as server:
        yield server


@pytest.fixture
def ssh_agent(ssh_keys) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """The socket path of an ssh-agent holding the plain key (``ssh_keys.identity``)."""
    from sshd import ssh_agent as agent

    with agent([ssh_keys.identity]) as sock:
        yield sock


# -- GlusterFS (tests/glusterd.py) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def glusterd() -> Iterator:  # type: ignore[type-arg]
    """A glusterd in a network namespace of its own, shared by a test module; volumes are
    made with ``glusterd.create_volume(...)``."""
    from glusterd import GlusterServer, need_gluster

    need_gluster()
    with GlusterServer() as server:
        yield server


@pytest.fixture(scope="module")
def gvol(glusterd) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """A started plain volume (one brick) on the module's glusterd."""
    vol = glusterd.create_volume("plain")
    yield vol


# -- a second local user, and mounts every user can reach --------------------------------------

#: the throwaway account tests act as when they play a hostile local user
OTHER_USER = "blockfs-test"


@pytest.fixture
def other_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("useradd is missing")
    run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER])
    return pwd.getpwnam(OTHER_USER)


def as_user(user: pwd.struct_passwd, *cmd: str) -> subprocess.CompletedProcess[str]:
    return run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *cmd],
        check=False,
        errors="replace",
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is root's alone)."""
    if not have_fuse():
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    d = Path(tempfile.mkdtemp(prefix="blockfs-perm-"))
    d.chmod(0o755)
    made: list[Path] = []
    yield d
    for mnt in sorted(d.glob("mnt*")):
        if is_mounted(mnt):
            subprocess.run([*BLOCKFS, "umount", str(mnt)], capture_output=True, timeout=120)
            force_unmount(mnt)
        made.append(mnt)
    for log in d.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
    shutil.rmtree(d, ignore_errors=True)


def mount_shared(d: Path, name: str, *images: str, options: tuple[str, ...] = ()) -> Path:
    mnt = d / name
    mnt.mkdir()
    blockfs("mount", "--allow-other", "--log", str(d / f"{name}.log"), *options, str(mnt), *images)
    return mnt
