"""Backup jobs on real mounts under live writes, judged by qemu-img compare/check/map."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    blockfs,
    ctl,
    events,
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


def fio_writer(path: Path, runtime: int, size: int, jobs: int = 4) -> subprocess.Popen[bytes]:
    """Random 4k writes over the whole disk from several jobs, bounded in time."""
    need_tool("fio")
    return subprocess.Popen(
        [
            "fio",
            "--name=guest",
            f"--filename={path}",
            "--rw=randwrite",
            "--bs=4k",
            f"--numjobs={jobs}",
            f"--size={size}",
            "--ioengine=libaio",
            "--iodepth=4",
            "--direct=1",
            "--time_based",
            f"--runtime={runtime}",
            "--randrepeat=0",
            "--group_reporting",
            "--output-format=json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def fio_done(proc: subprocess.Popen[bytes]) -> dict:  # type: ignore[type-arg]
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0
    return job


@pytest.mark.parametrize(
    "source_fmt,target_fmt,sync,view",
    [
        ("raw", "raw", "full", True),
        ("raw", "qcow2", "full", False),
        ("qcow2", "qcow2", "full", True),
        ("qcow2", "raw", "top", False),
        ("qcow2", "qcow2", "top", True),
    ],
)
def test_point_in_time_under_load(
    mount, tmp_path: Path, source_fmt: str, target_fmt: str, sync: str, view: bool
) -> None:
    """Copy the disk through the mount, start a backup, write hard with fio for the whole job:
    the target (and the view, read while the writes go on) equals that copy exactly."""
    size = 64 * MiB
    raw = random_file(tmp_path / "src.raw", size, seed=2)
    with open(raw, "r+b") as f:  # a hole, so zero skipping is exercised too
        f.seek(40 * MiB)
        f.write(bytes(8 * MiB))
    src = raw
    if source_fmt == "qcow2":
        src = tmp_path / "src.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    m = mount(f"disk0={src}")
    ref = tmp_path / "ref.raw"
    run(["cp", str(m / "disk0"), str(ref)])
    target = tmp_path / f"t.{target_fmt}"
    spec = f"device=disk0 target={target} format={target_fmt} sync={sync} speed=16M"
    assert start(m, spec + (" view=on" if view else "")) == "disk0"
    writer = fio_writer(m / "disk0", runtime=4, size=size)
    if view:
        run(["cmp", str(ref), str(m / "disk0@disk0")])
    s = wait_state(m, "disk0", ("concluded",))
    job = fio_done(writer)
    assert s["error"] is None and s["offset"] == s["len"] == size, s
    assert job["write"]["io_bytes"] > 4 * MiB
    assert not (m / "disk0@disk0").exists()
    qemu_img("compare", "-F", "raw", "-f", target_fmt, str(target), str(ref))
    if target_fmt == "qcow2":
        qemu_img("check", str(target))
    # The disk itself did change under the job.
    assert run(["cmp", str(ref), str(m / "disk0")], check=False).returncode == 1
    assert "BLOCK_JOB_COMPLETED" in [e["event"] for e in events(m)]
    ctl(m, "disk0", "dismiss")
    assert not (m.path / ".control" / "jobs" / "disk0").exists()


def test_sync_top_copies_only_the_top(mount, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "32M")
    run(["qemu-io", "-c", "write -P 0x11 0 16M", str(base)])
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    run(["qemu-io", "-c", "write -P 0x22 4M 4M", str(mid)])
    qemu_img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    run(["qemu-io", "-c", "write -P 0x33 1M 1M", "-c", "write -P 0x44 20M 64k", str(top)])
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(top), str(ref))
    m = mount(f"vm={top}")
    target = tmp_path / "t.qcow2"
    start(m, f"device=vm target={target} sync=top")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 8M", str(m / "vm")])
    s = wait_state(m, "vm", ("concluded",))
    assert s["error"] is None
    info = json.loads(qemu_img("info", "--output=json", str(target)).stdout)
    assert info["backing-filename"] == str(mid)
    # Only the top's clusters (1 MiB + 64 KiB) are allocated in the target itself.
    mapping = json.loads(qemu_img("map", "--output=json", str(target)).stdout)
    own = sum(e["length"] for e in mapping if e["depth"] == 0 and e["data"])
    assert own == 1 * MiB + 64 * 1024, mapping
    qemu_img("compare", "-F", "raw", str(target), str(ref))
    qemu_img("check", str(target))


def test_sync_none_fleecing(mount, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "32M")
    run(["qemu-io", "-c", "write -P 0x61 0 32M", str(src)])
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-O", "raw", str(src), str(ref))
    m = mount(f"d={src}")
    target = tmp_path / "fleece.qcow2"
    start(m, f"device=d target={target} sync=none")
    run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x62 1M 3M",
            "-c",
            "write -P 0x63 20M 64k",
            str(m / "d"),
        ]
    )
    # The target, read through its backing file (the live source), is the disk at job start.
    qemu_img("compare", "-U", "-F", "raw", str(target), str(ref))
    mapping = json.loads(qemu_img("map", "-U", "--output=json", str(target)).stdout)
    own = sum(e["length"] for e in mapping if e["depth"] == 0 and e["data"])
    assert own == 3 * MiB + 64 * 1024
    ctl(m, "d", "complete")
    s = wait_state(m, "d", ("concluded",))
    assert s["error"] is None
    m.umount()
    qemu_img("check", str(target))


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "small"
    d.mkdir()
    res = run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(d)], check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_full_target_stops_then_resumes_exact(mount, tmp_path: Path, small_fs: Path) -> None:
    size = 48 * MiB
    src = random_file(tmp_path / "src.raw", size, seed=3)
    m = mount(f"d={src}")
    ref = tmp_path / "ref.raw"
    run(["cp", str(m / "d"), str(ref)])
    target = small_fs / "t.raw"
    start(m, f"device=d target={target} format=raw on-target-error=stop")
    writer = fio_writer(m / "d", runtime=3, size=size, jobs=2)
    s = wait_state(m, "d", ("paused",))
    assert s["io-status"] == "nospace"
    fio_done(writer)  # the guest saw no error
    assert any(e["event"] == "BLOCK_JOB_ERROR" and e["data"]["action"] == "stop" for e in events(m))
    run(["mount", "-o", "remount,size=128M", str(small_fs)])
    ctl(m, "d", "resume")
    s = wait_state(m, "d", ("concluded",))
    assert s["error"] is None, s
    qemu_img("compare", "-f", "raw", "-F", "raw", str(target), str(ref))


def test_full_target_with_report_fails_the_job_not_the_guest(
    mount, tmp_path: Path, small_fs: Path
) -> None:
    size = 48 * MiB
    src = random_file(tmp_path / "src.raw", size, seed=4)
    m = mount(f"d={src}")
    target = small_fs / "t.raw"
    writer = fio_writer(m / "d", runtime=3, size=size, jobs=2)
    start(m, f"device=d target={target} format=raw on-target-error=report")
    s = wait_state(m, "d", ("concluded",))
    assert s["error"] and "No space left" in s["error"]
    fio_done(writer)
    completed = [e for e in events(m) if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" in completed[-1]["data"]


def test_pause_resume_speed_cancel(mount, tmp_path: Path) -> None:
    size = 64 * MiB
    src = random_file(tmp_path / "src.raw", size, seed=5)
    m = mount(f"d={src}")
    start(m, f"device=d target={tmp_path / 't.qcow2'} speed=4M")
    ctl(m, "d", "pause")
    s1 = wait_state(m, "d", ("paused",))
    time.sleep(0.5)
    s2 = status(m, "d")
    assert s2["offset"] == s1["offset"] and s2["state"] == "paused"
    ctl(m, "d", "resume")
    assert status(m, "d")["state"] == "running"
    ctl(m, "d", "speed=1G")
    assert status(m, "d")["speed"] == 1 << 30
    with pytest.raises(Exception) as exc:
        ctl(m, "d", "dismiss")
    assert "cannot accept verb 'dismiss'" in str(exc.value)
    ctl(m, "d", "speed=1M")
    ctl(m, "d", "cancel")
    s = wait_state(m, "d", ("concluded",))
    assert s["offset"] < size
    assert any(e["event"] == "BLOCK_JOB_CANCELLED" for e in events(m))
    # The device is free again: a new job with the same id needs the old one dismissed.
    with pytest.raises(Exception) as exc:
        start(m, f"device=d target={tmp_path / 't2.qcow2'}")
    assert "exists already" in str(exc.value)
    ctl(m, "d", "dismiss")
    assert start(m, f"device=d target={tmp_path / 't2.qcow2'}") == "d"
    wait_state(m, "d", ("concluded",))


def test_speed_limits_the_copy(mount, tmp_path: Path) -> None:
    size = 16 * MiB
    src = random_file(tmp_path / "src.raw", size, seed=6)
    m = mount(f"d={src}")
    t0 = time.monotonic()
    start(m, f"device=d target={tmp_path / 't.raw'} format=raw speed=8M")
    time.sleep(1.0)
    s = status(m, "d")
    assert s["offset"] < 12 * MiB, s  # ~8 MiB/s: far from the whole disk after one second
    wait_state(m, "d", ("concluded",))
    assert time.monotonic() - t0 > 1.2


def test_unmount_during_a_job_ends_it_cleanly(mount, tmp_path: Path) -> None:
    size = 64 * MiB
    src = random_file(tmp_path / "src.raw", size, seed=7)
    m = mount(f"d={src}")
    target = tmp_path / "t.qcow2"
    start(m, f"device=d target={target} speed=4M")
    time.sleep(0.3)
    pid = m.pid
    os.kill(pid, 15)
    assert wait_gone(pid)
    # A cancelled new target is removed: nothing left looks like a finished copy.
    assert not target.exists()
    assert not list(tmp_path.glob(".t.qcow2.*.part"))
    assert "BLOCK_JOB_CANCELLED" in m.log_text()


@pytest.mark.parametrize(
    "spec,err,reason",
    [
        ("device=d target=T colour=red", errno.EINVAL, "unknown key 'colour'"),
        ("device=d target=T sync=sometimes", errno.EINVAL, "sync=sometimes"),
        ("device=d target=T speed=fast", errno.EINVAL, "speed"),
        ("device=nope target=T", errno.ENOENT, "no device 'nope'"),
        ("target=T", errno.EINVAL, "device= is required"),
        ("device=d target=/nonexistent/dir/t.qcow2", errno.ENOENT, "does not exist"),
        ("device=d target=EXISTING", errno.EEXIST, "exists already"),
        ("device=d target=T mode=existing", errno.ENOENT, "does not exist"),
        ('{"device": "d", "target": ["x"]}', errno.EINVAL, "expected a string"),
        ("{not json", errno.EINVAL, "not valid JSON"),
        ('{"device": ' + "[" * 30000 + "]" * 30000 + "}", errno.EINVAL, "nested too deeply"),
        ("x" * 70000, errno.EINVAL, "longer than"),
        ("device=d target=T \udcff=1", errno.EINVAL, "not UTF-8"),
        ("device=d target=T id=.x", errno.EINVAL, "must not start with"),
        ("", errno.EINVAL, "empty spec"),
    ],
)
def test_bad_specs(mount, tmp_path: Path, spec: str, err: int, reason: str) -> None:
    src = random_file(tmp_path / "src.raw", MiB, seed=8)
    existing = random_file(tmp_path / "existing.qcow2", 4096)
    m = mount(f"d={src}")
    spec = spec.replace("EXISTING", str(existing)).replace(
        "target=T", f"target={tmp_path / 'new.qcow2'}"
    )
    fd = os.open(m.path / ".control" / "jobs" / "backup", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, (spec + "\n").encode(errors="surrogateescape"))
        assert exc.value.errno == err
        answer = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    assert reason in answer and answer.count("\n") == 1, answer
    assert not (tmp_path / "new.qcow2").exists()
    assert any(e["event"] == "JOB_START_FAILED" for e in events(m))


def test_busy_device_and_shell_usage(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 32 * MiB, seed=9)
    m = mount(f"d={src}")
    t1 = tmp_path / "t1.qcow2"
    # Plain shell, as the README shows.
    run(["bash", "-c", f"echo 'device=d target={t1} speed=2M' > {m.path}/.control/jobs/backup"])
    res = run(
        [
            "bash",
            "-c",
            f"echo 'device=d target={tmp_path / 't2.qcow2'} id=other' > "
            f"{m.path}/.control/jobs/backup",
        ],
        check=False,
    )
    assert res.returncode != 0 and "busy" in res.stderr.lower()
    out = blockfs("job", "list", str(m.path)).stdout
    assert "d " in out and "backup" in out
    blockfs("job", "speed", str(m.path), "d", "1G")
    res = blockfs("job", "wait", str(m.path), "d", "--timeout", "60")
    assert res.returncode == 0
    res = blockfs("job", "start", "backup", str(m.path), "device=d", f"target={t1}", check=False)
    assert res.returncode == 1 and res.stderr.startswith("blockfs: ") and "exists" in res.stderr
    blockfs("job", "dismiss", str(m.path), "d")
    qemu_img("compare", "-F", "raw", str(t1), str(src))


def test_compressed_backup_under_writes(mount, tmp_path: Path) -> None:
    size = 32 * MiB
    src = tmp_path / "src.raw"
    text = b"".join(b"line %08d of a very compressible disk\n" % i for i in range(size // 40 + 1))
    src.write_bytes(text[:size])
    m = mount(f"d={src}")
    ref = tmp_path / "ref.raw"
    run(["cp", str(m / "d"), str(ref)])
    target = tmp_path / "t.qcow2"
    start(m, f"device=d target={target} compress=on speed=8M")
    writer = fio_writer(m / "d", runtime=2, size=size, jobs=2)
    s = wait_state(m, "d", ("concluded",))
    fio_done(writer)
    assert s["error"] is None, s
    qemu_img("compare", "-F", "raw", str(target), str(ref))
    check = json.loads(qemu_img("check", "--output=json", str(target)).stdout)
    assert check["compressed-clusters"] >= (size // 65536) * 0.9
    assert target.stat().st_blocks * 512 < size // 4
    res = write_control_error(
        m, f"device=d id=r target={tmp_path / 'r.raw'} format=raw compress=on"
    )
    assert "qcow2" in res


def write_control_error(m, spec: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception) as exc:
        start(m, spec)
    return str(exc.value)


@pytest.fixture
def broken_source(tmp_path: Path) -> Path:
    """A qcow2 whose last compressed clusters are garbage: qemu-img itself cannot read them."""
    raw = tmp_path / "text.raw"
    raw.write_bytes(
        b"".join(b"line %08d compressible text\n" % i for i in range(300000))[: 8 * MiB]
    )
    img = tmp_path / "broken.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(img))
    with open(img, "r+b") as f:
        f.seek(-16384, os.SEEK_END)
        f.write(bytes(16384))  # an invalid deflate stream, whatever the offsets
    res = qemu_img("convert", "-O", "raw", str(img), str(tmp_path / "probe.raw"), check=False)
    assert res.returncode != 0 and "Input/output error" in res.stderr
    return img


def test_source_read_error_reports(mount, tmp_path: Path, broken_source: Path) -> None:
    m = mount(f"d={broken_source},read-only=on")
    start(m, f"device=d target={tmp_path / 't.qcow2'} on-source-error=report")
    s = wait_state(m, "d", ("concluded",))
    assert s["error"] and "source read failed" in s["error"], s
    errors = [e["data"] for e in events(m) if e["event"] == "BLOCK_JOB_ERROR"]
    assert errors and errors[0]["operation"] == "read" and errors[0]["action"] == "report"


def test_source_read_error_stops_then_cancel(mount, tmp_path: Path, broken_source: Path) -> None:
    m = mount(f"d={broken_source},read-only=on")
    start(m, f"device=d target={tmp_path / 't.qcow2'} on-source-error=stop")
    s = wait_state(m, "d", ("paused",))
    assert s["io-status"] == "failed" and s["error"] is None
    assert s["offset"] < s["len"]
    # The rest of the disk still reads, through the mount, while the job waits.
    with open(m / "d", "rb") as f:
        assert len(f.read(4 * MiB)) == 4 * MiB
    ctl(m, "d", "resume")  # the same clusters fail again: paused again
    s = wait_state(m, "d", ("paused",))
    assert s["io-status"] == "failed"
    ctl(m, "d", "cancel")
    s = wait_state(m, "d", ("concluded",))
    assert any(e["event"] == "BLOCK_JOB_CANCELLED" for e in events(m))


def test_target_in_use_by_a_mounted_image_is_refused(mount, tmp_path: Path) -> None:
    a = random_file(tmp_path / "a.raw", MiB, seed=10)
    b = random_file(tmp_path / "b.raw", MiB, seed=11)
    before = b.read_bytes()
    m = mount(f"a={a}", f"b={b}")
    fd = os.open(m.path / ".control" / "jobs" / "backup", os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, f"device=a target={b} format=raw mode=existing\n".encode())
        assert exc.value.errno == errno.EBUSY
        assert "in use by someone that forbids writers" in os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    assert b.read_bytes() == before
