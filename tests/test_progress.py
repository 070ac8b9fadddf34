"""Progress as people see it: :func:`blockfs.cli.progress.progress` in its three modes, ``blockfs
job watch`` on real jobs (plain lines into a pipe, rich lines on a terminal, and the exit codes
of ``job wait``), and ``blockfs create -p`` with qemu-img judging what it made.

A terminal is a real pseudo-terminal (the pty module) where the whole command runs; rich alone
is judged through a Console forced to act as a terminal.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from blockfs.cli import progress as progress_module
from blockfs.cli.images import create_image_file
from blockfs.cli.progress import (
    RateMeter,
    format_amount,
    format_duration,
    progress,
    rich_progress,
)
from blockfs.nodes.base import Node
from blockfs.nodes.qcow2 import create_qcow2
from blockfs.nodes.vhdx import create_vhdx
from conftest import BLOCKFS, blockfs, ctl, need_tool, qemu_img, random_file, start, wait_state

MiB = 1 << 20
GiB = 1 << 30
Writer = Callable[[Node], Awaitable[None]]
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The progress module's clock, moved by the test (the rest of the process keeps time)."""
    fake = FakeClock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def run_in_pty(cmd: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``cmd`` with stdin, stdout and stderr on a new pseudo-terminal; its exit status and
    everything it wrote there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the last holder of the terminal's far end is gone
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"{cmd} still runs after {timeout} s: {out.decode()!r}")
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        os.close(master)


# -- progress(): plain, disabled, rich -----------------------------------------------------


def test_plain_lines_come_at_most_once_a_second_and_the_last_tells_the_time_taken(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with progress("Checking", total=GiB) as update:  # capsys' stderr is no terminal
        for step in range(1, 41):  # 4 s, reports every 100 ms
            clock.now += 0.1
            update(step * GiB // 40)
    out, err = capsys.readouterr()
    assert out == "" and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 4, lines  # at 1, 2 and 3 s; at 4 s the work is done: the last line
    assert lines[0] == "Checking: 256.0 MiB / 1.0 GiB (25.0%), 256.0 MiB/s, ETA 0:00:03"
    assert lines[2].startswith("Checking: 768.0 MiB / 1.0 GiB (75.0%), 256.0 MiB/s, ETA 0:00:01")
    assert lines[-1] == "Checking: 1.0 GiB / 1.0 GiB (100.0%), 256.0 MiB/s, in 0:00:04"


def test_plain_progress_says_where_it_stopped_when_the_work_fails(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OSError), progress("Copying", total=100, unit="clusters") as update:
        clock.now += 2
        update(40)
        raise OSError("no space")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "Copying: 40 clusters / 100 clusters (40.0%), ? /s, ETA -:--:--",
        "Copying: 40 clusters / 100 clusters (40.0%), 20 clusters/s, in 0:00:02",
    ]


def test_disabled_progress_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("Checking", total=GiB, enabled=False) as update:
        for done in range(0, GiB + 1, 64 * MiB):
            update(done)
    assert capsys.readouterr() == ("", "")


def test_rich_progress_draws_a_bar_with_amounts_rate_and_eta(clock: FakeClock) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system="standard")
    with rich_progress("Checking", GiB, "bytes", console) as update:
        for step in range(1, 5):
            clock.now += 1
            update(step * 128 * MiB)
        text = ESCAPE.sub("", buf.getvalue())
        assert "━" in text and "Checking" in text
        assert "384.0 MiB/1.0 GiB  128.0 MiB/s  ETA 0:00:05" in text  # the last seen at 3 s
    last = ESCAPE.sub("", buf.getvalue()).replace("\r", "\n").splitlines()[-1]
    # the line left on the screen: where it ended, at the mean rate since the start
    assert last.startswith("Checking") and "━" in last
    assert last.endswith("512.0 MiB/1.0 GiB  128.0 MiB/s  in 0:00:04"), last


def test_progress_on_a_terminal_uses_rich_on_stderr() -> None:
    code = (
        "from blockfs.cli.progress import progress\n"
        "with progress('Checking', total=1 << 30) as update:\n"
        "    for i in range(1, 9):\n"
        "        update(i << 27)\n"
        "print('stdout stays clean')\n"
    )
    status, out = run_in_pty([sys.executable, "-c", code])
    assert status == 0, out
    text = ESCAPE.sub("", out)
    assert "\x1b[" in out and "━" in text and "1.0 GiB/1.0 GiB" in text and " in 0:00:0" in text
    assert "stdout stays clean" in text


def test_amounts_durations_and_rates_for_people() -> None:
    assert [format_amount(n) for n in (0, 1023, 1024, 1536 * MiB, 3 << 40, 1 << 60)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "3.0 TiB", "1024.0 PiB",
    ]  # fmt: skip
    assert format_duration(None) == "-:--:--" and format_duration(3725.4) == "1:02:05"
    meter = RateMeter(window=10)
    assert meter.rate() is None and meter.eta(100) is None and meter.eta(0) == 0.0
    for t in range(31):  # 1 unit/s for 20 s, then 5 units/s: the window follows the change
        meter.add(float(t), t if t < 20 else 20 + 5 * (t - 20))
    assert meter.rate() == pytest.approx(5.0)
    meter.add(31.0, 3)  # started over
    assert meter.rate() is None


# -- blockfs job watch on real jobs --------------------------------------------------------


def test_watch_into_a_pipe_prints_plain_lines_and_exits_0(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 8 * MiB, seed=1)
    m = mount(f"d={src},format=raw")
    start(m, f"device=d target={tmp_path / 't.qcow2'} speed=8M")
    ctl(m, "d", "pause")  # the first line is known: the watch starts on a paused job
    wait_state(m, "d", ("paused",))
    watch = subprocess.Popen(
        [*BLOCKFS, "job", "watch", str(m.path), "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()
        ctl(m, "d", "resume")
        rest, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
    assert watch.returncode == 0 and err == ""
    assert re.match(r"d +backup +paused +\d+\.\d% [\d.]+ (B|KiB|MiB)/8\.0 MiB$", first), first
    lines = rest.splitlines()
    assert "\x1b" not in rest
    # a line per change of state, not per poll (ten polls a second for about a second)
    assert len(lines) == 2, lines
    assert re.match(
        r"d +backup +running +\d+\.\d% .*/8\.0 MiB [\d.]+ \S+/s ETA \d:\d\d:\d\d", lines[0]
    )
    assert re.match(r"d +backup +concluded +100\.0% 8\.0 MiB/8\.0 MiB done$", lines[1])
    # job wait: the same wait, without a word
    res = blockfs("job", "wait", str(m.path), "d")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_watch_on_a_terminal_draws_each_job_with_rich(mount, tmp_path: Path) -> None:
    a = random_file(tmp_path / "a.raw", 8 * MiB, seed=2)
    b = random_file(tmp_path / "b.raw", 4 * MiB, seed=3)
    m = mount(f"a={a},format=raw", f"b={b},format=raw")
    start(m, f"device=a target={tmp_path / 'ta.qcow2'} speed=16M")
    start(m, f"device=b target={tmp_path / 'tb.raw'} format=raw speed=8M id=second")
    status, out = run_in_pty([*BLOCKFS, "job", "watch", str(m.path), "a", "second"])
    assert status == 0, out
    assert "Traceback" not in out and "\x1b[" in out
    text = ESCAPE.sub("", out).replace("\r\n", "\n").replace("\r", "\n")
    assert "━" in text
    # the last frame: both rows, done
    assert re.search(r"a +backup +concluded .*8\.0 MiB/8\.0 MiB +done\nsecond ", text), text
    assert re.search(r"second +backup +concluded .*4\.0 MiB/4\.0 MiB +done", text), text


def test_watch_until_ready_says_ready_and_in_sync(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 4 * MiB, seed=4)
    m = mount(f"d={src},format=raw")
    start(m, f"device=d target={tmp_path / 'm.qcow2'}", kind="mirror")
    res = blockfs("job", "watch", str(m.path), "d", "--until", "ready", "--timeout", "60")
    assert re.search(r"^d +mirror +ready +100\.0% 4\.0 MiB/4\.0 MiB in sync$", res.stdout, re.M)
    ctl(m, "d", "complete")
    wait_state(m, "d", ("concluded",))


def test_watch_exit_codes_are_those_of_wait(mount, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 4 * MiB, seed=5)
    other = random_file(tmp_path / "other.raw", 8 * MiB, seed=6)
    m = mount(f"d={src},format=raw,inject=on", f"e={other},format=raw")
    for cmd in ("watch", "wait"):
        res = blockfs("job", cmd, str(m.path), "nosuch", check=False)
        assert res.returncode == 1 and "no job 'nosuch'" in res.stderr, res
    # a job that is too slow for --timeout
    start(m, f"device=e target={tmp_path / 'slow.qcow2'} speed=1M")
    for cmd in ("watch", "wait"):
        res = blockfs("job", cmd, str(m.path), "e", "--timeout", "0.3", check=False)
        assert res.returncode == 1 and "timed out" in res.stderr, res
    ctl(m, "e", "cancel")
    # a job that fails: every read of its device fails
    (m / ".control" / "images" / "d" / "inject").write_text("op=read errno=EIO\n")
    start(m, f"device=d target={tmp_path / 'failed.qcow2'}")
    wait_state(m, "d", ("concluded",))
    for cmd in ("watch", "wait"):
        res = blockfs("job", cmd, str(m.path), "d", check=False)
        assert res.returncode == 1 and "blockfs: job d failed:" in res.stderr, res
        if cmd == "watch":
            assert re.match(r"d +backup +concluded .* failed$", res.stdout), res.stdout


# -- blockfs create -p ---------------------------------------------------------------------


def test_create_qcow2_with_metadata_preallocation_shows_progress(tmp_path: Path) -> None:
    need_tool("qemu-img")
    path = tmp_path / "x.qcow2"
    res = blockfs("create", "-p", "-f", "qcow2", "-o", "preallocation=metadata", str(path), "1G")
    assert res.stdout == ""
    assert res.stderr.splitlines()[-1].startswith(f"Creating {path}: 1.0 GiB / 1.0 GiB (100.0%), ")
    qemu_img("check", str(path))
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["virtual-size"] == GiB


async def test_create_reports_after_each_mib_of_tables(tmp_path: Path) -> None:
    """qcow2 with 512-byte clusters: 1 MiB of L2 tables maps 64 MiB. A fixed VHDX of 1 MiB
    blocks: 1 MiB of BAT (131072 entries) maps as many blocks, less one sector bitmap entry
    after every 4096 blocks. Each format reports once more at the end, after the flush."""
    seen: list[tuple[int, int]] = []

    def report(done: int, total: int) -> None:
        seen.append((done, total))

    def writer(create: Callable[..., Awaitable[None]], size: int, **kw: object) -> Writer:
        async def write(target: Node) -> None:
            await create(target, size, on_progress=report, **kw)

        return write

    qcow2 = writer(create_qcow2, 256 * MiB, cluster_size=512, preallocation="metadata")
    await create_image_file(str(tmp_path / "a.qcow2"), False, qcow2)
    assert seen == [(k * 64 * MiB, 256 * MiB) for k in (1, 2, 3, 4, 4)]

    seen.clear()
    vhdx = writer(create_vhdx, 300 * GiB, block_size=MiB, subformat="fixed")
    await create_image_file(str(tmp_path / "a.vhdx"), False, vhdx)
    ends = (131072, 2 * 131072, 300 * 1024 + (300 * 1024 - 1) // 4096)
    assert seen == [((end - end // 4097) * MiB, 300 * GiB) for end in ends] + [
        (300 * GiB, 300 * GiB)
    ]

    seen.clear()  # nothing long to do: one report, at the end
    await create_image_file(str(tmp_path / "b.qcow2"), False, writer(create_qcow2, GiB))
    assert seen == [(GiB, GiB)]


def test_create_p_on_a_terminal_draws_a_bar(tmp_path: Path) -> None:
    need_tool("qemu-img")
    path = tmp_path / "small.qcow2"
    opts = "preallocation=metadata,cluster_size=512"
    res = run_in_pty([*BLOCKFS, "create", "-p", "-o", opts, str(path), "256M"])
    assert res[0] == 0, res[1]
    text = ESCAPE.sub("", res[1])
    assert "━" in text and "256.0 MiB/256.0 MiB" in text
    qemu_img("check", str(path))


def test_create_fixed_vhdx_shows_progress(tmp_path: Path) -> None:
    need_tool("qemu-img")
    path = tmp_path / "x.vhdx"
    res = blockfs(
        "create", "-p", "-f", "vhdx", "-o", "subformat=fixed,block_size=1M", str(path), "2T"
    )
    lines = res.stderr.splitlines()
    assert lines[-1].startswith(f"Creating {path}: 2.0 TiB / 2.0 TiB (100.0%), "), lines
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format"] == "vhdx" and info["virtual-size"] == 2 << 40
    assert info["actual-size"] < 64 * MiB  # the payload blocks stay sparse


def test_create_without_p_says_nothing(tmp_path: Path) -> None:
    res = blockfs(
        "create", "-f", "qcow2", "-o", "preallocation=metadata", str(tmp_path / "q"), "1G"
    )
    assert (res.stdout, res.stderr) == ("", "")
