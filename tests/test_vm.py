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

Jobs while the guest writes: the guest (`guestvm.PointInTimeWorkload`) writes BEFORE markers,
pauses at a serial-console handshake while the host starts a backup, then writes AFTER markers and
a load while the (rate-limited) job still runs. The backup must equal the disk at the pause
(``qemu-img compare`` against a copy the host took then), with ``qemu-img check`` clean on a qcow2
target; the live disk holds the AFTER markers. A mirror (`guestvm.SwitchOverWorkload`, in
copy-mode background and write-blocking): the guest writes BEFORE markers, DURING markers and a
load while the slowed job copies, and AFTER markers once ``complete`` switched its disk over to
the target under it; the target then holds all three and the old image BEFORE and DURING only,
both ``qemu-img check`` clean. Commit joins here when it exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestvm
from test_vhdx import vhdimount_read


def need_vhdimount() -> None:
    if shutil.which("vhdimount") is None:
        pytest.skip("vhdimount is not installed (make setup installs libvhdi-utils)")


DISK_BYTES = 64 << 20
BLOCKFS = [sys.executable, "-m", "blockfs"]
#: the opt-in flag for long runs (tests/conftest.py)
FULL = os.environ.get("BLOCKFS_FULL") == "1"

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
        self.fmt = {"blockfs-qcow2": "qcow2", "blockfs-vhdx": "vhdx"}.get(kind, "raw")
        if kind == "blockfs-vhdx-diff":
            self.fmt = "vhdx"
        self.image = tmp_path / f"disk.{self.fmt}"
        self.mount: BlockfsMount | None = None
        if kind == "blockfs-vhdx":  # a dynamic VHDX made by blockfs
            subprocess.run(
                [*BLOCKFS, "create", "-f", "vhdx", str(self.image), str(DISK_BYTES)], check=True
            )
        elif kind == "blockfs-vhdx-diff":  # a differencing VHDX over a parent qemu-io wrote
            parent = tmp_path / "parent.vhdx"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "vhdx", str(parent), str(DISK_BYTES)],
                check=True,
            )
            subprocess.run(
                ["qemu-io", "-f", "vhdx", "-c", f"write -P 0x5a 0 {DISK_BYTES // 2}", str(parent)],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [*BLOCKFS, "create", "-f", "vhdx", "-b", str(parent), str(self.image)], check=True
            )
        elif self.fmt == "qcow2":
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
        raw = self.tmp_path / "converted.raw"
        if self.kind == "blockfs-vhdx-diff":
            # QEMU cannot open a differencing VHDX: libvhdi (vhdimount) is the judge.
            raw.write_bytes(vhdimount_read(self.image, self.tmp_path))
            return raw
        check = subprocess.run(
            ["qemu-img", "check", str(self.image)], check=False, capture_output=True, text=True
        )
        assert check.returncode == 0, f"qemu-img check: {check.stdout}{check.stderr}"
        subprocess.run(
            ["qemu-img", "convert", "-f", self.fmt, "-O", "raw", str(self.image), str(raw)],
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
    if target.mount is None and cache != "none" and not FULL:
        pytest.skip("the plain-file baseline runs in one cache mode (both with BLOCKFS_FULL=1)")
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


# By default each cache mode once (the patterns here, the file system below), and each
# blockfs target once: qcow2 here, raw below; every combination, and the plain-file baseline
# that checks the harness itself, with BLOCKFS_FULL=1.
_ALL_TARGETS = ["plain", "blockfs-raw", "blockfs-qcow2"]


@pytest.mark.parametrize("cache", ["none", "writeback"] if FULL else ["none"])
@pytest.mark.parametrize(
    "target", _ALL_TARGETS if FULL else ["blockfs-qcow2"], indirect=True
)
def test_guest_patterns_written_with_dd_read_back_in_guest_and_host(
    guest_kit: guestvm.GuestKit, target: Target, cache: str
) -> None:
    _boot_and_check(guest_kit, target, cache, guestvm.PatternWorkload(DISK_BYTES), "pattern")


#: the differencing image by default (it reads through its dynamic parent); both with
#: BLOCKFS_FULL=1
@pytest.fixture(params=["blockfs-vhdx", "blockfs-vhdx-diff"] if FULL else ["blockfs-vhdx-diff"])
def vhdx_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    t = Target(request.param, tmp_path)
    assert t.mount is not None
    try:
        t.mount.open(t.image, t.fmt)
        yield t
    finally:
        t.mount.close()
    text = t.mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"


def test_guest_ext2_on_a_dynamic_and_a_differencing_vhdx(
    guest_kit: guestvm.GuestKit, vhdx_target: Target
) -> None:
    """The guest makes and fills an ext2 file system on a mounted VHDX (dynamic, made by
    blockfs; differencing, over a parent qemu-io wrote) and powers off; e2fsck is clean and
    the files are intact, read through the mount and, after unmount, by an independent
    reader (qemu-img convert; libvhdi's vhdimount for the differencing image)."""
    if shutil.which("e2fsck") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsck/debugfs are not installed (apt-get install e2fsprogs)")
    if vhdx_target.kind == "blockfs-vhdx-diff":
        need_vhdimount()
    _boot_and_check(guest_kit, vhdx_target, "none", guestvm.Ext2Workload(), "ext2")


@pytest.mark.parametrize("cache", ["none", "writeback"] if FULL else ["writeback"])
@pytest.mark.parametrize("target", _ALL_TARGETS if FULL else ["blockfs-raw"], indirect=True)
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


def test_guest_waits_at_host_phase_until_the_host_answers(guest_kit: guestvm.GuestKit) -> None:
    script = guestvm.HOST_PHASE_SH + "host_phase one\necho went on\nhost_phase two 2\n"
    with guest_kit.start(script) as guest:
        guest.expect("phase", "one", timeout=60)
        assert "went on" not in guest.console()
        guest.send("go")
        guest.expect("phase", "two", timeout=30)
        # No answer this time: the guest gives up after its own bound, 2 s, and fails the script.
        result = guest.wait(timeout=30)
    assert "went on" in result.stdout
    assert result.exit_status == 1 and not result.timed_out, result.explain()
    assert "GUEST-FAIL: no answer from the host after phase two" in result.stdout


# --------------------------------------------------------------------------------------------
# A backup started while the guest runs: between its BEFORE and its AFTER markers.

BACKUP_DISK_BYTES = 32 << 20
#: Slow enough that the guest's whole AFTER phase lands while the job still copies (32 MiB at
#: 512 KiB/s is a minute); lifted to unlimited once the guest has written everything.
BACKUP_START_SPEED = "512K"


def _filled_image(tmp_path: Path, fmt: str) -> Path:
    """An image whose every sector holds data (``FILL sector=N``): the job has real work, where
    zeros would be skipped at once."""
    raw = tmp_path / "fill.raw"
    with open(raw, "wb") as f:
        for mib in range(BACKUP_DISK_BYTES >> 20):
            first = mib * 2048
            f.write(
                b"".join(
                    f"FILL sector={s:010d}".ljust(guestvm.SECTOR - 1).encode() + b"\n"
                    for s in range(first, first + 2048)
                )
            )
    if fmt == "raw":
        return raw
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(image)], check=True
    )
    raw.unlink()
    return image


def _control(mnt: Path, path: str, text: str) -> str:
    from blockfs.cli.jobs import write_control

    return write_control(str(mnt / ".control" / path), text)


def _job_status(mnt: Path, job_id: str) -> dict[str, object]:
    return json.loads((mnt / ".control" / "jobs" / job_id / "status").read_text())  # type: ignore[no-any-return]


def _wait_concluded(mnt: Path, job_id: str, timeout: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        status = _job_status(mnt, job_id)
        if status["state"] == "concluded":
            return status
        assert time.monotonic() < deadline, f"job {job_id} did not conclude: {status}"
        time.sleep(0.05)


def _as_raw(image: Path, fmt: str, out: Path) -> Path:
    """The image as raw bytes, read by qemu-img (and checked by it when it is qcow2)."""
    if fmt == "raw":
        return image
    check = subprocess.run(
        ["qemu-img", "check", str(image)], check=False, capture_output=True, text=True
    )
    assert check.returncode == 0, f"qemu-img check {image}: {check.stdout}{check.stderr}"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True
    )
    return out


def _before_extents_in(
    view: Path, workload: guestvm.PointInTimeWorkload | guestvm.SwitchOverWorkload
) -> list[str]:
    """Read the BEFORE extents of a file: what they do not hold."""
    problems = []
    with open(view, "rb") as f:
        for first, count in workload.before_extents():
            f.seek(first * guestvm.SECTOR)
            got = f.read(count * guestvm.SECTOR)
            want = b"".join(
                guestvm.pattern_sector(s, "BEFORE") for s in range(first, first + count)
            )
            if got != want:
                problems.append(f"sectors {first}+{count}: got {got[:48]!r}")
    return problems


@pytest.mark.parametrize(
    "source_fmt,target_fmt,view",
    # the point-in-time view by default (qcow2 sources and targets: test_backup.py); every
    # case with BLOCKFS_FULL=1
    [("raw", "qcow2", False), ("qcow2", "qcow2", False), ("raw", "raw", True)][
        0 if FULL else 2 :
    ],
    ids=["raw-to-qcow2", "qcow2-to-qcow2", "raw-to-raw-view"][0 if FULL else 2 :],
)
def test_backup_started_mid_run_holds_the_disk_as_it_was_at_the_start(
    guest_kit: guestvm.GuestKit, tmp_path: Path, source_fmt: str, target_fmt: str, view: bool
) -> None:
    """The guest writes BEFORE markers and pauses; the host copies the disk for reference and
    starts a rate-limited backup; the guest writes AFTER markers and an AFTER-load over the disk
    while the job runs, and pauses again; the job is set free and concludes. The backup equals
    the reference exactly (every BEFORE, no AFTER), the live disk holds every AFTER and no
    BEFORE. With ``view=on`` the host reads MNT/vm@vm during the AFTER writes and after them: it
    shows the disk as it was at the start throughout."""
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    workload = guestvm.PointInTimeWorkload(BACKUP_DISK_BYTES)
    image = _filled_image(tmp_path, source_fmt)
    mount = BlockfsMount(tmp_path / "mnt", tmp_path / "blockfs.log")
    target = tmp_path / f"backup.{target_fmt}"
    reference = tmp_path / "reference.raw"
    view_file = mount.mnt / "vm@vm"
    try:
        mount.open(image, source_fmt)
        disk = guestvm.Disk(mount.disk, format="raw", cache="none")
        with guest_kit.start(workload.script(), [disk]) as guest:
            guest.expect("phase", "before-written", timeout=120)
            # The guest is parked and synced: this is the disk the backup must hold.
            shutil.copyfile(mount.disk, reference)
            spec = f"device=vm target={target} format={target_fmt} sync=full"
            spec += f" speed={BACKUP_START_SPEED}" + (" view=on" if view else "")
            assert _control(mount.mnt, "jobs/backup", spec) == "vm"
            assert _job_status(mount.mnt, "vm")["state"] in ("created", "running")
            guest.send("go")

            view_reads = 0
            if view:
                # Read the view while the guest writes AFTER (at least once, however fast it is).
                for _ in range(10_000):
                    problems = _before_extents_in(view_file, workload)
                    assert not problems, f"view during the AFTER writes: {problems}"
                    view_reads += 1
                    if guest.seen("phase", "after-written"):
                        break
            guest.expect("phase", "after-written", timeout=120)

            status = _job_status(mount.mnt, "vm")
            # Otherwise the guest's AFTER writes did not race the job and this proves little.
            assert status["state"] == "running", status
            assert status["offset"] < status["len"], status  # type: ignore[operator]
            if view:
                view_copy = tmp_path / "view.raw"
                shutil.copyfile(view_file, view_copy)
                cmp = subprocess.run(["cmp", str(reference), str(view_copy)], check=False)
                assert cmp.returncode == 0, "the view differs from the disk at the start"
                assert not workload.verify_snapshot(view_copy)

            _control(mount.mnt, "jobs/vm/ctl", "speed=0")
            status = _wait_concluded(mount.mnt, "vm")
            assert status["error"] is None, status
            assert status["offset"] == status["len"] == BACKUP_DISK_BYTES, status
            assert not view_file.exists()

            guest.send("go")
            result = guest.wait(timeout=60)
        assert result.ok, result.explain()
        assert result.results.get("markers") == "written", result.explain()
        _control(mount.mnt, "jobs/vm/ctl", "dismiss")
        assert not (mount.mnt / ".control" / "jobs" / "vm").exists()

        live_problems = workload.verify_host(mount.disk)
        assert not live_problems, f"live disk through the mount: {live_problems}"
        mount.umount()
    finally:
        mount.close()
    text = mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"

    backup = _as_raw(target, target_fmt, tmp_path / "backup-converted.raw")
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(backup), str(reference)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, f"backup != disk at the start: {compare.stdout}"
    assert not workload.verify_snapshot(backup)
    live = _as_raw(image, source_fmt, tmp_path / "live-converted.raw")
    assert not workload.verify_host(live), "live image after unmount"
    if view:
        print(f"view read {view_reads} times during the AFTER writes")


# --------------------------------------------------------------------------------------------
# A mirror while the guest runs: BEFORE it, DURING its copy, AFTER its switch-over.

#: The job copies about the first quarter of the disk at the fast speed, then crawls at the slow
#: one while the guest writes its DURING phase (24 MiB at 256 KiB/s would take 96 s), so those
#: writes land both on clusters already copied and on clusters not copied yet.
MIRROR_FAST_SPEED = "4M"
MIRROR_SLOW_SPEED = "256K"


def _wait_job(
    mnt: Path, job_id: str, what: str, done: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """Poll the job's status until ``done(status)``; the status that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        status = _job_status(mnt, job_id)
        if done(status):
            return status
        assert time.monotonic() < deadline, f"job {job_id}: not {what} after {timeout}s: {status}"
        time.sleep(0.02)


def _events(mnt: Path) -> list[dict[str, Any]]:
    text = (mnt / ".control" / "events").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"] if FULL else ["background"])
def test_mirror_moves_a_running_guest_disk_and_switches_it_over_under_the_guest(
    guest_kit: guestvm.GuestKit, tmp_path: Path, copy_mode: str
) -> None:
    """The guest writes BEFORE markers and pauses; the host starts a mirror of its qcow2 disk
    to a new qcow2 target, lets it copy about a quarter of the disk fast and then slows it to a
    crawl; the guest writes a DURING load and markers all over the disk while the job copies,
    and pauses again. The host lets the job catch up (speed=0), waits for ready, completes it:
    the job concludes without error and the device's info names the target. The guest, which
    kept its disk open throughout, writes AFTER markers (now landing on the target only) and
    powers off. After unmount the target (``qemu-img check`` clean) holds every marker of the
    three phases; the old image (clean too) holds every BEFORE and DURING marker and no AFTER."""
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    disk_bytes = BACKUP_DISK_BYTES
    workload = guestvm.SwitchOverWorkload(disk_bytes)
    image = _filled_image(tmp_path, "qcow2")
    mount = BlockfsMount(tmp_path / "mnt", tmp_path / "blockfs.log")
    target = tmp_path / "target.qcow2"
    info_file = mount.mnt / ".control" / "images" / "vm" / "info"
    try:
        mount.open(image, "qcow2")
        assert json.loads(info_file.read_text())["filename"] == str(image)
        disk = guestvm.Disk(mount.disk, format="raw", cache="none")
        with guest_kit.start(workload.script(), [disk]) as guest:
            guest.expect("phase", "before-written", timeout=120)
            spec = f"device=vm target={target} copy-mode={copy_mode} speed={MIRROR_FAST_SPEED}"
            assert _control(mount.mnt, "jobs/mirror", spec) == "vm"
            _wait_job(mount.mnt, "vm", "a quarter copied", lambda s: s["offset"] >= disk_bytes // 4)
            _control(mount.mnt, "jobs/vm/ctl", f"speed={MIRROR_SLOW_SPEED}")
            slowed: dict[str, Any] = _job_status(mount.mnt, "vm")
            # An unfinished target never looks finished: it has a hidden name until the switch.
            assert slowed["partial-target"] and not target.exists(), slowed
            # Otherwise the DURING writes would not land on uncopied clusters.
            assert slowed["offset"] < disk_bytes // 2, slowed
            guest.send("go")
            guest.expect("phase", "during-written", timeout=120)

            status: dict[str, Any] = _job_status(mount.mnt, "vm")
            # Otherwise the guest's DURING writes did not race the copy and this proves little.
            assert status["state"] == "running" and not status["ready"], status
            assert status["offset"] < status["len"], status
            _control(mount.mnt, "jobs/vm/ctl", "speed=0")
            ready = _wait_job(mount.mnt, "vm", "ready", lambda s: s["ready"] is True)
            assert ready["state"] == "ready" and ready["error"] is None, ready
            _control(mount.mnt, "jobs/vm/ctl", "complete")
            status = _wait_job(mount.mnt, "vm", "concluded", lambda s: s["state"] == "concluded")
            assert status["error"] is None, status
            assert status["offset"] == status["len"], status
            if copy_mode == "background":
                # Every cluster once, and again wherever a DURING write dirtied a copied one
                # (write-blocking writes whole clusters through, which then need no copy).
                assert status["offset"] > disk_bytes, status
            print(f"{copy_mode}: slowed at {slowed['offset']}, copied {status['offset']} bytes")
            assert str(status["target-state"]).startswith("switched"), status
            info = json.loads(info_file.read_text())
            assert info["filename"] == str(target) and info["format"] == "qcow2", info
            names = [e["event"] for e in _events(mount.mnt) if e["data"].get("device") == "vm"]
            assert "BLOCK_JOB_READY" in names and "BLOCK_JOB_COMPLETED" in names, names
            assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED"), names
            assert sorted(p.name for p in tmp_path.glob(".*.part")) == []
            assert target.is_file()

            guest.send("go")
            result = guest.wait(timeout=60)
        assert result.ok, result.explain()
        assert result.results.get("markers") == "written", result.explain()
        _control(mount.mnt, "jobs/vm/ctl", "dismiss")
        assert not (mount.mnt / ".control" / "jobs" / "vm").exists()

        live_problems = workload.verify_host(mount.disk)
        assert not live_problems, f"live disk through the mount: {live_problems}"
        mount.umount()
    finally:
        mount.close()
    text = mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"

    moved = _as_raw(target, "qcow2", tmp_path / "target-converted.raw")
    problems = workload.verify_host(moved)
    assert not problems, f"the target after unmount: {problems}"
    old = _as_raw(image, "qcow2", tmp_path / "old-converted.raw")
    problems = workload.verify_left_behind(old)
    assert not problems, f"the old image after unmount: {problems}"


def test_guest_writes_across_a_snapshot_a_stream_and_an_active_commit(
    guest_kit: guestvm.GuestKit, tmp_path: Path
) -> None:
    """The guest's disk is a qcow2 image full of FILL data; the guest writes BEFORE markers
    and pauses. The host takes a live external snapshot (snap1 becomes the active layer) and
    starts a slow stream of the whole chain into it; the guest writes DURING markers while the
    stream copies (its writes race the copies), and pauses. The host lets the stream finish
    (snap1 now stands alone), takes a second snapshot (snap2) and starts a slow active commit
    of it into snap1; the guest writes AFTER markers while it copies, and powers off. The host
    completes the commit: the device reads snap1 again. After unmount snap1 alone (no backing
    file, ``qemu-img check`` clean) holds every marker and the FILL data around them; the
    first image holds the BEFORE markers and nothing later."""
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    workload = guestvm.SwitchOverWorkload(BACKUP_DISK_BYTES)
    image = _filled_image(tmp_path, "qcow2")
    mount = BlockfsMount(tmp_path / "mnt", tmp_path / "blockfs.log")
    snap1, snap2 = tmp_path / "snap1.qcow2", tmp_path / "snap2.qcow2"
    info_file = mount.mnt / ".control" / "images" / "vm" / "info"

    def chain() -> list[str]:
        names, layer = [], json.loads(info_file.read_text())
        while layer is not None:  # each layer under the one above, as "backing-image"
            names.append(layer["filename"])
            layer = layer.get("backing-image")
        return names

    try:
        mount.open(image, "qcow2")
        disk = guestvm.Disk(mount.disk, format="raw", cache="none")
        with guest_kit.start(workload.script(), [disk]) as guest:
            guest.expect("phase", "before-written", timeout=120)
            assert _control(mount.mnt, "images/vm/ctl", f"snapshot={snap1.name}") == str(snap1)
            assert chain() == [str(snap1), str(image)]
            assert _control(mount.mnt, "jobs/stream", "device=vm speed=2M id=st") == "st"
            guest.send("go")
            guest.expect("phase", "during-written", timeout=120)
            status: dict[str, Any] = _job_status(mount.mnt, "st")
            assert status["state"] == "running", status  # the DURING writes raced the copy
            _control(mount.mnt, "jobs/st/ctl", "speed=0")
            status = _wait_concluded(mount.mnt, "st")
            assert status["error"] is None and status["stitched"], status
            assert chain() == [str(snap1)]
            assert _control(mount.mnt, "images/vm/ctl", f"snapshot={snap2}") == str(snap2)
            assert _control(mount.mnt, "jobs/commit", "device=vm speed=256K id=ac") == "ac"
            guest.send("go")
            result = guest.wait(timeout=90)
            assert result.ok, result.explain()
            _control(mount.mnt, "jobs/ac/ctl", "speed=0")
            _wait_job(mount.mnt, "ac", "ready", lambda s: s["ready"] is True)
            _control(mount.mnt, "jobs/ac/ctl", "complete")
            status = _wait_concluded(mount.mnt, "ac")
            assert status["error"] is None, status
            assert chain() == [str(snap1)]
        live = workload.verify_host(mount.disk)
        assert not live, f"live disk through the mount: {live}"
        mount.umount()
    finally:
        mount.close()
    text = mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(snap1)], check=True, capture_output=True,
            text=True,
        ).stdout
    )  # fmt: skip
    assert "backing-filename" not in info, info
    problems = workload.verify_host(_as_raw(snap1, "qcow2", tmp_path / "snap1.raw"))
    assert not problems, f"snap1 after unmount: {problems}"
    first = _as_raw(image, "qcow2", tmp_path / "first.raw")
    with open(first, "rb") as f:
        data = f.read()
    assert b"DURING" not in data and b"AFTER" not in data
    assert not _before_extents_in(first, workload)



def test_guest_runs_on_a_qcow2_image_reached_over_ssh(
    guest_kit: guestvm.GuestKit, sshd: Any, tmp_path: Path
) -> None:
    """The guest's disk is a qcow2 image on the far side of a real sshd (ssh://, key auth,
    the host key checked by fingerprint): it makes, fills and checks an ext2 file system
    (cache=none), and the image, read by qemu-img after unmount, holds it all."""
    if not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")):
        pytest.skip("FUSE (/dev/fuse, fusermount3) is absent")
    from test_ssh import url

    t = Target("blockfs-qcow2", tmp_path)
    assert t.mount is not None
    try:
        t.mount.open(url(sshd, t.image), "qcow2")  # type: ignore[arg-type]
        info = json.loads((t.mount.mnt / ".control" / "images" / "vm" / "info").read_text())
        assert info["filename"].startswith("ssh://"), info
        _boot_and_check(guest_kit, t, "none", guestvm.Ext2Workload(), "ext2")
    finally:
        t.mount.close()
    text = t.mount.log_text()
    assert "Traceback" not in text, f"blockfs daemon log holds a traceback:\n{text}"
