"""Commit and stream on a qcow2 backing chain, on each side: the layers' data folded together
by a live job while the top image is exposed, the way a user would drive it.

The chain (:func:`make_chain`, made once per run with qemu-img and qemu-io)::

    base.qcow2   the bench image: every cluster pseudo-random data
    mid.qcow2    overlay of base: a quarter of the clusters, chosen at random, rewritten
    top.qcow2    overlay of mid (the active layer, the exposed disk): another random quarter

Each measurement (:data:`CHAIN_JOBS`) starts from a fresh copy of the chain (``cp
--sparse=always``, then ``sync``; not measured) on a fresh daemon of one side:

- ``commit mid into base``: an intermediate commit; top stays the active layer, mid leaves
  the chain (top's backing file becomes base). Timed from the start request to the job's
  conclusion.
- ``active commit top+mid into base``: timed from the start request to READY; then completed,
  and the disk switches over to base.
- ``stream base+mid into top``: no base: everything top does not hold is copied into it, and
  top loses its backing file. Timed to the conclusion.

The figures are per byte *folded*: what the job copies, as ``qemu-img map`` sees the chain
before it (mid's allocated clusters; those of top or mid; every cluster top does not hold).
After each job, with the daemon stopped, the result is checked with qemu-img (the disk's
content equals the chain's before the job, and its chain has lost the right layers): a job that
ends well but leaves a wrong image gets no figure, only the reason.

blockfs: ``device=disk top=mid.qcow2 base=base.qcow2`` (intermediate) or ``device=disk
base=base.qcow2`` (active) written to ``MNT/.control/jobs/commit``, ``device=disk`` to
``MNT/.control/jobs/stream``, driven through ``MNT/.control/jobs/ID/`` (:mod:`benchmarks.jobctl`).
Until blockfs has those files, or while it refuses the start, its lines are "n/a".

qemu: the daemon opens top.qcow2 with its backing chain (QsdExport: the backing nodes get
automatic node names, learnt by file name from ``query-named-block-nodes``); ``block-commit``
(``device`` the exported format node, ``top-node`` mid's node for the intermediate commit,
``base-node`` base's node, ``auto-dismiss`` off), ``block-stream`` (``device``, no base), then
``query-jobs`` polled, ``job-complete`` for the active commit, ``job-dismiss``.
qemu-storage-daemon's writable FUSE export holds the RESIZE permission, which an active commit
(a mirror job underneath) and a stream job do not share: qemu refuses them with "Permission
conflict ... 'resize'" (qemu 7.2). Each job is first started on the writable export; when qemu
refuses it so, the export is re-added read-only on the same file (``block-export-del``,
``block-export-add writable=false``) and the job started again, with the clock and the CPU count
restarted. The intermediate commit runs under the writable export (its job takes no permission
on the exposed node that conflicts); the active commit and the stream run under a read-only
one. No guest writes reach either side during these jobs, so the export's mode changes no
figure, only what qemu allows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from qemu.qmp import ExecuteError

from benchmarks import procstat
from benchmarks.exposures import BlockfsMount, QsdExport
from benchmarks.jobctl import (
    CONCLUDE_TIMEOUT,
    QSD_SOURCE,
    BlockfsJobFiles,
    JobFailed,
    QmpJob,
    export_read_only,
    wait_until,
)

BASE, MID, TOP = "base.qcow2", "mid.qcow2", "top.qcow2"
#: the chain's cluster size (qemu-img's default) and the share of clusters each overlay rewrites
CLUSTER = 64 << 10
OVERLAY_SHARE = 4  # one cluster in 4
#: the overlays' data: PATTERNS files of PATTERN_BYTES pseudo-random bytes, in turn (qemu-io's
#: ``write -s FILE`` fills each write from the start of FILE)
PATTERNS = 8
PATTERN_BYTES = 1 << 20


class ChainJobUnavailable(Exception):
    """This side has no such job (yet); the message says why."""


class ChainJobFailed(JobFailed):
    pass


class ExportConflict(Exception):
    """qemu refused the job for a permission its writable FUSE export holds."""


@dataclass(frozen=True)
class ChainJob:
    """One measurement: a commit or a stream of the chain."""

    name: str  # the lines' name after the format
    kind: str  # blockfs's ``jobs/KIND``: "commit" or "stream"
    what: str  # the word of its messages
    top: str | None  # the top image of a commit (None: the active layer)
    base: str | None  # the base image (None: a stream of everything)

    @property
    def active(self) -> bool:
        """Driven to READY, then completed (an active commit)."""
        return self.kind == "commit" and self.top is None


CHAIN_JOBS: tuple[ChainJob, ...] = (
    ChainJob("commit mid into base", "commit", "commit", MID, BASE),
    ChainJob("active commit top+mid into base", "commit", "active commit", None, BASE),
    ChainJob("stream base+mid into top", "stream", "stream", None, None),
)


@dataclass(frozen=True)
class Chain:
    """The chain every measurement copies: BASE, MID, TOP in ``folder``."""

    folder: str
    size: int
    folded: dict[str, int]  # bytes each job of CHAIN_JOBS copies, by name


@dataclass(frozen=True)
class ChainTiming:
    seconds: float  # from the start request to the conclusion (READY for an active commit)
    cpu_s: float  # the daemon's CPU time over that period
    switch_s: float  # an active commit: from the complete request to the conclusion
    read_only_export: bool  # qemu ran it under a read-only export


# -- the chain ---------------------------------------------------------------------------------


def make_chain(folder: str, base_image: str, size: int) -> Chain:
    """BASE: a sparse copy of ``base_image`` (a fully allocated qcow2 image of random data);
    MID over it and TOP over MID (backing files recorded by name, relative to the folder), each
    with a random quarter of its clusters rewritten with pseudo-random data by qemu-io.

    :raise RuntimeError, subprocess.SubprocessError:
    """
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    _run(["cp", "--sparse=always", base_image, os.path.join(folder, BASE)])
    rng = np.random.default_rng(20260101)
    patterns = []
    for i in range(PATTERNS):
        path = os.path.join(folder, f".pattern{i}")
        with open(path, "wb") as f:
            f.write(rng.bytes(PATTERN_BYTES))
        patterns.append(path)
    clusters = size // CLUSTER
    for name, backing in ((MID, BASE), (TOP, MID)):
        _run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name], folder
        )
        picked = np.sort(rng.choice(clusters, clusters // OVERLAY_SHARE, replace=False))
        commands = []
        for n, (first, count) in enumerate(_runs([int(c) for c in picked])):
            pattern = patterns[n % PATTERNS]
            commands.append(f"write -q -s {pattern} {first * CLUSTER} {count * CLUSTER}")
        res = subprocess.run(
            ["qemu-io", "-f", "qcow2", name],
            cwd=folder,
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if res.returncode != 0 or "failed" in res.stdout + res.stderr:
            raise RuntimeError(
                f"qemu-io could not write {name}: {(res.stdout + res.stderr)[-300:]}"
            )
        own = _allocated(os.path.join(folder, name), lambda depth: depth == 0)
        if own != clusters // OVERLAY_SHARE * CLUSTER:
            raise RuntimeError(
                f"{name}: {own} bytes allocated, not {clusters // OVERLAY_SHARE * CLUSTER}"
            )
    for path in patterns:
        os.unlink(path)
    top = os.path.join(folder, TOP)
    folded = {
        CHAIN_JOBS[0].name: _allocated(os.path.join(folder, MID), lambda depth: depth == 0),
        CHAIN_JOBS[1].name: _allocated(top, lambda depth: depth <= 1),
        CHAIN_JOBS[2].name: _allocated(top, lambda depth: depth >= 1),
    }
    return Chain(folder, size, folded)


def _runs(picked: list[int]) -> list[tuple[int, int]]:
    """Sorted cluster numbers as (first, count) runs of adjacent clusters, each at most
    PATTERN_BYTES long."""
    runs: list[tuple[int, int]] = []
    most = PATTERN_BYTES // CLUSTER
    for c in picked:
        if runs and runs[-1][0] + runs[-1][1] == c and runs[-1][1] < most:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


def _allocated(image: str, depth_ok: Callable[[int], bool]) -> int:
    """Bytes of data ``qemu-img map`` finds in the layers of ``image``'s chain whose depth
    (0: the image itself) ``depth_ok`` accepts."""
    res = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", image],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return sum(
        e["length"] for e in json.loads(res.stdout) if e["data"] and depth_ok(e.get("depth", 0))
    )


def _run(cmd: list[str], cwd: str | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=600)


def copy_chain(chain: Chain, folder: str) -> str:
    """A fresh copy of the chain in ``folder`` (emptied first), written back to disk so that
    neither side's job meets the copy's writeback; the path of its TOP."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name in (BASE, MID, TOP):
        _run(["cp", "--sparse=always", os.path.join(chain.folder, name), folder])
    os.sync()
    return os.path.join(folder, TOP)


def check_result(job: ChainJob, chain: Chain, folder: str) -> None:
    """With the daemon stopped: the disk after ``job`` (TOP, or BASE after an active commit)
    reads as the chain did before it, and its chain has the layers it should have.

    :raise ChainJobFailed: it does not.
    """
    disk = os.path.join(folder, BASE if job.active else TOP)
    want = {"commit": [TOP, BASE], "active commit": [BASE], "stream": [TOP]}[job.what]
    res = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", disk],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if res.returncode != 0:
        raise ChainJobFailed(f"qemu-img info after the {job.what}: {res.stderr.strip()[-300:]}")
    info = json.loads(res.stdout)
    layers = [os.path.basename(layer["filename"]) for layer in info]
    if layers != want:
        raise ChainJobFailed(
            f"after the {job.what} the disk's chain is {' <- '.join(reversed(layers))}, "
            f"not {' <- '.join(reversed(want))}"
        )
    res = subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            os.path.join(chain.folder, TOP),
            disk,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if res.returncode != 0:
        said = (res.stdout + res.stderr).strip().splitlines()
        raise ChainJobFailed(
            f"after the {job.what} the disk differs from the chain before it: "
            f"{said[0] if said else f'qemu-img compare exited {res.returncode}'}"
        )


# -- the two sides -----------------------------------------------------------------------------


class QsdChainJob:
    JOB_ID = "cj0"

    def __init__(self, export: QsdExport, job: ChainJob) -> None:
        self.export = export
        self.spec = job
        self.job = QmpJob(export, self.JOB_ID, job.what, ChainJobFailed)
        self.nodes: dict[str, str] = {}
        self.read_only_export = False

    def prepare(self) -> None:
        """Learn the chain's node names, by file name (the backing nodes' are automatic)."""
        for node in self.export.qmp("query-named-block-nodes", flat=True):
            if node["drv"] == "qcow2":
                self.nodes[os.path.basename(node["file"])] = node["node-name"]

    def _node(self, image: str) -> str:
        try:
            return self.nodes[image]
        except KeyError:
            raise ChainJobFailed(f"qemu shows no node for {image}") from None

    def start(self) -> None:
        """:raise ExportConflict: refused under the writable export (see the module's doc).
        :raise ChainJobFailed: refused."""
        args: dict[str, object] = {
            "job-id": self.JOB_ID,
            "device": QSD_SOURCE,
            "auto-dismiss": False,
        }
        if self.spec.base is not None:
            args["base-node"] = self._node(self.spec.base)
        if self.spec.top is not None:
            args["top-node"] = self._node(self.spec.top)
        command = "block-commit" if self.spec.kind == "commit" else "block-stream"
        try:
            self.export.qmp(command, **args)
        except ExecuteError as exc:
            if "Permission conflict" in str(exc) and not self.read_only_export:
                raise ExportConflict(str(exc)) from None
            raise ChainJobFailed(f"qemu refused the {self.spec.what}: {exc}") from None

    def use_read_only_export(self) -> None:
        export_read_only(self.export, ChainJobFailed)
        self.read_only_export = True

    def ready(self) -> bool:
        return self.job.ready()

    def concluded(self) -> bool:
        return self.job.concluded()

    def complete(self) -> None:
        self.job.complete()

    def close(self) -> None:
        self.job.close()


class BlockfsChainJob:
    read_only_export = False

    def __init__(self, mount: BlockfsMount, job: ChainJob) -> None:
        self.spec = job
        self.job = BlockfsJobFiles(mount, job.kind, job.what, ChainJobFailed)

    def prepare(self) -> None:
        """:raise ChainJobUnavailable: this blockfs has no such job."""
        if not self.job.available():
            kind = self.spec.kind
            raise ChainJobUnavailable(
                f"blockfs has no {kind} job yet (.control/jobs/{kind} absent)"
            )

    def start(self) -> None:
        """:raise ChainJobFailed: blockfs refused the start."""
        spec = "device=disk"
        if self.spec.top is not None:
            spec += f" top={self.spec.top}"
        if self.spec.base is not None:
            spec += f" base={self.spec.base}"
        self.job.start(spec)

    def use_read_only_export(self) -> None:
        raise ChainJobFailed("blockfs has no read-only fallback")  # never asked: no conflict

    def ready(self) -> bool:
        return self.job.ready()

    def concluded(self) -> bool:
        return self.job.concluded()

    def complete(self) -> None:
        self.job.ctl("complete")

    def close(self) -> None:
        self.job.close()


ChainDriver = QsdChainJob | BlockfsChainJob


def chain_driver(exposure: BlockfsMount | QsdExport, job: ChainJob) -> ChainDriver:
    if isinstance(exposure, QsdExport):
        return QsdChainJob(exposure, job)
    return BlockfsChainJob(exposure, job)


def timed_chain_job(driver: ChainDriver, pid: int, timeout: float) -> ChainTiming:
    """Run one commit or stream on the idle disk: time and daemon CPU from the start request
    to the conclusion (to READY for an active commit, which is then completed).

    :raise ChainJobUnavailable, ChainJobFailed:
    """
    job = driver.spec
    try:
        driver.prepare()
        while True:
            cpu0 = procstat.cpu_seconds(pid)
            t0 = time.monotonic()
            try:
                driver.start()
            except ExportConflict:  # once: start() refuses a conflict under a read-only export
                driver.use_read_only_export()
                continue
            break
        if job.active:
            wait_until(
                driver.ready, t0 + timeout, ChainJobFailed, f"the {job.what} was not ready in time"
            )
        else:
            wait_until(
                driver.concluded,
                t0 + timeout,
                ChainJobFailed,
                f"the {job.what} did not end in time",
            )
        seconds = time.monotonic() - t0
        cpu = procstat.cpu_seconds(pid) - cpu0
        switch = 0.0
        if job.active:
            t1 = time.monotonic()
            driver.complete()
            wait_until(
                driver.concluded,
                t1 + CONCLUDE_TIMEOUT,
                ChainJobFailed,
                f"the {job.what} did not conclude in time after complete",
            )
            switch = time.monotonic() - t1
    finally:
        driver.close()
    return ChainTiming(seconds, cpu, switch, driver.read_only_export)
