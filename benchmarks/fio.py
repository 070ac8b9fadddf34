"""The fio jobs run on both sides, and what is taken from fio's JSON output.

Every job is O_DIRECT (the kernel's page cache of the FUSE file is out of the way; each request
reaches the daemon) and time-bounded (``--time_based --runtime``, after ``--ramp_time``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FioJob:
    """One fio workload and the figure it yields."""

    name: str  # the line's name in the report, after the format
    rw: str
    bs: str
    iodepth: int
    figure: str  # "MB/s", "IOPS" or "µs" (mean completion latency)
    numjobs: int = 1
    rwmixread: int | None = None

    @property
    def better(self) -> str:
        return "lower" if self.figure == "µs" else "higher"

    def args(self, filename: str, runtime: float, ramp: float) -> list[str]:
        """fio's command line; no ramp when ``ramp`` is 0."""
        cmd = [
            "fio",
            f"--name={self.rw}",
            f"--filename={filename}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}",
            "--ioengine=libaio",
            "--direct=1",
            "--time_based",
            f"--runtime={_ms(runtime)}",
            "--group_reporting",
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ]
        if ramp > 0:
            cmd.append(f"--ramp_time={_ms(ramp)}")
        if self.rwmixread is not None:
            cmd.append(f"--rwmixread={self.rwmixread}")
        return cmd


#: the fio lines of the report, in order
FIO_JOBS: tuple[FioJob, ...] = (
    FioJob("seq read 1M qd4", "read", "1M", 4, "MB/s"),
    FioJob("seq write 1M qd4", "write", "1M", 4, "MB/s"),
    FioJob("rand read 4k qd16", "randread", "4k", 16, "IOPS"),
    FioJob("rand write 4k qd16", "randwrite", "4k", 16, "IOPS"),
    FioJob("rand read 4k qd1 latency", "randread", "4k", 1, "µs"),
    FioJob("rand write 4k qd1 latency", "randwrite", "4k", 1, "µs"),
    FioJob("randrw 70/30 4k 4 jobs qd4", "randrw", "4k", 4, "IOPS", numjobs=4, rwmixread=70),
)

#: the guest's write latency during a backup
LATENCY_DURING_BACKUP = FioJob(
    "rand write 4k qd1 latency during backup", "randwrite", "4k", 1, "µs"
)


@dataclass(frozen=True)
class FioResult:
    iops: float  # reads plus writes
    mb_s: float  # reads plus writes, 10^6 bytes per second
    clat_us: float  # mean completion latency over reads and writes, weighted by count
    io_bytes: int  # bytes moved in the measured period (after the ramp)
    runtime_s: float

    def figure(self, job: FioJob) -> float:
        return {"MB/s": self.mb_s, "IOPS": self.iops, "µs": self.clat_us}[job.figure]


class FioError(RuntimeError):
    pass


#: where fio names the request that failed ("write offset=31539200, buflen=4096")
_REQUEST = re.compile(r"(: (?:read|write|trim|sync|datasync))? offset=\d+, buflen=\d+")


def fio_errors(stderr: str) -> str:
    """What fio reported on stderr, short and the same from run to run: each distinct line once,
    an I/O error without the offset and length of the request that met it (``fio: io_u error on
    file F: Operation not supported: write``); the last three such lines, 500 characters at most.
    """
    seen: list[str] = []
    for line in stderr.splitlines():
        line = _REQUEST.sub(lambda m: m.group(1) or "", line.strip())
        if line and line not in seen:
            seen.append(line)
    more = f"({len(seen) - 3} more before) " if len(seen) > 3 else ""
    return (more + "; ".join(seen[-3:]))[-500:] or "no message"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def parse_output(text: str) -> FioResult:
    """Read fio's JSON (anything fio printed before it, such as a signal notice, is skipped).

    :raise FioError: no JSON, or a job reported an error.
    """
    start = 0 if text.startswith("{") else text.find("\n{") + 1
    if not text[start:].startswith("{"):
        raise FioError(f"fio printed no JSON: {text[:300]!r}")
    doc = json.loads(text[start:])
    job = doc["jobs"][0]
    if job.get("error"):
        errno = job["error"]
        raise FioError(f"fio job failed with error {errno} ({os.strerror(errno)})")
    iops = bw = bytes_ = 0.0
    lat_sum = 0.0
    count = 0
    for direction in ("read", "write"):
        d = job[direction]
        iops += d["iops"]
        bw += d["bw_bytes"]
        bytes_ += d["io_bytes"]
        n = d["total_ios"]
        if n:
            lat_sum += d["clat_ns"]["mean"] * n
            count += n
    return FioResult(
        iops=iops,
        mb_s=bw / 1e6,
        clat_us=(lat_sum / count / 1000) if count else 0.0,
        io_bytes=int(bytes_),
        runtime_s=job["job_runtime"] / 1000,
    )


def run_fio(
    job: FioJob,
    filename: str,
    runtime: float,
    ramp: float,
    *,
    after_ramp: Callable[[], None] | None = None,
    after: float | None = None,
    stop_when: Callable[[], bool] | None = None,
    extra_args: tuple[str, ...] = (),
) -> FioResult:
    """Run ``job`` on ``filename`` and return its figures.

    ``after_ramp`` is called once the ramp time has passed (fio measures from then on), to sample
    a daemon's counters over the same period (or ``after`` seconds, when given). ``stop_when`` is polled; when it returns true fio is
    interrupted (SIGINT: it stops and still reports what it measured).

    :raise FioError: fio failed or did not end in time.
    """
    proc = subprocess.Popen(
        [*job.args(filename, runtime, ramp), *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + runtime + ramp + 60
        ramp_end = time.monotonic() + (ramp if after is None else after)
        sampled = after_ramp is None
        interrupted = False
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise FioError(f"fio {job.name} did not end within {runtime + ramp + 60:.0f} s")
            if not sampled and now >= ramp_end:
                assert after_ramp is not None
                after_ramp()
                sampled = True
            if stop_when is not None and not interrupted and stop_when():
                proc.send_signal(signal.SIGINT)
                interrupted = True
            time.sleep(0.01)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    if not sampled and after_ramp is not None:
        after_ramp()
    if proc.returncode != 0 and not interrupted:
        raise FioError(f"fio {job.name} exited {proc.returncode}: {fio_errors(err)}")
    return parse_output(out)


def mean_latency_us(log_path: str, start_ms: float, end_ms: float) -> tuple[float, int]:
    """Mean completion latency (µs) and count of the I/Os in a fio latency log (written with
    ``--log_unix_epoch=1``: each line ``time_ms, value_ns, direction, bs, ...``) that completed
    between ``start_ms`` and ``end_ms`` (Unix time, milliseconds)."""
    total = 0
    count = 0
    with open(log_path) as f:
        for line in f:
            fields = line.split(",", 2)
            if len(fields) < 2:
                continue
            t = int(fields[0])
            if start_ms <= t <= end_ms:
                total += int(fields[1])
                count += 1
    return (total / count / 1000 if count else 0.0), count
