"""Issue 9, the FUSE and control-tree holes: memory that grew without bound (3), image files and
control files every user could read (5), specs judged by the piece (8), events flooded out by
one repeated error (9).

Memory is judged by the daemon's resident size (``VmRSS``) against a bound stated in each test;
permissions by a real second user (``blockfs-test``, created if missing) on an ``--allow-other``
mount, the kernel enforcing the modes blockfs shows. Set ``BLOCKFS_FULL=1`` for the issue's full
10,000 job cycles (the normal run does 1,000).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockfs.control.tree import (
    MAX_CONTROL_BYTES,
    MAX_CONTROL_HANDLES,
    TextFile,
    VDir,
    VirtualTree,
)
from blockfs.fs import _spec_is_whole
from blockfs.jobs.job import EventLog
from blockfs.values import MAX_SPEC_BYTES
from conftest import (
    FULL,
    as_user,
    blockfs,
    mount_shared,
    random_file,
    run,
)

MiB = 1 << 20
#: the issue's figure; 1,000 in the normal run (measured: see test_job_cycles_keep_rss_bounded)
JOB_CYCLES = 10_000 if FULL else 400
#: what job cycles and 10,000 opens of `events` may add to the daemon's RSS
RSS_SLACK = 40 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def control(m, *parts: str) -> Path:  # type: ignore[no-untyped-def]
    return Path(m.path, ".control", *parts)


def write_fd(path: Path, *chunks: bytes) -> tuple[OSError | None, str]:
    """Write ``chunks`` (one write() each) to one open file; the first error and the answer."""
    fd = os.open(path, os.O_RDWR)
    failed: OSError | None = None
    try:
        for chunk in chunks:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                failed = exc
                break
        answer = os.read(fd, 65536).decode()
    finally:
        os.close(fd)
    return failed, answer


def events(m) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    return [json.loads(line) for line in control(m, "events").read_text().splitlines()]


# -- hole 9: repeats are coalesced ---------------------------------------------------------------


async def test_event_log_coalesces_repeats_of_recent_events() -> None:
    log = EventLog(maxlen=10)
    log.emit("JOB_STATUS_CHANGE", id="a", status="running")
    for _ in range(215):
        log.emit("BLOCK_JOB_ERROR", device="a", operation="write", action="ignore")
        log.emit("BLOCK_JOB_ERROR", device="a", operation="read", action="ignore")
    got = list(log)
    # The older event survives: 430 errors took two entries, not the whole log.
    assert [e["event"] for e in got] == ["JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR", "BLOCK_JOB_ERROR"]
    assert [e.get("count") for e in got] == [None, 215, 215]
    assert got[2]["data"]["operation"] == "read"
    assert log.version == 431  # every emit changes what `events` shows
    # Different data is a different event; a repeat moves to the end with the latest timestamp.
    log.emit("BLOCK_JOB_ERROR", device="b", operation="write", action="ignore")
    log.emit("BLOCK_JOB_ERROR", device="a", operation="write", action="ignore")
    got = list(log)
    assert [(e["data"]["device"], e.get("count")) for e in got[1:]] == [
        ("a", 215),
        ("b", None),
        ("a", 216),
    ]
    # Only the last few entries are compared: an old event is logged anew.
    for i in range(EventLog.COALESCE_WINDOW):
        log.emit("JOB_STATUS_CHANGE", id=f"x{i}", status="null")
    log.emit("JOB_STATUS_CHANGE", id="a", status="running")
    assert list(log)[-1].get("count") is None


def test_ignored_target_errors_take_one_event(mount, tmp_path: Path) -> None:
    """A backup to a full filesystem under on-target-error=ignore retries for ever; the log
    keeps one BLOCK_JOB_ERROR entry with a count instead of filling up with copies."""
    if os.getuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    full = tmp_path / "full"
    full.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)])
    try:
        with open(full / "filler", "wb") as f:
            try:
                f.write(b"\xff" * MiB)
            except OSError:
                pass
        src = random_file(tmp_path / "src.raw", 4 * MiB, seed=1)
        m = mount(f"d={src}")
        failed, answer = write_fd(
            control(m, "jobs", "backup"),
            f"device=d target={full / 't.raw'} format=raw on-target-error=ignore\n".encode(),
        )
        assert failed is None, answer
        deadline = time.monotonic() + 30
        while True:
            errors = [e for e in events(m) if e["event"] == "BLOCK_JOB_ERROR"]
            if errors and errors[-1].get("count", 1) >= 20:
                break
            assert time.monotonic() < deadline, errors
            time.sleep(0.1)
        assert len(errors) <= 2, errors  # write (and possibly a flush) errors: one entry each
        assert any(e["event"] == "JOB_STATUS_CHANGE" for e in events(m))
        write_fd(control(m, "jobs", "d", "ctl"), b"cancel\n")
        deadline = time.monotonic() + 30
        while json.loads(control(m, "jobs", "d", "status").read_text())["state"] != "concluded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        m.umount()
    finally:
        run(["umount", "-l", str(full)], check=False)


# -- hole 8: a spec is judged whole ----------------------------------------------------------------


def test_spec_is_whole_rules() -> None:
    def whole(text: bytes) -> bool:
        return _spec_is_whole(bytearray(text), text.endswith(b"\n"))

    assert not whole(b"device=d target=")
    assert whole(b"device=d target=/t\n")
    assert whole(b"\n")  # an empty spec is judged (and refused) at once
    assert not whole(b'{"device": "d",')
    assert not whole(b'{"device": "d",\n')  # a JSON spec over several lines
    assert not whole(b'{"device": "d", "target": "/x')  # inside a string
    assert whole(b'{"device": "d", "target": "/t"}')  # parses: no newline needed
    assert whole(b"{not json\n")  # nothing can follow that makes it parse
    assert not whole(b"{not json")  # ...but without a newline it waits for close
    assert whole(b'{"a": ' + b"[" * 30000 + b"\n")  # hostile nesting is judged, not parsed
    assert whole(b'{"device": "\xff"}')  # not UTF-8


def test_spec_split_across_two_writes_is_judged_whole(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=2)
    m = mount(f"d={src}", f"e={random_file(tmp_path / 'e.raw', MiB, seed=22)}")
    failed, answer = write_fd(
        control(m, "jobs", "backup"),
        b"device=d target=",
        f"{tmp_path / 't.raw'} format=raw id=split\n".encode(),
    )
    assert failed is None, answer
    assert answer == "split\n"
    failed, answer = write_fd(
        control(m, "jobs", "backup"),
        b'{"device": "e", "id": "json",\n',
        f' "target": "{tmp_path / "t.qcow2"}"}}'.encode(),
    )
    assert failed is None, answer
    assert answer == "json\n"
    # A verb too: "can" then "cel\n" is cancel, not an unknown verb.
    failed, answer = write_fd(control(m, "jobs", "json", "ctl"), b"can", b"cel\n")
    assert failed is None or failed.errno == errno.EBUSY, answer  # EBUSY: concluded already


def test_spec_without_newline_is_acted_on_at_close(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=3)
    m = mount(f"d={src}")
    backup = control(m, "jobs", "backup")
    # A good spec: the job starts when the file is closed.
    fd = os.open(backup, os.O_WRONLY)
    os.write(fd, f"device=d target={tmp_path / 't.raw'} format=raw id=atclose".encode())
    assert not control(m, "jobs", "atclose").exists()
    os.close(fd)
    assert control(m, "jobs", "atclose", "status").exists()
    # A bad one: close(2) returns its errno; a read of the same open file gives the reason.
    fd = os.open(backup, os.O_RDWR)
    os.write(fd, b"device=d target=/t colour=red")
    second = os.dup(fd)
    with pytest.raises(OSError) as exc:
        os.close(second)  # the spec is acted on at this close (FUSE flush)
    assert exc.value.errno == errno.EINVAL
    assert "colour" in os.read(fd, 4096).decode()
    os.close(fd)  # nothing left to act on: a clean close
    fd = os.open(backup, os.O_WRONLY)
    os.write(fd, b'{"device": "nope", "target": "/t"')  # JSON without its closing brace
    with pytest.raises(OSError) as exc:
        os.close(fd)
    assert exc.value.errno == errno.EINVAL
    fd = os.open(backup, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:  # whole JSON: judged at this write already
            os.write(fd, b'{"device": "nope", "target": "/t"}')
        assert exc.value.errno == errno.ENOENT
    finally:
        os.close(fd)


def test_gathered_spec_is_capped(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=4)
    m = mount(f"d={src}")
    chunk = b"x" * (MAX_SPEC_BYTES // 2)
    failed, answer = write_fd(control(m, "jobs", "backup"), chunk, chunk, b"y\n")
    assert failed is not None and failed.errno == errno.EINVAL
    assert "longer than" in answer


# -- hole 3: memory ----------------------------------------------------------------------------


def test_removed_entries_leave_the_inode_table_after_their_last_handle() -> None:
    tree = VirtualTree()
    jobs = tree.mkdirs(tree.root, ".control", "jobs")
    d = VDir("job")
    tree.add(jobs, d)
    status = TextFile("status", lambda: "{}")
    ctl = TextFile("ctl", lambda: "")
    tree.add(d, status)
    tree.add(d, ctl)
    before = len(tree.by_inode)
    tree.opened(status)
    dropped = tree.remove(d)
    assert set(dropped) == {d, ctl}
    assert tree.by_inode[status.inode] is status  # its open handle still works
    assert "job" not in jobs.children
    assert tree.closed(status.inode) is status
    assert len(tree.by_inode) == before - 3


def _fill_events(m, target_bytes: int = MiB) -> int:  # type: ignore[no-untyped-def]
    """Distinct refused specs, ~1 KiB each, until `events` holds about ``target_bytes``."""
    i = 0
    while True:
        pad = "p" * 900
        write_fd(control(m, "jobs", "backup"), f"device=none{i} target=/t{i} {pad}\n".encode())
        i += 1
        if i % 100 == 0:
            size = len(control(m, "events").read_bytes())
            if size >= target_bytes or i >= 3000:
                return size


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_100:
        pytest.skip(f"the fd limit ({hard}) is below the 10,000 opens the test makes")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 10_100), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_ten_thousand_opens_of_events_share_one_snapshot(mount, tmp_path: Path, many_fds) -> None:  # type: ignore[no-untyped-def]
    """10,000 opens of a ~1 MB `events` (each kept open) add less than RSS_SLACK to the
    daemon: open handles share one rendering, and past MAX_CONTROL_HANDLES open fails with
    EMFILE. (Before: each handle held its own copy, ~1 MB each.)"""
    src = random_file(tmp_path / "src.raw", MiB, seed=5)
    m = mount(f"d={src}")
    size = _fill_events(m)
    assert size >= 800_000, size
    pid = m.pid
    start = rss(pid)
    fds: list[int] = []
    refused = 0
    try:
        for i in range(10_000):
            try:
                fds.append(os.open(control(m, "events"), os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                refused += 1
            if i % 250 == 0:  # stop early if memory runs away (it did: 1 MB per open)
                assert rss(pid) - start < RSS_SLACK, (i, rss(pid) - start)
        grown = rss(pid) - start
        assert len(fds) == MAX_CONTROL_HANDLES and refused == 10_000 - MAX_CONTROL_HANDLES
        for fd in (fds[0], fds[len(fds) // 2], fds[-1]):
            assert len(os.pread(fd, 2 * size, 0)) == size
    finally:
        for fd in fds:
            os.close(fd)
    print(f"\n10,000 opens of events ({size} bytes): RSS {start >> 20} MiB + {grown >> 20} MiB")
    assert grown < RSS_SLACK, grown
    # The limit is per handle held, not per life: closed handles free their place.
    os.close(os.open(control(m, "events"), os.O_RDONLY))


def test_snapshot_bytes_per_user_are_capped(mount, tmp_path: Path) -> None:
    """Handles that each hold a different rendering of `events` (the log changes between
    opens) stop at MAX_CONTROL_BYTES with EMFILE."""
    src = random_file(tmp_path / "src.raw", MiB, seed=6)
    m = mount(f"d={src}")
    size = _fill_events(m)
    pid = m.pid
    start = rss(pid)
    fds: list[int] = []
    try:
        for i in range(4 * (MAX_CONTROL_BYTES // size)):
            write_fd(control(m, "jobs", "backup"), f"device=other{i} target=/t\n".encode())
            try:
                fds.append(os.open(control(m, "events"), os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        else:
            raise AssertionError(f"{len(fds)} distinct snapshots of {size} bytes were allowed")
        assert len(fds) <= MAX_CONTROL_BYTES // size + 1
        grown = rss(pid) - start
        print(f"\n{len(fds)} snapshots of {size} bytes held: RSS {start >> 20} MiB + "
              f"{grown >> 20} MiB")  # fmt: skip
        assert grown < MAX_CONTROL_BYTES + RSS_SLACK, grown
    finally:
        for fd in fds:
            os.close(fd)
    os.close(os.open(control(m, "events"), os.O_RDONLY))  # room again once they are closed


def test_job_cycles_keep_rss_bounded(mount, tmp_path: Path) -> None:
    """Start (mode=existing), cancel and dismiss a backup JOB_CYCLES times: the daemon's RSS
    stays within RSS_SLACK of where it was after a warm-up. (Before: every dismissed job stayed
    alive through the inode table, ~70 KB per cycle here, 146 KB on the issue's disk.)"""
    # 4 GiB (sparse): a job's dirty bitmap alone is 64 KiB, so a job kept alive shows.
    size = 4 << 30
    src = tmp_path / "src.raw"
    target = tmp_path / "t.raw"
    for path in (src, target):
        with open(path, "wb") as f:
            f.truncate(size)
    m = mount(f"d={src}")
    spec = f"device=d target={target} format=raw mode=existing speed=64K\n".encode()
    backup = control(m, "jobs", "backup")
    ctl = control(m, "jobs", "d", "ctl")

    def cycle() -> None:
        failed, answer = write_fd(backup, spec)
        assert failed is None, answer
        failed, answer = write_fd(ctl, b"cancel\n")
        assert failed is None or failed.errno == errno.EBUSY, answer
        for _ in range(10_000):
            failed, answer = write_fd(ctl, b"dismiss\n")
            if failed is None:
                return
            assert failed.errno == errno.EBUSY, answer  # not concluded yet
        raise AssertionError("the job never concluded")

    pid = m.pid
    for _ in range(100):
        cycle()
    start = rss(pid)
    t0 = time.monotonic()
    for i in range(JOB_CYCLES):
        cycle()
        if i % 250 == 0:
            assert rss(pid) - start < RSS_SLACK, (i, rss(pid) - start)
    took = time.monotonic() - t0
    grown = rss(pid) - start
    print(
        f"\n{JOB_CYCLES} job cycles in {took:.1f} s ({JOB_CYCLES / took:.0f}/s): "
        f"RSS {start >> 20} MiB + {grown / MiB:.1f} MiB"
    )
    assert grown < RSS_SLACK, grown
    assert not control(m, "jobs", "d").exists()
    # only the files that start jobs are left (one per kind), no job's folder
    assert sorted(os.listdir(control(m, "jobs"))) == ["backup", "commit", "mirror", "stream"]


# -- hole 5: who may read what -----------------------------------------------------------------


def test_allow_other_mirrors_image_owner_and_mode(shared_dir: Path, other_user) -> None:  # type: ignore[no-untyped-def]
    d = shared_dir
    secret = random_file(d / "secret.raw", MiB, seed=8)
    secret.chmod(0o600)
    public = random_file(d / "public.raw", MiB, seed=9)
    public.chmod(0o644)
    theirs = random_file(d / "theirs.raw", MiB, seed=10)
    theirs.chmod(0o640)
    os.chown(theirs, other_user.pw_uid, other_user.pw_gid)
    ro = random_file(d / "ro.raw", MiB, seed=13)
    ro.chmod(0o664)
    mnt = mount_shared(
        d, "mnt0", f"secret={secret}", f"public={public}", f"theirs={theirs}",
        f"ro={ro},read-only=on",
    )  # fmt: skip
    st = {n: os.stat(mnt / n) for n in ("secret", "public", "theirs", "ro")}
    assert stat.S_IMODE(st["secret"].st_mode) == 0o600 and st["secret"].st_uid == 0
    assert stat.S_IMODE(st["public"].st_mode) == 0o644
    assert stat.S_IMODE(st["theirs"].st_mode) == 0o640
    assert (st["theirs"].st_uid, st["theirs"].st_gid) == (other_user.pw_uid, other_user.pw_gid)
    assert stat.S_IMODE(st["ro"].st_mode) == 0o444  # read-only: no write bits

    denied = as_user(other_user, "head", "-c", "16", str(mnt / "secret"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert as_user(other_user, "head", "-c", "16", str(mnt / "public")).returncode == 0
    assert as_user(other_user, "head", "-c", "16", str(mnt / "theirs")).returncode == 0
    wrote = as_user(other_user, "dd", "if=/dev/zero", f"of={mnt / 'public'}", "bs=512",
                    "count=1", "conv=notrunc")  # fmt: skip
    assert wrote.returncode != 0 and "Permission denied" in wrote.stderr, wrote

    # Control files that name host paths are the owner's alone; the rest stays readable.
    ctl = mnt / ".control"
    for private in (ctl / "events", ctl / "images" / "secret" / "info"):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o400
        res = as_user(other_user, "cat", str(private))
        assert res.returncode != 0 and "Permission denied" in res.stderr, res
        private.read_bytes()  # the owner still reads it
    assert as_user(other_user, "cat", str(ctl / "README")).returncode == 0
    assert as_user(other_user, "ls", str(ctl / "images")).returncode == 0
    for path, text in [
        ("jobs/backup", "device=public target=/tmp/x"),
        ("jobs/commit", "device=public"),
        ("jobs/stream", "device=public"),
        ("images/public/ctl", "snapshot=/tmp/x.qcow2"),
    ]:
        res = as_user(other_user, "sh", "-c", f"echo '{text}' > {ctl}/{path}")
        assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)


def test_job_status_is_the_owners_alone(shared_dir: Path, other_user) -> None:  # type: ignore[no-untyped-def]
    d = shared_dir
    src = random_file(d / "src.raw", 4 * MiB, seed=11)
    mnt = mount_shared(d, "mnt0", f"d={src}")
    failed, answer = write_fd(
        mnt / ".control" / "jobs" / "backup",
        f"device=d target={d / 't.raw'} format=raw speed=64K\n".encode(),
    )
    assert failed is None, answer
    status = mnt / ".control" / "jobs" / "d" / "status"
    assert stat.S_IMODE(os.stat(status).st_mode) == 0o400
    res = as_user(other_user, "cat", str(status))
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    assert json.loads(status.read_text())["device"] == "d"
    write_fd(mnt / ".control" / "jobs" / "d" / "ctl", b"cancel\n")


def test_mode_uid_gid_options_override(shared_dir: Path, other_user) -> None:  # type: ignore[no-untyped-def]
    d = shared_dir
    secret = random_file(d / "secret.raw", MiB, seed=12)
    secret.chmod(0o600)
    mnt = mount_shared(d, "mnt0", f"secret={secret}", options=("--mode", "0644"))
    assert stat.S_IMODE(os.stat(mnt / "secret").st_mode) == 0o644
    res = as_user(other_user, "head", "-c", "16", str(mnt / "secret"))
    assert res.returncode == 0, res
    secret = random_file(d / "secret2.raw", MiB, seed=14)
    secret.chmod(0o600)
    mnt = mount_shared(
        d, "mnt1", f"secret={secret}",
        options=("--mode", "600", "--uid", str(other_user.pw_uid), "--gid", "0"),
    )  # fmt: skip
    st = os.stat(mnt / "secret")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, other_user.pw_uid, 0)
    res = as_user(other_user, "head", "-c", "16", str(mnt / "secret"))
    assert res.returncode == 0, res
    bad = blockfs("mount", "--mode", "999", str(d / "mnt2"), f"x={secret}", check=False)
    assert bad.returncode == 2 and "octal" in bad.stderr
