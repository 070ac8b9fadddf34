"""Writing the VHDX metadata log (MS-VHDX 2.3): every change of a BAT or sector bitmap sector is
appended to the log before the file's own copy of that sector is touched.

What lives here: :class:`LogWriter`, which knows the ring, the sequence numbers and tails, which
sectors are logged but not yet written in place (:attr:`LogWriter.dirty`), and the checkpoints
that write them. It does not know what the sectors mean (the node builds their images from its
tables), nor the failsafe: the node passes in its guarded metadata write, its guarded flush and
its header update, so that a failure of any of them stops the node. No I/O of its own beyond
those three.

The protocol (a group commit, so that an allocating write costs one log append, no flush):

1. Under :attr:`LogWriter.lock` the node builds the new images of the sectors it changes,
   :meth:`LogWriter.append` writes them as one log entry (a write to the file, not flushed), and
   the node then changes its tables in memory (no ``await`` in between). The images stay in
   :attr:`LogWriter.dirty`; the node reads metadata from the file through them.
2. :meth:`LogWriter.flush` (a guest's flush) flushes the file, which makes every entry written
   before it durable, and then writes the images of durable entries in place (not flushed:
   the next flush makes them durable, and only then does the tail move past their entries).
3. When the next entry would not fit before the end of the log region, or on a clean close, a
   checkpoint: flush, write every image in place, flush; then a header update gives the log a
   new GUID (every old entry becomes invalid, so the ring may start again from its beginning)
   or, on close, clears it (the log is empty).

Invariants (a kill, or a power loss, at any instant leaves a log that replays to a state that
some prefix of the changes made):

* Write-ahead: a sector is written in place only after a flush that began after the entry
  holding its image was written (``PendingSector.latest <= _durable``).
* Tail: each entry names as its tail the oldest entry of this log whose in-place writes are not
  known durable (all of them completed before a flush began); replaying from the tail onwards
  restores every change whose in-place copy may have been lost.
* Within one log GUID entries never wrap: each lies after the one before it, so no entry a
  replay may need is ever overwritten. Sequence numbers rise by one per entry.
* A new log GUID is set (header update, flushed) before the first entry written with it, and
  only when every earlier entry's changes are durable in place; the GUID is cleared only then.
* One append, checkpoint or in-place pass at a time (``lock``); the node holds the lock from
  building an entry's images until it has changed its tables, so images are built from a
  state that already holds every earlier entry.

Each in-place write is announced with the event the node gave its image (``bat_update``,
``bitmap_update``); each entry with ``log_write``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from blockfs.nodes.vhdx.format import ZERO_GUID, MiB
from blockfs.nodes.vhdx.log import SECTOR, DataUpdate, descriptor_sectors, encode_entry

#: most data sectors one entry carries (a caller splits bigger changes): 64 sectors and their
#: descriptor sector are 260 KiB, well inside the smallest log (1 MiB)
MAX_ENTRY_UPDATES = 64

WriteFn = Callable[[str, int, bytes], Awaitable[None]]
FlushFn = Callable[[], Awaitable[None]]
GuidFn = Callable[[uuid.UUID], Awaitable[None]]


@dataclass(slots=True)
class PendingSector:
    """A sector logged but not yet written in place."""

    first: int  # the oldest entry whose change of this sector is not yet in place
    latest: int  # the entry that holds ``image``
    image: bytes  # the sector as the latest entry left it
    event: str  # what its in-place write is announced as


@dataclass(frozen=True, slots=True)
class LoggedSector:
    """One sector for :meth:`LogWriter.append`: its new image, and the event its in-place
    write is announced with."""

    event: str
    update: DataUpdate


class LogWriter:
    """The writing side of one image's log region (see the module docstring)."""

    def __init__(
        self,
        log_offset: int,
        log_length: int,
        file_size: Callable[[], int],
        *,
        write: WriteFn,
        flush: FlushFn,
        set_log_guid: GuidFn,
    ) -> None:
        self._log_offset = log_offset
        self._ring = log_length
        self._write = write
        self._flush = flush
        self._set_log_guid = set_log_guid
        self._file_size = file_size
        #: held from building an entry's images until the tables hold the change
        self.lock = trio.Lock()
        #: file offset -> the sector logged but not yet in place (the node reads through these)
        self.dirty: dict[int, PendingSector] = {}
        self._guid: uuid.UUID | None = None
        self._head = 0  # ring offset of the next entry
        self._next_seq = 1
        #: (sequence number, ring offset) of this log's entries that are not yet clean
        self._entries: list[tuple[int, int]] = []
        self._durable = 0  # entries up to this one are durable in the log
        self._clean = 0  # entries up to this one are durable in place too
        #: the file size known durable (the FlushedFileOffset of new entries)
        self._flushed_size = file_size()

    async def append(self, sectors: Sequence[LoggedSector]) -> None:
        """Write one entry carrying ``sectors`` (at most :data:`MAX_ENTRY_UPDATES`). The
        caller holds :attr:`lock`, and changes its tables in memory right after this returns.

        :raise BlockfsError: a write or flush failed (the caller's failsafe stopped the node).
        """
        assert self.lock.locked() and 0 < len(sectors) <= MAX_ENTRY_UPDATES
        length = (descriptor_sectors(len(sectors)) + len(sectors)) * SECTOR
        if self._guid is None:
            await self._begin()
        elif self._head + length > self._ring:
            await self._checkpoint()
            await self._begin()
        assert self._guid is not None
        seq = self._next_seq
        raw = encode_entry(
            sequence_number=seq,
            tail=self._tail(),
            log_guid=self._guid,
            flushed_file_offset=self._flushed_size // MiB * MiB,
            last_file_offset=-(-self._file_size() // MiB) * MiB,
            updates=[s.update for s in sectors],
        )
        await self._write("log_write", self._log_offset + self._head, raw)
        # The entry is in the file: from here on no await until the caller's tables hold it.
        self._entries.append((seq, self._head))
        self._head += len(raw)
        self._next_seq = seq + 1
        dirty = self.dirty
        for s in sectors:
            old = dirty.get(s.update.file_offset)
            dirty[s.update.file_offset] = PendingSector(
                seq if old is None else old.first, seq, s.update.data, s.event
            )

    async def flush(self) -> None:
        """Make every entry written so far durable (and with it everything written to the file
        before), then write the images of durable entries in place."""
        last, applied = self._next_seq - 1, self._applied()
        size = self._file_size()
        await self._flush()
        self._flushed(last, applied, size)
        if self.dirty:
            async with self.lock:
                await self._write_in_place(self._durable)

    async def close(self) -> None:
        """Empty the log at a clean close: every change durable in place, then the log GUID
        cleared. Nothing to do when no entry was written since the log was last emptied."""
        async with self.lock:
            if self._guid is None:
                return
            await self._checkpoint()
            await self._set_log_guid(ZERO_GUID)
            self._guid = None
            self._head = 0

    # -- internals ------------------------------------------------------------------------------

    def _tail(self) -> int:
        """Ring offset of the oldest entry not yet durable in place, or of the entry about to
        be written when there is none."""
        for seq, pos in self._entries:
            if seq > self._clean:
                return pos
        return self._head

    def _applied(self) -> int:
        """Entries up to this one have every change written in place."""
        if not self.dirty:
            return self._next_seq - 1
        return min(d.first for d in self.dirty.values()) - 1

    def _flushed(self, last: int, applied: int, size: int) -> None:
        """A flush that began when ``last`` was the newest entry, ``applied`` the newest entry
        written in place and the file ``size`` bytes long has completed."""
        self._durable = max(self._durable, last)
        self._clean = max(self._clean, applied)
        self._flushed_size = max(self._flushed_size, size)
        clean = self._clean
        self._entries = [(s, p) for s, p in self._entries if s > clean]

    async def _write_in_place(self, upto: int) -> None:
        """Write the dirty sectors whose images entries up to ``upto`` hold (durable ones), in
        file order, adjacent sectors of one kind in one write. Caller holds :attr:`lock`."""
        ready = sorted(off for off, d in self.dirty.items() if d.latest <= upto)
        i = 0
        while i < len(ready):
            start = ready[i]
            event = self.dirty[start].event
            parts = [self.dirty[start].image]
            j = i + 1
            while (
                j < len(ready)
                and ready[j] == start + SECTOR * (j - i)
                and self.dirty[ready[j]].event == event
            ):
                parts.append(self.dirty[ready[j]].image)
                j += 1
            await self._write(event, start, b"".join(parts))
            for off in ready[i:j]:
                del self.dirty[off]
            i = j

    async def _checkpoint(self) -> None:
        """Every entry durable, every image in place and durable. Caller holds :attr:`lock`."""
        last, applied = self._next_seq - 1, self._applied()
        size = self._file_size()
        await self._flush()
        self._flushed(last, applied, size)
        await self._write_in_place(self._durable)
        assert not self.dirty
        last, applied = self._next_seq - 1, self._applied()
        await self._flush()
        self._flushed(last, applied, size)

    async def _begin(self) -> None:
        """A new log GUID: entries of any earlier one are no longer valid, the ring starts over.
        Only when no change is pending in place (at the first entry, after a checkpoint)."""
        assert not self.dirty
        guid = uuid.uuid4()
        await self._set_log_guid(guid)
        self._guid = guid
        self._head = 0
        self._entries.clear()
