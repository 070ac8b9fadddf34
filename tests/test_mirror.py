"""Mirror jobs on real mounts under live writes: fio's own verification (during the job,
across the switch-over, and again on the target after unmount), qemu-img compare/check/info
as judges. Error policies and refusals: test_mirror_errors.py; the guest VM: test_vm.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from blockfs.errors import BlockfsError
from conftest import (
    FULL,
    blockfs,
    ctl,
    events,
    need_tool,
    qemu_img,
    random_file,
    run,
    start,
    status,
    wait_ready,
    wait_state,
)

MiB = 1 << 20


def fio_args(path: Path, offset: int, size: int, seed: int, *extra: str) -> list[str]:
    """Random 4k writes over [offset, offset+size), each block once, crc32c-stamped and read
    back (``--verify_only`` later checks the same blocks again, wherever they went)."""
    return [
        "fio", "--name=mirror", f"--filename={path}", "--rw=randwrite", "--bs=4k",
        f"--offset={offset}", f"--size={size}", "--ioengine=libaio", "--iodepth=8",
        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", f"--randseed={seed}",
        "--randrepeat=1", "--verify_state_save=0", *extra,
    ]  # fmt: skip


def fio_start(path: Path, cwd: Path, offset: int, size: int, seed: int) -> subprocess.Popen[str]:
    need_tool("fio")
    args = fio_args(path, offset, size, seed, "--direct=1")
    return subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def fio_finish(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "err= 0" in out, out


def fio_verify_only(path: Path, cwd: Path, offset: int, size: int, seed: int) -> None:
    """fio reads the blocks an earlier run wrote and checks each one's stamp and crc."""
    res = run(fio_args(path, offset, size, seed, "--verify_only"), check=False, cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "err= 0" in res.stdout, res.stdout


def as_raw(image: Path, fmt: str, out: Path) -> Path:
    qemu_img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out


def info(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(qemu_img("info", "--output=json", str(path)).stdout)


#: each copy mode and each target format once by default; every combination in long runs
_FIO_CASES = [("qcow2", "background"), ("raw", "write-blocking")] + (
    [("raw", "background"), ("qcow2", "write-blocking")] if FULL else []
)


@pytest.mark.parametrize("target_fmt,copy_mode", _FIO_CASES)
def test_mirror_under_fio_verify_then_switch_and_keep_writing(
    mount, tmp_path: Path, copy_mode: str, target_fmt: str
) -> None:
    """fio writes and verifies while the mirror copies (a rate limit makes the copy last),
    then while it is ready, and on across ``complete``, through the same open file. After
    unmount fio verifies every block of both runs again on the target (converted to raw):
    nothing written before, during or after the switch is lost. The target equals what the
    mount showed last, and both images pass ``qemu-img check``."""
    size = 64 * MiB
    raw = random_file(tmp_path / "src.raw", size, seed=5)
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))
    m = mount(f"disk0={src},format=qcow2")
    target = tmp_path / f"target.{target_fmt}"
    spec = f"device=disk0 target={target} format={target_fmt} copy-mode={copy_mode} speed=24M"
    assert start(m, spec, "mirror") == "disk0"
    s = status(m, "disk0")
    assert s["type"] == "mirror" and s["copy-mode"] == copy_mode and not s["ready"]
    during = fio_start(m / "disk0", tmp_path, 0, 24 * MiB, seed=11)
    fio_finish(during)
    ctl(m, "disk0", "speed=0")
    s = wait_ready(m, "disk0")
    assert s["state"] == "ready" and s["target-state"] == "in sync", s
    assert not target.exists(), "a new target gets its name only at the switch"
    across = fio_start(m / "disk0", tmp_path, 32 * MiB, 24 * MiB, seed=12)
    time.sleep(0.5)  # fio is writing: the switch happens under its feet
    ctl(m, "disk0", "complete")
    s = wait_state(m, "disk0", ("concluded",))
    assert s["error"] is None, s
    assert s["target-state"].startswith("switched"), s
    if copy_mode == "write-blocking":
        # Writes reached the target as they happened: nothing was copied twice, so the job
        # converges whatever the write rate.
        assert s["offset"] <= size, s
    else:
        assert s["offset"] > size, s  # written clusters were copied again
    fio_finish(across)
    names = [e["event"] for e in events(m)]
    assert "BLOCK_JOB_READY" in names and names[-2:] == ["BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE"]
    chain = m.chain("disk0")
    assert chain[0]["filename"] == str(target), chain
    final = tmp_path / "final.raw"
    run(["cp", str(m / "disk0"), str(final)])
    m.umount()

    if target_fmt == "qcow2":
        qemu_img("check", str(target))
    qemu_img("check", str(src))
    qemu_img("compare", "-f", target_fmt, "-F", "raw", str(target), str(final))
    flat = as_raw(target, target_fmt, tmp_path / "target-flat.raw")
    fio_verify_only(flat, tmp_path, 0, 24 * MiB, seed=11)
    fio_verify_only(flat, tmp_path, 32 * MiB, 24 * MiB, seed=12)
    # What nobody wrote is the source's own data, carried over.
    with open(raw, "rb") as a, open(flat, "rb") as b:
        a.seek(56 * MiB)
        b.seek(56 * MiB)
        assert a.read(8 * MiB) == b.read(8 * MiB)
    # The old image got none of the writes after the switch: fio's second run fails there.
    old = as_raw(src, "qcow2", tmp_path / "old-flat.raw")
    res = run(fio_args(old, 32 * MiB, 24 * MiB, 12, "--verify_only"), check=False, cwd=tmp_path)
    assert res.returncode != 0 or "err= 0" not in res.stdout


def test_sync_top_keeps_the_backing_chain(mount, tmp_path: Path) -> None:
    """sync=top copies only what the top holds; the target gets the same backing file and,
    after the switch, the mount serves target -> mid -> base (info shows it)."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_img("create", "-f", "qcow2", str(base), "32M")
    run(["qemu-io", "-c", "write -P 0x11 0 16M", str(base)])
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    run(["qemu-io", "-c", "write -P 0x22 8M 8M", str(mid)])
    qemu_img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    run(["qemu-io", "-c", "write -P 0x33 12M 2M", str(top)])
    m = mount(f"disk0={top},format=qcow2")
    target = tmp_path / "new-top.qcow2"
    start(m, f"device=disk0 target={target} sync=top", "mirror")
    wait_ready(m, "disk0")
    with open(m / "disk0", "r+b") as f:  # across the switch, through one open file
        f.seek(20 * MiB)
        f.write(b"\x44" * MiB)
        f.flush()
        os.fsync(f.fileno())
        ctl(m, "disk0", "complete")
        s = wait_state(m, "disk0", ("concluded",))
        assert s["error"] is None, s
        f.seek(24 * MiB)
        f.write(b"\x55" * MiB)
        f.flush()
        os.fsync(f.fileno())
    chain = m.chain("disk0")
    assert [c["filename"] for c in chain] == [str(target), str(mid), str(base)], chain
    ref = tmp_path / "ref.raw"
    run(["cp", str(m / "disk0"), str(ref)])
    m.umount()
    i = info(target)
    assert i["backing-filename"] == str(mid) and i["backing-filename-format"] == "qcow2", i
    # Only the top's data (and the writes) were copied: far less than the disk.
    assert i["actual-size"] < 8 * MiB, i
    qemu_img("check", str(target))
    qemu_img("compare", "-F", "raw", str(target), str(ref))
    # The old top is as it was at the switch: 0x33 but no 0x55.
    qemu_img("check", str(top))
    run(["qemu-io", "-c", "read -P 0x33 12M 2M", "-c", "read -P 0x44 20M 1M", str(top)])
    res = run(["qemu-io", "-c", "read -P 0x55 24M 1M", str(top)], check=False)
    assert "Pattern verification failed" in res.stdout + res.stderr


def test_sync_none_target_over_the_source(mount, tmp_path: Path) -> None:
    """sync=none copies only what is written after the start; the new target is backed by
    the source, which after the switch stays as it was (read-only, in the chain)."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "32M")
    run(["qemu-io", "-c", "write -P 0x61 0 32M", str(src)])
    m = mount(f"disk0={src},format=qcow2")
    target = tmp_path / "overlay.qcow2"
    start(m, f"device=disk0 target={target} sync=none copy-mode=write-blocking", "mirror")
    run(["dd", "if=/dev/zero", f"of={m / 'disk0'}", "bs=1M", "count=2", "seek=4",
         "conv=notrunc", "oflag=direct"])  # fmt: skip
    wait_ready(m, "disk0")
    at_switch = tmp_path / "at-switch.raw"
    run(["cp", str(m / "disk0"), str(at_switch)])
    ctl(m, "disk0", "complete")
    assert wait_state(m, "disk0", ("concluded",))["error"] is None
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x62 16M 1M", str(m / "disk0")])
    chain = m.chain("disk0")
    assert [c["filename"] for c in chain] == [str(target), str(src)], chain
    assert chain[1]["blockfs"]["read-only"] is True
    final = tmp_path / "final.raw"
    run(["cp", str(m / "disk0"), str(final)])
    m.umount()
    assert info(target)["backing-filename"] == str(src)
    assert info(target)["actual-size"] < 6 * MiB  # the writes, not the disk
    qemu_img("check", str(target))
    qemu_img("check", str(src))
    qemu_img("compare", "-F", "raw", str(target), str(final))
    qemu_img("compare", "-F", "raw", str(src), str(at_switch))


def test_cli_start_wait_ready_complete(mount, tmp_path: Path) -> None:
    """The commands of the README: start, wait --until ready, complete, wait."""
    src = random_file(tmp_path / "src.raw", 16 * MiB, seed=9)
    m = mount(f"disk0={src},format=raw")
    target = tmp_path / "t.qcow2"
    out = blockfs("job", "start", "mirror", str(m.path), "device=disk0", f"target={target}")
    assert out.stdout.strip() == "disk0"
    blockfs("job", "wait", str(m.path), "disk0", "--until", "ready", "--timeout", "60")
    assert status(m, "disk0")["ready"]
    blockfs("job", "complete", str(m.path), "disk0")
    blockfs("job", "wait", str(m.path), "disk0", "--timeout", "60")
    ctl(m, "disk0", "dismiss")
    assert not (m.path / ".control" / "jobs" / "disk0").exists()
    m.umount()
    qemu_img("compare", "-F", "raw", str(target), str(src))


def test_pause_in_ready_is_standby_and_complete_needs_resume(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 8 * MiB, seed=3)
    m = mount(f"disk0={src},format=raw")
    start(m, f"device=disk0 target={tmp_path / 't.qcow2'}", "mirror")
    wait_ready(m, "disk0")
    ctl(m, "disk0", "pause")
    wait_state(m, "disk0", ("standby",), timeout=10)
    with pytest.raises(BlockfsError) as err:
        ctl(m, "disk0", "complete")
    assert err.value.errno == errno.EBUSY and "resume it first" in str(err.value)
    ctl(m, "disk0", "resume")
    wait_state(m, "disk0", ("ready",), timeout=10)
    ctl(m, "disk0", "complete")
    assert wait_state(m, "disk0", ("concluded",))["error"] is None


def test_sparse_1tib_mirror_memory(mount, tmp_path: Path) -> None:
    """A 1 TiB disk (virtual) with a little data: only the data is walked and copied, and
    the daemon's peak RSS stays small (the dirty bitmap is one bit per 64 KiB: 2 MiB)."""
    src = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "1T")
    run(["qemu-io", "-c", "write -P 0x5a 0 4M", "-c", "write -P 0x5b 900G 4M", str(src)])
    m = mount(f"disk0={src},format=qcow2")
    target = tmp_path / "big-target.qcow2"
    t0 = time.monotonic()
    start(m, f"device=disk0 target={target}", "mirror")
    wait_ready(m, "disk0", timeout=120)
    ready_s = time.monotonic() - t0
    ctl(m, "disk0", "complete")
    assert wait_state(m, "disk0", ("concluded",))["error"] is None
    hwm = _peak_rss_mib(m.pid)
    m.umount()
    print(f"1 TiB sparse mirror: ready in {ready_s:.2f} s, daemon peak RSS {hwm:.1f} MiB")
    assert hwm < 100, f"peak RSS {hwm:.1f} MiB"
    qemu_img("compare", str(target), str(src))
    assert info(target)["actual-size"] < 32 * MiB


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_mirror_to_a_vhdx_target_and_backup_from_it(mount, tmp_path: Path) -> None:
    """A qcow2 disk moves to a new dynamic VHDX while written; after the switch a backup of
    the VHDX disk goes to another VHDX. qemu-img compares and checks both; libvhdi agrees."""
    src = random_file(tmp_path / "src.raw", 24 * MiB, seed=21)
    m = mount(f"disk0={src},format=raw")
    target = tmp_path / "moved.vhdx"
    start(m, f"device=disk0 target={target} format=vhdx copy-mode=write-blocking", "mirror")
    run(["dd", "if=/dev/urandom", f"of={m / 'disk0'}", "bs=64k", "count=16", "seek=40",
         "conv=notrunc", "oflag=direct"])  # fmt: skip
    wait_ready(m, "disk0")
    ctl(m, "disk0", "complete")
    assert wait_state(m, "disk0", ("concluded",))["error"] is None
    ctl(m, "disk0", "dismiss")
    assert m.info("disk0")["format"] == "vhdx"
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 64k", str(m / "disk0")])
    backup = tmp_path / "backup.vhdx"
    start(m, f"device=disk0 target={backup} format=vhdx")
    assert wait_state(m, "disk0", ("concluded",))["error"] is None
    final = tmp_path / "final.raw"
    run(["cp", str(m / "disk0"), str(final)])
    m.umount()
    for image in (target, backup):
        qemu_img("check", "-f", "vhdx", str(image))
        qemu_img("compare", "-f", "vhdx", "-F", "raw", str(image), str(final))
    if shutil.which("vhdiinfo"):
        assert "Dynamic" in run(["vhdiinfo", str(target)]).stdout
