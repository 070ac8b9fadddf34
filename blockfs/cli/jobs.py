"""``blockfs job ...``: a thin client of ``MNT/.control/jobs`` for people and scripts.

Everything here reads and writes the same files a shell would; nothing talks to the daemon any
other way, so what the CLI can do, ``echo`` and ``cat`` can do too.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from blockfs.cli.progress import RateMeter, format_amount, format_duration, format_rate
from blockfs.errors import BlockfsError, UsageError

JOB_KINDS = ("backup", "mirror", "commit", "stream")
FINAL = ("concluded", "null")


def _jobs_dir(mnt: str) -> str:
    d = os.path.join(mnt, ".control", "jobs")
    if not os.path.isdir(d):
        raise UsageError(f"{mnt}: not a blockfs mount", errno=errno.ENOENT)
    return d


def _status(mnt: str, job_id: str) -> dict[str, Any]:
    path = os.path.join(_jobs_dir(mnt), job_id, "status")
    try:
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise UsageError(f"no job {job_id!r} on {mnt}", errno=errno.ENOENT) from None


def _job_ids(mnt: str) -> list[str]:
    d = _jobs_dir(mnt)
    return sorted(n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)))


def write_control(path: str, text: str) -> str:
    """Write ``text`` to a control file and return its answer; a refusal raises with the
    reason the file gives. :raise BlockfsError:"""
    if not text.endswith("\n"):
        text += "\n"  # a spec is acted on at the write that ends its line
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, text.encode())
            failed: OSError | None = None
        except OSError as exc:
            failed = exc
        answer = os.read(fd, 65536).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if failed is not None:
        raise BlockfsError(answer or failed.strerror or "refused", errno=failed.errno)
    return answer


def _cmd_start(args: argparse.Namespace) -> int:
    path = os.path.join(_jobs_dir(args.mountpoint), args.kind)
    spec = " ".join(args.spec)
    print(write_control(path, spec))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [_status(args.mountpoint, i) for i in _job_ids(args.mountpoint)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<16} {'TYPE':<8} {'DEVICE':<12} {'STATE':<10} {'PROGRESS':>8}  ERROR")
    for s in rows:
        pct = 100.0 * s["offset"] / s["len"] if s["len"] else 0.0
        print(
            f"{s['id']:<16} {s['type']:<8} {s['device']:<12} {s['state']:<10} {pct:7.1f}%  "
            f"{s['error'] or ''}"
        )
    return 0


def _verb(verb: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        path = os.path.join(_jobs_dir(args.mountpoint), args.id, "ctl")
        if not os.path.exists(path):
            raise UsageError(f"no job {args.id!r} on {args.mountpoint}", errno=errno.ENOENT)
        text = verb if verb != "speed" else f"speed={args.value}"
        if getattr(args, "force", False):
            text = "cancel force"
        write_control(path, text)
        return 0

    return run


def _reached(s: dict[str, Any], until: str) -> bool:
    """Whether a job is where ``--until`` waits for it (a concluded job always is)."""
    if s["state"] in FINAL:
        return True
    return until == "ready" and bool(s.get("ready"))


def _wait(args: argparse.Namespace, *, show: bool) -> int:
    """Wait until the named jobs (or all) conclude, or with ``--until ready`` until each is
    ready (a mirror or an active commit in sync); exit 0 only if none failed. With ``show``
    (``job watch``) each poll is drawn on stdout: :func:`_live_view` on a terminal,
    :func:`_plain_view` elsewhere.

    :raise UsageError: not a mount, or a job named that is not there (or went away).
    :raise BlockfsError: ETIMEDOUT after ``--timeout`` seconds.
    """
    ids = args.id or _job_ids(args.mountpoint)
    if not ids:
        return 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last: dict[str, dict[str, Any]] = {}
    view: AbstractContextManager[Callable[[list[dict[str, Any]]], None]]
    if not show:
        view = nullcontext(lambda rows: None)
    elif sys.stdout.isatty():
        view = _live_view(sys.stdout)
    else:
        view = _plain_view(sys.stdout)
    with view as draw:
        while True:
            for i in ids:
                last[i] = _status(args.mountpoint, i)
            draw(list(last.values()))
            if all(_reached(s, args.until) for s in last.values()):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise BlockfsError("timed out waiting for the jobs", errno=errno.ETIMEDOUT)
            time.sleep(args.interval)
    failed = [s for s in last.values() if s["error"]]
    for s in failed:
        print(f"blockfs: job {s['id']} failed: {s['error']}", file=sys.stderr)
    if args.until == "ready":
        for s in last.values():
            if not s["error"] and s["state"] in FINAL:
                print(f"blockfs: job {s['id']} ended without being ready", file=sys.stderr)
                failed.append(s)
    return 1 if failed else 0


# -- job watch: one line per job --------------------------------------------------------------

#: how often ``job watch`` repeats a job's plain line while its state stays the same
PLAIN_EVERY = 5.0


@dataclass(frozen=True)
class _JobLine:
    """What a job's line says: its id, type and state, how much of its length is done, and
    (while it runs) the rate and the time left, or a word for where it is."""

    id: str
    type: str
    state: str
    amount: str
    rate: str
    eta: str

    def plain(self, pct: float) -> str:
        head = f"{self.id:<14} {self.type:<7} {self.state:<10} {pct:5.1f}% {self.amount}"
        return " ".join(part for part in (head, self.rate, self.eta) if part)


class _JobFigures:
    """The lines of one job, from its status as it is polled; the rate is measured here,
    between polls."""

    __slots__ = ("meter",)

    def __init__(self) -> None:
        self.meter = RateMeter()

    def line(self, s: dict[str, Any], now: float) -> _JobLine:
        offset, length = s["offset"], s["len"]
        self.meter.add(now, offset)
        rate = ""
        if s["state"] in FINAL:
            eta = "failed" if s["error"] else "done"
        elif s.get("ready"):
            eta = "in sync"  # a ready mirror copies only what the guest writes
        elif s["state"] == "running":
            rate = format_rate(self.meter.rate())
            eta = f"ETA {format_duration(self.meter.eta(length - offset))}"
        else:
            eta = ""
        state = s["state"] + (f" ({s['io-status']})" if s["io-status"] != "ok" else "")
        amount = f"{format_amount(offset)}/{format_amount(length)}"
        return _JobLine(s["id"], s["type"], state, amount, rate, eta)


@contextmanager
def _live_view(stream: TextIO) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """Draw the jobs on a terminal: one rich line per job (id, type, state, bar, bytes done of
    the job's length, rate, ETA), redrawn at each poll and left on the screen at the end."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TextColumn

    def text(field: str, **kw: Any) -> TextColumn:
        return TextColumn(f"{{task.fields[{field}]}}", markup=False, **kw)

    bars = Progress(
        text("id", style="bold"),
        text("type"),
        text("state"),
        BarColumn(),
        text("amount", justify="right"),
        text("rate", justify="right"),
        text("eta"),
        console=Console(file=stream),
        auto_refresh=False,  # drawn once per poll, by the thread that polls
    )
    rows: dict[str, tuple[TaskID | None, _JobFigures]] = {}

    def draw(statuses: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for s in statuses:
            task, figures = rows.get(s["id"], (None, _JobFigures()))
            line = asdict(figures.line(s, now))
            done = s["state"] in FINAL and not s["error"]
            total = s["len"] or (1 if done else 0)
            completed = s["offset"] or (1 if done else 0)
            if task is None:  # add_task draws the new row at once: with all its fields
                task = bars.add_task("", total=total, completed=completed, **line)
                rows[s["id"]] = (task, figures)
            else:
                bars.update(task, total=total, completed=completed, **line)
        bars.refresh()

    with bars:
        yield draw


@contextmanager
def _plain_view(stream: TextIO) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    """Draw the jobs where no terminal is: a line for a job when its state changes, and
    every :data:`PLAIN_EVERY` seconds while it does not; no escapes."""
    said: dict[str, tuple[tuple[object, ...], float]] = {}
    figures: dict[str, _JobFigures] = {}

    def draw(statuses: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for s in statuses:
            line = figures.setdefault(s["id"], _JobFigures()).line(s, now)
            key = (s["state"], s["io-status"], s.get("ready"), s["error"])
            before = said.get(s["id"])
            if before is not None and before[0] == key and now - before[1] < PLAIN_EVERY:
                continue
            said[s["id"]] = (key, now)
            pct = 100 * s["offset"] / s["len"] if s["len"] else 100.0 * (line.eta == "done")
            stream.write(line.plain(pct) + "\n")
        stream.flush()

    yield draw


_JOB_EXAMPLES = """\
examples:
  blockfs job start backup /mnt/vm device=disk0 target=/srv/backup.qcow2 sync=full
  blockfs job start mirror /mnt/vm device=disk0 target=/new/disk0.qcow2
  blockfs job watch /mnt/vm disk0 --until ready     # bars on a terminal, lines in a pipe
  blockfs job complete /mnt/vm disk0                # a ready mirror switches to its target
  blockfs job list /mnt/vm --json

The spec keys of each kind are listed in MNT/.control/README.
"""


def _parser(sub: argparse._SubParsersAction, name: str, help: str, example: str):  # type: ignore[no-untyped-def,type-arg]
    return sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    job = sub.add_parser(
        "job",
        help="start, watch and steer block jobs on a mount",
        description="Start, watch and steer the block jobs of a mount, through its control "
        "files (MNT/.control/jobs).",
        epilog=_JOB_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jsub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)

    p = _parser(jsub, "start", "start a job; prints its ID",
                "blockfs job start backup /mnt/vm device=disk0 target=/srv/b.qcow2 speed=100M")  # fmt: skip
    p.add_argument("kind", choices=JOB_KINDS, help="the kind of job")
    p.add_argument("mountpoint", metavar="MNT", help="the mount")
    p.add_argument("spec", nargs="+", metavar="KEY=VALUE", help="the spec (MNT/.control/README)")
    p.set_defaults(func=_cmd_start)

    p = _parser(jsub, "list", "list the jobs of a mount", "blockfs job list /mnt/vm --json")
    p.add_argument("mountpoint", metavar="MNT", help="the mount")
    p.add_argument("--json", action="store_true", help="every status file, as one JSON list")
    p.set_defaults(func=_cmd_list)

    for name, show in (("watch", True), ("wait", False)):
        what = "show progress" if show else "wait silently"
        p = _parser(jsub, name, f"{what} until the jobs end; exit 1 if any failed",
                    f"blockfs job {name} /mnt/vm disk0 --until ready --timeout 600")  # fmt: skip
        p.add_argument("mountpoint", metavar="MNT", help="the mount")
        p.add_argument("id", nargs="*", metavar="ID", help="the jobs (default: all)")
        p.add_argument(
            "--interval",
            type=float,
            default=0.5 if show else 0.1,
            help="seconds between two looks at the status files",
        )
        p.add_argument("--timeout", type=float, default=0.0, help="give up after this many s")
        p.add_argument(
            "--until",
            choices=("concluded", "ready"),
            default="concluded",
            help="what to wait for (ready: a mirror or active commit in sync, waiting for complete)",
        )
        p.set_defaults(func=lambda a, show=show: _wait(a, show=show))

    for verb in ("pause", "resume", "cancel", "complete", "dismiss"):
        p = _parser(jsub, verb, f"{verb} a job", f"blockfs job {verb} /mnt/vm disk0")
        p.add_argument("mountpoint", metavar="MNT", help="the mount")
        p.add_argument("id", metavar="ID", help="the job's ID")
        if verb == "cancel":
            p.add_argument("--force", action="store_true", help="stop at once, even when ready")
        p.set_defaults(func=_verb(verb))
    p = _parser(jsub, "speed", "set a job's background copy rate (bytes/s, K/M/G; 0: no limit)",
                "blockfs job speed /mnt/vm disk0 50M")  # fmt: skip
    p.add_argument("mountpoint", metavar="MNT", help="the mount")
    p.add_argument("id", metavar="ID", help="the job's ID")
    p.add_argument("value", help="the rate")
    p.set_defaults(func=_verb("speed"))
