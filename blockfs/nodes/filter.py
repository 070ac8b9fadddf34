"""Filter nodes: one child, inserted above a node by a job.

A filter names every operation it passes through unchanged (``passes_through``) and implements
the others itself. :data:`NODE_OPERATIONS` is the full list; a test checks that each filter covers
every one of them, so the day an operation is added to :class:`Node`, every filter must decide
what to do with it instead of silently passing it through (which would corrupt a backup).
"""

from __future__ import annotations

from typing import ClassVar

from blockfs.nodes.base import Node

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
        "aclose",
    }
)


class FilterNode(Node):
    """Base of filters. The child's bound methods are taken once, so a passed-through request
    costs one call, as if the filter were not there."""

    passes_through: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, child: Node) -> None:
        self.child = child
        self.size = child.size
        self.read_only = child.read_only
        self.filename = child.filename
        self.format_name = child.format_name
        self.limits = child.limits
        # block_status answers for the child's layer, so the chain goes on below the child.
        self.backing = child.backing
        for name in self.passes_through:
            setattr(self, name, getattr(child, name))

    # The abstract operations, for filters that neither handle nor pass them: refusing loudly
    # beats guessing. Each instance replaces the ones it passes through.
    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} does not handle read")

    async def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not handle write")

    async def flush(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not handle flush")

    def children(self) -> list[Node]:
        return [self.child]

    def debug_event(self, name: str) -> None:
        self.child.debug_event(name)

    def describe(self) -> dict[str, object]:
        return self.child.describe()

    async def aclose(self) -> None:
        await self.child.aclose()
