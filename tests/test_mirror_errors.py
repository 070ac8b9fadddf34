"""The mirror's error handling on real mounts: a target on a file system that fills up (every
on-target-error policy, both copy modes), source reads that fail (error injection), cancel
before and in READY, cancel force, and the specs it refuses. Judged by qemu-img compare and
check, cmp, and the events and status files.

A guest process writes to the disk all through the full-target cases: none of its writes may
fail, whatever the target does. A qcow2 target that fills up gives back what a failed write
allocated, and one whose metadata write failed (its failsafe) is read again from its file when
the job goes on: every policy recovers once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    FULL,
    _write_control,
    blockfs,
    ctl,
    events,
    qemu_img,
    random_file,
    run,
    status,
    wait_state,
)

MiB = 1 << 20
SIZE = 64 * MiB
#: the small file system: room for the filler and half the disk; without the filler, for all
SMALL_FS = 80 * MiB
FILLER = 48 * MiB
#: the longest any job here may take to reach a state it is heading for
WAIT = 30.0


# -- helpers ------------------------------------------------------------------------------------


def mirror(m, spec: str) -> str:  # type: ignore[no-untyped-def]
    """Start a mirror through ``jobs/mirror``; returns the job id (raises on a refusal)."""
    return _write_control(str(m.path / ".control" / "jobs" / "mirror"), spec)


def job_events(m, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    """The events of one job (BLOCK_JOB_* name it in data.device, JOB_STATUS_CHANGE in
    data.id), oldest first."""
    return [
        e for e in events(m) if e["data"].get("device") == job_id or e["data"].get("id") == job_id
    ]


def names(evs: list[dict]) -> list[str]:  # type: ignore[type-arg]
    return [e["event"] for e in evs]


def wait_for(what: str, cond, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


#: the guest: random 4 KiB O_DIRECT writes all over the disk until the stop file appears; a
#: write that fails (or is cut short) ends it with an error
_GUEST = """\
import mmap, os, random, sys
path, size, stop, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
rnd = random.Random(seed)
n = 0
while not os.path.exists(stop):
    for _ in range(32):
        buf[:] = rnd.randbytes(4096)
        done = os.pwrite(fd, buf, rnd.randrange(size // 4096) * 4096)
        if done != 4096:
            sys.exit(f"short write: {done} bytes")
        n += 1
os.fsync(fd)
print(n)
"""


class Guest:
    """A guest writing to ``MNT/disk`` until :meth:`stop`."""

    def __init__(self, disk: Path, stop_file: Path, seed: int) -> None:
        self.stop_file = stop_file
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _GUEST, str(disk), str(SIZE), str(stop_file), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.1)  # writing before anything else happens

    def stop(self) -> int:
        """Every write of the guest succeeded (and its fsync); returns how many it made."""
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, f"a guest write failed: {err}"
        assert int(out) > 0
        return int(out)


class Guests:
    """``g = guests(m / "disk")`` starts a :class:`Guest`; :meth:`halt` ends those still
    running (their errors no longer matter)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[Guest] = []

    def __call__(self, disk: Path) -> Guest:
        g = Guest(disk, self.folder / f"guest{len(self.made)}.stop", seed=len(self.made))
        self.made.append(g)
        return g

    def halt(self) -> None:
        for g in self.made:
            if g.proc.poll() is None:
                g.stop_file.touch()
                try:
                    g.proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    g.proc.kill()
                    g.proc.communicate()


@pytest.fixture
def guest(mount, tmp_path: Path) -> Iterator[Guests]:  # type: ignore[no-untyped-def]
    """Guests, halted at teardown before the mounts go (this fixture depends on ``mount``,
    so it ends first)."""
    guests = Guests(tmp_path)
    yield guests
    guests.halt()


def copy_of(m, name: str, dest: Path) -> Path:  # type: ignore[no-untyped-def]
    """The guest's view of the disk now (the guest must be stopped)."""
    run(["cp", str(m / name), str(dest)])
    return dest


def compare(ref: Path, image: Path, fmt: str = "qcow2") -> None:
    """``image`` reads exactly as the raw ``ref`` (qemu-img compare)."""
    qemu_img("compare", "-f", "raw", "-F", fmt, str(ref), str(image))


def check(image: Path) -> int:
    """``qemu-img check``: no corruption and no check error; exit 0 or 3 (leaks only)."""
    res = qemu_img("check", "--output=json", str(image), check=False)
    assert res.returncode in (0, 3), f"qemu-img check {image}: {res.stdout}{res.stderr}"
    doc = json.loads(res.stdout)
    assert not doc.get("corruptions") and not doc.get("check-errors"), doc
    return res.returncode


@contextlib.contextmanager
def unmounted_on_failure(m, guests: Guests) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """When the body fails, halt the guests and unmount at once (the mount fixture would
    too, but then waits for the daemon's process to be reaped, which takes seconds here)."""
    try:
        yield
    except BaseException:
        guests.halt()
        blockfs("umount", str(m.path), check=False, timeout=60)
        raise


def leftovers(folder: Path) -> list[str]:
    """Files of a target's folder that a job may have left: the target or a .part file."""
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB qcow2 disk full of random data (but for a 4 MiB hole of zeroes)."""
    d = tmp_path_factory.mktemp("mirror-src")
    raw = random_file(d / "src.raw", SIZE, seed=11)
    with open(raw, "r+b") as f:
        f.seek(40 * MiB)
        f.write(bytes(4 * MiB))
    img = d / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    raw.unlink()
    return img


@pytest.fixture
def source(template: Path, tmp_path: Path) -> Path:
    """This test's own copy of the template disk."""
    src = tmp_path / "src.qcow2"
    shutil.copyfile(template, src)
    return src


@dataclass
class SmallFs:
    dir: Path
    filler: Path

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFs]:
    """A tmpfs of 80 MiB holding a 48 MiB filler: a 64 MiB target fills it up half-way, and
    fits once the filler is removed. Unmounted at teardown (list it before ``mount``)."""
    d = tmp_path / "small"
    d.mkdir()
    res = run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0755", "tmpfs", str(d)], check=False
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        filler = d / "filler"
        with open(filler, "wb") as f:
            f.write(bytes(FILLER))
        yield SmallFs(d, filler)
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


# -- 1. a target on a file system that fills up ------------------------------------------------


def error_count(m, job_id: str) -> int:  # type: ignore[no-untyped-def]
    """BLOCK_JOB_ERROR events of the job, repeats included (the log coalesces them)."""
    return sum(e.get("count", 1) for e in job_events(m, job_id) if e["event"] == "BLOCK_JOB_ERROR")


def node_errors(m) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(line for line in m.log_text().splitlines() if " ERROR: " in line)


def wait_errors(m, job_id: str, want: int, state: str) -> None:  # type: ignore[no-untyped-def]
    """Wait until the job met ``want`` errors, staying in ``state`` meanwhile."""
    deadline = time.monotonic() + WAIT
    while error_count(m, job_id) < want:
        s = status(m, job_id)
        assert s["state"] == state, f"{s}\n{node_errors(m)}"
        assert time.monotonic() < deadline, f"fewer than {want} errors: {s}"
        time.sleep(0.02)


def wait_ready_after_errors(m, job_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Wait for READY once the cause of the errors is gone; fail at once if the job pauses or
    ends instead, or still meets errors a second later."""
    t0 = time.monotonic()
    settled: int | None = None
    while True:
        s = status(m, job_id)
        if s["state"] == "ready":
            return s
        assert s["state"] in ("running", "created"), f"{s}\n{node_errors(m)}"
        now = time.monotonic()
        if settled is None and now > t0 + 0.5:
            settled = error_count(m, job_id)  # errors under way at the fix have landed
        if settled is not None and now > t0 + 1.5:
            assert error_count(m, job_id) == settled, (
                f"the job still fails with the cause gone: {s}\n{node_errors(m)}"
            )
        assert now < t0 + 10, f"job {job_id} stuck: {s}"
        time.sleep(0.02)


#: how many target errors the job meets before the test frees space, where errors keep coming
#: (ignore retries, guest writes in write-blocking mode): the target stays full for a second or
#: two. A background error is a failed copy of up to 1 MiB (four workers retry every 50 ms); a
#: write-blocking one a failed 4 KiB guest write (thousands a second).
ERRORS_WHILE_FULL = {"background": 100, "write-blocking": 1500}


def full_target_job(  # type: ignore[no-untyped-def]
    m,
    guest,
    source: Path,
    small: SmallFs,
    tmp_path: Path,
    policy: str,
    copy_mode: str,
    fmt: str = "qcow2",
    with_guest: bool = True,
) -> tuple[Path, Path | None]:
    """Mirror ``disk`` onto the small file system, the guest writing all along, until the
    target is full, then judge what ``policy`` did. Returns the target and (unless the job
    failed, as ``report`` makes it) the guest's view of the disk at the switch-over."""
    target = small.dir / f"t.{fmt}"
    g = guest(m / "disk") if with_guest else None
    spec = f"device=disk target={target} format={fmt} on-target-error={policy} "
    assert mirror(m, spec + f"copy-mode={copy_mode} speed=128M") == "disk"

    if policy == "report":
        s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
        if g is not None:
            g.stop()
        assert s["error"] and "No space left on device" in s["error"], s
        assert s["target-state"] == "incomplete: removed", s
        evs = job_events(m, "disk")
        errors = [e for e in evs if e["event"] == "BLOCK_JOB_ERROR"]
        assert errors and all(e["data"]["action"] == "report" for e in errors), evs
        assert all(e["data"]["operation"] == "write" for e in errors), evs
        done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 1 and "No space" in done[0]["data"]["error"], evs
        assert names(evs).index("BLOCK_JOB_ERROR") < names(evs).index("BLOCK_JOB_COMPLETED")
        assert "BLOCK_JOB_READY" not in names(evs) and "BLOCK_JOB_CANCELLED" not in names(evs)
        assert leftovers(small.dir) == []  # neither the target nor its .part file
        assert m.info("disk")["filename"] == str(source)
        return target, None

    if policy in ("stop", "enospc"):
        s = wait_state(m, "disk", ("paused", "concluded"), timeout=WAIT)
        assert s["state"] == "paused", f"{s}\n{node_errors(m)}"
        assert s["io-status"] == "nospace" and s["paused"] and s["error"] is None, s
        action = "stop"
    else:  # ignore: the job goes on, retrying what failed
        wait_for("an ignored error", lambda: error_count(m, "disk") > 0)
        action = "ignore"
    if action == "ignore":
        wait_errors(m, "disk", ERRORS_WHILE_FULL[copy_mode], "running")
    else:
        # Paused, while the guest writes on: a write-through that fails now is not judged
        # again (the job is paused for the first error); it is retried after resume.
        time.sleep(0.5)
    s = status(m, "disk")
    assert s["state"] == ("paused" if action == "stop" else "running"), f"{s}\n{node_errors(m)}"
    assert not s["ready"] and s["offset"] < s["len"] and s["error"] is None, s
    errors = [e for e in job_events(m, "disk") if e["event"] == "BLOCK_JOB_ERROR"]
    assert errors and all(e["data"]["action"] == action for e in errors), errors
    assert all(e["data"]["operation"] == "write" for e in errors), errors
    assert not target.exists()  # unfinished: only the hidden .part file
    assert [n.startswith(f".t.{fmt}.") for n in leftovers(small.dir)] == [True]

    small.free()
    if action == "stop":
        ctl(m, "disk", "resume")
    ctl(m, "disk", "speed=0")
    s = wait_ready_after_errors(m, "disk")
    assert s["io-status"] == "ok" and s["error"] is None, s
    if g is not None:
        g.stop()  # every guest write succeeded, all through the job
    ref = copy_of(m, "disk", tmp_path / "ref.raw")
    ctl(m, "disk", "complete")
    s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
    assert s["error"] is None, s
    assert s["target-state"] == "switched: the device now serves the target", s
    done = [e for e in job_events(m, "disk") if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(done) == 1 and "error" not in done[0]["data"], done
    assert m.info("disk")["filename"] == str(target)
    assert leftovers(small.dir) == [f"t.{fmt}"]
    return target, ref


#: every policy in both copy modes, qcow2 and raw (BLOCKFS_FULL=1); by default each policy and
#: each copy mode once, qcow2, and raw once
_FULL_TARGET_CASES = [
    ("qcow2", "report", "background"),
    ("qcow2", "report", "write-blocking"),
    ("qcow2", "stop", "background"),
    ("qcow2", "stop", "write-blocking"),
    ("qcow2", "enospc", "background"),
    ("qcow2", "enospc", "write-blocking"),
    ("qcow2", "ignore", "background"),
    ("qcow2", "ignore", "write-blocking"),
    # a raw target (no allocation, no metadata) shows the policy alone
    ("raw", "stop", "write-blocking"),
    ("raw", "ignore", "background"),
    ("raw", "ignore", "write-blocking"),
]
_DEFAULT_CASES = {
    ("qcow2", "report", "background"),
    ("qcow2", "stop", "write-blocking"),
    ("qcow2", "enospc", "background"),
    ("qcow2", "ignore", "write-blocking"),
    ("raw", "ignore", "background"),
}


@pytest.mark.parametrize(
    "fmt,policy,copy_mode",
    [c for c in _FULL_TARGET_CASES if FULL or c in _DEFAULT_CASES],
)
def test_full_target(
    small_fs: SmallFs,
    mount,
    guest,
    tmp_path: Path,
    source: Path,
    fmt: str,
    policy: str,
    copy_mode: str,
) -> None:
    """The guest's writes never fail; report fails the job and removes the new target; stop
    and enospc pause it (io-status nospace) until space is freed and it is resumed; ignore
    retries until space is freed; then READY, complete, and the target equals the disk."""
    m = mount(f"disk={source},format=qcow2")
    with unmounted_on_failure(m, guest):
        target, ref = full_target_job(m, guest, source, small_fs, tmp_path, policy, copy_mode, fmt)
    if ref is None:  # failed: the source goes on as the disk
        ref = copy_of(m, "disk", tmp_path / "ref.raw")
    m.umount()
    # The old image is intact, and as the guest left it (at the switch, or at the end).
    assert check(source) == 0
    compare(ref, source)
    if target.exists():
        compare(ref, target, fmt)
        if fmt == "qcow2":
            check(target)


def test_full_target_leaks_nothing(
    small_fs: SmallFs, mount, guest, tmp_path: Path, source: Path
) -> None:
    """After stop, free space, resume and complete, the target is not only consistent but
    clean: the clusters allocated for the writes that failed were given back (QEMU's
    qcow2_alloc_cluster_abort)."""
    m = mount(f"disk={source},format=qcow2")
    with unmounted_on_failure(m, guest):
        target, ref = full_target_job(
            m, guest, source, small_fs, tmp_path, "stop", "background", with_guest=False
        )
    m.umount()
    assert ref is not None
    compare(ref, target)
    assert check(target) == 0, "leaked clusters in the target"


def fill_up(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte with one more file."""
    rest = folder / "rest"
    fd = os.open(rest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (MiB, 4096, 512, 1):
            buf = bytes(chunk)
            try:
                while os.write(fd, buf) == chunk:
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return rest


def test_full_before_the_first_l2_table_recovers(
    small_fs: SmallFs, mount, guest, tmp_path: Path, source: Path
) -> None:
    """An existing, empty qcow2 target (4 KiB clusters) on a file system full to the last
    byte: its first allocation is an L2 table, which fails with ENOSPC; stop pauses the job
    (nospace); once space is freed, resume finishes it and the target equals the disk."""
    target = small_fs.dir / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(target), str(SIZE))
    rest = fill_up(small_fs.dir)
    m = mount(f"disk={source},format=qcow2")
    with unmounted_on_failure(m, guest):
        mirror(m, f"device=disk target={target} mode=existing on-target-error=stop")
        s = wait_state(m, "disk", ("paused", "concluded"), timeout=WAIT)
        assert s["state"] == "paused" and s["io-status"] == "nospace", s
        assert s["offset"] == 0, s
        small_fs.free()
        rest.unlink()
        ctl(m, "disk", "resume")
        s = wait_ready_after_errors(m, "disk")
        ref = copy_of(m, "disk", tmp_path / "ref.raw")
        ctl(m, "disk", "complete")
        s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
        assert s["error"] is None, s
    m.umount()
    compare(ref, target)
    check(target)
    assert check(source) == 0
    compare(ref, source)


# -- 2. source read errors ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
def test_source_read_errors(mount, tmp_path: Path, source: Path, policy: str) -> None:
    """Reads of the source fail (EIO, injected below the qcow2 node): report fails the job;
    stop pauses it (io-status failed) until resume; ignore retries; once the reads work
    again both go on to READY and the target equals the disk."""
    m = mount(f"disk={source},format=qcow2,inject=on")
    rules = m.path / ".control" / "images" / "disk" / "inject"
    # report: one read fails; stop, ignore: every read from the 4th on, until cleared
    once = "on" if policy == "report" else "off"
    rules.write_text(f"op=read errno=EIO nth=4 once={once}\n")
    folder = tmp_path / "tgt"
    folder.mkdir()
    target = folder / "t.qcow2"
    mirror(m, f"device=disk target={target} on-source-error={policy}")

    if policy == "report":
        s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
        assert s["error"] and "source read failed" in s["error"], s
        assert "injected EIO" in s["error"], s
        assert s["target-state"] == "incomplete: removed", s
        evs = job_events(m, "disk")
        errors = [e for e in evs if e["event"] == "BLOCK_JOB_ERROR"]
        assert errors and errors[0]["data"] == {
            "device": "disk",
            "operation": "read",
            "action": "report",
        }, evs
        done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 1 and "source read failed" in done[0]["data"]["error"], evs
        assert names(evs).index("BLOCK_JOB_ERROR") < names(evs).index("BLOCK_JOB_COMPLETED")
        assert os.listdir(folder) == []
        ref = copy_of(m, "disk", tmp_path / "ref.raw")
        m.umount()
        assert check(source) == 0
        compare(ref, source)
        return

    if policy == "stop":
        s = wait_state(m, "disk", ("paused",), timeout=WAIT)
        assert s["io-status"] == "failed" and s["error"] is None, s
    else:
        wait_for("an ignored error", lambda: "BLOCK_JOB_ERROR" in names(job_events(m, "disk")))
        time.sleep(0.3)
        s = status(m, "disk")
        assert s["state"] == "running" and s["error"] is None, s
        fired = json.loads(rules.read_text())[0]["fired"]
        time.sleep(0.3)
        assert json.loads(rules.read_text())[0]["fired"] > fired  # it keeps retrying
    errors = [e for e in job_events(m, "disk") if e["event"] == "BLOCK_JOB_ERROR"]
    assert errors and {json.dumps(e["data"], sort_keys=True) for e in errors} == {
        json.dumps({"device": "disk", "operation": "read", "action": policy}, sort_keys=True)
    }, errors
    s = status(m, "disk")
    assert not s["ready"] and s["offset"] < SIZE, s
    assert not target.exists()

    rules.write_text("clear\n")
    if policy == "stop":
        ctl(m, "disk", "resume")
    s = wait_state(m, "disk", ("ready",), timeout=WAIT)
    assert s["io-status"] == "ok" and s["offset"] == s["len"], s
    ref = copy_of(m, "disk", tmp_path / "ref.raw")
    ctl(m, "disk", "complete")
    s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
    assert s["error"] is None, s
    assert m.info("disk")["filename"] == str(target)
    m.umount()
    compare(ref, target)
    assert check(target) == 0
    assert check(source) == 0
    compare(ref, source)


# -- 3. cancel ----------------------------------------------------------------------------------


def test_cancel_before_ready_removes_the_new_target(mount, tmp_path: Path, source: Path) -> None:
    m = mount(f"disk={source},format=qcow2")
    folder = tmp_path / "tgt"
    folder.mkdir()
    target = folder / "t.qcow2"
    mirror(m, f"device=disk target={target} speed=8M")  # 8 s for the whole disk
    wait_for("progress", lambda: status(m, "disk")["offset"] > 0)
    s = status(m, "disk")
    assert s["state"] == "running" and s["partial-target"].startswith(str(folder / ".t.qcow2.")), s
    assert os.path.exists(s["partial-target"])
    ctl(m, "disk", "cancel")
    s = wait_state(m, "disk", ("concluded",), timeout=5)
    assert s["error"] is None and s["offset"] < SIZE, s
    assert s["target-state"] == "incomplete: removed", s
    evs = names(job_events(m, "disk"))
    assert "BLOCK_JOB_CANCELLED" in evs, evs
    assert "BLOCK_JOB_COMPLETED" not in evs and "BLOCK_JOB_READY" not in evs, evs
    assert os.listdir(folder) == []  # no t.qcow2, no .t.qcow2.*.part
    assert m.info("disk")["filename"] == str(source)
    ctl(m, "disk", "dismiss")
    m.umount()
    assert check(source) == 0


def test_progress_of_a_job_ended_before_ready(mount, tmp_path: Path, source: Path) -> None:
    """BLOCK_JOB_CANCELLED and the concluded status carry the progress as QEMU's do:
    0 < offset <= len, len the work the job knew of (here the disk's data, 60 MiB)."""
    m = mount(f"disk={source},format=qcow2")
    with unmounted_on_failure(m, Guests(tmp_path)):
        mirror(m, f"device=disk target={tmp_path / 't.qcow2'} speed=8M")
        wait_for("progress", lambda: status(m, "disk")["offset"] > 0)
        running = status(m, "disk")
        assert 0 < running["offset"] < running["len"], running
        ctl(m, "disk", "cancel")
        s = wait_state(m, "disk", ("concluded",), timeout=5)
        (ev,) = [e for e in job_events(m, "disk") if e["event"] == "BLOCK_JOB_CANCELLED"]
        assert ev["data"]["offset"] == s["offset"] > 0, (ev, s)
        assert s["len"] >= s["offset"], s
        assert ev["data"]["len"] >= ev["data"]["offset"], ev
    m.umount()


def test_cancel_in_ready_keeps_a_consistent_target_and_the_source(
    mount, guest, tmp_path: Path, source: Path
) -> None:
    """cancel in READY: the target is made equal to the disk at that point and kept under its
    name (BLOCK_JOB_COMPLETED, error null); the device keeps serving its source."""
    m = mount(f"disk={source},format=qcow2")
    folder = tmp_path / "tgt"
    folder.mkdir()
    target = folder / "t.qcow2"
    mirror(m, f"device=disk target={target}")
    wait_state(m, "disk", ("ready",), timeout=WAIT)
    g = guest(m / "disk")  # writes while READY: the job keeps the target in sync
    time.sleep(0.5)
    g.stop()
    ref = copy_of(m, "disk", tmp_path / "ref.raw")  # the guest stopped right before cancel
    ctl(m, "disk", "cancel")
    s = wait_state(m, "disk", ("concluded",), timeout=WAIT)
    assert s["error"] is None, s
    assert s["target-state"] == "consistent: the source as it was at cancel", s
    evs = job_events(m, "disk")
    done = [e for e in evs if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert len(done) == 1 and "error" not in done[0]["data"], evs
    assert "BLOCK_JOB_CANCELLED" not in names(evs), evs
    assert os.listdir(folder) == ["t.qcow2"]
    assert m.info("disk")["filename"] == str(source)
    compare(ref, target)
    # Writes now go to the source alone.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", str(m / "disk")])
    compare(ref, target)
    assert run(["cmp", str(ref), str(m / "disk")], check=False).returncode == 1
    after = copy_of(m, "disk", tmp_path / "after.raw")
    m.umount()
    assert check(target) == 0
    assert check(source) == 0
    compare(after, source)


def test_cancel_force_in_ready_ends_at_once(mount, guest, tmp_path: Path, source: Path) -> None:
    """cancel force in READY ends the job at once, with dirty clusters left and the guest
    writing: BLOCK_JOB_CANCELLED, the new target removed, the source served."""
    m = mount(f"disk={source},format=qcow2")
    folder = tmp_path / "tgt"
    folder.mkdir()
    target = folder / "t.qcow2"
    mirror(m, f"device=disk target={target} copy-mode=background")
    wait_state(m, "disk", ("ready",), timeout=WAIT)
    ctl(m, "disk", "speed=1M")  # what the guest dirties now stays dirty for a while
    g = guest(m / "disk")
    wait_for("dirty clusters", lambda: status(m, "disk")["len"] > status(m, "disk")["offset"])
    t0 = time.monotonic()
    ctl(m, "disk", "cancel force")
    s = wait_state(m, "disk", ("concluded",), timeout=5)
    took = time.monotonic() - t0
    g.stop()
    assert took < 1.0, f"cancel force took {took:.2f} s"
    assert s["error"] is None, s
    evs = names(job_events(m, "disk"))
    assert "BLOCK_JOB_CANCELLED" in evs and "BLOCK_JOB_COMPLETED" not in evs, evs
    assert s["target-state"] == "incomplete: removed", s
    assert os.listdir(folder) == []
    assert m.info("disk")["filename"] == str(source)
    ref = copy_of(m, "disk", tmp_path / "ref.raw")
    m.umount()
    assert check(source) == 0
    compare(ref, source)


# -- 4. refusals --------------------------------------------------------------------------------

#: one write of a spec and one read of the answer on the same open file, in a child process
#: (bounded: a daemon that waits on itself would hang the writer)
_REFUSE = """\
import json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    os.write(fd, sys.argv[2].encode() + b"\\n")
    err = 0
except OSError as exc:
    err = exc.errno
answer = os.read(fd, 65536).decode(errors="replace")
os.close(fd)
print(json.dumps({"errno": err, "answer": answer}))
"""


def write_spec(m, spec: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """(errno of the write, 0 if it worked; what a read of the same open file gives)."""
    path = m.path / ".control" / "jobs" / "mirror"
    res = run([sys.executable, "-c", _REFUSE, str(path), spec], timeout=20)
    doc = json.loads(res.stdout)
    return doc["errno"], doc["answer"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refusals(mount, tmp_path: Path, source: Path) -> None:
    """Each bad spec fails the write with its errno and a one-line reason, creates nothing,
    changes no file, and leaves the daemon serving (no hang, no traceback)."""
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(other), str(SIZE))
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    run(["qemu-io", "-c", "write -P 0x11 0 4M", str(base)])
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    wrong = tmp_path / "wrong.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(wrong), str(SIZE // 2))
    existing = random_file(tmp_path / "existing.qcow2", 4096, seed=12)
    raw_same = tmp_path / "same.raw"
    qemu_img("create", "-q", "-f", "raw", str(raw_same), str(SIZE))
    m = mount(
        f"disk={source},format=qcow2",
        f"other={other},format=qcow2",
        f"chain={top},format=qcow2",
    )
    new = tmp_path / "new.qcow2"
    mnt = m.path
    cases = [
        # a target inside the mount: new, and an existing one that is another mounted image
        (f"device=disk target={mnt}/x", errno.EBUSY, "inside this"),
        (f"device=disk target={mnt}/other mode=existing", errno.EBUSY, "inside this"),
        (f"device=disk target={mnt}/disk mode=existing", errno.EBUSY, "inside this"),
        # a file a mounted image uses: another's, and the device's own
        (f"device=disk target={other} mode=existing", errno.EBUSY, str(other)),
        (f"device=disk target={source} mode=existing", errno.EBUSY, str(source)),
        (f"device=chain target={base} mode=existing", errno.EBUSY, str(base)),
        (f"device=disk target={wrong} mode=existing", errno.EINVAL, "bytes"),
        (f"device=disk target={new} granularity=3000", errno.EINVAL, "granularity=3000"),
        (f"device=disk target={new} granularity=256", errno.EINVAL, "granularity=256"),
        (f"device=disk target={new} granularity=128M", errno.EINVAL, "granularity=128M"),
        (f"device=disk target={new} copy-mode=bogus", errno.EINVAL, "copy-mode"),
        (f"device=chain target={new} format=raw sync=top", errno.EINVAL, "sync=top"),
        (
            f"device=chain target={raw_same} format=raw mode=existing sync=top",
            errno.EINVAL,
            "sync=top",
        ),
        (f"device=disk target={existing}", errno.EEXIST, "exists already"),
        (f"device=disk target={existing} format=raw", errno.EEXIST, "exists already"),
    ]
    before = {p: digest(p) for p in (other, source, base, top, wrong, existing, raw_same)}
    wrong_answers = []
    for spec, err, reason in cases:
        t0 = time.monotonic()
        got, answer = write_spec(m, spec)
        took = time.monotonic() - t0
        ok = (
            got != 0
            and got == err
            and reason in answer
            and answer.count("\n") == 1
            and answer.endswith("\n")
            and took < 5
        )
        if not ok:
            wrong_answers.append(f"{spec!r}: errno {got} ({errno.errorcode.get(got)}), "
                                 f"{took:.1f} s, answer {answer!r}")  # fmt: skip
        assert not (m.path / ".control" / "jobs" / "disk").exists(), spec
        assert not (m.path / ".control" / "jobs" / "chain").exists(), spec
        assert not new.exists() and not list(tmp_path.glob(".new.qcow2.*")), spec
    assert not wrong_answers, "\n".join(wrong_answers)
    failed = [e for e in events(m) if e["event"] == "JOB_START_FAILED"]
    assert len(failed) == len(cases), failed
    assert sorted(n for n in os.listdir(mnt) if n != ".control") == ["chain", "disk", "other"]
    # The daemon still serves, and a good spec still starts a job.
    assert mirror(m, f"device=disk target={new}") == "disk"
    wait_state(m, "disk", ("ready",), timeout=WAIT)
    ctl(m, "disk", "cancel force")
    wait_state(m, "disk", ("concluded",), timeout=5)
    m.umount()
    assert {p: digest(p) for p in before} == before
