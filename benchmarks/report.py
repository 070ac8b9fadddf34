"""The results: one :class:`Line` per figure, shown as a table, saved as JSON, drawn as a chart.

Most lines have two sides, blockfs and qemu (qemu-storage-daemon), and the ratio blockfs/qemu.
The ssh lines have a third, sshfs, and the raw fio lines a third, floor (the thinnest pyfuse3
file system, :mod:`benchmarks.floorfs`), with a second ratio, blockfs/sshfs or blockfs/floor:
they get tables of their own and two bars each in the chart."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

#: the sides a line may have beside blockfs and qemu (one at most)
THIRD_SIDES = ("sshfs", "floor")


@dataclass
class Line:
    """One figure on each side (blockfs, qemu; sshfs or floor too on some). A side's samples are
    one per round; the median is reported. A side without samples is "n/a" and ``notes`` say
    why."""

    name: str
    unit: str
    better: str  # "higher" or "lower"
    samples: dict[str, list[float]] = field(default_factory=lambda: {"blockfs": [], "qemu": []})
    notes: dict[str, str] = field(default_factory=dict)

    def value(self, side: str) -> float | None:
        s = self.samples.get(side)
        return statistics.median(s) if s else None

    @property
    def third(self) -> str | None:
        """The line's third side, if any: sshfs (the ssh lines) or floor (the thinnest pyfuse3
        file system, on the raw lines)."""
        for side in THIRD_SIDES:
            if side in self.samples:
                return side
        return None

    def ratio_to(self, side: str) -> float | None:
        """blockfs / ``side``."""
        b, q = self.value("blockfs"), self.value(side)
        if b is None or q is None or q == 0:
            return None
        return b / q

    @property
    def ratio(self) -> float | None:
        return self.ratio_to("qemu")

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "unit": self.unit,
            "blockfs": _round(self.value("blockfs")),
            "qemu": _round(self.value("qemu")),
        }
        third = self.third
        if third:
            d[third] = _round(self.value(third))
        d["ratio"] = _round(self.ratio, 3)
        if third:
            d[f"ratio_{third}"] = _round(self.ratio_to(third), 3)
        d["better"] = self.better
        if any(len(v) > 1 for v in self.samples.values()):
            d["samples"] = {side: [_round(x) for x in v] for side, v in self.samples.items()}
        if self.notes:
            d["notes"] = dict(self.notes)
        return d


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None:
        return None
    return float(f"{v:.{digits}g}") if abs(v) < 10**digits else round(v, 1)


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _rows(lines: list[Line], third: str | None) -> list[tuple[str, ...]]:
    """The header and a row per line: name, unit, the sides' figures, the ratios, better."""
    sides = ("blockfs", "qemu", third) if third else ("blockfs", "qemu")
    if third:
        head: tuple[str, ...] = (
            "line", "unit", "blockfs", "qemu", third, "b/qemu", f"b/{third}", "better",
        )  # fmt: skip
    else:
        head = ("line", "unit", "blockfs", "qemu", "ratio", "better")
    rows = [head]
    for ln in lines:
        ratios = (ln.ratio, ln.ratio_to(third)) if third else (ln.ratio,)
        rows.append(
            (
                ln.name,
                ln.unit,
                *(_fmt(ln.value(side)) for side in sides),
                *(_ratio(r) for r in ratios),
                ln.better,
            )
        )
    return rows


def _groups(lines: list[Line]) -> list[tuple[list[Line], str | None]]:
    """The two-sided lines, then those with a floor side, then the ssh lines (with sshfs):
    each group that has lines."""
    groups: list[tuple[list[Line], str | None]] = []
    for third in (None, "floor", "sshfs"):
        group = [ln for ln in lines if ln.third == third]
        if group:
            groups.append((group, third))
    return groups


def table(lines: list[Line]) -> str:
    """The terminal table (the lines with a floor side, and the ssh lines with sshfs, in tables
    of their own), with one footnote per "n/a" reason."""
    out: list[str] = []
    for group, third in _groups(lines):
        rows = _rows(group, third)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        if out:
            out.append("")
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(row[2:-1], widths[2:-1], strict=True)]
            cells.append(row[-1])
            out.append("  ".join(cells))
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
    reasons = sorted({f"{side}: {why}" for ln in lines for side, why in ln.notes.items()})
    if reasons:
        out.append("")
        out.extend(f"n/a: {r}" for r in reasons)
    return "\n".join(out)


def markdown_table(lines: list[Line]) -> str:
    out: list[str] = []
    for group, third in _groups(lines):
        rows = _rows(group, third)
        if out:
            out.append("")
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|---|---|" + "--:|" * (len(rows[0]) - 3) + "---|")
        out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
    return "\n".join(out)


def write_json(
    path: str, machine: dict[str, object], config: dict[str, object], lines: list[Line]
) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"machine": machine, "config": config, "results": [ln.as_dict() for ln in lines]}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> tuple[dict[str, object], dict[str, object], list[Line]]:
    """A results file written by :func:`write_json`, back as lines (the medians as samples)."""
    with open(path) as f:
        doc = json.load(f)
    lines = []
    for r in doc["results"]:
        ln = Line(r["name"], r["unit"], r["better"], notes=dict(r.get("notes", {})))
        for third in THIRD_SIDES:
            if third in r:
                ln.samples[third] = []
        for side in ln.samples:
            if r[side] is not None:
                ln.samples[side].append(r[side])
        lines.append(ln)
    return doc["machine"], doc.get("config", {}), lines


def chart_title(machine: dict[str, object], config: dict[str, object]) -> str:
    qemu_version = str(machine.get("qemu", "?")).split()[0]
    size = int(config.get("size", 0)) >> 20  # type: ignore[call-overload]
    return (
        f"blockfs / qemu-storage-daemon {qemu_version}, {size} MiB images, "
        f"{config.get('rounds')} round(s), {config.get('date')}\n"
        f"{machine.get('cpu')}, {machine.get('cores')} cores, kernel {machine.get('kernel')}"
    )


def write_chart(path: str, lines: list[Line], title: str) -> None:
    """A horizontal bar per line: the ratio blockfs/qemu on a log scale, green where blockfs is
        at least as good as qemu, red where it is worse; "n/a" lines keep their row, without a bar.
        An ssh line has two rows: blockfs/qemu and blockfs/sshfs; a line with a floor side,
    blockfs/qemu and blockfs/floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, Line, float | None]] = []
    for ln in lines:
        third = ln.third
        if third:
            rows.append((f"{ln.name} ({ln.unit}) / qemu", ln, ln.ratio))
            rows.append((f"{ln.name} ({ln.unit}) / {third}", ln, ln.ratio_to(third)))
        else:
            rows.append((f"{ln.name} ({ln.unit})", ln, ln.ratio))
    names = [name for name, _, _ in rows]
    ratios = [r for _, _, r in rows]
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.8))
    ys = list(range(len(rows)))[::-1]
    for y, (_, ln, r) in zip(ys, rows, strict=True):
        if r is None:
            ax.text(1.0, y, "  n/a", va="center", fontsize=7, color="grey")
            continue
        good = r >= 1.0 if ln.better == "higher" else r <= 1.0
        # bars grow from 1.0 (parity), left for "blockfs has less", right for "more"
        ax.barh(y, r - 1.0, left=1.0, color="#3a9a4a" if good else "#c8453a", height=0.7)
        ax.text(r, y, f" {r:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    present = [r for r in ratios if r]
    lo = min([*present, 1.0]) / 1.6
    hi = max([*present, 1.0]) * 1.8
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16) if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel(
        "ratio blockfs / qemu-storage-daemon, or / sshfs or / floor where a row says so (log "
        "scale; "
        "green = blockfs as good or better, red = worse)",
        fontsize=8,
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
