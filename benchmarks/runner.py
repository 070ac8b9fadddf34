"""``python -m benchmarks``: the command line and the order of the runs.

For each format: prepare one image of random data; then, round after round, expose it through a
fresh blockfs daemon (A) and a fresh qemu-storage-daemon (B), never both at once (they share the
image file), and run every fio job, then the backups, on each; then each mirror measurement on a
daemon of its own (a completed mirror switches the disk over to its copy); then, for qcow2, each
commit and stream measurement on a fresh copy of a backing chain and a daemon of its own. A B A
B ...; medians over rounds. A fresh daemon per run makes its peak RSS (VmHWM) the peak of that
run alone. Then the ssh lines (``--no-ssh`` skips them, ``--only ssh`` runs them alone): a raw
image on a loopback sshd through blockfs, qemu-storage-daemon's ssh driver and sshfs in turn,
round after round (:mod:`benchmarks.ssh`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qemu.qmp import QMPError

from benchmarks import procstat
from benchmarks.backup import (
    BackupFailed,
    BackupUnavailable,
    BlockfsBackup,
    QsdBackup,
    latency_during_backup,
    timed_backup,
)
from benchmarks.chainjobs import (
    CHAIN_JOBS,
    Chain,
    ChainJobFailed,
    ChainJobUnavailable,
    chain_driver,
    check_result,
    copy_chain,
    make_chain,
    timed_chain_job,
)
from benchmarks.exposures import BlockfsMount, ExposureError, FloorMount, QsdExport
from benchmarks.fio import FIO_JOBS, LATENCY_DURING_BACKUP, FioError, FioJob, run_fio
from benchmarks.gluster import (
    GLUSTER_JOBS,
    GlusterSite,
    GlusterUnavailable,
    QsdGlusterExport,
    gluster_specs,
)
from benchmarks.machine import describe_machine
from benchmarks.mirror import (
    LATENCY_DURING_MIRROR,
    WRITE_LOAD_MIB_S,
    BlockfsMirror,
    MirrorFailed,
    MirrorUnavailable,
    QsdMirror,
    guest_file,
    latency_during_mirror,
    ready_under_load,
    timed_mirror,
)
from benchmarks.report import (
    Line,
    chart_title,
    markdown_table,
    read_json,
    table,
    write_chart,
    write_json,
)
from benchmarks.ssh import (
    BUFFERED_ARGS,
    SIDES,
    SSH_JOBS,
    QsdSshExport,
    SshfsMount,
    SshSite,
    SshUnavailable,
    ssh_specs,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ("raw", "qcow2", "vhdx")
#: ``qemu-img convert`` options of each format's image (a dynamic VHDX: blocks allocated as
#: written, so every block of random data is there; the BAT maps each one, as qcow2's L2 tables)
CONVERT_OPTIONS: dict[str, tuple[str, ...]] = {"vhdx": ("-o", "subformat=dynamic")}
#: the formats of the commit and stream lines (a backing chain of that format)
CHAIN_FORMATS = ("qcow2",)
GiB = 1 << 30


@dataclass(frozen=True)
class Settings:
    size: int
    rounds: int
    runtime: float
    ramp: float
    formats: tuple[str, ...]
    jobs: bool
    io_mode: str | None
    backup_timeout: float
    load_timeout: float  # how long a mirror may take to reach READY under the write load
    ssh: bool = True  # the ssh lines (blockfs, qemu's ssh driver and sshfs over a loopback sshd)
    gluster: bool = True  # the gluster lines (blockfs and qemu's gluster driver, one volume)
    fuse_threads: int | None = None  # blockfs mount --fuse-threads (None: the default)


def line_specs(formats: tuple[str, ...], jobs: bool = True) -> list[tuple[str, str, str]]:
    """(name, unit, better) of every line of the report, in order."""
    specs = []
    for fmt in formats:
        specs += [(f"{fmt} {j.name}", j.figure, j.better) for j in FIO_JOBS]
        specs += [(f"{fmt} {j.name} daemon CPU", "s/GiB", "lower") for j in FIO_JOBS]
        specs.append((f"{fmt} daemon peak RSS", "MiB", "lower"))
        if jobs:
            specs += [
                (f"{fmt} backup full wall time", "s", "lower"),
                (f"{fmt} backup full throughput", "MB/s", "higher"),
                (f"{fmt} backup full daemon CPU", "s/GiB", "lower"),
                (f"{fmt} {LATENCY_DURING_BACKUP.name}", "µs", "lower"),
            ]
            specs += mirror_specs(fmt)
            if fmt in CHAIN_FORMATS:
                specs += chain_specs(fmt)
    return specs


def floor_lines() -> list[str]:
    """The lines the floor runs: the raw image's fio jobs, their daemon CPU and its RSS."""
    return [
        *(f"raw {j.name}" for j in FIO_JOBS),
        *(f"raw {j.name} daemon CPU" for j in FIO_JOBS),
        "raw daemon peak RSS",
    ]


def mirror_specs(fmt: str) -> list[tuple[str, str, str]]:
    """(name, unit, better) of the mirror lines of one format."""
    return [
        (f"{fmt} mirror full throughput", "MB/s", "higher"),
        (f"{fmt} mirror full daemon CPU", "s/GiB", "lower"),
        (f"{fmt} {LATENCY_DURING_MIRROR.name}", "µs", "lower"),
        (f"{fmt} mirror full time to ready under {WRITE_LOAD_MIB_S} MiB/s writes", "s", "lower"),
    ]


def chain_specs(fmt: str) -> list[tuple[str, str, str]]:
    """(name, unit, better) of the commit and stream lines of one format."""
    specs = []
    for job in CHAIN_JOBS:
        specs += [
            (f"{fmt} {job.name} throughput", "MB/s", "higher"),
            (f"{fmt} {job.name} daemon CPU", "s/GiB", "lower"),
        ]
    return specs


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="blockfs beside qemu-storage-daemon's FUSE export: same images, same fio "
        "jobs, same run.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about 50 s per format: 256M, 1 round, 1.5 s per fio job",
    )
    p.add_argument("--size", type=_size, help="image size (default 2G; --quick 256M)")
    p.add_argument("--rounds", type=int, help="A B rounds, medians over them (default 3)")
    p.add_argument("--runtime", type=float, help="seconds measured per fio job (default 6)")
    p.add_argument("--ramp", type=float, help="seconds of fio ramp before that (default 2)")
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated image formats (default {','.join(FORMATS)})",
    )
    p.add_argument(
        "--no-jobs",
        action="store_true",
        help="skip the backup, mirror, commit and stream lines",
    )
    p.add_argument(
        "--no-ssh",
        action="store_true",
        help="skip the ssh lines (the image over a loopback sshd: blockfs, qemu, sshfs)",
    )
    p.add_argument(
        "--no-gluster",
        action="store_true",
        help="skip the gluster lines (the image on a GlusterFS volume: blockfs, qemu)",
    )
    p.add_argument(
        "--only",
        choices=("ssh", "gluster"),
        help="run only these lines (the ssh or the gluster lines alone, no image format's)",
    )
    p.add_argument(
        "--io-mode",
        choices=("hybrid", "inline", "threads"),
        help="BLOCKFS_IO_MODE for the blockfs daemon (default: the daemon's own)",
    )
    p.add_argument(
        "--fuse-threads",
        type=int,
        metavar="N",
        help="blockfs mount --fuse-threads=N (0: pyfuse3's own request loop; default: blockfs's)",
    )
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the scratch directory is made (removed afterwards)",
    )
    p.add_argument(
        "--output",
        help="the JSON file of results (default benchmarks/results/latest.json; --quick: "
        "benchmarks/results/quick.json)",
    )
    p.add_argument(
        "--chart",
        help="the PNG chart of ratios (default: beside --output, the same name with .png; "
        "a full run without --output: benchmarks/ratios.png, the published one)",
    )
    p.add_argument(
        "--replot",
        metavar="JSON",
        help="run nothing: print the table of a results file and redraw its chart",
    )
    p.add_argument(
        "--markdown", action="store_true", help="also print the table as Markdown (for README.md)"
    )
    return p


def output_paths(args: argparse.Namespace) -> tuple[str, str]:
    """Where the JSON and the chart go. Only a full run without --output redraws the
    published chart (benchmarks/ratios.png); a --quick run, or any run given --output, draws
    its chart beside its JSON, so a smoke run never changes the checkout."""
    output = args.output or os.path.join(
        HERE, "results", "quick.json" if args.quick else "latest.json"
    )
    if args.chart:
        return output, args.chart
    if args.quick or args.output:
        return output, os.path.splitext(output)[0] + ".png"
    return output, os.path.join(HERE, "ratios.png")


def settings_from(args: argparse.Namespace) -> Settings:
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; known: {', '.join(FORMATS)}")
    ssh, gluster = not args.no_ssh, not args.no_gluster
    if args.only is not None:
        if (args.only == "ssh" and not ssh) or (args.only == "gluster" and not gluster):
            raise SystemExit(f"--only {args.only} and --no-{args.only} leave nothing to run")
        formats = ()
        ssh, gluster = args.only == "ssh", args.only == "gluster"
    quick = args.quick
    s = Settings(
        size=args.size or (256 << 20 if quick else 2 * GiB),
        rounds=args.rounds or (1 if quick else 3),
        runtime=args.runtime or (1.5 if quick else 6.0),
        ramp=args.ramp if args.ramp is not None else (0.5 if quick else 2.0),
        formats=formats,
        jobs=not args.no_jobs,
        io_mode=args.io_mode,
        backup_timeout=60.0 if quick else 600.0,
        load_timeout=20.0 if quick else 300.0,
        ssh=ssh,
        gluster=gluster,
        fuse_threads=args.fuse_threads,
    )
    if s.size < 16 << 20 or s.size % (1 << 20):
        raise SystemExit("--size must be a whole number of MiB, at least 16M")
    if s.rounds < 1 or s.runtime <= 0 or s.ramp < 0:
        raise SystemExit("--rounds, --runtime and --ramp must be positive")
    return s


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- images -------------------------------------------------------------------------------------


def prepare_raw(path: str, size: int) -> None:
    """``size`` bytes of pseudo-random data (no zero blocks for either side to shortcut)."""
    import numpy as np

    rng = np.random.default_rng(20241126)
    chunk = 4 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def prepare_images(workdir: str, s: Settings) -> dict[str, str]:
    if not s.formats:
        return {}
    raw = os.path.join(workdir, "source.raw")
    _say(f"writing {s.size >> 20} MiB of random data to {raw}")
    prepare_raw(raw, s.size)
    images = {}
    for fmt in s.formats:
        path = os.path.join(workdir, f"disk.{fmt}")
        if fmt == "raw":
            shutil.copyfile(raw, path)
        else:
            subprocess.run(
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    fmt,
                    *CONVERT_OPTIONS.get(fmt, ()),
                    raw,
                    path,
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
            check_allocated(path, fmt, s.size)
        images[fmt] = path
    os.unlink(raw)
    return images


def check_allocated(path: str, fmt: str, size: int) -> None:
    """Every byte of the image is data in its file (no hole, no zero block), as ``qemu-img map``
    sees it: both sides then read and overwrite allocated blocks only.

    :raise RuntimeError: it is not.
    """
    res = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", fmt, path],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    data = sum(e["length"] for e in json.loads(res.stdout) if e["data"] and not e["zero"])
    if data != size:
        raise RuntimeError(f"{path}: {data} of {size} bytes allocated after qemu-img convert")


# -- one run: one daemon, every job -------------------------------------------------------------


class Runs:
    """The lines of the report, filled in run after run."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.lines = {
            name: Line(name, unit, better) for name, unit, better in line_specs(s.formats, s.jobs)
        }
        if "raw" in s.formats:
            # the floor (the thinnest pyfuse3 file system) runs the raw fio lines too
            for name in floor_lines():
                self.lines[name].samples["floor"] = []
        if s.ssh:
            for name, unit, better in ssh_specs():
                self.lines[name] = Line(name, unit, better, samples={side: [] for side in SIDES})
        if s.gluster:
            for name, unit, better in gluster_specs():
                self.lines[name] = Line(name, unit, better)
        #: how each ssh side ran fio, for the JSON's config (sshfs: O_DIRECT, or buffered)
        self.ssh_io: dict[str, str] = {}

    def add(self, name: str, side: str, value: float) -> None:
        self.lines[name].samples[side].append(value)

    def note(self, names: list[str], side: str, why: str) -> None:
        for name in names:
            self.lines[name].notes.setdefault(side, why)

    def names(self, fmt: str) -> list[str]:
        return [n for n in self.lines if n.startswith(f"{fmt} ")]


def _sample_cpu(into: list[float], pid: int) -> None:
    into.append(procstat.cpu_seconds(pid))


def run_fio_jobs(runs: Runs, fmt: str, exposure: BlockfsMount | QsdExport | FloorMount) -> None:
    s = runs.s
    side = exposure.side
    pid = exposure.pid
    for job in FIO_JOBS:
        name = f"{fmt} {job.name}"
        cpu: list[float] = []
        try:
            result = run_fio(
                job,
                exposure.path,
                s.runtime,
                s.ramp,
                after_ramp=functools.partial(_sample_cpu, cpu, pid),
            )
            cpu.append(procstat.cpu_seconds(pid))
        except (FioError, OSError) as exc:
            runs.note([name, f"{name} daemon CPU"], side, f"{name}: {exc}")
            _say(f"  {side} {job.name}: FAILED {exc}")
            continue
        runs.add(name, side, result.figure(job))
        if result.io_bytes:
            runs.add(f"{name} daemon CPU", side, (cpu[1] - cpu[0]) / (result.io_bytes / GiB))
        _say(f"  {side:7} {job.name:28} {result.figure(job):10.1f} {job.figure}")
    runs.add(f"{fmt} daemon peak RSS", side, exposure.peak_rss_mib())


def run_backups(runs: Runs, fmt: str, exposure: BlockfsMount | QsdExport, workdir: str) -> None:
    s = runs.s
    side = exposure.side
    target = os.path.join(workdir, f"backup-{side}.qcow2")
    job_lines = [
        f"{fmt} backup full wall time",
        f"{fmt} backup full throughput",
        f"{fmt} backup full daemon CPU",
        f"{fmt} {LATENCY_DURING_BACKUP.name}",
    ]

    def backup() -> QsdBackup | BlockfsBackup:
        if isinstance(exposure, QsdExport):
            return QsdBackup(exposure, target, s.size)
        return BlockfsBackup(exposure, target, s.size)

    def idle() -> None:
        t = timed_backup(backup(), exposure.pid, s.backup_timeout)
        runs.add(job_lines[0], side, t.wall_s)
        runs.add(job_lines[1], side, s.size / t.wall_s / 1e6)
        runs.add(job_lines[2], side, t.cpu_s / (s.size / GiB))
        _say(f"  {side:7} backup full: {t.wall_s:.2f} s, {s.size / t.wall_s / 1e6:.0f} MB/s")

    def during() -> None:
        lat = latency_during_backup(backup(), exposure.path, s.backup_timeout, workdir)
        runs.add(job_lines[3], side, lat)
        _say(f"  {side:7} write latency during backup: {lat:.1f} µs")

    # The latency needs the guest's writes; the backup alone reads the disk. So a side that
    # cannot write (a format blockfs only reads yet) keeps its backup figures.
    for i, (lines, measure) in enumerate(((job_lines[:3], idle), (job_lines[3:], during))):
        try:
            measure()
        except BackupUnavailable as exc:  # so is the measurement after this one
            runs.note(job_lines[i * 3 :], side, str(exc))
            _say(f"  {side:7} backup: n/a ({exc})")
            return
        except FioError as exc:
            runs.note(lines, side, str(exc))  # "fio JOB exited N: what fio said"
            _say(f"  {side:7} backup: n/a ({exc})")
        except (BackupFailed, OSError, subprocess.SubprocessError) as exc:
            runs.note(lines, side, f"backup failed: {exc}")
            _say(f"  {side:7} backup: FAILED {exc}")
        except QMPError as exc:
            runs.note(lines, side, f"backup failed: {type(exc).__name__}: {exc}")
            _say(f"  {side:7} backup: FAILED {type(exc).__name__}: {exc}")


def run_mirrors(
    runs: Runs, fmt: str, workdir: str, expose: Callable[[], BlockfsMount | QsdExport]
) -> None:
    """The mirror lines. Each measurement runs on a fresh daemon from ``expose()``: a completed
    mirror leaves the disk switched over to its target, and the next one must start from the
    image again. A side without a mirror job is n/a; a failed measurement is n/a with why."""
    s = runs.s
    throughput, cpu, latency, load = (name for name, _, _ in mirror_specs(fmt))
    # The latency mirror is slowed so that its copy outlasts the measuring window (s.runtime)
    # about twice over, the same limit on both sides.
    speed = max(1 << 20, int(s.size / (2 * s.runtime)) >> 20 << 20)

    def mirror(exposure: BlockfsMount | QsdExport, idle: bool) -> QsdMirror | BlockfsMirror:
        target = os.path.join(workdir, f"mirror-{exposure.side}.qcow2")
        if isinstance(exposure, QsdExport):
            return QsdMirror(exposure, target, s.size, read_only_export=idle)
        return BlockfsMirror(exposure, target, s.size)

    def idle(exposure: BlockfsMount | QsdExport) -> None:
        t = timed_mirror(mirror(exposure, True), exposure.pid, s.backup_timeout)
        runs.add(throughput, exposure.side, s.size / t.ready_s / 1e6)
        runs.add(cpu, exposure.side, t.cpu_s / (s.size / GiB))
        _say(
            f"  {exposure.side:7} mirror full: ready in {t.ready_s:.2f} s "
            f"({s.size / t.ready_s / 1e6:.0f} MB/s), switched over in {t.switch_s * 1000:.0f} ms"
        )

    def during(exposure: BlockfsMount | QsdExport) -> None:
        lat = latency_during_mirror(
            mirror(exposure, False), exposure.path, speed, s.runtime, s.backup_timeout, workdir
        )
        runs.add(latency, exposure.side, lat)
        _say(f"  {exposure.side:7} write latency during mirror ({speed >> 20} MiB/s): {lat:.1f} µs")

    def loaded(exposure: BlockfsMount | QsdExport) -> None:
        with guest_file(exposure, workdir) as path:
            secs, mb_s = ready_under_load(mirror(exposure, False), path, s.load_timeout)
        runs.add(load, exposure.side, secs)
        _say(f"  {exposure.side:7} mirror ready under load in {secs:.2f} s (fio {mb_s:.1f} MB/s)")

    measurements = (([throughput, cpu], idle), ([latency], during), ([load], loaded))
    for i, (lines, measure) in enumerate(measurements):
        exposure = expose()
        side = exposure.side
        try:
            with exposure:
                measure(exposure)
        except MirrorUnavailable as exc:  # so are the measurements after this one
            runs.note([n for later, _ in measurements[i:] for n in later], side, str(exc))
            _say(f"  {side:7} mirror: n/a ({exc})")
            return
        except ExposureError as exc:
            runs.note(lines, side, f"{fmt}: {exc}")
            _say(f"  {side:7} mirror: n/a ({exc})")
        except FioError as exc:
            runs.note(lines, side, str(exc))  # "fio JOB exited N: what fio said"
            _say(f"  {side:7} mirror: n/a ({exc})")
        except (MirrorFailed, OSError, subprocess.SubprocessError) as exc:
            runs.note(lines, side, f"mirror failed: {exc}")
            _say(f"  {side:7} mirror: FAILED {exc}")
        except QMPError as exc:
            runs.note(lines, side, f"mirror failed: {type(exc).__name__}: {exc}")
            _say(f"  {side:7} mirror: FAILED {type(exc).__name__}: {exc}")


def run_chain_jobs(
    runs: Runs,
    fmt: str,
    workdir: str,
    chain: Chain,
    expose: Callable[[str], BlockfsMount | QsdExport],
) -> None:
    """The commit and stream lines of one side. Each measurement runs on a fresh copy of the
    chain (its cost not measured) under a fresh daemon from ``expose(top)``; the result is then
    checked with qemu-img. A side without the kind of job is n/a; a failed measurement is n/a
    with why."""
    s = runs.s
    folder = os.path.join(workdir, "chain-run")
    unavailable: dict[str, str] = {}  # kind of job -> why this side has none
    for job in CHAIN_JOBS:
        lines = [f"{fmt} {job.name} throughput", f"{fmt} {job.name} daemon CPU"]
        exposure = expose(os.path.join(folder, "top.qcow2"))
        side = exposure.side
        if job.kind in unavailable:
            runs.note(lines, side, unavailable[job.kind])
            continue
        try:
            copy_chain(chain, folder)
            with exposure:
                t = timed_chain_job(chain_driver(exposure, job), exposure.pid, s.backup_timeout)
            check_result(job, chain, folder)
            folded = chain.folded[job.name]
            runs.add(lines[0], side, folded / t.seconds / 1e6)
            runs.add(lines[1], side, t.cpu_s / (folded / GiB))
            how = " (read-only export)" if t.read_only_export else ""
            until = f"ready in {t.seconds:.2f} s" if job.active else f"in {t.seconds:.2f} s"
            switched = f", switched over in {t.switch_s * 1000:.0f} ms" if job.active else ""
            _say(
                f"  {side:7} {job.name}: {folded >> 20} MiB {until} "
                f"({folded / t.seconds / 1e6:.0f} MB/s){switched}{how}"
            )
        except ChainJobUnavailable as exc:  # so is every later job of that kind
            unavailable[job.kind] = str(exc)
            runs.note(lines, side, str(exc))
            _say(f"  {side:7} {job.what}: n/a ({exc})")
        except ExposureError as exc:
            runs.note(lines, side, f"{fmt} chain: {exc}")
            _say(f"  {side:7} {job.what}: n/a ({exc})")
        except (ChainJobFailed, OSError, subprocess.SubprocessError) as exc:
            runs.note(lines, side, f"{job.what} failed: {exc}")
            _say(f"  {side:7} {job.what}: FAILED {exc}")
        except QMPError as exc:
            runs.note(lines, side, f"{job.what} failed: {type(exc).__name__}: {exc}")
            _say(f"  {side:7} {job.what}: FAILED {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def prepare_chain(runs: Runs, fmt: str, workdir: str, image: str) -> Chain | None:
    """The chain of the commit and stream lines, over a copy of the bench image; None (and
    every such line n/a with why) if it cannot be made."""
    try:
        chain = make_chain(os.path.join(workdir, "chain"), image, runs.s.size)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        names = [name for name, _, _ in chain_specs(fmt)]
        for side in ("blockfs", "qemu"):
            runs.note(names, side, f"{fmt} chain: could not be made: {exc}")
        _say(f"{fmt}: no commit and stream lines: the chain could not be made: {exc}")
        return None
    sizes = ", ".join(f"{name} {n >> 20} MiB" for name, n in chain.folded.items())
    _say(f"{fmt}: chain base <- mid <- top made; data folded: {sizes}")
    return chain


def run_side(
    runs: Runs, fmt: str, workdir: str, exposure: BlockfsMount | QsdExport | FloorMount
) -> None:
    """One fresh daemon: every fio job, then the backups (not on the floor, which has no jobs);
    a side that cannot be exposed is n/a."""
    side = exposure.side
    names = floor_lines() if isinstance(exposure, FloorMount) else runs.names(fmt)
    try:
        with exposure:
            _say(f"{fmt} on {side} (pid {exposure.pid})")
            run_fio_jobs(runs, fmt, exposure)
            if runs.s.jobs and not isinstance(exposure, FloorMount):
                run_backups(runs, fmt, exposure, workdir)
    except ExposureError as exc:
        runs.note(names, side, f"{fmt}: {exc}")
        _say(f"{fmt} on {side}: n/a ({exc})")
    except (OSError, QMPError, subprocess.SubprocessError) as exc:
        # A daemon that died or a monitor that failed mid-run: what was measured stays, the
        # rest of this run is n/a with the reason, and the next run starts a fresh daemon.
        runs.note(names, side, f"{fmt}: {type(exc).__name__}: {exc}")
        _say(f"{fmt} on {side}: FAILED {type(exc).__name__}: {exc}")


def run_ssh(runs: Runs, workdir: str) -> None:
    """The ssh lines: a raw image of random data served by a loopback sshd, round after round
    through blockfs, qemu-storage-daemon's ssh driver and sshfs in turn (never two at once:
    they share the image). Without a sshd every ssh line is n/a with why."""
    s = runs.s
    names = [name for name, _, _ in ssh_specs()]
    folder = os.path.join(workdir, "ssh")
    image = os.path.join(folder, "data", "disk.raw")
    try:
        os.makedirs(os.path.dirname(image), exist_ok=True)
        _say(f"ssh: writing {s.size >> 20} MiB of random data to {image}")
        prepare_raw(image, s.size)
        with SshSite(folder, image) as site:
            _say(f"ssh: sshd on {site.host}:{site.port} serving {image}")
            for rnd in range(s.rounds):
                _say(f"ssh: round {rnd + 1} of {s.rounds}")
                for side in SIDES:
                    run_ssh_side(runs, site, side, workdir)
    except (SshUnavailable, OSError, subprocess.SubprocessError) as exc:
        for side in SIDES:
            runs.note(names, side, f"ssh: {exc}")
        _say(f"ssh: n/a ({exc})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_ssh_side(runs: Runs, site: SshSite, side: str, workdir: str) -> None:
    """One fresh exposure of the ssh image on ``side``, every fio job of the ssh lines."""
    exposure: BlockfsMount | QsdSshExport | SshfsMount
    if side == "blockfs":
        exposure = BlockfsMount(
            site.blockfs_location(), "raw", workdir, runs.s.io_mode, runs.s.fuse_threads
        )
    elif side == "qemu":
        exposure = QsdSshExport(site, workdir)
    else:
        exposure = SshfsMount(site, workdir)
    run_remote_side(runs, "ssh", SSH_JOBS, exposure, side)


def run_gluster(runs: Runs, workdir: str) -> None:
    """The gluster lines: a raw image of random data on a GlusterFS volume (the tests'
    glusterd, in a network namespace), round after round through blockfs and
    qemu-storage-daemon's gluster driver in turn. Without a glusterd every line is n/a."""
    s = runs.s
    names = [name for name, _, _ in gluster_specs()]
    folder = os.path.join(workdir, "gluster")
    try:
        os.makedirs(folder, exist_ok=True)
        _say(f"gluster: a volume with {s.size >> 20} MiB of random data")
        with GlusterSite(folder, s.size) as site:
            _say(f"gluster: {site.url()}")
            for rnd in range(s.rounds):
                _say(f"gluster: round {rnd + 1} of {s.rounds}")
                for side in ("blockfs", "qemu"):
                    exposure: BlockfsMount | QsdGlusterExport
                    if side == "blockfs":
                        exposure = BlockfsMount(
                            site.url(), "raw", workdir, s.io_mode, s.fuse_threads
                        )
                    else:
                        exposure = QsdGlusterExport(site, workdir)
                    run_remote_side(runs, "gluster", GLUSTER_JOBS, exposure, side)
    except (GlusterUnavailable, OSError, subprocess.SubprocessError) as exc:
        for side in ("blockfs", "qemu"):
            runs.note(names, side, f"gluster: {exc}")
        _say(f"gluster: n/a ({exc})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_remote_side(
    runs: Runs, kind: str, jobs: tuple[FioJob, ...], exposure: Any, side: str, how: str = ""
) -> None:
    """Every fio job of the ``kind`` lines on one fresh exposure (a side that fails is n/a
    with why; the others still run)."""
    s = runs.s
    names = [f"{kind} raw {job.name}" for job in jobs]
    extra: tuple[str, ...] = ()
    try:
        with exposure:
            if isinstance(exposure, SshfsMount) and not exposure.direct:
                extra = BUFFERED_ARGS
                how = f"buffered, {' '.join(BUFFERED_ARGS[1:])}: {exposure.direct_error}"
            if kind == "ssh":
                runs.ssh_io[side] = how or "O_DIRECT"
            _say(f"{kind} raw on {side} (pid {exposure.pid}, {how or 'O_DIRECT'})")
            for job in jobs:
                name = f"{kind} raw {job.name}"
                try:
                    result = run_fio(job, exposure.path, s.runtime, s.ramp, extra_args=extra)
                except (FioError, OSError) as exc:
                    runs.note([name], side, f"{name}: {exc}")
                    _say(f"  {side} {job.name}: FAILED {exc}")
                    continue
                runs.add(name, side, result.figure(job))
                _say(f"  {side:7} {job.name:28} {result.figure(job):10.1f} {job.figure}")
    except ExposureError as exc:
        runs.note(names, side, f"{kind}: {exc}")
        _say(f"{kind} raw on {side}: n/a ({exc})")
    except Exception as exc:
        runs.note(names, side, f"{kind}: {type(exc).__name__}: {exc}")
        _say(f"{kind} raw on {side}: FAILED {type(exc).__name__}: {exc}")


def run_all(s: Settings, workdir: str) -> Runs:
    runs = Runs(s)
    images = prepare_images(workdir, s)
    for fmt in s.formats:
        image = images[fmt]
        chain = None
        if s.jobs and fmt in CHAIN_FORMATS:  # from the image as prepared, before any write
            chain = prepare_chain(runs, fmt, workdir, image)
        for rnd in range(s.rounds):
            _say(f"{fmt}: round {rnd + 1} of {s.rounds}")
            blockfs = functools.partial(
                BlockfsMount, image, fmt, workdir, s.io_mode, s.fuse_threads
            )
            qemu = functools.partial(QsdExport, image, fmt, workdir)
            for expose in (blockfs, qemu):
                run_side(runs, fmt, workdir, expose())
                if s.jobs:
                    run_mirrors(runs, fmt, workdir, expose)
            if fmt == "raw":
                run_side(runs, fmt, workdir, FloorMount(image, workdir))
            if chain is not None:
                for on_chain in (
                    functools.partial(
                        BlockfsMount,
                        fmt=fmt,
                        workdir=workdir,
                        io_mode=s.io_mode,
                        fuse_threads=s.fuse_threads,
                    ),
                    functools.partial(QsdExport, fmt=fmt, workdir=workdir),
                ):
                    run_chain_jobs(runs, fmt, workdir, chain, on_chain)
        os.unlink(image)
        if chain is not None:
            shutil.rmtree(chain.folder, ignore_errors=True)
    if s.ssh:
        run_ssh(runs, workdir)
    if s.gluster:
        run_gluster(runs, workdir)
    return runs


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind through every finally: unmount, stop daemons, clean up


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        machine, config, lines = read_json(args.replot)
        print(table(lines))
        if args.markdown:
            print()
            print(markdown_table(lines))
        chart = args.chart or os.path.join(HERE, "ratios.png")  # a deliberate redraw
        write_chart(chart, lines, chart_title(machine, config))
        return 0
    output, chart = output_paths(args)
    s = settings_from(args)
    for tool in ("fio", "qemu-img", "qemu-storage-daemon", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"benchmarks: {tool} is not installed (make setup installs it)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.now(UTC)
    machine = describe_machine()  # before the run: the blockfs tree the daemons start from
    os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="blockfs-bench-", dir=args.workdir)
    t0 = time.monotonic()
    try:
        runs = run_all(s, workdir)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines = list(runs.lines.values())
    config = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.monotonic() - t0, 1),
        "size": s.size,
        "rounds": s.rounds,
        "runtime_s": s.runtime,
        "ramp_s": s.ramp,
        "formats": list(s.formats),
        "io_mode": s.io_mode or os.environ.get("BLOCKFS_IO_MODE") or "default",
        "fuse_threads": "default" if s.fuse_threads is None else s.fuse_threads,
        "quick": bool(args.quick),
        "ssh": s.ssh,
    }
    if runs.ssh_io:
        config["ssh_io"] = dict(runs.ssh_io)
    print(table(lines))
    if args.markdown:
        print()
        print(markdown_table(lines))
    write_json(output, machine, config, lines)
    write_chart(chart, lines, chart_title(machine, config))
    _say(f"wrote {output} and {chart} in {config['duration_s']} s")
    return 0
