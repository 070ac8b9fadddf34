"""A cache of metadata tables keyed by their offset in the image file, with pinning.

What lives here: :class:`TableCache`, the least-recently-used cache of tables (qcow2's L2 tables
and refcount blocks; VHDX's BAT pages and sector bitmaps) that a format node keeps so that a
mapped request costs one dictionary lookup. It knows nothing of any format: a table is any
object, loaded by a function the owner passes in. It must not do I/O of its own.

Invariants the owners rely on (no ``await`` may fall between the lines that keep them):

* A pinned table is never evicted: an owner pins a table before it changes it (over awaits),
  so that an eviction and a reload can never bring back a stale copy from the disk.
* One load per table at a time: tasks that miss the same table while it is being read wait for
  that read instead of reading it again (and racing to insert two copies).
* :attr:`TableCache.tables` is the live ordered dict. Hot paths may hold it and do the two
  dictionary operations of a hit themselves (``get``, then ``move_to_end``): a method call on
  every request costs more than the lookup (see the per-request cost in DESIGN.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class TableCache(Generic[T]):
    """Tables by file offset, least recently used first; at most ``capacity`` unpinned ones
    are kept (pinned tables may take the cache above it for as long as they are pinned)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        #: offset -> table, in order of use (the least recently used first)
        self.tables: OrderedDict[int, T] = OrderedDict()
        self._pins: dict[int, int] = {}
        self._loading: dict[int, trio.Event] = {}

    def __len__(self) -> int:
        return len(self.tables)

    def get(self, offset: int) -> T | None:
        """The cached table at ``offset`` (marked as just used), or None."""
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
        return t

    async def load(self, offset: int, read: Callable[[int], Awaitable[T]]) -> T:
        """The table at ``offset``, read with ``read(offset)`` on a miss (once, however many
        tasks miss it at the same time). :raise: whatever ``read`` raises (nothing is cached
        then, and the next caller reads again)."""
        while True:
            t = self.get(offset)
            if t is not None:
                return t
            ev = self._loading.get(offset)
            if ev is not None:
                await ev.wait()
                continue
            ev = self._loading[offset] = trio.Event()
            try:
                t = await read(offset)
                self.put(offset, t)
                return t
            finally:
                del self._loading[offset]
                ev.set()

    def put(self, offset: int, table: T) -> None:
        """Cache ``table`` (just read or just written) at ``offset``, evicting the least
        recently used unpinned tables beyond the capacity (never ``offset`` itself)."""
        tables = self.tables
        tables[offset] = table
        tables.move_to_end(offset)
        if len(tables) > self.capacity:
            pins = self._pins
            for k in list(tables):
                if len(tables) <= self.capacity:
                    break
                if k not in pins and k != offset:
                    del tables[k]

    def pop(self, offset: int) -> None:
        """Forget the table at ``offset`` (its cluster was freed)."""
        self.tables.pop(offset, None)

    def clear(self) -> None:
        """Forget every table (after tables were rewritten behind the cache). Pins stay."""
        self.tables.clear()

    def pin(self, offset: int) -> None:
        """Keep the table at ``offset`` cached until :meth:`unpin` (pins nest)."""
        self._pins[offset] = self._pins.get(offset, 0) + 1

    def unpin(self, offset: int) -> None:
        n = self._pins[offset] - 1
        if n:
            self._pins[offset] = n
        else:
            del self._pins[offset]
