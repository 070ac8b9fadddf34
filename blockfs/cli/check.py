"""The ``blockfs check`` command: ``qemu-img check`` for qcow2 and VHDX images, with the same
report, the same words and the same exit status.

What lives here: the command line, opening (and locking) the image file, the two passes
``qemu-img check`` makes when it repairs (the repair, then a check of the repaired image whose
report is shown, with what was fixed), the human and JSON reports, and progress bars. The
checks themselves are ``blockfs.nodes.qcow2.check`` and ``blockfs.nodes.vhdx.check``; what
they find on the way is printed to stderr line by line, as QEMU prints it.

Exit status, as ``qemu-img check``: 0 no error (or all fixed), 1 the check could not complete
(an image that cannot be opened, or internal errors), 2 corruptions, 3 leaked clusters only,
63 a format that does not support checks (raw, or no image at all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from blockfs.errors import UsageError
from blockfs.nodes.file import check_image_file, lock_against_writers

EXIT_CLEAN = 0
EXIT_FAILED = 1
EXIT_CORRUPTIONS = 2
EXIT_LEAKS = 3
EXIT_NOT_SUPPORTED = 63

#: the order ``qemu-img check --output json`` prints its keys in (that of its dictionary)
JSON_ORDER = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)
#: keys printed even when 0 (the others only when not)
JSON_ALWAYS = frozenset({"check-errors", "filename", "format"})

_DESCRIPTION = """\
Check a qcow2 or VHDX image for inconsistencies, as 'qemu-img check' does:
refcounts against the references to every cluster (qcow2), the placement of
every block (VHDX). What is found is printed on stderr as it is found, the
report on stdout. An image a writer has open is refused.
"""

_EPILOG = """\
examples:
  blockfs check disk.qcow2                 check, change nothing
  blockfs check --output json disk.qcow2   the report as JSON (qemu-img's keys)
  blockfs check -r leaks disk.qcow2        free leaked clusters
  blockfs check -r all -p disk.qcow2       repair all that can be, showing progress

exit status: 0 no errors (or all repaired), 1 the check could not complete,
2 corruptions, 3 leaked clusters only, 63 a format without checks (raw)
"""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser(
        "check",
        help="check an image's metadata, and repair it",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "-r",
        dest="repair",
        choices=("leaks", "all"),
        help="repair: 'leaks' frees leaked clusters (qcow2); 'all' also raises refcounts "
        "that are too low, rebuilds a broken refcount structure, fixes COPIED flags and "
        "clears the dirty bit of lazy refcounts (qcow2), and replays a VHDX log (either "
        "mode). The image is opened read-write.",
    )
    c.add_argument(
        "--output",
        choices=("human", "json"),
        default="human",
        help="the report's form: 'human' (default) or 'json' (the keys of qemu-img check)",
    )
    c.add_argument(
        "-p", "--progress", action="store_true", help="show the progress of the check on stderr"
    )
    c.add_argument("filename", metavar="IMAGE", help="the image file (qcow2 or VHDX)")
    c.set_defaults(func=cmd_check)


class _Result(Protocol):
    """What a check of either format returns."""

    def counts(self) -> dict[str, int]:
        """The counters, under the names of ``qemu-img check --output json``."""


def cmd_check(args: argparse.Namespace) -> int:
    """:raise UsageError: a path that is no image file. :raise ImageError: an image that cannot
    be checked (one line)."""
    path: str = args.filename
    repair: str | None = args.repair
    human = args.output == "human"
    check_image_file(path)
    fd = _open(path, writable=repair is not None)
    try:
        fmt = _probe(fd, path)
        if fmt is None:
            print(
                f"blockfs: {path}: this image format does not support checks "
                "(only qcow2 and vhdx do)",
                file=sys.stderr,
            )
            return EXIT_NOT_SUPPORTED
        label = "Repairing" if repair else "Checking"
        with _Bars(label, args.progress, "tables" if fmt == "qcow2" else "entries") as bars:
            counts = _run(fd, path, fmt, repair, bars)
            fixed = counts["corruptions-fixed"] or counts["leaks-fixed"]
            if fixed:
                if human:
                    print(
                        "The following inconsistencies were found and repaired:\n\n"
                        f"    {counts['leaks-fixed']} leaked clusters\n"
                        f"    {counts['corruptions-fixed']} corruptions\n\n"
                        "Double checking the fixed image now...",
                        flush=True,
                    )
                bars.label = "Checking"
                again = _run(fd, path, fmt, None, bars)
                again["leaks-fixed"] = counts["leaks-fixed"]
                again["corruptions-fixed"] = counts["corruptions-fixed"]
                counts = again
    finally:
        os.close(fd)
    sys.stdout.write(_human(counts) if human else _json(counts, path, fmt))
    sys.stdout.flush()
    if counts["check-errors"]:
        print(f"blockfs: {path}: Check failed", file=sys.stderr)
        return EXIT_FAILED
    if counts["corruptions"]:
        return EXIT_CORRUPTIONS
    if counts["leaks"]:
        return EXIT_LEAKS
    return EXIT_CLEAN


def _run(
    fd: int, path: str, fmt: str, repair: str | None, on_progress: Callable[[int, int], None]
) -> dict[str, int]:
    """One pass of the check (and repair) of the image open on ``fd``: its counters."""
    result: _Result
    if fmt == "qcow2":
        from blockfs.nodes.qcow2.check import Fix, check_qcow2

        fix = {None: Fix.NONE, "leaks": Fix.LEAKS, "all": Fix.LEAKS | Fix.ERRORS}[repair]
        result = check_qcow2(fd, path, fix, on_message=_say, on_progress=on_progress)
    else:
        from blockfs.nodes.vhdx.check import check_vhdx

        result = check_vhdx(fd, path, repair is not None, on_message=_say, on_progress=on_progress)
    return result.counts()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _probe(fd: int, path: str) -> str | None:
    """The format whose magic the file starts with (None: none that has checks)."""
    try:
        magic = os.pread(fd, 8, 0)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}", errno=exc.errno) from None
    if magic[:4] == b"QFI\xfb":
        return "qcow2"
    if magic == b"vhdxfile":
        return "vhdx"
    return None


def _open(path: str, writable: bool) -> int:
    """The image file opened (read-write to repair) and locked as blockfs locks images: no
    other writer may come, and none may be there (QEMU's lock bytes).

    :raise UsageError: it cannot be opened, is no regular file or block device, or is in use.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}", errno=exc.errno) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{path}: not a regular file or block device")
        if stat.S_ISREG(st.st_mode):
            lock_against_writers(fd, path, read_only=not writable)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Bars:
    """Progress on stderr (``-p``): one bar per phase of a check, a phase being what the
    checker reports with one total (``blockfs.cli.progress`` is imported only when asked)."""

    def __init__(self, label: str, enabled: bool, unit: str) -> None:
        self.label = label
        self.enabled = enabled
        self.unit = unit
        self._stack = contextlib.ExitStack()
        self._update: Callable[[int], None] | None = None
        self._total = -1
        self._done = -1

    def __enter__(self) -> _Bars:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._update is None or total != self._total or done < self._done:
            from blockfs.cli.progress import progress

            self._stack.close()
            self._update = self._stack.enter_context(
                progress(self.label, total, enabled=True, unit=self.unit)
            )
            self._total = total
        self._done = done
        self._update(done)


def _human(c: dict[str, int]) -> str:
    """The report as ``qemu-img check`` prints it."""
    out = []
    if not (c["corruptions"] or c["leaks"] or c["check-errors"]):
        out.append("No errors were found on the image.\n")
    else:
        if c["corruptions"]:
            out.append(
                f"\n{c['corruptions']} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if c["leaks"]:
            out.append(
                f"\n{c['leaks']} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if c["check-errors"]:
            out.append(f"\n{c['check-errors']} internal errors have occurred during the check.\n")
    total, allocated = c["total-clusters"], c["allocated-clusters"]
    if total and allocated:
        out.append(
            f"{allocated}/{total} = {allocated * 100 / total:.2f}% allocated, "
            f"{c['fragmented-clusters'] * 100 / allocated:.2f}% fragmented, "
            f"{c['compressed-clusters'] * 100 / allocated:.2f}% compressed clusters\n"
        )
    if c["image-end-offset"]:
        out.append(f"Image end offset: {c['image-end-offset']}\n")
    return "".join(out)


def _json(c: dict[str, int], path: str, fmt: str) -> str:
    """The report as ``qemu-img check --output json`` prints it: its keys, in its order, each
    counter only when it is not 0 (but check-errors)."""
    values: dict[str, int | str] = {**c, "filename": path, "format": fmt}
    report = {k: values[k] for k in JSON_ORDER if k in JSON_ALWAYS or values[k]}
    return json.dumps(report, indent=4) + "\n"
