"""The job model: QEMU's job states and verbs, an event log, and the base every job builds on.

States (QEMU's names): created -> running <-> paused -> (ready) -> waiting -> pending ->
concluded -> null, with aborting on the way from any live state to concluded when a job fails
or is cancelled. Verbs are gated by state (:data:`VERBS`); a verb in the wrong state is refused
with EBUSY and a one-line reason.

A job is started by :mod:`blockfs.jobs.registry` (:meth:`Job.start`, then :meth:`Job.main` in
the host's nursery). Its body (:meth:`Job.run`) calls :meth:`Job.checkpoint` between units of
work: that is where pause takes effect. Cancel cancels the body's trio scope; :meth:`Job.finalize` then runs shielded
(a filter is removed from the graph whatever happened). A concluded job stays (its status can be
read) until ``dismiss``.
"""

from __future__ import annotations

import enum
import errno
import logging
import time
from collections import deque
from typing import Any

import trio

from blockfs.errors import BlockfsError, JobError

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobState
#: the states of a job that has not concluded yet and still accepts verbs
LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING})
#: the states in which a job holds its device (no second job may start on it)
BUSY = LIVE | {S.ABORTING}
#: the states in which each verb is accepted
VERBS: dict[str, set[JobState]] = {
    "pause": {S.CREATED, S.RUNNING, S.READY, S.PAUSED, S.STANDBY},
    "resume": {S.CREATED, S.RUNNING, S.READY, S.PAUSED, S.STANDBY},
    "cancel": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING},
    "complete": {S.READY, S.STANDBY},
    "dismiss": {S.CONCLUDED},
    "speed": {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY},
}


class IoStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class ErrorAction(enum.Enum):
    """What a job does when an I/O error hits it (QEMU's BlockdevOnError)."""

    REPORT = "report"  # fail the job
    IGNORE = "ignore"  # carry on, retry the range later
    STOP = "stop"  # pause the job; resume retries
    ENOSPC = "enospc"  # stop on ENOSPC, report anything else

    def decide(self, exc: BaseException) -> ErrorAction:
        if self is ErrorAction.ENOSPC:
            nospace = getattr(exc, "errno", None) == errno.ENOSPC
            return ErrorAction.STOP if nospace else ErrorAction.REPORT
        return self


class EventLog:
    """A bounded history of events, oldest first, as QMP would have sent them.

    Repeats are coalesced: an event equal (name and data) to one of the last
    :data:`COALESCE_WINDOW` entries moves that entry to the end with ``count`` raised and the
    latest timestamp, so an error that recurs every few milliseconds (``on-target-error=ignore``)
    takes one line instead of pushing every older event out. :attr:`version` counts every emit,
    coalesced or not: the rendering of the log changes exactly when it does.
    """

    #: how many of the newest entries a new event is compared with
    COALESCE_WINDOW = 8

    def __init__(self, maxlen: int = 1000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._changed = trio.Event()
        self.version = 0

    def emit(self, event: str, **data: Any) -> None:
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        self.version += 1
        events = self._events
        for back in range(1, min(self.COALESCE_WINDOW, len(events)) + 1):
            entry = events[-back]
            if entry["event"] == event and entry["data"] == data:
                del events[-back]
                entry["timestamp"] = stamp
                entry["count"] = entry.get("count", 1) + 1
                events.append(entry)
                log.debug("event %s %s (x%d)", event, data, entry["count"])
                break
        else:
            events.append({"event": event, "data": data, "timestamp": stamp})
            log.info("event %s %s", event, data)
        self._changed.set()
        self._changed = trio.Event()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._events))

    def __len__(self) -> int:
        return len(self._events)

    async def wait_changed(self) -> None:
        await self._changed.wait()


class JobFailed(BlockfsError):
    """The job's body gives up: the message becomes the job's error."""


class Job:
    """Base of every job. Subclasses set ``type`` and implement :meth:`run` (and, as needed,
    :meth:`prepare`, :meth:`finalize`, :meth:`on_complete`)."""

    type = "?"

    def __init__(self, job_id: str, device: str, events: EventLog) -> None:
        self.id = job_id
        self.device = device
        self.events = events
        self.state = JobState.CREATED
        self.offset = 0
        self.len = 0
        self.speed = 0
        self.io_status = IoStatus.OK
        self.error: str | None = None
        self.cancelled = False
        self._paused = False
        self._resumed = trio.Event()
        self._scope = trio.CancelScope()
        self._concluded = trio.Event()
        self._complete_requested = False
        self._state_before_pause = JobState.RUNNING
        #: tasks running the body, and how many of them sit in a paused checkpoint: the job
        #: is PAUSED only once all of them do (as in QEMU, where a job pauses at a pause point)
        self.body_tasks = 1
        self._parked = 0
        #: set by verbs and events a waiting body wants to notice (pause, complete, ...)
        self.kick = trio.Event()

    # -- what subclasses provide ------------------------------------------------------------

    async def start(self) -> None:
        """Before the body runs, while the job is being started: change the graph (insert a
        filter), publish files. Raising fails the start (the job is then forgotten, and
        whatever this did must be undone here)."""

    async def run(self) -> None:
        """The body: copy until done. Raise JobFailed to fail; return to succeed."""
        raise NotImplementedError

    async def finalize(self, ok: bool) -> None:
        """Undo graph changes, close targets. Runs shielded, once, after the body ended."""

    def ready_for_completion(self) -> None:
        """For jobs that reach READY: enter it (the body then waits for ``complete``)."""
        if self.state is JobState.RUNNING:
            self._set_state(JobState.READY)
            self.events.emit(
                "BLOCK_JOB_READY",
                type=self.type,
                device=self.id,
                len=self.len,
                offset=self.offset,
                speed=self.speed,
            )

    # -- the life of a job ------------------------------------------------------------------

    async def main(self) -> None:
        """Run the job to its conclusion. Never raises (errors are the job's state)."""
        ok = False
        try:
            with self._scope:
                self._set_state(JobState.RUNNING)
                await self.run()
                ok = True
        except BlockfsError as exc:  # JobFailed, or an I/O error the body did not handle
            self.error = str(exc)
        except Exception as exc:  # a bug: still conclude, with the reason
            log.exception("job %s crashed", self.id)
            self.error = f"internal error: {exc!r}"
        if self._scope.cancelled_caught or (self.cancelled and not ok):
            self.cancelled = True
            ok = False
        if ok:
            self._set_state(JobState.WAITING)
            self._set_state(JobState.PENDING)
        else:
            self._set_state(JobState.ABORTING)
        with trio.CancelScope(shield=True):
            try:
                await self.finalize(ok)
            except Exception as exc:
                log.exception("job %s: finalize failed", self.id)
                if ok:
                    self.error = f"finalize failed: {exc}"
                    ok = False
        info = {
            "type": self.type,
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
        }
        if self.cancelled and self.error is None:
            self.events.emit("BLOCK_JOB_CANCELLED", **info)
        else:
            if self.error is not None:
                info["error"] = self.error
            self.events.emit("BLOCK_JOB_COMPLETED", **info)
        self._paused = False  # a concluded job is not paused, whatever it was when it ended
        self._set_state(JobState.CONCLUDED)
        self._concluded.set()

    @property
    def busy(self) -> bool:
        """Whether the job still holds its device (see :data:`BUSY`)."""
        return self.state in BUSY

    def _set_state(self, state: JobState) -> None:
        if state is not self.state:
            self.state = state
            self.events.emit("JOB_STATUS_CHANGE", id=self.id, status=state.value)

    async def wait_concluded(self) -> None:
        await self._concluded.wait()

    async def checkpoint(self) -> None:
        """Where the body yields: waits while paused; cancellation is delivered here too."""
        await trio.lowlevel.checkpoint()
        if not self._paused:
            return
        self._parked += 1
        try:
            self.update_paused_state()
            while self._paused:
                await self._resumed.wait()
        finally:
            self._parked -= 1

    def set_body_tasks(self, tasks: int) -> None:
        """How many tasks run the body now (an engine's workers; at least the body itself):
        the job is PAUSED once every one of them is parked."""
        self.body_tasks = max(1, tasks)
        self.update_paused_state()

    def update_paused_state(self) -> None:
        """Enter PAUSED/STANDBY once every body task is parked (call when body_tasks drops)."""
        if self._paused and self._parked >= self.body_tasks:
            if self.state in (JobState.RUNNING, JobState.READY):
                self._state_before_pause = self.state
                self._set_state(
                    JobState.PAUSED if self.state is JobState.RUNNING else JobState.STANDBY
                )

    def _kick(self) -> None:
        self.kick.set()
        self.kick = trio.Event()

    def pause_for_error(self, exc: BaseException) -> None:
        """Stop the job after an I/O error under the ``stop`` policy (io-status says why)."""
        if self._paused and self.io_status is not IoStatus.OK:
            return  # the first error says why (later ones may be its consequences)
        nospace = getattr(exc, "errno", None) == errno.ENOSPC
        self.io_status = IoStatus.NOSPACE if nospace else IoStatus.FAILED
        self._pause()

    def report_error(self, operation: str, action: ErrorAction) -> None:
        self.events.emit(
            "BLOCK_JOB_ERROR", device=self.id, operation=operation, action=action.value
        )

    async def io_error(
        self, policy: ErrorAction, exc: BlockfsError, operation: str, what: str
    ) -> bool:
        """Apply an ``on-*-error`` policy to a failed background copy (``operation`` is
        "read" or "write", ``what`` the message's start): report fails the job; stop pauses
        it (True: retry the range once resumed); ignore carries on after a short rest, so a
        failing disk is not spun on (False: a later pass retries the range).

        While the job is paused for an earlier error, a new one (a copy that was in flight,
        or a consequence of the first) is not judged again: retried once resumed.

        :raise JobFailed: the policy (or ``enospc`` on another errno) says report.
        """
        action = self.judge_io_error(policy, exc, operation)
        if action is None or action is ErrorAction.STOP:
            return True
        if action is ErrorAction.REPORT:
            raise JobFailed(f"{what}: {exc}", errno=exc.errno)
        await trio.sleep(0.05)
        return False

    def judge_io_error(
        self, policy: ErrorAction, exc: BlockfsError, operation: str
    ) -> ErrorAction | None:
        """The part of :meth:`io_error` that needs no ``await`` (a write path calls it): the
        action ``policy`` takes on ``exc``, reported as BLOCK_JOB_ERROR, the job paused for
        stop; None while the job is paused for an earlier error (nothing to judge again)."""
        if self._paused and self.io_status is not IoStatus.OK:
            return None
        action = policy.decide(exc)
        self.report_error(operation, action)
        if action is ErrorAction.STOP:
            self.pause_for_error(exc)
        return action

    # -- verbs ------------------------------------------------------------------------------

    def _check_verb(self, verb: str) -> None:
        if self.state not in VERBS[verb]:
            raise JobError(
                f"job {self.id!r} in state {self.state.value!r} cannot accept verb {verb!r}",
                errno=errno.EBUSY,
            )

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._resumed = trio.Event()
            self._kick()

    def pause(self) -> None:
        self._check_verb("pause")
        self._pause()

    def resume(self) -> None:
        self._check_verb("resume")
        if self._paused:
            self._paused = False
            self.io_status = IoStatus.OK
            if self.state in (JobState.PAUSED, JobState.STANDBY):
                self._set_state(self._state_before_pause)
            self._resumed.set()

    def cancel(self, force: bool = False) -> None:
        """End the job at once (``force`` matters to jobs that have a gentler cancel)."""
        self._check_verb("cancel")
        self.cancelled = True
        self._scope.cancel()

    def complete(self) -> None:
        self._check_verb("complete")
        self._complete_requested = True
        self._kick()

    def set_speed(self, speed: int) -> None:
        self._check_verb("speed")
        if speed < 0:
            raise JobError("speed must not be negative")
        self.speed = speed

    def dismiss(self) -> None:
        self._check_verb("dismiss")
        self._set_state(JobState.NULL)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "device": self.device,
            "state": self.state.value,
            "offset": self.offset,
            "len": self.len,
            "speed": self.speed,
            "ready": self.state is JobState.READY,
            "paused": self._paused,
            "io-status": self.io_status.value,
            "error": self.error,
        }
