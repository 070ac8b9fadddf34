"""The daemon's life: bad input refused in one line with nothing mounted, and every way to end
a mount (blockfs umount, fusermount3 -u, SIGTERM, SIGINT, kill -9) leaving a clean mountpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BLOCKFS, blockfs, have_fuse, is_mounted, random_file, run, wait_gone

pytestmark = pytest.mark.skipif(not have_fuse(), reason="FUSE (/dev/fuse, fusermount3) is absent")


def _refused(tmp_path: Path, *args: str, expect: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    res = blockfs("mount", str(mnt), *args, check=False, timeout=60)
    try:
        assert res.returncode == 1, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("blockfs: "), res.stderr
        assert expect in lines[0], lines[0]
        assert "Traceback" not in res.stderr
        assert not is_mounted(mnt)
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


@pytest.fixture
def img(tmp_path: Path) -> Path:
    return random_file(tmp_path / "a.img", 65536)


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path, f"x={tmp_path / 'nope.img'}", expect="no such file")


def test_directory_as_image(tmp_path: Path) -> None:
    _refused(tmp_path, f"x={tmp_path}", expect="is a directory")


def test_unknown_key(tmp_path: Path, img: Path) -> None:
    _refused(tmp_path, f"x={img},colour=blue", expect="unknown option 'colour'")


def test_unknown_format(tmp_path: Path, img: Path) -> None:
    _refused(tmp_path, f"x={img},format=vmdk9", expect="unknown format")


def test_duplicate_names(tmp_path: Path, img: Path) -> None:
    _refused(tmp_path, f"x={img}", f"x={img}", expect="two images named 'x'")


def test_duplicate_basenames(tmp_path: Path, img: Path) -> None:
    _refused(tmp_path, str(img), str(img), expect="two images named 'a.img'")


@pytest.mark.parametrize("name", [".hidden", "a@b", "a\x1bb", "a\rb", "a\u202eb"])
def test_bad_names(tmp_path: Path, img: Path, name: str) -> None:
    _refused(tmp_path, f"{name}={img}", expect=repr(name))


def test_slash_in_name_is_a_path(tmp_path: Path, img: Path) -> None:
    # "a/b=..." is no NAME=PATH: it is taken as a path, which does not exist.
    _refused(tmp_path, f"a/b={img}", expect="no such file")


def test_no_images(tmp_path: Path) -> None:
    _refused(tmp_path, expect="no image given")


def test_bad_read_only_value(tmp_path: Path, img: Path) -> None:
    _refused(tmp_path, f"x={img},read-only=maybe", expect="expected on or off")


def test_missing_mountpoint(tmp_path: Path, img: Path) -> None:
    res = blockfs("mount", str(tmp_path / "nodir"), f"x={img}", check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "no such directory" in res.stderr


def test_mountpoint_in_use(mount, tmp_path: Path, img: Path) -> None:
    m = mount(f"x={img}")
    res = blockfs("mount", str(m.path), f"y={img}", check=False)
    assert res.returncode == 1
    assert "mounted there already" in res.stderr and res.stderr.count("\n") == 1
    assert (m / "x").exists()


def test_umount_of_something_not_mounted(tmp_path: Path) -> None:
    res = blockfs("umount", str(tmp_path), check=False)
    assert res.returncode == 1 and "not mounted" in res.stderr


def _wait_exit(pid: int, timeout: float = 30) -> None:
    assert wait_gone(pid, timeout), f"daemon {pid} still runs"


def _write_and_check(m, img: Path) -> None:  # type: ignore[no-untyped-def]
    with open(m / "x", "r+b") as f:
        f.write(b"Z" * 4096)
        f.flush()


@pytest.mark.parametrize("how", ["blockfs-umount", "fusermount", "sigterm", "sigint"])
def test_every_way_out_is_clean(mount, tmp_path: Path, img: Path, how: str) -> None:
    m = mount(f"x={img}")
    pid = m.pid
    _write_and_check(m, img)
    if how == "blockfs-umount":
        blockfs("umount", str(m.path))
    elif how == "fusermount":
        run(["fusermount3", "-u", str(m.path)])
    else:
        os.kill(pid, signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    _wait_exit(pid)
    assert not is_mounted(m.path)
    assert img.read_bytes()[:4096] == b"Z" * 4096
    assert "Transport endpoint" not in run(["ls", str(m.path)], check=False).stderr


def test_umount_refuses_while_a_file_is_open(mount, tmp_path: Path, img: Path) -> None:
    m = mount(f"x={img}")
    with open(m / "x", "rb"):
        res = blockfs("umount", str(m.path), check=False)
        assert res.returncode == 1 and "busy" in res.stderr
        assert is_mounted(m.path)
    m.umount()


def test_kill_9_then_umount_recovers(mount, tmp_path: Path, img: Path) -> None:
    m = mount(f"x={img}")
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    _wait_exit(pid)
    res = run(["stat", str(m.path)], check=False)
    assert "Transport endpoint is not connected" in res.stderr
    blockfs("umount", str(m.path))
    assert not is_mounted(m.path)
    assert os.listdir(m.path) == []


def test_kill_9_then_mount_again_recovers(mount, tmp_path: Path, img: Path) -> None:
    m = mount(f"x={img}")
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    _wait_exit(pid)
    blockfs("mount", str(m.path), f"x={img}")
    try:
        run(["cmp", str(img), str(m / "x")])
    finally:
        blockfs("umount", str(m.path))


def test_foreground_mode_serves_until_unmounted(tmp_path: Path, img: Path) -> None:
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen([*BLOCKFS, "mount", "--foreground", str(mnt), f"x={img}"])
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "x").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        run(["cmp", str(img), str(mnt / "x")])
        run(["fusermount3", "-u", str(mnt)])
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_one_file_twice_is_refused_when_written(tmp_path: Path, img: Path) -> None:
    # The image lock of the first open refuses the second (as QEMU's would).
    _refused(tmp_path, f"a={img}", f"b={img}", expect="in use by someone that forbids writers")


def test_one_file_twice_read_only_is_fine(mount, img: Path) -> None:
    m = mount(f"a={img},read-only=on", f"b={img},read-only=on")
    run(["cmp", str(m / "a"), str(m / "b")])


def test_a_written_base_under_a_mounted_overlay_is_refused(mount, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)])
    # Overlay first: the lock its backing file holds refuses the writer.
    _refused(tmp_path, f"top={top}", f"base={base}", expect="in use by someone")
    # Base first: its lock does not stop readers, so the mount's own check refuses the overlay.
    _refused(tmp_path, f"base={base}", f"top={top}", expect="in use by image base")
    m = mount(f"top={top}", f"base={base},read-only=on")
    run(["cmp", str(m / "top"), str(m / "base")])


def test_qemu_cannot_write_a_mounted_image_but_can_read_it(mount, img: Path) -> None:
    m = mount(f"a={img}")
    res = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(img)], check=False)
    assert res.returncode != 0 and 'Failed to get "write" lock' in res.stderr
    assert "virtual size" in run(["qemu-img", "info", "-f", "raw", str(img)]).stdout
    m.umount()
    run(["qemu-io", "-f", "raw", "-c", "write 0 4k", str(img)])


def test_an_image_qemu_writes_is_refused(tmp_path: Path, img: Path) -> None:
    # qemu-io in interactive mode keeps the image open read-write until its input ends.
    qemu = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        held = f":{img.stat().st_ino} 100 101"  # QEMU's read and write permission bytes
        while held not in Path("/proc/locks").read_text():
            assert time.monotonic() < deadline and qemu.poll() is None
            time.sleep(0.05)
        _refused(tmp_path, f"a={img}", expect="another process writes this image")
        _refused(tmp_path, f"a={img},read-only=on", expect="another process writes this image")
    finally:
        assert qemu.stdin is not None
        qemu.stdin.close()
        qemu.wait(timeout=30)
