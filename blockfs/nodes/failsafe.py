"""The failsafe of the format nodes that write metadata (qcow2, VHDX): once a metadata write
or a flush of the file beneath fails, the node stops writing until it is opened again.

The file then holds what the node's write order makes consistent (qcow2: at most leaked
clusters; VHDX: a log to replay), and nothing more is written over it that could assume the
failed write happened. Reads go on. A failed flush keeps failing (the kernel may have dropped
the dirty pages whose write-back failed, so no later flush may claim them durable). The
writing entry points are shadowed on the instance when the node breaks, so the mapped-write
fast path pays for no check while the node is healthy.
"""

from __future__ import annotations

import errno
import logging
from typing import ClassVar

from blockfs.errors import BlockfsError
from blockfs.nodes.base import Node

log = logging.getLogger(__name__)


class FailsafeNode(Node):
    """A format node with the failsafe (see the module docstring). Subclasses set ``child``
    and call :meth:`_init_failsafe` in their constructor."""

    child: Node
    #: the writing operations a broken node refuses (VHDX shadows them until its first write
    #: after an open, too)
    GUARDED: ClassVar[tuple[str, ...]] = ("write", "write_zeroes", "discard")
    #: what the log line promises of the file after a break
    AFTER_BREAK: ClassVar[str] = "'qemu-img check' shows at most leaks"
    #: a metadata write cancelled half way breaks the node too (it may have happened or
    #: not); off, only a failed one does
    BREAK_ON_CANCEL: ClassVar[bool] = False

    def _init_failsafe(self) -> None:
        #: why the node stopped accepting writes; None while healthy
        self._broken: str | None = None
        self._broken_by_flush = False

    async def write_metadata(self, event: str, offset: int, data: bytes) -> None:
        """The one way metadata reaches the child: announced first as ``event``; a failure
        stops the node (:meth:`_break`) before the error goes on to the caller."""
        if self._broken is not None:
            raise self._refusal()
        self.child.debug_event(event)
        try:
            await self.child.write(offset, data)
        except Exception as exc:
            self._break(f"{event} write failed", exc)
            raise
        except BaseException as exc:
            if self.BREAK_ON_CANCEL:
                self._break(f"{event} write failed", exc)
            raise

    async def flush_child(self) -> None:
        """Flush the child; a failure stops the node and makes every later flush fail. A
        cancelled flush only fails (nothing is known durable that was not before)."""
        try:
            await self.child.flush()
        except Exception as exc:
            self._break("flush failed", exc, by_flush=True)
            raise

    def _break(self, what: str, exc: BaseException, *, by_flush: bool = False) -> None:
        self._broken_by_flush |= by_flush
        if self._broken is not None:
            return
        if isinstance(exc, Exception):
            reason = f"{what}: {exc}"
        else:  # cancelled half way: the write may or may not have happened
            reason = f"{what}: interrupted"
        self._broken = self.write_failure = reason
        log.error(
            "%s: %s; the image refuses writes until it is reopened (reads go on; %s)",
            self.filename,
            reason,
            self.AFTER_BREAK,
        )

        async def refuse(*args: object, **kwargs: object) -> None:
            raise self._refusal()

        for name in self.GUARDED:
            setattr(self, name, refuse)

    def _refusal(self) -> BlockfsError:
        return BlockfsError(
            f"{self.filename}: stopped writing after a failure ({self._broken}); reopen the image",
            errno=errno.EIO,
        )
