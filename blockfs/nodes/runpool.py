"""Connections shared by the remote nodes of one trio run: one ssh connection per server and
credentials, one libgfapi instance per volume, whatever number of images use it.

A resource is made at the first :meth:`RunPool.acquire` of its key, counted by its users, and
closed when the last one releases it. The pool lives in a :class:`trio.lowlevel.RunVar`: what it
holds is watched by that run's tasks (a relay's pipes, a worker thread's completions), so a
second ``trio.run`` in the same process (a CLI command after another) starts empty.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

import trio


class Shared(Protocol):
    users: int

    async def ensure(self) -> Any:
        """Make the resource usable (connect); raise if it cannot be."""

    def close(self) -> None:
        """Let it go (called once the last user released it)."""


R = TypeVar("R", bound=Shared)


class RunPool(Generic[R]):
    def __init__(self, name: str) -> None:
        self._var: trio.lowlevel.RunVar[dict[Hashable, R]] = trio.lowlevel.RunVar(name)

    def _map(self) -> dict[Hashable, R]:
        try:
            return self._var.get()
        except LookupError:
            found: dict[Hashable, R] = {}
            self._var.set(found)
            return found

    async def acquire(self, key: Hashable, make: Callable[[], R]) -> R:
        """The resource of ``key`` (made by ``make()`` if there is none), ensured, with one
        more user. :raise: what ``ensure`` raises (the user is not counted then)."""
        found = self._map()
        res = found.get(key)
        if res is None:
            res = found[key] = make()
        res.users += 1
        try:
            await res.ensure()
        except BaseException:
            self.release(key, res)
            raise
        return res

    def release(self, key: Hashable, res: R) -> None:
        """One user fewer; the last one closes it."""
        res.users -= 1
        if res.users <= 0:
            found = self._map()
            if found.get(key) is res:
                del found[key]
            res.close()
