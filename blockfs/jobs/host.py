"""What a job may use of the mount it runs in: the seam between ``jobs/`` and the daemon.

A job sees the mount only through :class:`JobHost`; the daemon implements it (and a test can,
in a few lines). Nothing under ``jobs/`` imports ``daemon``, ``fs``, ``control`` or the CLI,
not even for type checking: what a job needs of them is named here.
"""

from __future__ import annotations

from typing import Protocol

import trio

from blockfs.export import Export
from blockfs.jobs.job import EventLog
from blockfs.nodes.base import Node


class PublishedFile(Protocol):
    """A file a job put under the mountpoint (a backup's point-in-time view)."""

    @property
    def name(self) -> str: ...


class JobHost(Protocol):
    """The mount, as jobs see it."""

    @property
    def events(self) -> EventLog:
        """The one event log (``MNT/.control/events``)."""
        ...

    @property
    def nursery(self) -> trio.Nursery:
        """Where job bodies run; it outlives every job (shutdown cancels them first)."""
        ...

    def export(self, name: str) -> Export | None:
        """The mounted image called ``name``, or None."""
        ...

    def publish_view(self, export: Export, *, like: Export) -> PublishedFile:
        """Show ``export`` as a file of the mount (``MNT/NAME``, NAME being the export's),
        with the owner and mode ``like`` shows (a view is no more open than its device)."""
        ...

    def withdraw_view(self, file: PublishedFile) -> None:
        """Remove a published file; open handles keep working until released."""
        ...

    def check_not_in_use(
        self,
        what: str,
        node: Node,
        *,
        with_backing: bool = False,
        as_writer: bool = False,
        except_device: str | None = None,
    ) -> None:
        """Refuse a node (a job's target) whose files a mounted image uses, where one of the
        two writes them; ``with_backing`` checks its backing chain's files too; ``as_writer``:
        the job is about to write ``node`` (a commit's base, open read-only until then);
        ``except_device``: a device whose own chain ``node`` belongs to (not checked).

        :raise UsageError: (EBUSY) naming ``what``, the file and the image.
        """
        ...
