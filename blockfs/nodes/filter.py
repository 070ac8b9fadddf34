"""Filter nodes: one child, inserted above a node by a job.

A filter names every operation it passes through unchanged (``passes_through``) and implements
the others itself. :data:`NODE_OPERATIONS` is the full list; a test checks that each filter covers
every one of them, so the day an operation is added to :class:`Node`, every filter must decide
what to do with it instead of silently passing it through (which would corrupt a backup).

What a filter shows of its child (``size``, ``backing``, ``read_only``, names, limits) is read
from the child each time, never copied: a chain change below (commit drops a backing file, a
reopen makes it writable) shows through at once. Passed-through operations are the child's
bound methods, taken when the child is set (:meth:`FilterNode.set_child`), so they cost one call.

:class:`WriteNotifyFilter` tells a callback about every range written below it (after the write
landed): what a mirror or an active commit needs to re-dirty its copy bitmap.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar, overload

from blockfs.errors import BlockfsError
from blockfs.nodes.base import Limits, Node

_T = TypeVar("_T")

#: every operation of the node interface that a request or a job can call
NODE_OPERATIONS = frozenset(
    {
        "read",
        "write",
        "write_zeroes",
        "discard",
        "flush",
        "block_status",
        "truncate",
        "allocated_bytes",
        "reopen",
        "reconnect",
        "change_backing_file",
        "parent_will_change",
        "parent_settled",
        "aclose",
    }
)


#: what a filter that hooks only the writing operations (write, write_zeroes, discard,
#: truncate) passes through unchanged
WRITE_HOOK_PASSES = frozenset(
    {
        "read",
        "flush",
        "block_status",
        "allocated_bytes",
        "reopen",
        "reconnect",
        "change_backing_file",
        "parent_will_change",
        "parent_settled",
    }
)


class _FromChild(Generic[_T]):
    """An attribute of a filter that is its child's, read at every access (so it stays right
    after a chain change below). Assigning it raises: the filter has none of its own."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _FromChild[_T]: ...
    @overload
    def __get__(self, obj: FilterNode, owner: type) -> _T: ...
    def __get__(self, obj: FilterNode | None, owner: type) -> _T | _FromChild[_T]:
        if obj is None:
            return self
        value: _T = getattr(obj.child, self._name)
        return value

    def __set__(self, obj: FilterNode, value: _T) -> None:
        raise AttributeError(f"{type(obj).__name__}.{self._name} is its child's")


class FilterNode(Node):
    """Base of filters. The child's bound methods are taken when the child is set, so a
    passed-through request costs one call, as if the filter were not there."""

    passes_through: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, child: Node) -> None:
        self.set_child(child)

    def set_child(self, child: Node) -> None:
        """Put this filter above ``child`` (a graph change: the export is quiesced)."""
        self.child = child
        for name in self.passes_through:
            setattr(self, name, getattr(child, name))

    # What the filter shows is its child's, read live (see the module docstring): a filter
    # has no size, chain or name of its own, and assigning one is a bug, not a no-op.
    size = _FromChild[int]()
    read_only = _FromChild[bool]()
    # block_status answers for the child's layer, so the chain goes on below the child.
    backing = _FromChild["Node | None"]()
    filename = _FromChild[str]()
    format_name = _FromChild[str]()
    limits = _FromChild[Limits]()

    # The abstract operations, for filters that neither handle nor pass them: refusing loudly
    # beats guessing. Each instance replaces the ones it passes through.
    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} does not handle read")

    async def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not handle write")

    async def flush(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not handle flush")

    async def reopen(self, read_only: bool) -> None:
        # A filter holds no file: the mode is its child's (read live above).
        await self.child.reopen(read_only)

    def children(self) -> list[Node]:
        return [self.child]

    def debug_event(self, name: str) -> None:
        self.child.debug_event(name)

    def describe(self) -> dict[str, object]:
        return self.child.describe()

    async def aclose(self) -> None:
        await self.child.aclose()


class WriteNotifyFilter(FilterNode):
    """Calls ``notify(offset, length)`` for every range a write, write_zeroes or discard
    reached below, once the request ended (succeeded or not: a failed write may have changed
    part of the range). A copy that read the range before then is followed by a new one."""

    passes_through: ClassVar[frozenset[str]] = WRITE_HOOK_PASSES

    def __init__(self, child: Node, notify: Callable[[int, int], None]) -> None:
        super().__init__(child)
        self.notify = notify

    async def write(self, offset: int, data: bytes) -> None:
        try:
            await self.child.write(offset, data)
        finally:
            self.notify(offset, len(data))

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        try:
            await self.child.write_zeroes(offset, length, may_unmap)
        finally:
            self.notify(offset, length)

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self.child.discard(offset, length)
        finally:
            self.notify(offset, length)

    async def truncate(self, size: int) -> None:
        raise BlockfsError("cannot resize a disk while a job tracks its writes", errno=errno.EBUSY)

    async def aclose(self) -> None:
        await self.child.aclose()
