"""Raw images through a real mount: byte-exact round trips, the edges of the disk, the files
under .control, and what other tools (qemu-img, qemu-io, fio, mkfs + loop) make of the file."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import fio_verify, need_tool, qemu_img, random_file, run

ODD_SIZES = [1, 511, 513, 4097, 3 * 1024 * 1024 + 1234]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_read_back_exact_for_odd_sizes(mount, tmp_path: Path, size: int) -> None:
    img = random_file(tmp_path / "odd.img", size, seed=size)
    m = mount(f"d={img}")
    f = m / "d"
    assert f.stat().st_size == size
    run(["cmp", str(img), str(f)])
    qemu_img("compare", "-f", "raw", "-F", "raw", str(img), str(f))


def test_writes_straddling_the_end(mount, tmp_path: Path) -> None:
    size = 1_000_003
    img = random_file(tmp_path / "a.img", size, seed=1)
    ref = tmp_path / "ref.img"
    shutil.copy(img, ref)
    m = mount(f"a={img}")
    fd = os.open(m / "a", os.O_RDWR)
    try:
        data = random.Random(2).randbytes(8192)
        # Cut short at the end, like a block device: the part that fits is written.
        assert os.pwrite(fd, data, size - 100) == 100
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, data, size)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, data, size + 5000)
        assert exc.value.errno == errno.ENOSPC
        # Reads at or past the end are empty; reads straddling it are cut short.
        assert os.pread(fd, 4096, size) == b""
        assert os.pread(fd, 4096, size + 1 << 20) == b""
        assert os.pread(fd, 4096, size - 10) == data[90:100]
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(ref, "r+b") as r:
        r.seek(size - 100)
        r.write(data[:100])
    m.umount()
    assert img.stat().st_size == size
    qemu_img("compare", "-f", "raw", "-F", "raw", str(img), str(ref))


def test_random_writes_match_a_reference(mount, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024 + 777
    img = random_file(tmp_path / "a.img", size, seed=3)
    ref = tmp_path / "ref.img"
    shutil.copy(img, ref)
    m = mount(f"a={img}")
    rnd = random.Random(4)
    with open(m / "a", "r+b", buffering=0) as f, open(ref, "r+b") as r:
        for _ in range(300):
            off = rnd.randrange(size)
            data = rnd.randbytes(rnd.choice([1, 17, 512, 4096, 65536, 200_000]))
            data = data[: size - off]
            f.seek(off)
            f.write(data)
            r.seek(off)
            r.write(data)
    run(["cmp", str(ref), str(m / "a")])
    m.umount()
    qemu_img("compare", "-f", "raw", "-F", "raw", str(img), str(ref))


def test_dd_and_qemu_io_through_the_mount(mount, tmp_path: Path) -> None:
    img = tmp_path / "b.img"
    qemu_img("create", "-f", "raw", str(img), "16M")
    src = random_file(tmp_path / "src", 4 * 1024 * 1024, seed=5)
    m = mount(f"disk1={img}")
    run(["dd", f"if={src}", f"of={m / 'disk1'}", "bs=1M", "conv=notrunc,fsync", "status=none"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 8M 64k", str(m / "disk1")])
    out = run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 8M 64k", str(m / "disk1")]).stdout
    assert "read 65536/65536" in out
    stats = m.stats("disk1")
    assert stats["wr_bytes"] >= 4 * 1024 * 1024 + 65536
    assert stats["wr_operations"] > 0 and stats["flush_operations"] >= 1
    assert stats["rd_operations"] > 0
    m.umount()
    # The image file holds what was written, judged by qemu-io on the file itself.
    assert (
        "read 65536/65536"
        in run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 8M 64k", str(img)]).stdout
    )
    head = img.read_bytes()[: len(src.read_bytes())]
    assert head == src.read_bytes()


def test_o_direct_reads_and_writes(mount, tmp_path: Path) -> None:
    img = random_file(tmp_path / "a.img", 4 * 1024 * 1024, seed=6)
    m = mount(f"a={img}")
    fd = os.open(m / "a", os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 65536)
        buf.write(random.Random(7).randbytes(65536))
        assert os.pwritev(fd, [buf], 1 << 20) == 65536
        back = mmap.mmap(-1, 65536)
        assert os.preadv(fd, [back], 1 << 20) == 65536
        assert bytes(back) == bytes(buf)
    finally:
        os.close(fd)
    m.umount()
    assert img.read_bytes()[1 << 20 : (1 << 20) + 65536] == bytes(buf)


def test_read_only_image_refuses_writes(mount, tmp_path: Path) -> None:
    img = random_file(tmp_path / "a.img", 65536, seed=8)
    before = img.read_bytes()
    m = mount(f"a={img},read-only=on", f"b={random_file(tmp_path / 'b.img', 4096)}")
    st = (m / "a").stat()
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert stat.S_IMODE((m / "b").stat().st_mode) == 0o644
    with pytest.raises(OSError) as exc:
        os.open(m / "a", os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    assert m.info("a")["blockfs"]["read-only"] is True
    m.umount()
    assert img.read_bytes() == before


def test_whole_mount_read_only(mount, tmp_path: Path) -> None:
    img = random_file(tmp_path / "a.img", 65536, seed=9)
    m = mount(f"a={img}", options=("--read-only",))
    with pytest.raises(OSError) as exc:
        os.open(m / "a", os.O_WRONLY)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    run(["cmp", str(img), str(m / "a")])


def test_sparse_image_reports_its_allocation(mount, tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(10 * 1024 * 1024)
        f.write(b"x" * 1024 * 1024)
    m = mount(f"s={img}")
    st = (m / "s").stat()
    assert st.st_size == 64 * 1024 * 1024
    assert 1024 * 1024 <= st.st_blocks * 512 <= 2 * 1024 * 1024
    du = int(run(["du", "-k", str(m / "s")]).stdout.split()[0])
    assert du < 4096
    # cp --sparse=always keeps the holes in the copy.
    out = tmp_path / "copy.img"
    run(["cp", "--sparse=always", str(m / "s"), str(out)])
    assert out.stat().st_blocks * 512 < 4 * 1024 * 1024
    run(["cmp", str(img), str(out)])


def test_info_and_listing(mount, tmp_path: Path) -> None:
    a = random_file(tmp_path / "a.img", 12345, seed=10)
    b = random_file(tmp_path / "bee.raw", 4096, seed=11)
    m = mount(f"disk0={a}", str(b))
    names = sorted(os.listdir(m.path))
    assert names == [".control", "bee.raw", "disk0"]
    info = m.info("disk0")
    assert info["blockfs"]["device"] == "disk0"
    assert info["format"] == "raw"
    assert info["virtual-size"] == 12345
    assert info["filename"] == str(a)
    assert info["blockfs"]["read-only"] is False
    assert info["blockfs"]["jobs"] == []
    assert int((m.path / ".control" / "pid").read_text()) == m.pid
    assert stat.S_ISREG((m / "disk0").stat().st_mode)


def test_mkfs_ext4_loop_mount_and_fsck(mount, tmp_path: Path) -> None:
    need_tool("mkfs.ext4")
    img = tmp_path / "fs.img"
    qemu_img("create", "-f", "raw", str(img), "64M")
    m = mount(f"fs={img}")
    run(["mkfs.ext4", "-q", "-F", str(m / "fs")])
    mnt = tmp_path / "loopmnt"
    mnt.mkdir()
    res = run(["mount", "-o", "loop", str(m / "fs"), str(mnt)], check=False)
    if res.returncode != 0:
        pytest.skip(f"loop mounts do not work here: {res.stderr.strip()}")
    try:
        payload = random.Random(12).randbytes(3 * 1024 * 1024)
        for i in range(5):
            (mnt / f"file{i}").write_bytes(payload[i:])
        run(["sync"])
    finally:
        run(["umount", str(mnt)])
    run(["e2fsck", "-fn", str(m / "fs")])
    m.umount()
    run(["e2fsck", "-fn", str(img)])
    out = subprocess.run(["debugfs", "-R", "cat /file3", str(img)], capture_output=True, check=True)
    assert out.stdout == payload[3:]


def test_fio_verify_eight_jobs(mount, tmp_path: Path) -> None:
    need_tool("fio")
    img = tmp_path / "fio.img"
    qemu_img("create", "-f", "raw", str(img), "256M")
    m = mount(f"fio={img}")
    res = fio_verify(m / "fio", tmp_path, "--numjobs=8")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify" in res.stdout and "err= 0" in res.stdout
