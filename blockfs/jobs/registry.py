"""Starting jobs, and the jobs of one mount: one path for every kind.

A job kind is a row of :data:`JOB_KINDS`: how to parse its spec, how to open its target (if it
has one), and how to make the job. :meth:`JobRegistry.start` does the rest once for all kinds:
the device must exist and be free, the id must be new (checked before the target is opened,
and again after, as another start may have run meanwhile), the target must not be a file a
mounted image uses, and a start that fails anywhere leaves nothing behind (the job forgotten,
a target it created removed, a JOB_START_FAILED event).

The control tree only routes ``jobs/KIND`` writes here; it hears of jobs coming and going
through :attr:`JobRegistry.on_added` / :attr:`JobRegistry.on_removed`.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from blockfs.errors import BlockfsError, JobError, UsageError
from blockfs.export import Export
from blockfs.jobs.backup import BackupJob, BackupSpec, open_backup_target
from blockfs.jobs.chain import ChainSpec
from blockfs.jobs.commit import make_commit
from blockfs.jobs.host import JobHost
from blockfs.jobs.job import Job, JobState
from blockfs.jobs.mirror import MirrorJob, MirrorSpec, open_mirror_target
from blockfs.jobs.stream import StreamJob
from blockfs.jobs.target import OpenedTarget


class JobSpec(Protocol):
    """What the registry reads of every parsed spec."""

    @property
    def device(self) -> str: ...

    @property
    def id(self) -> str: ...


_S = TypeVar("_S", bound=JobSpec)


@dataclass(frozen=True)
class JobKind(Generic[_S]):
    """One kind of job, as :class:`JobRegistry` starts it."""

    #: the spec written to ``jobs/KIND``, checked. :raise UsageError:
    parse: Callable[[bytes], _S]
    #: the job, made (not started) over its device and its target
    make: Callable[[_S, JobHost, Export, OpenedTarget | None], Job]
    #: the target opened or created; None for kinds without one (stream)
    open_target: Callable[[_S, Export], Awaitable[OpenedTarget]] | None = None


#: every kind of job ``MNT/.control/jobs/KIND`` starts
JOB_KINDS: Mapping[str, JobKind[Any]] = {
    "backup": JobKind(BackupSpec.parse, BackupJob.make, open_backup_target),
    "mirror": JobKind(MirrorSpec.parse, MirrorJob.make, open_mirror_target),
    "commit": JobKind(ChainSpec.parse_commit, make_commit),
    "stream": JobKind(ChainSpec.parse_stream, StreamJob.make),
}


class JobRegistry:
    """The jobs of one mount, by id; concluded jobs stay until dismissed."""

    def __init__(self, host: JobHost, kinds: Mapping[str, JobKind[Any]] = JOB_KINDS) -> None:
        self.host = host
        self.kinds = kinds
        self.jobs: dict[str, Job] = {}
        #: called when a job is known (before it starts) and when it is forgotten
        self.on_added: Callable[[Job], None] = lambda job: None
        self.on_removed: Callable[[Job], None] = lambda job: None

    def device(self, name: str) -> Export:
        """:raise UsageError: (ENOENT) no such device; JobError (EBUSY) a job holds it."""
        export = self.host.export(name)
        if export is None:
            raise UsageError(f"no device {name!r}", errno=errno.ENOENT)
        for job in self.jobs.values():
            if job.device == name and job.busy:
                raise JobError(f"device {name!r} is busy with job {job.id!r}", errno=errno.EBUSY)
        return export

    def _check_new_id(self, job_id: str) -> None:
        if job_id in self.jobs:
            raise JobError(f"a job with id {job_id!r} exists already", errno=errno.EEXIST)

    async def start(self, kind: str, data: bytes) -> Job:
        """Parse a spec of ``kind``, start the job and run it in the host's nursery.

        :raise BlockfsError: the spec, the device, the id or the target is refused (nothing
            is left behind, and a JOB_START_FAILED event says why).
        """
        try:
            return await self._start(self.kinds[kind], data)
        except BlockfsError as exc:
            self.host.events.emit(
                "JOB_START_FAILED",
                type=kind,
                spec=data.decode(errors="replace").strip()[:1000],
                error=str(exc),
            )
            raise

    async def _start(self, kind: JobKind[Any], data: bytes) -> Job:
        spec = kind.parse(data)
        export = self.device(spec.device)
        self._check_new_id(spec.id)
        target = await kind.open_target(spec, export) if kind.open_target else None
        job: Job | None = None
        try:
            # Check again: another spec may have started a job while the target was opened.
            # The target file itself must not be a file a mounted image uses (its backing
            # file may be: fleecing reads the device's file through it).
            self.device(spec.device)
            self._check_new_id(spec.id)
            if target is not None:
                self.host.check_not_in_use(f"target {target.path}", target.node)
            job = kind.make(spec, self.host, export, target)
            self.jobs[job.id] = job
            self.on_added(job)
            await job.start()
        except BaseException:
            # One cleanup for every way a start can fail: nothing is left behind.
            if job is not None:
                self.remove(job)
            if target is not None:
                await target.discard()
            raise
        self.host.nursery.start_soon(job.main)
        return job

    def remove(self, job: Job) -> None:
        """Forget a job (dismissed, or its start failed)."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
            self.on_removed(job)

    def dismiss(self, job: Job) -> None:
        """:raise JobError: (EBUSY) the job has not concluded."""
        job.dismiss()
        self.remove(job)

    async def aclose(self) -> None:
        """Cancel every live job and wait for each to conclude (filters leave the graph)."""
        for job in list(self.jobs.values()):
            if job.busy:
                try:
                    job.cancel()
                except BlockfsError:
                    pass
        for job in list(self.jobs.values()):
            if job.state is not JobState.NULL and job.state is not JobState.CONCLUDED:
                await job.wait_concluded()
