"""A real QEMU guest (TCG) doing I/O on a disk, as users do with mounted images.

Each test boots one throwaway guest (tests/guestvm.py) on one disk and runs one workload in it:
known patterns written with dd and read back in the guest, or an ext2 file system made, filled and
unmounted in the guest. The host then checks the image with its own tools: a byte comparison, or
``e2fsck -fn`` and ``debugfs``. Blockfs-backed disks are checked twice: through the mount while it
is live, and on the backing image after unmount (qcow2 through ``qemu-img convert``, an oracle that
owes nothing to blockfs).

The disk is a plain file (so a failure here is about the guest kit, not blockfs), or a blockfs
mount of a raw or qcow2 image; QEMU opens it with ``cache=none`` (O_DIRECT through FUSE) and with
``cache=writeback``. Everything skips with its reason when QEMU, busybox or a kernel is missing,
and the qcow2 cases skip while ``blockfs mount`` rejects qcow2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestvm

DISK_BYTES = 64 << 20
BLOCKFS = [sys.executable, "-m", "blockfs"]

pytestmark = pytest.mark.skipif(
    shutil.which(guestvm.QEMU) is None,
    reason=f"{guestvm.QEMU} is not installed (apt-get install qemu-system-x86)",
)


@pytest.fixture(scope="module")
def guest_kit() -> guestvm.GuestKit:
    try:
        return guestvm.GuestKit.prepare()
    except guestvm.GuestUnavailable as e:
        pytest.skip(f"cannot build a guest: {e}")


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _wait_gone(pid: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class BlockfsMount:
    """One image mounted as MNT/vm by the blockfs CLI; `close` always leaves nothing mounted."""

    def __init__(self, mnt: Path, log: Path) -> None:
        self.mnt = mnt
        self.log = log
        self.pid: int | None = None

    @property
    def disk(self) -> Path:
        return self.mnt / "vm"

    def open(self, image: Path, fmt: str) -> None:
        self.mnt.mkdir()
        res = subprocess.run(
            [*BLOCKFS, "mount", "--log", str(self.log), str(self.mnt), f"vm={image},format={fmt}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0:
            if fmt != "raw" and "format" in res.stderr:
                pytest.skip(f"blockfs mount does not take {fmt} yet: {res.stderr.strip()}")
            raise AssertionError(f"blockfs mount failed ({res.returncode}): {res.stderr}")
        try:
            self.pid = int((self.mnt / ".control" / "pid").read_text())
        except (OSError, ValueError):
            self.pid = None

    def umount(self) -> None:
        """Unmount cleanly (flushing the image) and fail if that did not work."""
        res = subprocess.run(
            [*BLOCKFS, "umount", str(self.mnt)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, f"blockfs umount failed: {res.stderr}"
        assert not _is_mounted(self.mnt)
        if self.pid is not None:
            _wait_gone(self.pid)

    def close(self) -> None:
        if _is_mounted(self.mnt):
            subprocess.run(
                [*BLOCKFS, "umount", str(self.mnt)], check=False, capture_output=True, timeout=120
            )
        if _is_mounted(self.mnt):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mnt)], check=False, capture_output=True
            )
        if self.pid is not None:
            _wait_gone(self.pid)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class Target:
    """Where the guest's disk lives, and how the host reads the result back as a raw image."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.fmt = "qcow2" if kind == "blockfs-qcow2" else "raw"
        self.image = tmp_path / f"disk.{self.fmt}"
        self.mount: BlockfsMount | None = None
        if self.fmt == "qcow2":
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(DISK_BYTES)],
                check=True,
            )
        else:
            with open(self.image, "wb") as f:
                f.truncate(DISK_BYTES)
        if kind != "plain":
            self.mount = BlockfsMount(tmp_path / "mnt", tmp_path / "blockfs.log")

    @property
    def disk(self) -> Path:
        """The file QEMU opens."""
        return self.mount.disk if self.mount is not None else self.image

    def raw_after_unmount(self) -> Path:
        """The backing image as raw bytes, read without blockfs."""
        if self.fmt == "raw":
            return self.image
        check = subprocess.run(
            ["qemu-img", "check", str(self.image)], check=False, capture_output=True, text=True
        )
        assert check.returncode == 0, f"qemu-img check: {check.stdout}{check.stderr}"
        raw = self.tmp_path / "converted.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.image), str(raw)],
            check=True,
        )
        return raw


@pytest.fixture(params=["plain", "blockfs-raw", "blockfs-qcow2"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    t = Target(request.param, tmp_path)
    if t.mount is None:
        yield t
        return
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    try:
        t.mount.open(t.image, t.fmt)
        yield t
    finally:
        t.mount.close()
    text = t.mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"


def _boot_and_check(
    kit: guestvm.GuestKit,
    target: Target,
    cache: str,
    workload: guestvm.PatternWorkload | guestvm.Ext2Workload,
    result_key: str,
) -> None:
    disk = guestvm.Disk(target.disk, format="raw", cache=cache)
    result = kit.run(workload.script(), [disk], timeout=120)
    assert result.ok, result.explain()
    assert result.results.get(result_key), result.explain()

    if target.mount is not None:
        # Through the live mount: what a second reader of MNT/vm sees.
        problems = workload.verify_host(target.disk)
        assert not problems, f"through the mount: {problems}"
        target.mount.umount()
    problems = workload.verify_host(target.raw_after_unmount())
    assert not problems, f"backing image after unmount: {problems}"


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_guest_patterns_written_with_dd_read_back_in_guest_and_host(
    guest_kit: guestvm.GuestKit, target: Target, cache: str
) -> None:
    _boot_and_check(guest_kit, target, cache, guestvm.PatternWorkload(DISK_BYTES), "pattern")


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_guest_ext2_survives_poweroff_fsck_clean_and_files_intact(
    guest_kit: guestvm.GuestKit, target: Target, cache: str
) -> None:
    if shutil.which("e2fsck") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsck/debugfs are not installed (apt-get install e2fsprogs)")
    _boot_and_check(guest_kit, target, cache, guestvm.Ext2Workload(), "ext2")


def test_guest_script_failure_and_timeout_are_reported(guest_kit: guestvm.GuestKit) -> None:
    failed = guest_kit.run("echo before\nfalse\necho after\n", timeout=60)
    assert failed.exit_status == 1 and not failed.ok
    assert failed.stdout.splitlines() == ["before"]

    hung = guest_kit.run("sleep 600\n", timeout=3)
    assert hung.timed_out and hung.exit_status is None and not hung.ok
