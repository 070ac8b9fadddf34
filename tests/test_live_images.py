"""Changing the images of a live mount: internal snapshots through ``images/NAME/snapshots``
(and ``blockfs snapshot`` routed there), hot add and remove through ``images/add`` and
``images/remove``; and the ``map`` and ``info`` files of a mounted image.

Judges: qemu-img (snapshot -l, check, compare, map -U, convert -l) on the image files, and
reads through the mount.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import threading
from pathlib import Path

import pytest

from conftest import blockfs, ctl, events, qemu_img, run, start, wait_ready, wait_state

KiB = 1024
MiB = 1 << 20
BLOCK = 64 * KiB


def control(m, *parts: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(m.path, ".control", *parts)


def write_fd(path: Path, text: str) -> tuple[int | None, str]:
    """Write ``text`` (one line) to one open control file: (errno or None, its answer)."""
    if not text.endswith("\n"):
        text += "\n"  # acted on at the write that ends the line
    fd = os.open(path, os.O_RDWR)
    failed: int | None = None
    try:
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            failed = exc.errno
        answer = os.read(fd, 65536).decode()
    finally:
        os.close(fd)
    return failed, answer


def pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_data(img: Path, tag: str, tmp: Path) -> bytes:
    out = tmp / f"snap-{tag}.raw"
    qemu_img("convert", "-l", f"snapshot.name={tag}", "-O", "raw", str(img), str(out))
    return out.read_bytes()


def test_live_internal_snapshots(mount, tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    m = mount(f"disk={img}")
    snaps = control(m, "images", "disk", "snapshots")
    assert json.loads(snaps.read_text()) == []
    a, b = b"A" * BLOCK, b"B" * BLOCK
    pwrite(m / "disk", 0, a)
    failed, answer = write_fd(snaps, "create first\n")
    assert failed is None and json.loads(answer)["name"] == "first", answer
    pwrite(m / "disk", 0, b)
    pwrite(m / "disk", MiB, b)
    # the CLI on the image file goes through the mount (the mount's lock would refuse it)
    blockfs("snapshot", "-c", "second", str(img))
    listed = blockfs("snapshot", "-l", str(img)).stdout
    assert "first" in listed and "second" in listed, listed
    table = json.loads(snaps.read_text())
    assert [(s["id"], s["name"]) for s in table] == [("1", "first"), ("2", "second")]
    assert all(s["disk-size"] == 4 * MiB for s in table)
    # apply: the mounted file reads as it did at "first"
    blockfs("snapshot", "-a", "first", str(m / "disk"))  # the mounted file's name works too
    with open(m / "disk", "rb") as f:
        assert f.read(BLOCK) == a
        f.seek(MiB)
        assert f.read(BLOCK) == bytes(BLOCK)
    failed, answer = write_fd(snaps, "delete second")
    assert failed is None, answer
    names = [e["event"] for e in events(m)]
    for ev in ("SNAPSHOT_CREATED", "SNAPSHOT_APPLIED", "SNAPSHOT_DELETED"):
        assert ev in names, names
    m.umount()
    out = qemu_img("snapshot", "-l", str(img)).stdout
    assert "first" in out and "second" not in out, out
    qemu_img("check", str(img))
    assert snapshot_data(img, "first", tmp_path)[:BLOCK] == a


def test_snapshot_under_a_running_writer_is_a_point_in_time(mount, tmp_path: Path) -> None:
    """A writer rewrites 64 KiB blocks in order, each after the last one returned; the
    snapshot taken meanwhile holds blocks 0..k new and the rest old, for some k (a point in
    time: the guest's writes waited while it was taken)."""
    img = tmp_path / "disk.qcow2"
    blocks = 256
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(blocks * BLOCK))
    m = mount(f"disk={img}")
    stop = threading.Event()
    rounds: list[int] = []

    def writer() -> None:
        fd = os.open(m / "disk", os.O_WRONLY)
        try:
            for r in range(1, 50):  # bounded: at most 49 passes
                for i in range(blocks):
                    os.pwrite(fd, bytes([r]) * BLOCK, i * BLOCK)
                rounds.append(r)
                if stop.is_set():
                    return
        finally:
            os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for n in range(3):
            failed, answer = write_fd(control(m, "images", "disk", "snapshots"), f"create s{n}")
            assert failed is None, answer
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive()
    m.umount()
    qemu_img("check", str(img))
    for n in range(3):
        data = snapshot_data(img, f"s{n}", tmp_path)
        marks = [data[i * BLOCK] for i in range(blocks)]
        for i in range(blocks):
            assert data[i * BLOCK : (i + 1) * BLOCK] == bytes([marks[i]]) * BLOCK
        # one pass in progress: a run of round r+1 then a run of round r
        assert all(x >= y for x, y in itertools.pairwise(marks)), marks
        assert marks[0] - marks[-1] <= 1, marks


def test_snapshot_refusals(mount, tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    raw = tmp_path / "flat.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw), "1M")
    m = mount(f"disk={img}", f"flat={raw},format=raw")
    snaps = control(m, "images", "disk", "snapshots")
    cases = [
        ("frobnicate x", errno.EINVAL, "unknown verb"),
        ("create", errno.EINVAL, "needs a snapshot tag"),
        ("delete nothing", errno.EINVAL, "no snapshot"),
        ("apply nothing", errno.EINVAL, "no snapshot"),
    ]
    for text, code, reason in cases:
        failed, answer = write_fd(snaps, text)
        assert (failed, reason in answer) == (code, True), (text, failed, answer)
    failed, answer = write_fd(control(m, "images", "flat", "snapshots"), "create x")
    assert failed == errno.EMEDIUMTYPE and "need a qcow2 image" in answer, answer
    assert json.loads(control(m, "images", "flat", "snapshots").read_text()) == []
    # a job on the device: EBUSY with the reason
    assert start(m, f"device=disk target={tmp_path / 'copy.qcow2'}", "mirror") == "disk"
    wait_ready(m, "disk")
    info = m.info("disk")
    assert info["blockfs"]["jobs"] == [{"id": "disk", "type": "mirror", "status": "ready"}]
    failed, answer = write_fd(snaps, "create during-job")
    assert failed == errno.EBUSY and "busy" in answer, answer
    ctl(m, "disk", "cancel force")
    wait_state(m, "disk", ("concluded",))
    ctl(m, "disk", "dismiss")
    failed, answer = write_fd(snaps, "create after-job")
    assert failed is None, answer
    m.umount()
    ro = mount(f"disk={img},read-only=on")
    failed, answer = write_fd(control(ro, "images", "disk", "snapshots"), "create x")
    assert failed == errno.EROFS and "read-only" in answer, answer
    ro.umount()
    qemu_img("check", str(img))


def test_hot_add_and_remove(mount, tmp_path: Path) -> None:
    first = tmp_path / "first.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(first), "4M")
    second = tmp_path / "second.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(second), "4M")
    # 2 MiB of data: a backup at 64 KiB/s is still running seconds later (below)
    run(["qemu-io", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 2M 2M", str(second)])
    m = mount(f"disk={first}")
    add, remove = control(m, "images", "add"), control(m, "images", "remove")
    assert oct(add.stat().st_mode & 0o777) == "0o600"
    assert not (m / "extra").exists()  # a negative lookup the kernel may cache
    failed, answer = write_fd(add, f"extra={second}")
    assert failed is None and answer.strip() == "extra", answer
    with open(m / "extra", "r+b") as f:
        assert f.read(BLOCK) == b"\x5a" * BLOCK
        f.seek(MiB)
        f.write(b"\x6b" * BLOCK)
    assert m.info("extra")["filename"] == str(second)
    refusals = [
        (add, f"extra={second}", errno.EEXIST, "already"),
        (add, f"other={first}", errno.EBUSY, "in use"),
        (add, "rel=relative.qcow2", errno.EINVAL, "absolute"),
        (add, f"gone={tmp_path / 'missing.qcow2'}", errno.ENOENT, "no such file"),
        (add, f".hidden={second}", errno.EINVAL, "must not start with"),
        (add, f"x={second},colour=red", errno.EINVAL, "unknown option"),
        (remove, "nothing", errno.ENOENT, "no image"),
    ]
    for path, text, code, reason in refusals:
        failed, answer = write_fd(path, text)
        assert (failed, reason in answer) == (code, True), (text, failed, answer)
    # open: EBUSY; a job: EBUSY
    with open(m / "extra", "rb"):
        failed, answer = write_fd(remove, "extra")
        assert failed == errno.EBUSY and "is open" in answer, answer
    assert start(m, f"device=extra target={tmp_path / 'bk.qcow2'} speed=64K") == "extra"
    failed, answer = write_fd(remove, "extra")
    assert failed == errno.EBUSY and "busy" in answer, answer
    ctl(m, "extra", "cancel")
    wait_state(m, "extra", ("concluded",))
    failed, answer = write_fd(remove, "extra")
    assert failed is None, answer
    assert not (m / "extra").exists()
    assert not control(m, "images", "extra").exists()
    # closed: the file is free for others now, and whole
    qemu_img("check", str(second))
    run(["qemu-io", "-c", "read -P 0x6b 1M 64k", str(second)])
    names = [e["event"] for e in events(m)]
    assert "IMAGE_ADDED" in names and "IMAGE_REMOVED" in names
    # added again after removal, and read-only this time
    failed, answer = write_fd(add, f"extra={second},read-only=on")
    assert failed is None, answer
    with pytest.raises(OSError) as exc:
        open(m / "extra", "r+b")
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    m.umount()
    qemu_img("check", str(first))


def test_map_and_info_files_of_a_mounted_image(mount, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "8M")
    run(["qemu-io", "-c", "write -P 1 0 2M", str(base)])
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    m = mount(f"vm={top}")
    pwrite(m / "vm", MiB, b"x" * BLOCK)
    got = control(m, "images", "vm", "map").read_text()
    assert oct(control(m, "images", "vm", "map").stat().st_mode & 0o777) == "0o400"
    want = run(["qemu-img", "map", "-U", "--output=json", str(top)]).stdout
    assert got == want
    info = m.info("vm")
    assert info["filename"] == str(top) and info["backing-filename"] == "base.qcow2"
    assert info["full-backing-filename"] == str(base)
    assert info["backing-image"]["filename"] == str(base)
    assert info["backing-image"]["blockfs"]["read-only"] is True
    assert info["blockfs"]["device"] == "vm" and info["blockfs"]["jobs"] == []
    qemu = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(top)]).stdout)
    for key in ("format", "virtual-size", "cluster-size", "format-specific",
                "backing-filename-format"):  # fmt: skip
        assert info[key] == qemu[key], key


def test_snapshot_cli_trusts_only_our_own_mounts(tmp_path: Path) -> None:
    """A folder that merely looks like a mount (a .control tree beside the image, its
    snapshots file a FIFO that would hang a writer) is not a mount: the image file is changed
    directly, and nothing is written into the trap."""
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    trap = tmp_path / ".control" / "images" / "disk.qcow2"
    trap.mkdir(parents=True)
    os.mkfifo(trap / "snapshots")
    blockfs("snapshot", "-c", "mine", str(img), timeout=60)
    assert "mine" in qemu_img("snapshot", "-l", str(img)).stdout
    res = blockfs("snapshot", "--external", "new.qcow2", str(img), check=False, timeout=60)
    assert res.returncode != 0 and "not an image a blockfs mount of yours serves" in res.stderr
