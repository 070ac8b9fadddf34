"""The ``raw`` format node: the guest sees the child's bytes one to one.

It adds nothing to the data path but a bound on the size, so it stays as thin as a call.

A raw image whose format was *probed* is guarded as QEMU guards it: its guest owns every byte,
so a guest write that would make the first sectors probe as another format (a qcow2 header
naming a host file as its backing file, say) is refused with EPERM and logged; the next mount
would otherwise open the disk as that format. Only requests that touch the probed bytes pay for
the check; every other request still goes straight to the child.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from blockfs.errors import BlockfsError
from blockfs.nodes.base import DirectDone, DirectIo, Extent, Held, Node

log = logging.getLogger(__name__)


class RawNode(Node):
    format_name = "raw"

    def __init__(
        self,
        child: Node,
        probe_guard: Callable[[bytes], str] | None = None,
        probe_bytes: int = 4096,
    ) -> None:
        self.child = child
        self.size = child.size
        self.read_only = child.read_only
        self.filename = child.filename
        self.limits = child.limits
        # Bind the child's methods once: the per-request cost is one call, not two.
        self.read = child.read  # type: ignore[method-assign]
        self.write = child.write  # type: ignore[method-assign]
        self.write_zeroes = child.write_zeroes  # type: ignore[method-assign]
        self.discard = child.discard  # type: ignore[method-assign]
        self.flush = child.flush  # type: ignore[method-assign]
        self.block_status = child.block_status  # type: ignore[method-assign]
        self.allocated_bytes = child.allocated_bytes  # type: ignore[method-assign]
        self._probe_guard = probe_guard
        self._probe_bytes = probe_bytes
        if probe_guard is not None:
            self._child_write = child.write
            self._child_zeroes = child.write_zeroes
            self._child_discard = child.discard
            self.write = self._guarded_write  # type: ignore[method-assign]
            self.write_zeroes = self._guarded_zeroes  # type: ignore[method-assign]
            self.discard = self._guarded_discard  # type: ignore[method-assign]

    @classmethod
    async def open(
        cls, child: Node, *, probe_guard: Callable[[bytes], str] | None = None
    ) -> RawNode:
        """``probe_guard`` (the format prober) marks a probed image: writes that would make it
        probe as anything but raw are refused."""
        return cls(child, probe_guard)

    # -- the guard of a probed image --------------------------------------------------------------

    async def _check_head(self, offset: int, new: bytes | None, length: int) -> None:
        """:raise BlockfsError: (EPERM) the first bytes would probe as another format once
        ``new`` (None: zeroes) lands at ``offset``."""
        assert self._probe_guard is not None
        n = min(self._probe_bytes, self.size)
        head = bytearray(await self.child.read(0, n))
        end = min(n, offset + length)
        head[offset:end] = new[: end - offset] if new is not None else bytes(end - offset)
        fmt = self._probe_guard(bytes(head))
        if fmt != "raw":
            log.warning(
                "%s: refused a guest write at offset %d that would make this probed raw image "
                "read as %s on its next open",
                self.filename,
                offset,
                fmt,
            )
            raise BlockfsError(
                f"{self.filename}: write would turn a probed raw image into {fmt}",
                errno=errno.EPERM,
            )

    async def _guarded_write(self, offset: int, data: bytes) -> None:
        if offset < self._probe_bytes:
            await self._check_head(offset, data, len(data))
        await self._child_write(offset, data)

    async def _guarded_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if offset < self._probe_bytes:
            await self._check_head(offset, None, length)
        await self._child_zeroes(offset, length, may_unmap)

    async def _guarded_discard(self, offset: int, length: int) -> None:
        if offset < self._probe_bytes:
            await self._check_head(offset, None, length)
        await self._child_discard(offset, length)

    def direct_io(self) -> DirectIo | None:
        """The child's, as it is: a raw node maps one to one. A probed image's head is
        guarded in the event loop, so writes below it are not direct."""
        below = self.child.direct_io()
        if below is None or self._probe_guard is None:
            return below
        write, submit, head = below.write, below.submit_write, self._probe_bytes
        if write is None and submit is None:
            return below
        guarded = guarded_submit = None
        if write is not None:

            def guarded(offset: int, view: memoryview) -> bool:
                return offset >= head and write(offset, view)

        if submit is not None:

            def guarded_submit(
                offset: int, view: memoryview, done: DirectDone, held: Held
            ) -> bool:
                return offset >= head and submit(offset, view, done, held)

        return DirectIo(below.readinto, guarded, below.submit_read, guarded_submit)

    async def read(self, offset: int, length: int) -> bytes:  # replaced per instance
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:  # replaced per instance
        await self.child.write(offset, data)

    async def flush(self) -> None:  # replaced per instance
        await self.child.flush()

    async def block_status(self, offset: int, length: int) -> Extent:  # replaced per instance
        return await self.child.block_status(offset, length)

    async def truncate(self, size: int) -> None:
        await self.child.truncate(size)
        self.size = size

    def children(self) -> list[Node]:
        return [self.child]

    async def aclose(self) -> None:
        await self.child.aclose()
