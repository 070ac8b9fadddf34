"""Progress of a long command as people expect it, on stderr: :func:`progress`.

Three modes, chosen once per call: on a terminal a live rich line (label, bar, done/total,
rate, ETA); anywhere else plain lines, at most one every :data:`PLAIN_INTERVAL` seconds and a
last one at the end, so a log or a pipe is not flooded (``qemu-img -p`` does not flood either);
and nothing at all when disabled. The amounts, rates and durations are spelled by the helpers
here, which ``blockfs job watch`` shares (:class:`RateMeter`, :func:`format_amount`, ...).

rich is imported only inside the function that draws with it: a command that shows no bar
(``blockfs --help``, ``blockfs mount``) does not pay for the import.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console

#: the least time between two plain lines
PLAIN_INTERVAL = 1.0
#: the least time between two redraws of the rich line: a caller may report after every
#: request (measured: a redraw 0.34 ms, a call between redraws 0.2 us)
_RICH_INTERVAL = 0.1
#: the columns a rich line keeps for its figures (``512.0 MiB/1.0 GiB  85.3 MiB/s  ETA
#: 0:00:09`` and wider); the bar and the label share the rest
_FIGURES_WIDTH = 50
#: how far back a rate looks: long enough to smooth bursts, short enough to follow a change
#: of speed (a job's ``speed=``) within seconds
RATE_WINDOW = 10.0

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def format_amount(n: float, unit: str = "bytes") -> str:
    """``n`` for a person: bytes in binary units (``1.5 GiB``, as ``blockfs info`` shows
    sizes), any other unit as a count (``12 clusters``)."""
    if unit != "bytes":
        return f"{n:.0f} {unit}"
    if n < 1024:
        return f"{n:.0f} B"
    for name in _BINARY_UNITS:
        n /= 1024
        if n < 1024 or name == _BINARY_UNITS[-1]:
            return f"{n:.1f} {name}"
    raise AssertionError("unreachable")


def format_rate(rate: float | None, unit: str = "bytes") -> str:
    """A rate (per second) for a person; ``?`` while it is not known yet."""
    return "? /s" if rate is None else f"{format_amount(rate, unit)}/s"


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss``, or ``-:--:--`` for a duration not known."""
    if seconds is None:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RateMeter:
    """How fast a count grows: the slope of the samples of the last ``window`` seconds.

    A count that goes down (a job that started over) forgets the samples before it.
    """

    __slots__ = ("window", "_samples")

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        samples = self._samples
        if samples and done < samples[-1][1]:
            samples.clear()
        samples.append((now, done))
        # keep one sample older than the window, so the slope spans all of it
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    def rate(self) -> float | None:
        """Units per second, or None before two samples some time apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more units are done at the current rate."""
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        return remaining / rate if rate else None


def _ignore(done: int) -> None:
    pass


@contextmanager
def progress(
    label: str, total: int, enabled: bool = True, unit: str = "bytes"
) -> Iterator[Callable[[int], None]]:
    """Show the progress of a piece of work of ``total`` units on stderr; the context gives
    ``update(done)``, to call with the amount done so far (not an increment) as often as is
    convenient: calls are cheap, and what is drawn is rate-limited here.

    ``update`` may be called from any thread (the trio thread, a worker thread); it draws in
    the thread that calls it, at most every 0.1 s on a terminal and every
    :data:`PLAIN_INTERVAL` elsewhere, and never blocks for long (a write to stderr). The last
    state is drawn when the context exits, also when it exits with an exception.
    """
    if not enabled:
        yield _ignore
        return
    stream = sys.stderr
    if stream.isatty():
        from rich.console import Console

        with rich_progress(label, total, unit, Console(file=stream)) as update:
            yield update
    else:
        with plain_progress(label, total, unit, stream) as update:
            yield update


@contextmanager
def plain_progress(
    label: str, total: int, unit: str, stream: TextIO, *, interval: float = PLAIN_INTERVAL
) -> Iterator[Callable[[int], None]]:
    """:func:`progress` where no terminal is: a line at most every ``interval`` seconds, and
    one at the end with the time taken."""
    start = said = time.monotonic()
    latest = 0
    meter = RateMeter()
    lock = threading.Lock()

    def line(done: int, tail: str) -> str:
        pct = f" ({100 * done / total:.1f}%)" if total > 0 else ""
        amounts = f"{format_amount(done, unit)} / {format_amount(total, unit)}"
        return f"{label}: {amounts}{pct}, {tail}\n"

    def update(done: int) -> None:
        nonlocal latest, said
        now = time.monotonic()
        with lock:
            latest = done
            meter.add(now, done)
            if now - said < interval or done >= total:
                return  # the end has its own line
            said = now
            eta = format_duration(meter.eta(total - done))
            stream.write(line(done, f"{format_rate(meter.rate(), unit)}, ETA {eta}"))
            stream.flush()

    try:
        yield update
    finally:
        with lock:
            elapsed = time.monotonic() - start
            mean = latest / elapsed if elapsed > 0 else None
            stream.write(line(latest, f"{format_rate(mean, unit)}, in {format_duration(elapsed)}"))
            stream.flush()


@contextmanager
def rich_progress(
    label: str, total: int, unit: str, console: Console
) -> Iterator[Callable[[int], None]]:
    """:func:`progress` on a terminal: one live line drawn by rich on ``console`` (tests hand
    one that writes to a buffer)."""
    from rich.progress import BarColumn, Progress, TextColumn

    meter = RateMeter()
    told = 0.0  # when rich was last told
    latest = 0

    start = time.monotonic()

    def figures(done: int, *, end: bool = False) -> str:
        amounts = f"{format_amount(done, unit)}/{format_amount(total, unit)}"
        if end:  # what stays on the screen: the mean rate and the time taken
            elapsed = time.monotonic() - start
            mean = done / elapsed if elapsed > 0 else None
            return f"{amounts}  {format_rate(mean, unit)}  in {format_duration(elapsed)}"
        eta = format_duration(meter.eta(total - done))
        return f"{amounts}  {format_rate(meter.rate(), unit)}  ETA {eta}"

    # On a narrow terminal rich would shorten every column alike; here the bar gives way
    # (down to half the room, or 10), then the head of the label (its end names the file).
    room = console.width - _FIGURES_WIDTH - 2
    bar_width = max(10, min(20, room // 2), min(40, room - len(label)))
    if len(label) > room - bar_width:
        label = "…" + label[len(label) - max(room - bar_width - 1, 0) :]
    bars = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=bar_width),
        TextColumn("{task.fields[figures]}", markup=False),
        console=console,
        # drawn by the thread that reports, when it reports: no thread of rich's own, and
        # nothing on the line that could change between reports
        auto_refresh=False,
    )
    with bars:
        task = bars.add_task(label, total=max(total, 0), figures=figures(0))

        def update(done: int) -> None:
            nonlocal told, latest
            latest = done
            now = time.monotonic()
            if now - told < _RICH_INTERVAL and done < total:
                return
            told = now
            meter.add(now, done)
            bars.update(task, completed=done, figures=figures(done))
            bars.refresh()

        try:
            yield update
        finally:
            bars.update(task, completed=latest, figures=figures(latest, end=True))
            bars.refresh()
