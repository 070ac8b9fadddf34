"""The FUSE request loop of reader threads (blockfs.fuseloop, issue 17) and pyfuse3's own.

Every other test runs on the default (auto: the threads for local images, pyfuse3's loop for
remote ones). Here one battery of requests runs on both loops (``--fuse-threads=2`` and
``--fuse-threads=0``); the rest holds the threads' loop to what it adds: counters exact under concurrent threads, listings longer than one READDIR
answer, hot-added names found at once, a signal while the threads write.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    blockfs,
    fio_verify,
    is_mounted,
    need_tool,
    qemu_img,
    random_file,
    run,
    start,
    status,
    wait_gone,
    wait_state,
)

MiB = 1 << 20
#: two reader threads whatever the images (auto, the default, would choose the same here)
THREADS = ("--fuse-threads=2",)


@pytest.mark.parametrize("threads", [2, 0], ids=["threads", "pyfuse3"])
def test_request_battery(mount, tmp_path: Path, threads: int) -> None:
    raw = tmp_path / "a.img"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB + 512)  # not a multiple of 4 KiB: requests meet the end
    qcow = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(qcow), "8M")
    m = mount(f"a={raw},format=raw", f"b={qcow},format=qcow2",
              options=(f"--fuse-threads={threads}",))  # fmt: skip
    assert sorted(os.listdir(m.path)) == [".control", "a", "b"]
    assert os.stat(m / "a").st_size == 8 * MiB + 512
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 16 * MiB + 4096  # each disk's size, rounded up

    data = random_file(tmp_path / "data", 4 * MiB, seed=threads)
    for name, bs in (("a", "1M"), ("b", "64k")):
        run(["dd", f"if={data}", f"of={m / name}", f"bs={bs}", "oflag=direct", "conv=notrunc",
             "status=none"])  # fmt: skip
        fd = os.open(m / name, os.O_RDWR)
        try:
            assert os.pread(fd, 4 * MiB, 0) == data.read_bytes()
            os.fsync(fd)
        finally:
            os.close(fd)

    fd = os.open(m / "a", os.O_RDWR)
    try:
        # the end of the disk: a read across it is short, a write across it too, and a
        # write at it fails as on a block device
        assert os.pread(fd, 4096, 8 * MiB) == bytes(512)
        assert os.pwrite(fd, b"x" * 4096, 8 * MiB) == 512
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"y" * 4096, 8 * MiB + 512)
        assert exc.value.errno == errno.ENOSPC
        # a size change is ignored (cp's O_TRUNC), as on a block device
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 8 * MiB + 512
    finally:
        os.close(fd)

    # names cannot be made: the same answer from both loops
    for make in (lambda: (m / "new").touch(), lambda: (m / "dir").mkdir()):
        with pytest.raises(OSError) as exc:
            make()
        assert exc.value.errno == errno.ENOSYS
    with pytest.raises(FileNotFoundError):
        os.stat(m / "missing")

    # control files: read, write, the errno and reason of a bad spec
    assert "jobs" in (m / ".control" / "README").read_text()
    stats = m / ".control" / "images" / "a" / "stats"
    stats.write_text("boundaries=1000,2000\n")
    assert json.loads(stats.read_text())["rd_latency_histogram"]["boundaries"] == [1000, 2000]
    fd = os.open(stats, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, b"boundaries=2,1\n")
        assert exc.value.errno == errno.EINVAL
        assert b"increase" in os.read(fd, 4096)  # the reason, read from the same open file
    finally:
        os.close(fd)
    m.umount()
    assert raw.read_bytes()[: 4 * MiB] == data.read_bytes()
    assert raw.stat().st_size == 8 * MiB + 512
    qemu_img("check", str(qcow))
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(data), str(qcow)).returncode == 0


def test_threads_count_every_request(mount, tmp_path: Path) -> None:
    """Four fio jobs at queue depth 16 through two reader threads: the image's counters (and
    its file's) move by exactly what fio did."""
    need_tool("fio")
    # written, so in the page cache: every read is the threads' (an uncached one is not: see
    # test_uncached_reads_leave_the_threads)
    raw = random_file(tmp_path / "a.img", 64 * MiB, seed=1)
    m = mount(f"a={raw},format=raw", options=THREADS)
    before = m.stats("a")
    out = run(
        ["fio", "--name=mix", f"--filename={m / 'a'}", "--rw=randrw", "--rwmixread=60",
         "--bs=4k", "--numjobs=4", "--size=16M", "--offset_increment=16M",
         "--ioengine=libaio", "--iodepth=16", "--direct=1", "--group_reporting", "--output-format=json"],
        cwd=tmp_path,
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0]
    after = m.stats("a")
    reads, writes = job["read"]["total_ios"], job["write"]["total_ios"]
    assert reads > 1000 and writes > 1000
    assert after["rd_operations"] - before["rd_operations"] == reads
    assert after["wr_operations"] - before["wr_operations"] == writes
    assert after["rd_bytes"] - before["rd_bytes"] == job["read"]["io_bytes"]
    assert after["wr_bytes"] - before["wr_bytes"] == job["write"]["io_bytes"]
    bins = after["rd_latency_histogram"]["bins"]
    assert sum(bins) == after["rd_operations"]
    node = after["nodes"][0]
    assert node["rd_operations"] - before["nodes"][0]["rd_operations"] == reads
    assert node["wr_operations"] - before["nodes"][0]["wr_operations"] == writes
    # a raw image on a local file: every one of them answered in a reader thread
    assert after["direct"]["rd_operations"] - before["direct"]["rd_operations"] == reads
    assert after["direct"]["wr_operations"] - before["direct"]["wr_operations"] == writes


def test_job_filter_takes_every_write(mount, tmp_path: Path) -> None:
    """While a backup's copy-before-write filter is in the graph, no write takes the direct
    path (the filter sees each one first); the backup holds the disk as it was at its start;
    once the job is over, writes go through the threads again."""
    raw = tmp_path / "a.img"
    old = random_file(raw, 16 * MiB, seed=7)
    snapshot = tmp_path / "at-start.img"
    snapshot.write_bytes(old.read_bytes())
    m = mount(f"a={raw},format=raw", options=THREADS)
    target = tmp_path / "backup.qcow2"
    assert start(m, f"device=a target={target} format=qcow2 speed=2M id=bk") == "bk"
    before = m.stats("a")
    new = random_file(tmp_path / "new", 4 * MiB, seed=8)
    run(["dd", f"if={new}", f"of={m / 'a'}", "bs=64k", "oflag=direct", "conv=notrunc",
         "status=none"])  # fmt: skip
    during = m.stats("a")
    assert status(m, "bk")["state"] == "running"
    assert during["wr_operations"] - before["wr_operations"] == 64
    assert during["direct"]["wr_operations"] == before["direct"]["wr_operations"]
    assert wait_state(m, "bk", ("concluded",))["error"] is None
    run(["dd", f"if={new}", f"of={m / 'a'}", "bs=64k", "count=16", "oflag=direct",
         "conv=notrunc", "status=none"])  # fmt: skip
    assert m.stats("a")["direct"]["wr_operations"] - during["direct"]["wr_operations"] == 16
    m.umount()
    assert (
        qemu_img("compare", "-f", "raw", "-F", "qcow2", str(snapshot), str(target)).returncode == 0
    )


def test_listing_longer_than_one_answer(mount, tmp_path: Path) -> None:
    """200 images: the root's listing takes several READDIR answers (a page holds ~128 of
    these entries); a name added after a failed lookup is found at once (the kernel's
    negative entry is invalidated), a removed one is gone."""
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(MiB)
    m = mount(f"d000={base},format=raw", options=THREADS)
    with pytest.raises(FileNotFoundError):
        os.stat(m / "d001")
    add = m / ".control" / "images" / "add"
    names = [f"d{i:03d}" for i in range(200)]
    for name in names[1:]:
        img = tmp_path / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(MiB)
        with open(add, "w") as f:
            f.write(f"{name}={img},format=raw\n")
    assert os.stat(m / "d001").st_size == MiB
    assert sorted(os.listdir(m.path)) == [".control", *names]
    with open(m / ".control" / "images" / "remove", "w") as f:
        f.write("d150\n")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "d150")
    assert len(os.listdir(m.path)) == 200


def test_signal_while_threads_write(mount, tmp_path: Path) -> None:
    """SIGTERM while fio writes through the reader threads: the daemon stops, the mount goes,
    and what was written before is in the image (qemu-img reads it)."""
    need_tool("fio")
    raw = tmp_path / "a.img"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    m = mount(f"a={raw},format=raw", options=THREADS)
    head = random_file(tmp_path / "head", MiB, seed=3)
    run(["dd", f"if={head}", f"of={m / 'a'}", "bs=1M", "oflag=direct", "conv=notrunc,fsync",
         "status=none"])  # fmt: skip
    pid = m.pid
    fio = subprocess.Popen(
        ["fio", "--name=w", f"--filename={m / 'a'}", "--rw=randwrite", "--bs=4k",
         "--offset=8M", "--size=32M", "--ioengine=libaio", "--iodepth=16", "--direct=1",
         "--time_based", "--runtime=20"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while m.stats("a")["wr_operations"] < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        assert wait_gone(pid, 30), "the daemon did not stop on SIGTERM"
        fio.wait(timeout=30)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    deadline = time.monotonic() + 10
    while is_mounted(m.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(m.path)
    assert raw.read_bytes()[:MiB] == head.read_bytes()
    assert "Traceback" not in m.log_text()


def test_auto_loop_choice(mount, tmp_path: Path) -> None:
    """By default (auto) the threads serve a mount where some image has a direct path; a
    mount of images without one (here: behind the error-injection filter) keeps pyfuse3's
    loop, as ``--fuse-threads=0`` asks for any mount."""
    raw = tmp_path / "a.img"
    with open(raw, "wb") as f:
        f.truncate(MiB)
    m = mount(f"a={raw},format=raw")
    assert "FUSE requests: 2 reader threads" in m.log_text()
    m.umount()
    z = mount(f"a={raw},format=raw", options=("--fuse-threads=0",))
    assert "FUSE requests: pyfuse3's loop" in z.log_text()
    z.umount()
    n = mount(f"a={raw},format=raw,inject=on", options=("--fuse-threads=auto",))
    assert "FUSE requests: pyfuse3's loop" in n.log_text()
    data = random_file(tmp_path / "data", MiB, seed=5)
    run(["dd", f"if={data}", f"of={n / 'a'}", "bs=64k", "oflag=direct", "conv=notrunc",
         "status=none"])  # fmt: skip
    assert n.stats("a")["direct"] == {"rd_operations": 0, "wr_operations": 0}
    n.umount()
    assert raw.read_bytes() == data.read_bytes()


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_allocated_blocks_in_threads(mount, tmp_path: Path, fmt: str) -> None:
    """qcow2 and VHDX (dynamic): the first pass allocates (the event loop: refcounts and L2
    tables; the BAT through the log), the second rewrites the same clusters or blocks and the
    verify reads them in the reader threads; fio verifies both passes, qemu-img (and vhdiinfo)
    accept the image, and its content is what was read through the mount. A range never
    written reads as zeroes, in a thread too."""
    image = tmp_path / f"a.{fmt}"
    qemu_img("create", "-f", fmt, str(image), "160M")
    m = mount(f"a={image},format={fmt}", options=THREADS)
    first = fio_verify(m / "a", tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    after_first = m.stats("a")
    second = fio_verify(m / "a", tmp_path, "--verify_pattern=0x5a5a5a5a", "--verify=pattern")
    assert second.returncode == 0, second.stdout + second.stderr
    after = m.stats("a")
    written = after["wr_operations"] - after_first["wr_operations"]
    reads = after["rd_operations"] - after_first["rd_operations"]
    assert written == 4 * 32 * MiB // 4096
    # every cluster or block was allocated by the first pass
    assert after["direct"]["wr_operations"] - after_first["direct"]["wr_operations"] == written
    assert after["direct"]["rd_operations"] - after_first["direct"]["rd_operations"] == reads
    # never written (past what fio touched, below the end): zeroes, read in a thread
    fd = os.open(m / "a", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [buf], 150 * MiB) == MiB and buf[:] == bytes(MiB)
    finally:
        os.close(fd)
    assert m.stats("a")["direct"]["rd_operations"] > after["direct"]["rd_operations"]
    copy = tmp_path / "through.raw"
    run(["dd", f"if={m / 'a'}", f"of={copy}", "bs=1M", "iflag=direct", "status=none"])
    m.umount()
    qemu_img("check", str(image))
    assert qemu_img("compare", "-f", "raw", "-F", fmt, str(copy), str(image)).returncode == 0
    if fmt == "vhdx":
        assert run([need_tool("vhdiinfo"), str(image)]).returncode == 0


@pytest.mark.parametrize("fmt", ["qcow2", "vhdx"])
def test_reads_through_the_parent_in_threads(mount, tmp_path: Path, fmt: str) -> None:
    """An overlay (qcow2 over raw, a differencing VHDX over a dynamic one) freshly made: every
    read falls through to the parent's own direct path, in the reader threads, and reads what
    the parent holds; a write into the overlay then reads back over it."""
    base = tmp_path / f"base.{'raw' if fmt == 'qcow2' else 'vhdx'}"
    data = random_file(tmp_path / "data", 8 * MiB, seed=11)
    if fmt == "qcow2":
        base.write_bytes(data.read_bytes())
        qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(tmp_path / "top"))
    else:
        qemu_img("convert", "-f", "raw", "-O", "vhdx", str(data), str(base))
        blockfs("create", "-f", "vhdx", "-b", str(base), "-F", "vhdx", str(tmp_path / "top"))
    m = mount(f"top={tmp_path / 'top'},format={fmt}", options=THREADS)
    copy = tmp_path / "through.raw"
    run(["dd", f"if={m / 'top'}", f"of={copy}", "bs=64k", "iflag=direct", "status=none"])
    assert copy.read_bytes() == data.read_bytes()
    s = m.stats("top")
    assert s["direct"]["rd_operations"] == s["rd_operations"] == 8 * MiB // 65536
    m.umount()


def test_uncached_reads_leave_the_threads(mount, tmp_path: Path) -> None:
    """A read the page cache cannot answer is not waited for in a reader thread (two
    threads would cap the disk's queue depth at two): it goes to the event loop and its pool.
    Once cached, the same reads are the threads'. The data is right either way."""
    raw = tmp_path / "a.img"
    data = random_file(raw, 8 * MiB, seed=13)
    fd = os.open(raw, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
    finally:
        os.close(fd)
    m = mount(f"a={raw},format=raw", options=THREADS)
    copy = tmp_path / "cold"
    run(["dd", f"if={m / 'a'}", f"of={copy}", "bs=64k", "iflag=direct", "status=none"])
    assert copy.read_bytes() == data.read_bytes()
    cold = m.stats("a")
    assert cold["rd_operations"] == 128
    assert cold["direct"]["rd_operations"] < 128  # the uncached ones went to the loop
    run(["dd", f"if={m / 'a'}", f"of={copy}", "bs=64k", "iflag=direct", "status=none"])
    assert copy.read_bytes() == data.read_bytes()
    warm = m.stats("a")
    assert warm["direct"]["rd_operations"] - cold["direct"]["rd_operations"] == 128
