"""``MNT/.control/images/NAME/stats``: an image's I/O statistics, and its histograms' settings.

Read: one JSON object, QEMU's ``query-blockstats`` names throughout --

- the export's counters (what the image file was asked: ``rd_bytes``, ``wr_operations``, ...);
- ``rd_latency_histogram``, ``wr_latency_histogram``, ``flush_latency_histogram``: QEMU's
  ``BlockLatencyHistogramInfo``, ``{"boundaries": [ns...], "bins": [counts...]}``, bin ``i``
  counting the successful requests that took ``[boundaries[i-1], boundaries[i])`` ns;
- ``nodes``: one entry per layer of the backing chain, top first (``depth`` 0), with what that
  layer's storage did (its protocol node's :class:`blockfs.nodes.base.IoCounters`): format
  metadata I/O, and reads that fall through to a backing file, show up there;
- ``direct`` (blockfs's own): ``rd_operations`` and ``wr_operations`` of those counted above
  that a FUSE reader thread answered without the event loop (:mod:`blockfs.fuseloop`).

Write (the mount's owner only): ``clear`` (every bin back to zero), or key=value words as QEMU's
``block-latency-histogram-set`` takes them: ``boundaries=10000,50000,1000000`` (ns, all three
histograms), ``boundaries-read=``, ``boundaries-write=``, ``boundaries-flush=`` (one each, over
``boundaries``). New boundaries start their histogram from zero. Everything written is checked
before anything changes; a bad write fails with EINVAL and the reason.

Anyone may read the file, so it names no host path: a layer is its file's base name (as a
commit spec may name it), never its folder, host or volume.
"""

from __future__ import annotations

import json

from blockfs.control.tree import VFile
from blockfs.errors import UsageError
from blockfs.export import (
    LATENCY_KINDS,
    MAX_LATENCY_BOUNDARIES,
    Export,
    LatencyKind,
    check_boundaries,
)
from blockfs.nodes.base import Node
from blockfs.values import parse_words, spec_text

#: the keys a write takes, and the histograms each sets ("boundaries" first: the others
#: override it for their kind, as in QEMU)
_BOUNDARY_KEYS: dict[str, tuple[LatencyKind, ...]] = {
    "boundaries": LATENCY_KINDS,
    "boundaries-read": ("rd",),
    "boundaries-write": ("wr",),
    "boundaries-flush": ("flush",),
}
#: digits of the largest boundary check_boundaries accepts (2**63 - 1)
_MAX_DIGITS = 19


class StatsFile(VFile):
    """``images/NAME/stats`` (see the module docstring). Mode 0644: writable is not private."""

    writable = True

    def __init__(self, export: Export) -> None:
        super().__init__("stats")
        self.export = export

    async def render(self) -> bytes:
        return (json.dumps(stats_document(self.export), indent=2) + "\n").encode()

    async def write(self, data: bytes) -> bytes:
        """:raise UsageError: (EINVAL) an unknown word or bad boundaries; nothing changed."""
        text = spec_text(data).strip()
        stats = self.export.stats
        if text == "clear":
            stats.clear_latency_histograms()
            return b"ok\n"
        words = parse_words(text, _BOUNDARY_KEYS)
        chosen: dict[LatencyKind, tuple[int, ...]] = {}
        for key, kinds in _BOUNDARY_KEYS.items():
            if key in words:
                boundaries = parse_boundaries(words[key], key)
                chosen.update(dict.fromkeys(kinds, boundaries))
        for kind, boundaries in chosen.items():
            stats.set_latency_boundaries((kind,), boundaries)
        return b"ok\n"


def parse_boundaries(text: str, key: str) -> tuple[int, ...]:
    """``10000,50000,1000000``: comma-separated whole numbers of ns, checked by
    :func:`blockfs.export.check_boundaries`. :raise UsageError: with a one-line reason."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if len(parts) > MAX_LATENCY_BOUNDARIES:
        raise UsageError(f"{key}: at most {MAX_LATENCY_BOUNDARIES} boundaries")
    values = []
    for p in parts:
        shown = p if len(p) <= 24 else p[:21] + "..."
        if not (p.isascii() and p.isdigit()):
            raise UsageError(f"{key}: {shown!r} is not a whole number of ns")
        if len(p) > _MAX_DIGITS:  # before int(): no conversion of a huge number
            raise UsageError(f"{key}: {shown} is not a positive number of ns below 2**63")
        values.append(int(p))
    return check_boundaries(values, key)


def stats_document(export: Export) -> dict[str, object]:
    """What the stats file shows (see the module docstring)."""
    doc: dict[str, object] = {"device": export.name}
    doc.update(export.stats.as_dict())
    doc["nodes"] = chain_io(export.root)
    doc["direct"] = {
        "rd_operations": export.direct_rd_operations,
        "wr_operations": export.direct_wr_operations,
    }
    return doc


def chain_io(root: Node) -> list[dict[str, object]]:
    """Per layer of the chain under ``root``, top first: its name, format, depth, and the
    counters of its protocol node (none for a layer without storage of its own, a view)."""
    entries: list[dict[str, object]] = []
    layer: Node | None = root
    depth = 0
    while layer is not None:
        storage = layer  # the bottom of the layer, through filters and formats (as info's)
        while children := storage.children():
            storage = children[0]
        entry: dict[str, object] = {
            "node": _base_name(layer.filename),
            "format": layer.format_name,
            "depth": depth,
            "protocol": storage.format_name,
        }
        if storage.io is not None:
            entry.update(storage.io.as_dict())
        entries.append(entry)
        layer = layer.backing
        depth += 1
    return entries


def _base_name(filename: str) -> str:
    """The last component of a path or URI (no folder, host, volume or query)."""
    return filename.partition("?")[0].rstrip("/").rpartition("/")[2] or "?"
