"""One block job on either side, driven the way a user drives it: blockfs through its control
files, qemu-storage-daemon over QMP. The mirror lines (``mirror.py``) and the commit and stream
lines (``chainjobs.py``) share these drivers; each passes its own exception class and the word
its messages use for the job ("mirror", "commit", ...).

blockfs: a spec written to ``MNT/.control/jobs/KIND`` (the write answers with the new job's ID,
read from the same open file), ``MNT/.control/jobs/ID/status`` (JSON: ``state``, ``ready``,
``error``, ...) polled, verbs written to ``MNT/.control/jobs/ID/ctl``.
qemu: the job's entry in ``query-jobs`` polled, ``job-complete``, ``job-cancel``,
``job-dismiss``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import QMPError

from benchmarks.exposures import BlockfsMount, QsdExport

POLL_INTERVAL = 0.02
#: how long a job may take to conclude once completed or cancelled
CONCLUDE_TIMEOUT = 60.0

#: QsdExport's names: its FUSE export and the format node it exports
QSD_EXPORT_ID = "exp0"
QSD_SOURCE = "fmt0"


class JobFailed(RuntimeError):
    """A job was refused, ended with an error or took too long; the message says which."""


def wait_until(
    done: Callable[[], bool], deadline: float, failed: type[JobFailed], message: str
) -> None:
    """Poll ``done`` every POLL_INTERVAL until it is true. :raise failed: past ``deadline``."""
    while not done():
        if time.monotonic() > deadline:
            raise failed(message)
        time.sleep(POLL_INTERVAL)


def write_control(path: str, line: str, refused: str, failed: type[JobFailed]) -> str:
    """Write one line to a blockfs control file, unbuffered, and return what a read of the same
    open file then gives (a job's ID for a spec, "ok" for a verb). A refusal fails that write,
    and that read gives the reason.

    :raise failed: refused (the message starts with ``refused``).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError as exc:
            reason = os.read(fd, 4096).decode(errors="replace").strip() or exc.strerror
            raise failed(f"{refused}: {reason}") from None
        return os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)


class BlockfsJobFiles:
    """One blockfs job of kind ``kind`` (``jobs/KIND`` starts it) on a mount."""

    def __init__(self, mount: BlockfsMount, kind: str, what: str, failed: type[JobFailed]) -> None:
        self.jobs = os.path.join(mount.control, "jobs")
        self.kind = kind
        self.what = what
        self.failed = failed
        #: a job's ID defaults to its device's name; the start's answer says which it is
        self.id = "disk"

    def available(self) -> bool:
        return os.path.exists(os.path.join(self.jobs, self.kind))

    def start(self, spec: str) -> None:
        """:raise failed: blockfs refused the start."""
        answer = write_control(
            os.path.join(self.jobs, self.kind),
            spec,
            f"blockfs refused the {self.what}",
            self.failed,
        )
        if answer and "/" not in answer and not answer.startswith("."):
            self.id = answer.splitlines()[0].strip()

    def status(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.jobs, self.id, "status")) as f:
                return json.load(f)  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise self.failed(f"the blockfs {self.what} job disappeared") from None

    def ctl(self, verb: str) -> None:
        """:raise failed: blockfs refused the verb."""
        path = os.path.join(self.jobs, self.id, "ctl")
        write_control(path, verb, f"blockfs refused {verb!r}", self.failed)

    def ready(self) -> bool:
        """:raise failed: the job ended before it was ready."""
        status = self.status()
        if status.get("ready") is True:
            return True
        if status.get("state") == "concluded":
            raise self.failed(f"blockfs {self.what} ended before ready: {status.get('error')}")
        return False

    def concluded(self) -> bool:
        """:raise failed: the job concluded with an error."""
        status = self.status()
        if status.get("state") != "concluded":
            return False
        if status.get("error"):
            raise self.failed(f"blockfs {self.what} failed: {status['error']}")
        return True

    def ended(self) -> bool:
        try:
            return self.concluded()
        except self.failed:
            return True

    def close(self) -> None:
        """Cancel the job if it is still going, then dismiss it; a failure only loses the
        tidying (the daemon is stopped right after)."""
        try:
            if os.path.exists(os.path.join(self.jobs, self.id)):
                if not self.ended():
                    self.ctl("cancel force")
                    wait_until(
                        self.ended,
                        time.monotonic() + CONCLUDE_TIMEOUT,
                        self.failed,
                        f"the {self.what} did not reach cancel in time",
                    )
                self.ctl("dismiss")
        except (JobFailed, OSError):
            pass


class QmpJob:
    """One qemu-storage-daemon job, by its ID, through ``query-jobs``."""

    def __init__(self, export: QsdExport, job_id: str, what: str, failed: type[JobFailed]) -> None:
        self.export = export
        self.id = job_id
        self.what = what
        self.failed = failed

    def status(self) -> dict[str, Any]:
        for job in self.export.qmp("query-jobs"):
            if job["id"] == self.id:
                return job  # type: ignore[no-any-return]
        raise self.failed(f"the qemu {self.what} job disappeared")

    def ready(self) -> bool:
        """:raise failed: the job ended before it was ready."""
        job = self.status()
        if job["status"] == "ready":
            return True
        if job["status"] in ("aborting", "concluded", "null"):
            raise self.failed(
                f"qemu {self.what} ended before ready: {job.get('error', 'no error')}"
            )
        return False

    def concluded(self) -> bool:
        """:raise failed: the job concluded with an error."""
        job = self.status()
        if job["status"] != "concluded":
            return False
        if job.get("error"):
            raise self.failed(f"qemu {self.what} failed: {job['error']}")
        return True

    def ended(self) -> bool:
        try:
            return self.concluded()
        except self.failed:
            return True

    def complete(self) -> None:
        self.export.qmp("job-complete", id=self.id)

    def close(self) -> None:
        """Cancel the job if it is still going, then dismiss it; a failure only loses the
        tidying (the daemon is stopped right after)."""
        try:
            jobs = {j["id"]: j for j in self.export.qmp("query-jobs")}
            job = jobs.get(self.id)
            if job is not None and job["status"] != "concluded":
                self.export.qmp("job-cancel", id=self.id)
                wait_until(
                    self.ended,
                    time.monotonic() + CONCLUDE_TIMEOUT,
                    self.failed,
                    f"the {self.what} did not reach cancel in time",
                )
            if job is not None:
                self.export.qmp("job-dismiss", id=self.id)
        except (QMPError, JobFailed, OSError):
            pass


def drop_fuse_export(export: QsdExport, failed: type[JobFailed]) -> None:
    """Remove qemu's FUSE export (its file stays, unmounted); return once it is gone."""
    export.qmp("block-export-del", id=QSD_EXPORT_ID)
    deadline = time.monotonic() + CONCLUDE_TIMEOUT
    while any(e["id"] == QSD_EXPORT_ID for e in export.qmp("query-block-exports")):
        if time.monotonic() > deadline:
            raise failed("qemu did not remove its FUSE export in time")
        time.sleep(POLL_INTERVAL)


def export_read_only(export: QsdExport, failed: type[JobFailed]) -> None:
    """Export the same node on the same file again, read-only: without the RESIZE permission a
    writable FUSE export holds, which qemu's mirror, active commit and stream jobs do not share."""
    drop_fuse_export(export, failed)
    export.qmp(
        "block-export-add",
        **{
            "type": "fuse",
            "id": QSD_EXPORT_ID,
            "node-name": QSD_SOURCE,
            "mountpoint": export.path,
            "writable": False,
        },
    )
