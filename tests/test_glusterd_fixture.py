"""The GlusterFS fixture (tests/glusterd.py) itself, judged by gluster's own CLI and by
qemu-img / qemu-io over ``gluster://`` from the root network namespace.

Each qemu run on ``gluster://`` lasts ~10 s whatever it does (libgfapi 10.3's ``glfs_fini``
waits for a 10 s RPC timer; twice that for ``qemu-img create -f qcow2``), so the tests run
independent ones side by side and the two that need a chain of them are marked slow.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from glusterd import (
    NETNS_DIR,
    NETNS_PREFIX,
    NETWORK,
    GlusterServer,
    Volume,
    need_gluster,
    sweep_stale_namespaces,
)

MiB = 1024 * 1024
#: the tests that chain several qemu runs over gluster:// (each costs 10 s in libgfapi's
#: glfs_fini) run with BLOCKFS_FULL=1; test_gluster.py covers the same ground through blockfs
FULL_ONLY = pytest.mark.skipif(
    os.environ.get("BLOCKFS_FULL") != "1", reason="BLOCKFS_FULL=1: slow (qemu over gluster://)"
)

for _tool in ("qemu-img", "qemu-io"):
    if shutil.which(_tool) is None:
        pytest.skip(f"{_tool} is not installed (qemu-utils)", allow_module_level=True)


def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def run_parallel(*cmds: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands side by side (each gluster:// client idles ~10 s at exit)."""
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(lambda cmd: run(*cmd), cmds))


def ok(res: subprocess.CompletedProcess[str], server: GlusterServer) -> str:
    assert res.returncode == 0, (
        f"{res.args} exited {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}\n"
        f"--- glusterd.log:\n{server.log_tail()}"
    )
    return res.stdout


def start_time(pid: int) -> int | None:
    """A live process's start time (/proc/PID/stat field 22), None if gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def netns_names() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line]


def reference(path: Path, size: int, head: bytes) -> Path:
    """A raw image of ``size`` bytes: ``head`` then zeros."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[GlusterServer]:
    need_gluster()
    if "gluster" not in run("qemu-img", "--help").stdout.split("Supported formats:")[-1]:
        pytest.skip("this qemu-img has no gluster block driver")
    with GlusterServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(server: GlusterServer) -> Volume:
    return server.create_volume("plain")


@pytest.fixture(scope="module")
def rep3(server: GlusterServer) -> Volume:
    return server.create_volume("rep3", replica=3, bricks=3)


def test_server_lives_in_its_own_namespace(server: GlusterServer) -> None:
    host = ipaddress.ip_address(server.host)
    assert host in NETWORK
    assert host in ipaddress.ip_network(f"{server.client_address}/30", strict=False)
    assert server.netns.startswith(f"{NETNS_PREFIX}{os.getpid()}-")
    assert server.netns in netns_names()
    assert server.pid in server.pids_in_namespace()
    assert os.stat(f"/proc/{server.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    assert os.getpid() not in server.pids_in_namespace()
    # gluster's own view: a one-node pool, our socket
    pool = ok(server.cli("pool", "list"), server)
    assert [line.split()[1:] for line in pool.splitlines()[1:]] == [["localhost", "Connected"]]
    assert server.dir is not None
    assert server.socket.is_socket() and server.socket.is_relative_to(server.dir)


def test_files_stay_in_the_temp_folder(server: GlusterServer, plain: Volume, rep3: Volume) -> None:
    """glusterd, the bricks and glustershd write below ``server.dir`` only: their sockets (in
    /var/run/gluster as they see it), pid files and logs."""
    assert server.dir is not None
    pids = server.pids_in_namespace()
    daemons = [pid for pid in pids if Path(f"/proc/{pid}/comm").read_text().strip() != "glusterd"]
    bricks = plain.brick_pids() + rep3.brick_pids()
    assert 0 not in bricks and set(bricks) < set(daemons)
    assert any(Path(f"/proc/{pid}/comm").read_text().strip() == "glusterfs" for pid in daemons)
    for pid in daemons:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        sock = Path(args[args.index("-S") + 1])
        assert sock.parent == Path("/var/run/gluster")
        assert (server.run_dir / sock.name).is_socket()  # the bind mount's source
        assert not Path("/run/gluster", sock.name).exists()  # the real directory
        assert Path(args[args.index("-p") + 1]).is_relative_to(server.run_dir)
        if "-l" in args:
            assert Path(args[args.index("-l") + 1]).is_relative_to(server.log_dir)
    assert len(list((server.log_dir / "bricks").glob("*.log"))) >= 4
    assert (server.log_dir / "glustershd.log").stat().st_size > 0
    assert (server.work_dir / "ss_brick").is_dir()  # glusterd's hard-coded /var/lib/glusterd/...
    # the bind mounts exist for glusterd only, not in our mount namespace
    assert str(server.dir) in Path(f"/proc/{server.pid}/mountinfo").read_text()
    assert str(server.dir) not in Path("/proc/self/mountinfo").read_text()


@FULL_ONLY  # ~40 s: qemu-img create (20 s), then qemu-io, then compare/info/check
def test_plain_volume_through_qemu(server: GlusterServer, plain: Volume, tmp_path: Path) -> None:
    url = plain.url("/a.qcow2")
    assert url == f"gluster://{server.host}/plain/a.qcow2"
    same = reference(tmp_path / "same.raw", 16 * MiB, b"\x5a" * MiB)
    other = reference(tmp_path / "other.raw", 16 * MiB, b"\x5b" * MiB)

    ok(run("qemu-img", "create", "-f", "qcow2", url, "16M"), server)
    assert plain.local_path("a.qcow2").read_bytes()[:4] == b"QFI\xfb"
    out = ok(run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", url), server)
    assert "wrote 1048576/1048576 bytes at offset 0" in out

    cmp_same, cmp_other, info, check = run_parallel(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(same), url],
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(other), url],
        ["qemu-img", "info", "--output=json", url],
        ["qemu-img", "check", "-f", "qcow2", url],
    )
    assert "Images are identical" in ok(cmp_same, server)
    assert cmp_other.returncode == 1 and "Content mismatch at offset 0" in cmp_other.stdout
    meta = json.loads(ok(info, server))
    assert meta["format"] == "qcow2" and meta["virtual-size"] == 16 * MiB
    assert "No errors were found" in ok(check, server)


@FULL_ONLY  # ~25 s: qemu-img create, then qemu-io with a dead brick, then the heal
def test_replica_survives_a_dead_brick(server: GlusterServer, rep3: Volume) -> None:
    url = rep3.url("r.raw")
    ok(run("qemu-img", "create", "-f", "raw", url, "4M"), server)
    pids = rep3.brick_pids()
    assert len(set(pids)) == 3 and 0 not in pids

    assert rep3.kill_brick(0) == pids[0]
    assert rep3.brick_pids() == [0, pids[1], pids[2]]
    status = rep3.status()  # gluster's own view
    assert [status[str(b)]["status"] for b in rep3.bricks] == ["0", "1", "1"]

    out = ok(
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "read -P 0x33 0 1M", url),
        server,
    )
    assert "wrote 1048576/1048576" in out and "read 1048576/1048576" in out
    assert "verification failed" not in out
    copies = [rep3.brick_path(i, "r.raw").read_bytes()[:MiB] for i in range(3)]
    assert copies[1] == copies[2] == b"\x33" * MiB and copies[0] != copies[1]
    pending = Volume.parse_heal_info(rep3.heal_info())
    assert pending[0][1] != "Connected"
    assert all(entries and entries >= 1 for _, _, entries in pending[1:]), pending

    rep3.start_bricks()  # gluster volume start rep3 force
    back = rep3.brick_pids()
    assert back[0] not in (0, pids[0]) and back[1:] == pids[1:]
    rep3.wait_healed(timeout=60)
    healed = Volume.parse_heal_info(rep3.heal_info())
    assert [(status, entries) for _, status, entries in healed] == [("Connected", 0)] * 3
    copies = [rep3.brick_path(i, "r.raw").read_bytes() for i in range(3)]
    assert copies[0] == copies[1] == copies[2]
    assert copies[0][:MiB] == b"\x33" * MiB and len(copies[0]) == 4 * MiB


@FULL_ONLY  # ~20 s (test_gluster.py stops a volume under a mount by default)
def test_volume_stop_and_start(server: GlusterServer) -> None:
    vol = server.create_volume("stopstart")
    (pid,) = vol.brick_pids()
    assert pid > 0

    vol.stop()
    assert vol.info().findtext("statusStr") == "Stopped"
    assert vol.status() == {} and vol.brick_pids() == [0]
    assert pid not in server.pids_in_namespace()
    res = run("qemu-img", "info", vol.url("nothing.raw"), timeout=60)
    assert res.returncode != 0 and "failed to connect" in res.stderr, res.stderr

    vol.start()
    assert vol.info().findtext("statusStr") == "Started"
    (pid2,) = vol.brick_pids()
    assert pid2 not in (0, pid)
    assert vol.status()[str(vol.bricks[0])]["pid"] == str(pid2)
    ok(run("qemu-img", "create", "-f", "raw", vol.url("after.raw"), "1M"), server)
    assert vol.local_path("after.raw").stat().st_size == MiB


def test_glusterd_stop_and_start(server: GlusterServer, plain: Volume) -> None:
    bricks = plain.brick_pids()
    server.stop()
    assert not server.running and server.pid is None
    assert server.cli("volume", "list", timeout=10).returncode != 0
    assert plain.brick_pids() == bricks  # the bricks keep running without glusterd

    server.start()
    assert "plain" in ok(server.cli("volume", "list"), server).split()
    assert plain.status()[str(plain.bricks[0])]["pid"] == str(bricks[0])


def test_cleanup_leaves_nothing_behind() -> None:
    with GlusterServer() as srv:
        srv.create_volume("c", replica=3, bricks=3)
        netns, directory, veth = srv.netns, srv.dir, srv.veth_host
        assert directory is not None
        procs = {pid: start_time(pid) for pid in srv.pids_in_namespace()}
        assert len(procs) == 5  # glusterd, 3 bricks, glustershd
        subnet = ipaddress.ip_network(f"{srv.client_address}/30", strict=False)
    assert srv.pids_in_namespace() == []
    assert all(start_time(pid) != start for pid, start in procs.items())
    assert netns not in netns_names() and not (NETNS_DIR / netns).exists()
    assert not Path(f"/sys/class/net/{veth}").exists()
    routes = json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout)
    dsts = [ipaddress.ip_network(r["dst"], strict=False) for r in routes if r["dst"] != "default"]
    assert not [dst for dst in dsts if dst.overlaps(subnet)]
    assert not directory.exists()


def test_stale_namespaces_are_swept(server: GlusterServer) -> None:
    """A namespace left by a dead session (its pid is gone) goes, with what runs in it and its
    temporary directory; a live session's stays."""
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has that pid
    name = f"{NETNS_PREFIX}{dead}-0"
    assert run("ip", "netns", "add", name).returncode == 0
    sleeper = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / name}", "--", "sleep", "60"])
    leftover = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    (leftover / "run").mkdir()
    try:
        # swept only once the sleeper is inside: a sweep before nsenter opened the namespace
        # made nsenter fail (exit 1) instead of leaving a process to end
        ns = os.stat(NETNS_DIR / name)
        deadline = time.monotonic() + 10
        while True:
            try:
                inside = os.stat(f"/proc/{sleeper.pid}/ns/net")
                entered = (inside.st_dev, inside.st_ino) == (ns.st_dev, ns.st_ino)
            except OSError:
                entered = False
            if entered and Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep":
                break
            assert sleeper.poll() is None and time.monotonic() < deadline, "nsenter failed"
            time.sleep(0.01)
        assert name in sweep_stale_namespaces()
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert name not in netns_names()
        assert not leftover.exists()
        assert server.netns not in sweep_stale_namespaces()
        assert server.netns in netns_names() and server.running
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        if (NETNS_DIR / name).exists():
            run("ip", "netns", "del", name)
        shutil.rmtree(leftover, ignore_errors=True)
