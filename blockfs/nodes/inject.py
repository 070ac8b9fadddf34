"""The error-injection filter: fail chosen requests to the node below, as QEMU's blkdebug does.

Placed between a format node and its protocol node (image spec ``inject=on``), it fails the Nth
read, write or flush (or any request), once or always, with EIO or ENOSPC; a rule may wait for a
named *event* that the format node announces through :meth:`Node.debug_event` right before one
of its metadata writes (:data:`EVENTS` for qcow2, :data:`VHDX_EVENTS` for vhdx), so that "the L2 entry write" or "the refcount table
growth" can be made to fail exactly. Rules are given at run time, one per line of text in the
words of :func:`parse_rule` (``MNT/.control/images/NAME/inject``).

Rule life: a rule without an event is armed at once; one with an event is armed when the event
is announced. An armed rule counts the requests it matches; the ``nth`` one fails, and with
``once=off`` so does every matching request after it. A fired ``once`` rule is spent (shown,
never fires again); ``clear`` removes every rule. With ``land=on`` the failed request is carried
out first and only then reported failed: what a layer above sees when it cannot know whether
its write reached the disk (a write-back error reported late), the case a failsafe is for.

This module must not know FUSE or the control tree. The filter exists only where asked for, so
the normal data path pays nothing for it.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import ClassVar

from blockfs.errors import BlockfsError, UsageError
from blockfs.nodes.base import Node
from blockfs.nodes.filter import FilterNode
from blockfs.values import bool_value, parse_words, spec_text

log = logging.getLogger(__name__)

#: events the qcow2 node announces, each right before a metadata write of that kind
EVENTS = frozenset(
    {
        "header_update",  # a field of the image header (refcount table pointer, autoclear)
        "l1_update",  # an L1 entry (a new or copied L2 table goes live)
        "l2_alloc",  # the contents of a new (or copied) L2 table
        "l2_update",  # L2 entries (a write, zero or discard changes a mapping)
        "refblock_update",  # refcount entries in an existing refcount block
        "refblock_alloc",  # the contents of a new refcount block
        "reftable_update",  # a refcount table entry (a new refcount block goes live)
        "reftable_grow",  # a new, bigger refcount table (before the header points to it)
        "cluster_alloc",  # guest data into newly allocated clusters (data, not metadata)
    }
)
#: events the vhdx node announces (besides ``header_update``: a header's GUIDs)
VHDX_EVENTS = frozenset(
    {
        "log_write",  # a metadata log entry (BAT and sector bitmap changes, before any in place)
        "bat_update",  # BAT sectors written in place, once their log entry is durable
        "bitmap_update",  # sector bitmap sectors written in place, likewise
        "metadata_update",  # metadata table and items (parent locator) in place, likewise
        "block_alloc",  # guest data into a newly allocated payload block (data, not metadata)
    }
)
KNOWN_EVENTS = EVENTS | VHDX_EVENTS
#: what a rule can match: ``write`` covers write and write_zeroes; ``any`` every request
OPS = ("read", "write", "flush", "discard", "any")
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}
RULE_KEYS = ("op", "event", "errno", "nth", "once", "land")
#: at most this many rules at once (they are checked in turn on every request)
MAX_RULES = 64
MAX_NTH = 1_000_000_000


@dataclass(slots=True)
class InjectRule:
    """One rule and its counters."""

    op: str = "any"
    event: str | None = None
    errno_name: str = "EIO"
    nth: int = 1
    once: bool = True
    #: the request is carried out, then reported failed
    land: bool = False
    armed: bool = False
    #: matching requests counted since the rule was armed
    seen: int = 0
    #: requests this rule failed
    fired: int = 0
    spent: bool = False

    def matches(self, op: str) -> bool:
        return self.armed and (self.op == op or self.op == "any")

    def text(self) -> str:
        """The rule in the words it was written in (with every default spelled out)."""
        event = f" event={self.event}" if self.event else ""
        once = "on" if self.once else "off"
        land = " land=on" if self.land else ""
        return f"op={self.op}{event} errno={self.errno_name} nth={self.nth} once={once}{land}"

    def as_dict(self) -> dict[str, object]:
        state = "spent" if self.spent else "armed" if self.armed else "waiting"
        return {
            "rule": self.text(),
            "state": state,
            "seen": self.seen,
            "fired": self.fired,
        }


def parse_rule(text: bytes | str) -> InjectRule:
    """``op=write event=l2_update errno=EIO nth=1 once=on`` (every key optional; defaults
    ``op=any``, no event, ``errno=EIO``, ``nth=1``, ``once=on``, ``land=off``).

    :raise UsageError: an unknown key, a repeated key or a bad value (one line).
    """
    words = parse_words(text, RULE_KEYS)
    op = words.get("op", "any")
    if op not in OPS:
        raise UsageError(f"op={op[:40]}: expected one of {', '.join(OPS)}")
    event = words.get("event")
    if event is not None and event not in KNOWN_EVENTS:
        raise UsageError(f"event={event[:40]}: expected one of {', '.join(sorted(KNOWN_EVENTS))}")
    name = words.get("errno", "EIO").upper()
    if name not in ERRNOS:
        raise UsageError(f"errno={name[:40]}: expected one of {', '.join(ERRNOS)}")
    raw_nth = words.get("nth", "1")
    if not raw_nth.isascii() or not raw_nth.isdigit() or len(raw_nth) > 10:
        raise UsageError(f"nth={raw_nth[:40]}: expected a whole number from 1")
    nth = int(raw_nth)
    if not 1 <= nth <= MAX_NTH:
        raise UsageError(f"nth={nth}: expected a number from 1 to {MAX_NTH}")
    once = bool_value(words, "once", True)
    land = bool_value(words, "land", False)
    return InjectRule(
        op=op, event=event, errno_name=name, nth=nth, once=once, land=land, armed=not event
    )


class InjectFilter(FilterNode):
    """Fails requests to its child as its rules say; otherwise passes them on unchanged."""

    passes_through: ClassVar[frozenset[str]] = frozenset(
        {"block_status", "allocated_bytes", "reopen", "reconnect", "change_backing_file",
         "parent_will_change", "parent_settled", "aclose"}
    )

    def __init__(self, child: Node) -> None:
        super().__init__(child)
        self.rules: list[InjectRule] = []

    # The format node reads its child's size as the file grows: always the child's.
    @property
    def size(self) -> int:
        return self.child.size

    @size.setter
    def size(self, value: int) -> None:
        pass  # FilterNode.__init__ copies the size; the child's stays the truth

    # -- rules --------------------------------------------------------------------------------

    def apply(self, text: bytes | str) -> str:
        """Act on what was written to the control file: lines that are each a rule or
        ``clear``, all taken or none. Returns one line per rule added.

        :raise UsageError: a bad rule (naming its line when there are several), or too many.
        """
        text = spec_text(text, "rules")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise UsageError("empty rule (write key=value words, or clear)")
        todo: list[InjectRule | None] = []  # None: clear
        for i, line in enumerate(lines, 1):
            try:
                todo.append(None if line == "clear" else parse_rule(line))
            except UsageError as exc:
                raise UsageError(f"line {i}: {exc}" if len(lines) > 1 else str(exc)) from None
        count = len(self.rules)
        for item in todo:
            count = 0 if item is None else count + 1
            if count > MAX_RULES:
                raise UsageError(f"at most {MAX_RULES} rules; write 'clear' first")
        answer = []
        for item in todo:
            if item is None:
                self.rules.clear()
                log.info("inject %s: rules cleared", self.filename)
                answer.append("cleared")
            else:
                self.rules.append(item)
                log.info("inject %s: rule %d: %s", self.filename, len(self.rules), item.text())
                answer.append(f"rule {len(self.rules)}: {item.text()}")
        return "".join(a + "\n" for a in answer)

    def describe_rules(self) -> list[dict[str, object]]:
        return [r.as_dict() for r in self.rules]

    def debug_event(self, name: str) -> None:
        for rule in self.rules:
            if rule.event == name and not rule.armed and not rule.spent:
                rule.armed = True
                rule.seen = 0
        self.child.debug_event(name)

    def _check(self, op: str, offset: int, length: int) -> BlockfsError | None:
        """Count the request against every armed rule; raise for the first that fires, or
        return the error to raise once the request is done if that rule says ``land=on``."""
        fire: InjectRule | None = None
        for rule in self.rules:
            if rule.matches(op):
                rule.seen += 1
                if fire is None and rule.seen >= rule.nth:
                    fire = rule
        if fire is None:
            return None
        fire.fired += 1
        if fire.once:
            fire.armed = False
            fire.spent = True
        where = f" at {offset}+{length}" if length else ""
        msg = f"{self.filename}: injected {fire.errno_name} on {op}{where} ({fire.text()})"
        log.warning("%s", msg)
        exc = BlockfsError(msg, errno=ERRNOS[fire.errno_name])
        if fire.land:
            return exc
        raise exc

    # -- the operations -----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if self.rules and (late := self._check("read", offset, length)) is not None:
            await self.child.read(offset, length)
            raise late
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        if self.rules and (late := self._check("write", offset, len(data))) is not None:
            await self.child.write(offset, data)
            raise late
        await self.child.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        if self.rules and (late := self._check("write", offset, length)) is not None:
            await self.child.write_zeroes(offset, length, may_unmap)
            raise late
        await self.child.write_zeroes(offset, length, may_unmap)

    async def discard(self, offset: int, length: int) -> None:
        if self.rules and (late := self._check("discard", offset, length)) is not None:
            await self.child.discard(offset, length)
            raise late
        await self.child.discard(offset, length)

    async def flush(self) -> None:
        if self.rules and (late := self._check("flush", 0, 0)) is not None:
            await self.child.flush()
            raise late
        await self.child.flush()

    async def truncate(self, size: int) -> None:
        if self.rules and (late := self._check("write", size, 0)) is not None:
            await self.child.truncate(size)
            raise late
        await self.child.truncate(size)


def find_inject_filter(node: Node) -> InjectFilter | None:
    """The injection filter among the nodes ``node`` owns (not its backing chain), if any."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, InjectFilter):
            return n
        stack.extend(n.children())
    return None
