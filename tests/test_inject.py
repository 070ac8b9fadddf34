"""The error-injection filter, and the guarantees it makes testable.

G3: whatever metadata write or flush of a qcow2 image fails (each kind of write, EIO or ENOSPC,
once or always), the application gets that errno, the image then refuses writes with EIO, and
after unmount ``qemu-img check`` finds at most leaks and every write acknowledged before the
fault reads back (through qemu) as written.
G4: a failed flush stays failed until the image is reopened.

The grid runs a few rules per event by default (one mount per event, one image per rule);
``BLOCKFS_FULL=1`` runs every op x errno x once/always combination.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.inject import EVENTS, MAX_RULES, InjectFilter, parse_rule
from conftest import FULL, blockfs, qemu_img

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
DISK = 8 * MiB
#: regions written before the rule is set (data that must survive whatever follows)
BEFORE = 8


# -- unit level: the rule parser and the filter over an in-memory node ----------------------------


class MemNode(Node):
    format_name = "mem"

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_only = False
        self.data = bytearray(size)
        self.flushes = 0

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def aclose(self) -> None:
        pass


def test_rule_defaults_and_round_trip() -> None:
    r = parse_rule("op=any")
    assert (r.op, r.event, r.errno_name, r.nth, r.once, r.armed) == (
        "any",
        None,
        "EIO",
        1,
        True,
        True,
    )
    r = parse_rule(b"op=write event=l2_update errno=enospc nth=3 once=off")
    assert r.text() == "op=write event=l2_update errno=ENOSPC nth=3 once=off"
    assert not r.armed  # waits for its event
    assert parse_rule(r.text()).text() == r.text()


@pytest.mark.parametrize(
    "text",
    [
        "op=erase",
        "event=l3_update",
        "errno=EPERM",
        "nth=0",
        "nth=-1",
        "nth=1.5",
        "nth=99999999999999999999",
        "nth=١",  # a digit, but not an ASCII one
        "once=maybe",
        "colour=red",
        "op=write op=read",
        "op",
        "",
        '{"op": [1]}',
    ],
)
def test_bad_rules_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_rule(text)
    assert "\n" not in str(info.value) and str(info.value)


async def test_nth_once_always_and_events() -> None:
    f = InjectFilter(MemNode(4096))
    f.apply("op=write nth=2 errno=ENOSPC\nop=flush event=l2_update once=off")
    await f.write(0, b"a")  # first write: counted, passes
    with pytest.raises(BlockfsError) as info:
        await f.write(0, b"b")
    assert info.value.errno == errno.ENOSPC
    await f.write(0, b"c")  # the once rule is spent
    await f.read(0, 1)
    await f.flush()  # the flush rule waits for its event
    f.debug_event("l1_update")
    await f.flush()
    f.debug_event("l2_update")
    for _ in range(3):  # always: every flush from now on
        with pytest.raises(BlockfsError) as info:
            await f.flush()
        assert info.value.errno == errno.EIO
    states = [(r["state"], r["fired"]) for r in f.describe_rules()]
    assert states == [("spent", 1), ("armed", 3)]
    assert f.apply("clear") == "cleared\n" and f.rules == []
    await f.flush()


async def test_rules_are_taken_all_or_none() -> None:
    f = InjectFilter(MemNode(4096))
    with pytest.raises(UsageError, match="line 2"):
        f.apply("op=read\nop=nope")
    assert f.rules == []
    f.apply("\n".join(["op=read"] * MAX_RULES))
    with pytest.raises(UsageError, match="at most"):
        f.apply("op=write")
    f.apply("clear\nop=write")
    assert len(f.rules) == 1


def test_every_event_is_documented_in_the_control_readme() -> None:
    from blockfs.control import README

    for event in EVENTS:
        assert event in README


# -- real mounts ----------------------------------------------------------------------------------


def pattern(region: int) -> bytes:
    """Region ``region`` of the disk: every 8-byte word holds its own offset and a tag, so a
    read from the wrong place cannot look right."""
    base = region * CHUNK // 8
    return array("Q", range((0xB10C << 48) + base, (0xB10C << 48) + base + CHUNK // 8)).tobytes()


def make_image(path: Path) -> Path:
    # 512-byte clusters, 64-bit refcounts: a refcount block covers 32 KiB and the first
    # refcount table 2 MiB, so every kind of metadata write happens within a few MiB.
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", str(path),
        str(DISK),
    )  # fmt: skip
    return path


def check_consistent(img: Path) -> int:
    """``qemu-img check``: exit 0 or 3 (leaks only), no corruption. Returns the exit code."""
    res = qemu_img("check", "--output=json", str(img), check=False)
    assert res.returncode in (0, 3), f"{img.name}: qemu-img check {res.returncode}: " + (
        res.stdout + res.stderr
    )
    doc = json.loads(res.stdout)
    assert not doc.get("corruptions") and not doc.get("check-errors"), doc
    return res.returncode


def qemu_view(img: Path, tmp: Path) -> bytes:
    raw = tmp / (img.name + ".raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


@dataclass
class Outcome:
    acked: list[int]  # regions whose write was acknowledged
    failed: list[int]  # regions whose write failed (their contents are not promised)
    first_errno: int | None = None
    first_call: str = ""
    next_write_errno: int | None = None  # the write after the fault: None = it worked
    fsync_after: int | None = None  # an fsync after the fault: None = it worked


class Writer:
    """O_DIRECT writes of whole regions through the mount, an fsync every four."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
        self.acked: list[int] = []
        self.failed: list[int] = []

    def write(self, region: int) -> int | None:
        self.buf[:] = pattern(region)
        try:
            os.pwrite(self.fd, self.buf, region * CHUNK)
        except OSError as exc:
            self.failed.append(region)
            return exc.errno
        self.acked.append(region)
        return None

    def fsync(self) -> int | None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            return exc.errno
        return None

    def close(self) -> None:
        os.close(self.fd)
        self.buf.close()


def drive(m, name: str, rule: str, after: int = 1) -> Outcome:  # type: ignore[no-untyped-def]
    """Write regions until one write or fsync fails, then ``after`` more regions."""
    w = Writer(m / name)
    try:
        for r in range(BEFORE):
            assert w.write(r) is None
        assert w.fsync() is None
        (m / ".control" / "images" / name / "inject").write_text(rule + "\n")
        out = Outcome(w.acked, w.failed)
        for r in range(BEFORE, DISK // CHUNK - 1):
            err, call = w.write(r), "write"
            if err is None and r % 4 == 3:
                err, call = w.fsync(), "fsync"
            if err is not None:
                out.first_errno, out.first_call = err, call
                out.next_write_errno = w.write(r + 1)
                for k in range(r + 2, min(r + 1 + after, DISK // CHUNK - 1)):
                    w.write(k)
                out.fsync_after = w.fsync()
                break
        return out
    finally:
        w.close()


@dataclass(frozen=True)
class Case:
    event: str
    op: str
    err: str
    once: bool

    @property
    def rule(self) -> str:
        return (
            f"op={self.op} event={self.event} errno={self.err} once={'on' if self.once else 'off'}"
        )

    @property
    def failsafe(self) -> bool:
        """Whether the fault hits a metadata write or a flush (then the image stops writing);
        a failed write of guest data into new clusters changes no metadata."""
        return not (self.event == "cluster_alloc" and self.op in ("write", "any"))


def variants(event: str) -> list[Case]:
    if FULL:
        return [
            Case(event, op, err, once)
            for op in ("write", "flush", "any")
            for err in ("EIO", "ENOSPC")
            for once in (True, False)
        ]
    return [
        Case(event, "write", "EIO", True),
        Case(event, "write", "ENOSPC", False),
        Case(event, "flush", "ENOSPC", True),
        Case(event, "any", "EIO", False),
    ]


@pytest.mark.parametrize("event", sorted(EVENTS))
def test_metadata_fault_leaves_a_consistent_image_and_acked_data(
    mount, tmp_path: Path, event: str
) -> None:
    cases = variants(event)
    names = [f"c{i}" for i in range(len(cases))]
    imgs = [make_image(tmp_path / f"{n}.qcow2") for n in names]
    m = mount(*(f"{n}={img},format=qcow2,inject=on" for n, img in zip(names, imgs, strict=True)))
    outcomes = {}
    for name, case in zip(names, cases, strict=True):
        out = drive(m, name, case.rule)
        where = f"{case.rule}: "
        injected = getattr(errno, case.err)
        assert out.first_errno is not None, where + "no request failed: the event never came"
        assert out.first_errno == injected, where + f"{out.first_call} got {out.first_errno}"
        fired = json.loads((m / ".control" / "images" / name / "inject").read_text())
        assert fired[0]["fired"] >= 1, where + str(fired)
        if case.failsafe:
            assert out.next_write_errno == errno.EIO, where + "a broken image took a write"
        elif case.once:
            assert out.next_write_errno is None, where + "a data fault stopped the image"
        else:
            assert out.next_write_errno in (injected, errno.EIO), where
        if out.first_call == "fsync" or (case.op == "flush" and case.failsafe):
            assert out.fsync_after == errno.EIO, where + "a failed flush did not stay failed"
        if case.once or case.op != "any":
            # reads go on: what was acknowledged reads back through the mount
            with open(m / name, "rb") as f:
                for r in out.acked:
                    f.seek(r * CHUNK)
                    assert f.read(CHUNK) == pattern(r), where + f"region {r} through the mount"
        outcomes[name] = (case, out)
    m.umount()
    for img, (case, out) in zip(imgs, outcomes.values(), strict=True):
        check_consistent(img)
        data = qemu_view(img, tmp_path)
        for r in out.acked:
            assert data[r * CHUNK : (r + 1) * CHUNK] == pattern(r), f"{case.rule}: region {r}"
        untouched = set(range(DISK // CHUNK)) - set(out.acked) - set(out.failed)
        for r in untouched:
            assert data[r * CHUNK : (r + 1) * CHUNK] == bytes(CHUNK), f"{case.rule}: region {r}"
    if event != "reftable_grow":
        return
    # the image opens read-write again, and takes writes
    m2 = mount(f"c0={imgs[0]},format=qcow2")
    w = Writer(m2 / "c0")
    try:
        assert w.write(DISK // CHUNK - 1) is None and w.fsync() is None
    finally:
        w.close()
    m2.umount()
    check_consistent(imgs[0])


#: metadata writes that are carried out and then reported failed (land=on)
LANDED = ["header_update", "l1_update", "l2_alloc", "l2_update", "refblock_update",
          "reftable_update", "reftable_grow"]  # fmt: skip


def test_a_metadata_write_that_landed_but_failed_stops_the_image(mount, tmp_path: Path) -> None:
    """The failsafe's own case: the node cannot know whether its failed write reached the
    disk, so its tables may not match the image; it must stop writing, and the image is then
    consistent, however many writes the application tries after the fault."""
    imgs = [make_image(tmp_path / f"{e}.qcow2") for e in LANDED]
    m = mount(*(f"{e}={img},format=qcow2,inject=on" for e, img in zip(LANDED, imgs, strict=True)))
    outs = {}
    for event in LANDED:
        out = drive(m, event, f"op=write event={event} errno=EIO land=on", after=48)
        assert out.first_errno == errno.EIO, event
        assert out.next_write_errno == errno.EIO, f"{event}: a broken image took a write"
        outs[event] = out
    m.umount()
    for img, event in zip(imgs, LANDED, strict=True):
        check_consistent(img)
        data = qemu_view(img, tmp_path)
        for r in outs[event].acked:
            assert data[r * CHUNK : (r + 1) * CHUNK] == pattern(r), f"{event}: region {r}"


def test_a_failed_flush_stays_failed_until_remount(mount, tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(DISK))
    q = make_image(tmp_path / "q.qcow2")
    specs = [f"r={raw},format=raw,inject=on", f"q={q},format=qcow2,inject=on"]
    m = mount(*specs)
    for name in ("r", "q"):
        w = Writer(m / name)
        try:
            assert w.write(0) is None
            (m / ".control" / "images" / name / "inject").write_text("op=flush errno=EIO once=on\n")
            assert w.fsync() == errno.EIO
            assert w.fsync() == errno.EIO  # the rule is spent: the export remembers
            assert w.fsync() == errno.EIO
            # raw has no metadata: writes go on; qcow2 stops writing after a failed flush
            assert w.write(1) == (None if name == "r" else errno.EIO)
        finally:
            w.close()
        stats = m.stats(name)
        assert stats["failed_flush_operations"] == 3
    log = m.log_text()
    assert log.count("every later flush fails") == 2  # logged once per image
    m.umount()
    check_consistent(q)
    m2 = mount(*specs)
    for name in ("r", "q"):
        w = Writer(m2 / name)
        try:
            assert w.fsync() is None
            assert w.write(2) is None and w.fsync() is None
            with open(m2 / name, "rb") as f:
                assert f.read(CHUNK) == pattern(0)
        finally:
            w.close()
    m2.umount()
    check_consistent(q)


def test_read_faults_and_in_place_write_faults_do_not_stop_the_image(mount, tmp_path: Path) -> None:
    q = make_image(tmp_path / "q.qcow2")
    m = mount(f"q={q},format=qcow2,inject=on")
    ctl = m / ".control" / "images" / "q" / "inject"
    w = Writer(m / "q")
    try:
        assert w.write(0) is None and w.fsync() is None
        ctl.write_text("op=read errno=EIO nth=2\n")
        fd = os.open(m / "q", os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 512)  # one cluster: one read of the file below
            assert os.preadv(fd, [buf], 0) == 512
            with pytest.raises(OSError) as info:
                os.preadv(fd, [buf], 0)
            assert info.value.errno == errno.EIO
            assert os.preadv(fd, [buf], 0) == 512 and bytes(buf) == pattern(0)[:512]
        finally:
            os.close(fd)
        # a data write into an allocated cluster fails alone: nothing in metadata changed
        ctl.write_text("clear\nop=write errno=ENOSPC\n")
        assert w.write(0) == errno.ENOSPC
        assert w.write(0) is None and w.write(1) is None and w.fsync() is None
    finally:
        w.close()
    rules = json.loads(ctl.read_text())
    assert [(r["state"], r["fired"]) for r in rules] == [("spent", 1)]
    with pytest.raises(OSError) as info:
        ctl.write_text("op=write nth=0\n")
    assert info.value.errno == errno.EINVAL
    m.umount()
    assert check_consistent(q) == 0
    data = qemu_view(q, tmp_path)
    assert data[: 2 * CHUNK] == pattern(0) + pattern(1)


def test_inject_file_exists_only_when_asked_for(mount, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.qcow2")
    b = make_image(tmp_path / "b.qcow2")
    m = mount(f"a={a},format=qcow2", f"b={b},format=qcow2,inject=on")
    assert not (m / ".control" / "images" / "a" / "inject").exists()
    assert json.loads((m / ".control" / "images" / "b" / "inject").read_text()) == []
    m.umount()
    res = blockfs("mount", str(tmp_path), f"c={a},inject=maybe", check=False)
    assert res.returncode != 0 and "inject=maybe" in res.stderr
