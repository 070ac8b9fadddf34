"""A hostile local user against blockfs: probed formats, job targets, FIFOs, hostile specs.

Each test here stands for one hole found on an earlier main (the issue "Trust"): it failed there
and passes now. The oracle is the file system itself (what root wrote, where, with which mode)
and qemu-img where an image is judged.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    BLOCKFS,
    blockfs,
    ctl,
    events,
    is_mounted,
    qemu_img,
    random_file,
    run,
    start,
    status,
    wait_gone,
    wait_state,
)

MiB = 1 << 20
NOBODY = 65534  # an unprivileged uid and gid that exist on Debian


def write_spec(m, spec: str, kind: str = "backup") -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Write a spec to a control file; returns (errno or 0, what the same open file reads)."""
    fd = os.open(m.path / ".control" / "jobs" / kind, os.O_RDWR)
    try:
        try:
            os.write(fd, spec.encode("utf-8", "surrogatepass") + b"\n")
            code = 0
        except OSError as exc:
            code = exc.errno or -1
        return code, os.read(fd, 65536).decode(errors="replace")
    finally:
        os.close(fd)


def refused_mount(mnt: Path, *specs: str) -> str:
    """Mount that must be refused; returns the one-line error (unmounts if it was not)."""
    mnt.mkdir(exist_ok=True)
    res = blockfs("mount", str(mnt), *specs, check=False, timeout=60)
    if res.returncode == 0:
        blockfs("umount", str(mnt), check=False)
        pytest.fail(f"mount of {specs} was not refused")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert not is_mounted(mnt)
    return res.stderr


def qcow2_with_backing(path: Path, backing: str, size: str = "64M") -> bytes:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(path), size)
    return path.read_bytes()


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file outside the images' folder: what a hostile guest wants to read."""
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    p = d / "secret.txt"
    p.write_text("the root-only secret\n")
    p.chmod(0o600)
    return p


# -- hole 1: a probed format is a key to host files -------------------------------------------


def test_probed_raw_refuses_a_guest_write_that_would_change_its_format(
    mount, tmp_path: Path, secret: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    disk = images / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    header = qcow2_with_backing(tmp_path / "evil.qcow2", str(secret))
    m = mount(f"d={disk}")
    fd = os.open(m / "d", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, header[:4096], 0)
        assert exc.value.errno == errno.EPERM
        # Partial writes into the probed bytes are judged on the result, whatever their size.
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, header[:4], 0)
        assert exc.value.errno == errno.EPERM
        os.pwrite(fd, b"\0" * 4096, 0)  # harmless writes there still work
        os.pwrite(fd, header, 1 * MiB)  # and anywhere past the probed bytes, anything
    finally:
        os.close(fd)
    m.umount()
    assert disk.read_bytes()[:4] == b"\0\0\0\0"
    assert "would make this probed raw image read as qcow2" in m.log_text()
    # Given as raw, the guest owns every byte: nothing is refused.
    m2 = mount(f"d={disk},format=raw")
    with open(m2 / "d", "r+b", buffering=0) as f:
        f.write(header[:4096])
    m2.umount()
    assert json.loads(qemu_img("info", "--output=json", str(disk)).stdout)["format"] == "qcow2"


def test_probed_image_does_not_follow_a_backing_file_outside_its_folder(
    mount, tmp_path: Path, secret: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    disk = images / "disk.raw"
    # What a guest of an older, unguarded mount could have left in its raw disk.
    disk.write_bytes(qcow2_with_backing(tmp_path / "evil.qcow2", str(secret)))
    err = refused_mount(tmp_path / "m", f"d={disk}")
    assert "lies outside" in err and "backing-dirs=" in err
    # Relative names that climb out are the same case.
    sub = images / "sub"
    sub.mkdir()
    climber = sub / "climb.img"
    rel = os.path.relpath(secret, sub)
    assert rel.startswith("..")
    climber.write_bytes(qcow2_with_backing(tmp_path / "evil2.qcow2", rel))
    assert "lies outside" in refused_mount(tmp_path / "m", f"c={climber}")
    # Allowed by an option, named on the command line, or with the format given: followed.
    m = mount(f"d={disk},backing-dirs={secret.parent}")
    assert (m / "d").read_bytes()[:20] == b"the root-only secret"
    m.umount()
    m = mount(f"d={disk},format=qcow2")
    assert (m / "d").read_bytes()[:20] == b"the root-only secret"
    m.umount()


def test_backing_file_inside_the_folder_is_followed_and_probing_is_reported(
    mount, tmp_path: Path
) -> None:
    base = random_file(tmp_path / "base.raw", 4 * MiB, seed=1)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    mnt = tmp_path / "m"
    mnt.mkdir()
    res = blockfs("mount", str(mnt), f"t={top}")
    try:
        assert "probed as qcow2; give format=qcow2" in res.stderr
        assert (mnt / "t").read_bytes() == base.read_bytes()
    finally:
        blockfs("umount", str(mnt))


# -- hole 2: job targets ------------------------------------------------------------------------


def test_new_target_takes_the_source_mode(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 2 * MiB, seed=2)
    m = mount(f"d={src}")
    for mode in (0o600, 0o640):
        src.chmod(mode)
        target = tmp_path / f"t{mode:o}.qcow2"
        old = os.umask(0)
        try:
            start(m, f"device=d target={target} id=j{mode:o}")
        finally:
            os.umask(old)
        wait_state(m, f"j{mode:o}", ("concluded",))
        assert stat.S_IMODE(target.stat().st_mode) == mode
        qemu_img("compare", "-F", "raw", str(target), str(src))


def test_existing_target_that_is_a_symlink_is_refused(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=3)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    link = tmp_path / "t.raw"
    link.symlink_to(victim)
    m = mount(f"d={src}")
    code, reason = write_spec(m, f"device=d target={link} format=raw mode=existing")
    assert code == errno.ELOOP and "symbolic link" in reason
    assert victim.read_bytes() == b"precious" * 1000


def test_target_folder_through_another_users_symlink_is_refused(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=4)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "via"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    m = mount(f"d={src}")
    code, reason = write_spec(m, f"device=d target={link}/t.qcow2")
    assert code == errno.EACCES and "symbolic link owned by uid" in reason
    assert list(real.iterdir()) == []
    # Root's own links are followed.
    os.lchown(link, 0, 0)
    start(m, f"device=d target={link}/t.qcow2")
    wait_state(m, "d", ("concluded",))
    assert (real / "t.qcow2").exists()


def test_target_folder_writable_by_others_needs_the_sticky_bit(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=5)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    m = mount(f"d={src}")
    code, reason = write_spec(m, f"device=d target={shared}/t.qcow2")
    assert code == errno.EACCES and "writable by other users" in reason
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)
    # In a sticky folder a file of another user is not ours to overwrite.
    theirs = shared / "theirs.raw"
    theirs.write_bytes(bytes(MiB))
    os.chown(theirs, NOBODY, NOBODY)
    code, reason = write_spec(m, f"device=d target={theirs} format=raw mode=existing")
    assert code == errno.EACCES and "belongs to uid" in reason
    assert theirs.read_bytes() == bytes(MiB)
    start(m, f"device=d target={shared}/t.qcow2")
    wait_state(m, "d", ("concluded",))
    qemu_img("compare", "-F", "raw", str(shared / "t.qcow2"), str(src))


class SymlinkSwapper(threading.Thread):
    """The hostile user: the instant a file appears in ``folder`` (inotify), it is moved away
    and a symlink to ``victim`` takes its name. Bounded: it stops when told, or after 60 s."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, folder: Path, victim: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.victim = folder, victim
        self.stop = threading.Event()
        self.swapped = 0
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self._fd >= 0
        mask = self.IN_CREATE | self.IN_MOVED_TO
        assert self._libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) >= 0

    def run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if not select.select([self._fd], [], [], 0.05)[0]:
                    continue
                buf = os.read(self._fd, 65536)
                pos = 0
                while pos < len(buf):
                    _wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, pos)
                    name = buf[pos + 16 : pos + 16 + n].rstrip(b"\0").decode()
                    pos += 16 + n
                    path = self.folder / name
                    if name.endswith(".moved") or not path.is_file() or path.is_symlink():
                        continue
                    try:
                        os.rename(path, f"{path}.moved")
                        os.symlink(self.victim, path)
                        self.swapped += 1
                    except OSError:
                        pass
        finally:
            os.close(self._fd)


def test_racing_symlinks_never_redirect_a_new_target(mount, tmp_path: Path) -> None:
    """A user who can write the folder swaps a link in the instant the target appears: root
    never writes through it (the file O_EXCL made is the one used, never opened again by name,
    and named only at the end, after a check that it is still the same file)."""
    src = random_file(tmp_path / "src.raw", MiB, seed=6)
    victim = tmp_path / "victim.raw"
    victim.write_bytes(b"precious" * (MiB // 8))  # the size of a target: openable as one
    folder = tmp_path / "out"
    folder.mkdir()
    m = mount(f"d={src}")
    swapper = SymlinkSwapper(folder, victim)
    swapper.start()
    try:
        for i in range(3):
            code, _ = write_spec(m, f"device=d target={folder}/t{i}.raw format=raw id=r{i}")
            if code == 0:
                s = wait_state(m, f"r{i}", ("concluded",))
                assert s["error"] is not None and "replaced" in s["error"], s
    finally:
        swapper.stop.set()
        swapper.join()
    assert swapper.swapped >= 3
    assert victim.read_bytes() == b"precious" * (MiB // 8)


# -- hole 4: FIFOs ------------------------------------------------------------------------------


def test_fifo_target_is_refused_at_once(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=7)
    fifo = tmp_path / "t.fifo"
    os.mkfifo(fifo)
    m = mount(f"d={src}")
    t0 = time.monotonic()
    code, reason = write_spec(m, f"device=d target={fifo} format=raw mode=existing")
    assert code == errno.EINVAL and "not a regular file" in reason
    assert time.monotonic() - t0 < 10
    # Nothing hangs behind it: a job starts, and the mount unmounts.
    start(m, f"device=d target={tmp_path / 'ok.qcow2'}")
    wait_state(m, "d", ("concluded",))
    m.umount()


def test_fifo_backing_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "base.fifo"
    os.mkfifo(fifo)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "base.fifo", "-F", "raw", str(top), "8M")
    t0 = time.monotonic()
    assert "FIFO" in refused_mount(tmp_path / "m", f"t={top},format=qcow2")
    assert time.monotonic() - t0 < 30
    assert "FIFO" in refused_mount(tmp_path / "m", f"f={fifo}")


# -- hole 6: a job start never holds the event loop ---------------------------------------------


def test_backup_start_of_a_2tib_disk_does_not_stall_other_disks(mount, tmp_path: Path) -> None:
    """Figure: the longest 4k read of another disk while a backup of a 2 TiB disk starts.
    It was 5.8 s (a Python loop per cluster in the event loop), then 0.5-1.75 s through the
    FUSE reader threads (starved of the GIL by the busy event loop; blockfs.fuseloop's
    _GilShare), 6-10 ms since. The bound is loose so that only a stall fails it; the figure
    itself is printed."""
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "2T")
    other = random_file(tmp_path / "other.raw", 4 * MiB, seed=8)
    m = mount(f"big={big}", f"o={other}")
    worst = [0.0]
    stop = threading.Event()

    def reader() -> None:
        fd = os.open(m / "o", os.O_RDONLY | os.O_DIRECT)
        buf = bytearray(4096)
        mv = memoryview(buf)
        try:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                os.preadv(fd, [mv], 0)
                worst[0] = max(worst[0], time.monotonic() - t0)
                time.sleep(0.001)
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        start(m, f"device=big target={tmp_path / 't.qcow2'} sync=full")
        started = time.monotonic() - t0
        time.sleep(0.5)
        ctl(m, "big", "cancel")
        wait_state(m, "big", ("concluded",))
    finally:
        stop.set()
        t.join()
    print(f"2 TiB backup start: {started * 1000:.0f} ms; worst 4k read of another disk "
          f"meanwhile: {worst[0] * 1000:.1f} ms")  # fmt: skip
    assert worst[0] < 0.3


# -- hole 7: an unfinished target never looks finished ------------------------------------------


def test_unfinished_new_target_has_a_temporary_name(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 32 * MiB, seed=9)
    m = mount(f"d={src}")
    target = tmp_path / "t.raw"
    start(m, f"device=d target={target} format=raw speed=1M")
    s = status(m, "d")
    assert s["target"] == str(target) and s["partial-target"].endswith(".part")
    assert not target.exists() and Path(s["partial-target"]).exists()
    # Killed: only the hidden partial file stays, under a name no one takes for the copy.
    pid = m.pid
    os.kill(pid, 9)
    assert wait_gone(pid)
    assert not target.exists()
    assert [p.name for p in tmp_path.glob(".t.raw.*.part")]
    blockfs("umount", str(m.path))
    # Finished: the target has its name and is whole; no partial file is left.
    for p in tmp_path.glob(".t.raw.*.part"):
        p.unlink()
    m2 = mount(f"d={src}")
    start(m2, f"device=d target={target} format=raw")
    assert wait_state(m2, "d", ("concluded",))["error"] is None
    assert target.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob(".t.raw.*.part"))
    assert "partial-target" not in status(m2, "d")


# -- hole 8: plain bad input is a one-line error, with nothing left behind ----------------------


@pytest.mark.parametrize(
    "spec,err,reason",
    [
        ("device=d target=TGT\0x", errno.EINVAL, "NUL byte"),
        ('{"device": "d", "target": "\\ud800"}', errno.EINVAL, "lone surrogate"),
        ('{"device": "d", "target": "TGT", "speed": ' + "9" * 5000 + "}", errno.EINVAL, "too long"),
        ("device=d target=TGT speed=1.0e400", errno.EINVAL, "not a size"),
        ("device=d target=TGT speed=99999999999999999999T", errno.EINVAL, "larger than 2^63"),
        ("device=d target=TGT id=a\x1b[2Jb", errno.EINVAL, "control or invisible"),
        ('{"device": "d", "target": "TGT", "id": "a\\rb"}', errno.EINVAL, "control or invisible"),
        ('{"device": "d", "target": "TGT", "id": "a\\u202eb"}', errno.EINVAL, "invisible"),
    ],
)
def test_hostile_spec_values(mount, tmp_path: Path, spec: str, err: int, reason: str) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=10)
    m = mount(f"d={src}")
    code, text = write_spec(m, spec.replace("TGT", str(tmp_path / "t.qcow2")))
    assert code == err, text
    assert reason in text and text.count("\n") == 1, text
    assert "internal error" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("t.", ".t."))] == []


def test_disk_too_large_for_a_job_is_efbig(mount, tmp_path: Path) -> None:
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(huge), "1E")
    m = mount(f"d={huge}")
    for fmt in ("raw", "qcow2"):
        code, text = write_spec(m, f"device=d target={tmp_path / 't'} format={fmt}")
        assert code == errno.EFBIG and "larger than block jobs support" in text, text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("t", ".t"))] == []
    assert not [e for e in events(m) if e["event"] == "JOB_STATUS_CHANGE"]


# -- hole 9: a truncated image and a hostile working folder -------------------------------------


def test_read_past_a_truncated_image_file_is_eio(mount, tmp_path: Path) -> None:
    img = random_file(tmp_path / "d.raw", 8 * MiB, seed=11)
    m = mount(f"d={img},format=raw")
    os.truncate(img, 4 * MiB)
    fd = os.open(m / "d", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = bytearray(65536)
        with pytest.raises(OSError) as exc:
            os.preadv(fd, [buf], 6 * MiB)
        assert exc.value.errno == errno.EIO
        assert os.preadv(fd, [buf], 0) == len(buf)  # what is still there reads
    finally:
        os.close(fd)
    m.umount()
    assert "shorter than it was" in m.log_text()


def test_daemon_ignores_a_blockfs_folder_in_the_working_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "blockfs").mkdir(parents=True)
    (work / "blockfs" / "__init__.py").write_text("raise SystemExit('the wrong blockfs')\n")
    (work / "blockfs" / "__main__.py").write_text("raise SystemExit('the wrong blockfs')\n")
    img = random_file(work / "d.raw", MiB, seed=12)
    mnt = tmp_path / "m"
    mnt.mkdir()
    # The CLI is the installed one (run from elsewhere); the daemon it starts inherits `work`.
    cli = [sys.executable, "-P", "-m", "blockfs"]
    res = run([*cli, "mount", str(mnt), f"d={img}"], cwd=work, check=False)
    try:
        assert res.returncode == 0, res.stderr
        assert (mnt / "d").read_bytes() == img.read_bytes()
    finally:
        subprocess.run([*BLOCKFS, "umount", str(mnt)], capture_output=True, timeout=120)
    assert json.dumps(res.stderr).count("wrong blockfs") == 0
