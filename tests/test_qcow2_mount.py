"""qcow2 through real mounts: fio --verify writes, then ``qemu-img check``; and crash safety:
kill -9 the daemon in the middle of write-heavy runs, then check that the image has no
corruption and that every acknowledged write reads back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FULL, blockfs, fio_verify, is_mounted, need_tool, qemu_img, run

MiB = 1024 * 1024


def qemu_io(img: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run([*args, str(img)])


def overlay_on_base(tmp_path: Path, size: str = "128M") -> Path:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), size)
    qemu_io(base, "write -P 0x5a 0 32M", "write -P 0x5b 40M 8M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    return top


def check_no_corruption(img: Path) -> None:
    """No corruption; leaks (a kill between refcount and L2 update) are repairable."""
    res = qemu_img("check", "--output=json", str(img), check=False)
    doc = json.loads(res.stdout)
    assert res.returncode in (0, 3), res.stdout + res.stderr
    assert not doc.get("corruptions") and not doc.get("check-errors"), doc
    if res.returncode == 3:
        qemu_img("check", "-r", "leaks", str(img))
        res = qemu_img("check", str(img), check=False)
        assert res.returncode == 0, res.stdout


def test_fio_verify_on_overlay_then_qemu_img_agrees(mount, tmp_path: Path) -> None:
    need_tool("fio")
    top = overlay_on_base(tmp_path)
    m = mount(f"vm={top}")
    res = fio_verify(m / "vm", tmp_path, "--bsrange=4k-128k")
    assert res.returncode == 0 and "err= 0" in res.stdout, res.stdout + res.stderr
    seen = (m / "vm").read_bytes()
    m.umount()
    res = qemu_img("check", str(top), check=False)
    assert res.returncode == 0 and "No errors" in res.stdout, res.stdout
    raw = tmp_path / "top.raw"
    qemu_img("convert", "-O", "raw", str(top), str(raw))
    assert raw.read_bytes() == seen  # what the mount showed is what qemu reads


def _fio_crash_args(filename: Path, seed: int) -> list[str]:
    return [
        "fio",
        "--name=crash",
        f"--filename={filename}",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--size=128M",
        "--ioengine=libaio",
        "--iodepth=16",
        "--direct=1",
        "--verify=crc32c",
        f"--randseed={seed}",
    ]


def test_kill_daemon_during_fio_loses_no_acknowledged_write(mount, tmp_path: Path) -> None:
    need_tool("fio")
    top = overlay_on_base(tmp_path)
    rnd = random.Random(1234)
    for i in range(5 if FULL else 2):  # kill rounds: a small count unless BLOCKFS_FULL=1
        for f in tmp_path.glob("*.state"):
            f.unlink()
        m = mount(f"vm={top}")
        pid = m.pid
        fio = subprocess.Popen(
            [*_fio_crash_args(m / "vm", 100 + i), "--do_verify=0", "--verify_state_save=1"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(rnd.uniform(0.3, 1.5))
        os.kill(pid, signal.SIGKILL)
        out, _ = fio.communicate(timeout=60)
        killed = fio.returncode != 0  # fio may have finished before the kill
        assert not killed or list(tmp_path.glob("*crash*verify.state")), out
        blockfs("umount", str(m.path))  # cleans the dead mount
        assert not is_mounted(m.path)
        check_no_corruption(top)
        m = mount(f"vm={top}")
        state = ["--verify_state_load=1"] if killed else []
        res = run(
            [*_fio_crash_args(m / "vm", 100 + i), "--verify_only", *state, "--verify_fatal=0"],
            check=False,
            cwd=tmp_path,
        )
        m.umount()
        # fio counts the writes that failed when the daemon died as completed; there are at
        # most iodepth of those. Every other completed write must verify.
        bad = res.stdout.count("verify: ") + res.stderr.count("verify: ")
        assert bad <= 16, res.stdout + res.stderr
    res = qemu_img("check", str(top), check=False)
    assert res.returncode == 0, res.stdout


_WRITER = r"""
import mmap, os, random, sys, threading
path, journal, seed, slots, slot = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
order = list(range(slots)); random.Random(seed).shuffle(order)
lock = threading.Lock(); jf = open(journal, "a", buffering=1)
def pattern(idx):
    return (b"%08d:%08d;" % (seed, idx)) * (slot // 18) + b"#" * (slot % 18)
def work(k):
    buf = mmap.mmap(-1, slot)
    for idx in order[k::8]:
        buf.seek(0); buf.write(pattern(idx))
        with lock: jf.write("begin %d %d\n" % (idx, seed))
        try:
            os.pwrite(fd, buf, idx * slot)
        except OSError:
            return
        with lock: jf.write("done %d %d\n" % (idx, seed))
ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
"""


def test_kill_daemon_every_acknowledged_write_reads_back(mount, tmp_path: Path) -> None:
    # A sharper oracle than fio's: the writer journals each write before and after pwrite()
    # returned; after the kill every "done" slot must hold its data, a slot written but not
    # acknowledged may hold either version.
    top = overlay_on_base(tmp_path, "64M")
    slot = 20 * 1024  # not cluster aligned: most writes are partial-cluster COW over the base
    slots = 64 * MiB // slot
    expect: dict[int, int | None] = {}  # slot -> seed of the last acknowledged write
    journal = tmp_path / "journal"
    rnd = random.Random(99)
    for i in range(3):
        journal.write_text("")
        m = mount(f"vm={top}")
        pid = m.pid
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(m / "vm"),
                str(journal),
                str(1000 + i),
                str(slots),
                str(slot),
            ]
        )
        time.sleep(rnd.uniform(0.3, 1.5))
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=60)
        blockfs("umount", str(m.path))
        for line in journal.read_text().splitlines():
            what, idx, seed = line.split()
            expect[int(idx)] = int(seed) if what == "done" else None
        check_no_corruption(top)
        raw = tmp_path / "top.raw"
        qemu_img("convert", "-O", "raw", str(top), str(raw))
        data = raw.read_bytes()
        done = [k for k, v in expect.items() if v is not None]
        assert done, "the writer acknowledged nothing before the kill"
        for idx in done:
            want = (b"%08d:%08d;" % (expect[idx], idx)) * (slot // 18) + b"#" * (slot % 18)
            got = data[idx * slot : (idx + 1) * slot]
            assert got == want, f"round {i}: acknowledged write of slot {idx} lost"
    res = qemu_img("check", str(top), check=False)
    assert res.returncode == 0, res.stdout


@pytest.fixture(autouse=True)
def _needs_qemu_io() -> None:
    need_tool("qemu-io")
