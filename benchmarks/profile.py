"""``python -m benchmarks.profile``: where the blockfs daemon spends its time under one fio job.

Mounts a raw image of random data, runs one of the report's fio jobs on it, samples the daemon
with py-spy meanwhile, and prints the functions with the most samples: "self" (the function was
on top of the stack) and "total" (it was anywhere on the stack), as a share of all samples of
busy threads (py-spy leaves out threads idle in a system call such as epoll_wait).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter

from benchmarks.exposures import BlockfsMount
from benchmarks.fio import FIO_JOBS, run_fio
from benchmarks.runner import _size, prepare_raw

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("/blockfs/", "site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/blockfs/":
                path = "blockfs/" + path
            break
    return f"{path}:{m['func']}"


def summarize(raw_path: str, top: int, thread_filter: str | None = None) -> str:
    """Top functions of a py-spy ``--format raw`` file (collapsed stacks, root first)."""
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, num = line.rstrip("\n").rpartition(" ")
            if not stack or not num.isdigit():
                continue
            count = int(num)
            frames = stack.split(";")
            thread = frames[0] if frames[0].startswith("thread ") else "?"
            if thread_filter and thread_filter not in thread:
                continue
            frames = [fr for fr in frames if not fr.startswith(("thread ", "process "))]
            if not frames:
                continue
            threads[thread] += count
            samples += count
            names = [_short(fr) for fr in frames]
            self_count[names[-1]] += count
            for name in set(names):
                total_count[name] += count
    out = [f"{samples} samples of busy threads"]
    for thread, k in threads.most_common():
        out.append(f"  {thread}: {100 * k / samples:.1f}%")
    out.append("\nself (on top of the stack):")
    out += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in self_count.most_common(top)]
    out.append("\ntotal (anywhere on the stack):")
    out += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total_count.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--job", default="rand read 4k qd16", choices=[j.name for j in FIO_JOBS])
    p.add_argument("--size", type=_size, default=1 << 30)
    p.add_argument("--duration", type=float, default=15.0, help="seconds py-spy samples")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--io-mode", choices=("hybrid", "inline", "threads"))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", help="count only threads whose name holds this (MainThread)")
    p.add_argument("--native", action="store_true", help="sample C frames too (py-spy --native)")
    p.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
    p.add_argument("--workdir", default="/var/tmp")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    job = next(j for j in FIO_JOBS if j.name == args.job)
    workdir = tempfile.mkdtemp(prefix="blockfs-profile-", dir=args.workdir)
    raw = args.raw or os.path.join(workdir, "pyspy.txt")
    try:
        image = os.path.join(workdir, "disk.raw")
        prepare_raw(image, args.size)
        with BlockfsMount(image, "raw", workdir, args.io_mode) as mount:
            spy: list[subprocess.CompletedProcess[str]] = []

            def sample() -> None:
                cmd = [
                    py_spy,
                    "record",
                    "-p",
                    str(mount.pid),
                    "-d",
                    str(int(args.duration)),
                    "-r",
                    str(args.rate),
                    "-f",
                    "raw",
                    "--function",
                    "--threads",
                    # --native must stop the process to unwind it; otherwise do not stop it
                    *(["--native"] if args.native else ["--nonblocking"]),
                    "-o",
                    raw,
                ]
                spy.append(
                    subprocess.run(
                        cmd, capture_output=True, text=True, check=False, timeout=args.duration + 60
                    )
                )

            sampler = threading.Timer(2.0, sample)
            sampler.start()
            result = run_fio(job, mount.path, args.duration + 4, 1.0)
            sampler.join(timeout=args.duration + 90)
        print(
            f"{job.name}: {result.figure(job):.1f} {job.figure} under py-spy "
            f"(io mode {args.io_mode or 'default'})"
        )
        if not spy or spy[0].returncode != 0:
            print(f"py-spy failed: {spy[0].stderr if spy else 'did not run'}", file=sys.stderr)
            return 1
        print(summarize(raw, args.top, args.thread))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
