"""Commit and stream over differencing VHDX chains, and a mixed chain (a qcow2 snapshot over a
VHDX image): the chains are made with blockfs (qemu cannot write differencing VHDX), and
judged by libvhdi (``vhdimount`` reads a chain by itself, ``vhdiinfo`` names the parent) and
by qemu-img wherever the result is a dynamic VHDX or qcow2 it can read."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from test_mirror import fio_finish, fio_start, fio_verify_only
from test_vhdx import vhdiinfo, vhdimount_read

from blockfs.nodes.registry import close_chain, open_image
from conftest import FULL, blockfs, ctl, qemu_img, run, start, wait_gone, wait_ready, wait_state

MiB = 1 << 20
SIZE = 48 * MiB
FIO_OFF, FIO_SIZE = 40 * MiB, 8 * MiB


def _extents(seed: int, count: int = 12) -> list[tuple[int, bytes]]:
    """Random data at random places below fio's region (some unaligned to blocks)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        off = rnd.randrange(0, (FIO_OFF - 2 * MiB) // 512) * 512
        out.append((off, rnd.randbytes(rnd.randrange(1, 2 * MiB // 512) * 512)))
    return out


def scribble(path: Path, seed: int) -> None:
    with open(path, "r+b") as f:
        for off, data in _extents(seed):
            f.seek(off)
            f.write(data)


def make_chain(mount, d: Path, depth: int) -> list[Path]:  # type: ignore[no-untyped-def]
    """base.vhdx (dynamic, 1 MiB blocks) <- s1.vhdx <- ...: each layer made by ``blockfs
    create`` and written by blockfs's VHDX node (qemu cannot write differencing images)."""
    paths = []
    for i in range(depth):
        p = d / ("base.vhdx" if i == 0 else f"s{i}.vhdx")
        if i == 0:
            blockfs("create", "-f", "vhdx", "-o", "block_size=1M", str(p), str(SIZE))
        else:
            blockfs("create", "-f", "vhdx", "-b", str(paths[-1]), str(p))

        async def fill(p: Path = p, seed: int = i + 10) -> None:
            node = await open_image(str(p), fmt="vhdx")
            try:
                for off, data in _extents(seed):
                    await node.write(off, data)
                await node.flush()
            finally:
                await close_chain(node)

        trio.run(fill)
        paths.append(p)
    return paths


def parent_of(img: Path) -> str | None:
    """The parent libvhdi finds recorded (a Windows-style path), or None."""
    info = vhdiinfo(img)
    name = info.get("Parent filename")
    return name.replace("\\", "/").rsplit("/", 1)[-1] if name else None


#: a cover by default (an intermediate commit stitches the active layer to base; a cancelled
#: active commit settles the linkage libvhdi checks; a stream without a base turns the active
#: layer into a dynamic image); every job with BLOCKFS_FULL=1 (a completed active commit is
#: also run by the mixed-chain test below)
_JOBS = ["intermediate", "active-cancel", "stream-none"] + (
    ["active", "stream-base"] if FULL else []
)


@pytest.mark.parametrize("job", _JOBS)
def test_vhdx_chain_jobs_under_fio(mount, tmp_path: Path, job: str) -> None:
    chain = make_chain(mount, tmp_path, 3)
    base, _s1, s2 = chain
    m = mount(f"vm={s2},format=vhdx")
    before = tmp_path / "before.raw"
    run(["cp", str(m / "vm"), str(before)])
    fio = fio_start(m / "vm", tmp_path, FIO_OFF, FIO_SIZE, seed=7)
    spec, kind = {
        "intermediate": ("device=vm top=s1.vhdx speed=16M", "commit"),
        "active": ("device=vm speed=16M", "commit"),
        "active-cancel": ("device=vm base=1 speed=16M", "commit"),
        "stream-base": ("device=vm base=base.vhdx speed=16M", "stream"),
        "stream-none": ("device=vm speed=16M", "stream"),
    }[job]
    assert start(m, spec, kind) == "vm"
    if job.startswith("active"):
        wait_ready(m, "vm")
        fio_finish(fio)
        ctl(m, "vm", "cancel" if job == "active-cancel" else "complete")
    s = wait_state(m, "vm", ("concluded",))
    assert s["error"] is None, s
    if not job.startswith("active"):
        fio_finish(fio)
    final = tmp_path / "final.raw"
    run(["cp", str(m / "vm"), str(final)])
    m.umount()

    with open(final, "rb") as a, open(before, "rb") as b:
        assert a.read(FIO_OFF) == b.read(FIO_OFF), "the guest view changed"
    now = base if job == "active" else s2
    fio_verify_only(final, tmp_path, FIO_OFF, FIO_SIZE, seed=7)
    expected_parent = {
        "intermediate": "base.vhdx",
        "active": None,
        # cancelled in ready: the chain stays, and s2 names s1 by its DataWriteGuid as it
        # is now (which libvhdi, reading only parent_linkage, checks)
        "active-cancel": "s1.vhdx",
        "stream-base": "base.vhdx",
        "stream-none": None,
    }[job]
    assert parent_of(now) == expected_parent
    if expected_parent is None:
        # A dynamic VHDX again (or still): qemu reads it, and it reads what the mount showed.
        assert vhdiinfo(now)["Disk type"] == "Dynamic"
        qemu_img("check", "-f", "vhdx", str(now))
        qemu_img("compare", "-f", "vhdx", "-F", "raw", str(now), str(final))
    else:
        assert vhdimount_read(now, tmp_path) == final.read_bytes()
    qemu_img("check", "-f", "vhdx", str(base))
    # The layers that left the chain still open (their files untouched but for the linkage).
    for p in chain:
        blockfs("info", str(p))


def test_kill_9_during_an_active_commit_into_a_vhdx_base(mount, tmp_path: Path) -> None:
    """base.vhdx gets written by the commit (its DataWriteGuid changes): the image above it
    recorded the new one as its second linkage first, so after a kill the chain still opens
    and reads every acknowledged write."""
    base, s1 = make_chain(mount, tmp_path, 2)
    m = mount(f"vm={s1},format=vhdx")
    with open(m / "vm", "r+b") as f:
        f.seek(FIO_OFF)
        f.write(os.urandom(MiB))
    expect = tmp_path / "expect.raw"
    run(["cp", str(m / "vm"), str(expect)])
    assert start(m, "device=vm id=j", "commit") == "j"
    wait_ready(m, "j")
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    again = mount(f"vm={s1},format=vhdx", options=("--read-only",), name="again")
    assert (again / "vm").read_bytes() == expect.read_bytes()
    again.umount()
    # libvhdi (which checks only parent_linkage, not parent_linkage2) opens the chain too
    assert vhdimount_read(s1, tmp_path) == expect.read_bytes()
    # qemu replays base's log (a kill may leave one) and finds it clean: on a copy, as the
    # replay gives it a new DataWriteGuid
    copy = tmp_path / "base-copy.vhdx"
    run(["cp", "--sparse=always", str(base), str(copy)])
    qemu_img("check", "-r", "all", "-f", "vhdx", str(copy))
    qemu_img("check", "-f", "vhdx", str(copy))


def test_a_qcow2_snapshot_over_vhdx_commits_back_into_it(mount, tmp_path: Path) -> None:
    """A mixed chain: a live qcow2 snapshot over a dynamic VHDX, written, then folded back
    (active commit) into the VHDX, which qemu-img then reads as the mount did."""
    (base,) = make_chain(mount, tmp_path, 1)
    m = mount(f"vm={base},format=vhdx")
    (m.path / ".control" / "images" / "vm" / "ctl").write_text("snapshot=over.qcow2\n")
    fd = os.open(m.path / ".control" / "images" / "vm" / "ctl", os.O_RDWR)
    try:
        with pytest.raises(OSError) as refused:
            os.write(fd, b"snapshot=x.vhdx format=vhdx\n")
        assert refused.value.errno == errno.EINVAL
        assert "through a vhdx parent" in os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    assert not (tmp_path / "x.vhdx").exists()
    scribble(m / "vm", seed=99)
    assert start(m, "device=vm id=c", "commit") == "c"
    wait_ready(m, "c")
    ctl(m, "c", "complete")
    assert wait_state(m, "c", ("concluded",))["error"] is None
    final = tmp_path / "final.raw"
    run(["cp", str(m / "vm"), str(final)])
    m.umount()
    qemu_img("check", "-f", "vhdx", str(base))
    qemu_img("check", str(tmp_path / "over.qcow2"))
    qemu_img("compare", "-f", "vhdx", "-F", "raw", str(base), str(final))
