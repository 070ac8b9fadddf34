"""``MNT/.control/images/NAME/stats``: counters that move by exactly what a controlled ``dd``
asks, QEMU's latency histograms (bins, boundaries set by a write, ``clear``), bad settings
refused in one line, and per-layer counters that show where a read of a chain really went.

Image files are opened with FUSE's direct_io and ``dd`` uses O_DIRECT: the kernel sends one
request per ``dd`` block (64 KiB, below every FUSE transfer limit), no readahead, no merging.
The histogram's bin semantics are proven below FUSE, on an export whose clock the test sets.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from memnode import MemoryNode
from test_ssh import url

import blockfs.export
from blockfs.cli.jobs import write_control
from blockfs.control.stats import StatsFile, chain_io
from blockfs.errors import BlockfsError
from blockfs.export import DEFAULT_LATENCY_BOUNDARIES, MAX_LATENCY_BOUNDARIES, Export
from conftest import as_user, mount_shared, qemu_img, run

KiB, MiB = 1 << 10, 1 << 20
KINDS = ("rd", "wr", "flush")


def stats_path(m: Any, name: str = "disk0") -> Path:
    return Path(m.path, ".control", "images", name, "stats")


def dd(*args: str) -> None:
    run(["dd", *args, "status=none"])


def delta(after: dict[str, Any], before: dict[str, Any], *keys: str) -> dict[str, int]:
    return {k: after[k] - before[k] for k in keys}


def hist_sum(doc: dict[str, Any], kind: str) -> int:
    return sum(doc[f"{kind}_latency_histogram"]["bins"])


@pytest.fixture
def raw_disk(mount: Any, tmp_path: Path) -> Iterator[Any]:
    img = tmp_path / "disk0.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    yield mount(f"disk0={img},format=raw")


# -- the export's counters and histograms, through a real mount --------------------------------


def test_direct_reads_writes_and_a_flush_move_the_counters_exactly(raw_disk: Any) -> None:
    m = raw_disk
    before = m.stats("disk0")
    dd(f"if={m / 'disk0'}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct")
    mid = m.stats("disk0")
    assert delta(mid, before, "rd_operations", "rd_bytes", "wr_operations") == {
        "rd_operations": 16, "rd_bytes": MiB, "wr_operations": 0,
    }  # fmt: skip
    dd("if=/dev/zero", f"of={m / 'disk0'}", "bs=64k", "count=8", "seek=4", "oflag=direct",
       "conv=notrunc,fsync")  # fmt: skip
    after = m.stats("disk0")
    assert delta(after, mid, "wr_operations", "wr_bytes", "flush_operations", "rd_operations") == {
        "wr_operations": 8, "wr_bytes": 512 * KiB, "flush_operations": 1, "rd_operations": 0,
    }  # fmt: skip
    assert after["wr_highest_offset"] == (4 + 8) * 64 * KiB
    for kind in KINDS:
        h = after[f"{kind}_latency_histogram"]
        assert h["boundaries"] == list(DEFAULT_LATENCY_BOUNDARIES)
        assert len(h["bins"]) == len(h["boundaries"]) + 1
        # every successful request in exactly one bin
        assert hist_sum(after, kind) == after[f"{kind}_operations"], kind
    # the raw layer's file did what the export was asked (no format metadata in between)
    (node,) = after["nodes"]
    assert (node["node"], node["format"], node["depth"], node["protocol"]) == (
        "disk0.raw", "raw", 0, "file",
    )  # fmt: skip
    assert delta(node, before["nodes"][0], "rd_operations", "rd_bytes", "wr_operations",
                 "wr_bytes", "flush_operations") == {
        "rd_operations": 16, "rd_bytes": MiB, "wr_operations": 8, "wr_bytes": 512 * KiB,
        "flush_operations": 1,
    }  # fmt: skip


def test_writing_boundaries_resets_and_reshapes_the_bins(raw_disk: Any) -> None:
    m = raw_disk
    path = str(stats_path(m))
    dd(f"if={m / 'disk0'}", "of=/dev/null", "bs=64k", "count=4", "iflag=direct")
    assert write_control(path, "boundaries=10000,50000,1000000") == "ok"
    doc = m.stats("disk0")
    for kind in KINDS:
        assert doc[f"{kind}_latency_histogram"] == {
            "boundaries": [10000, 50000, 1000000], "bins": [0, 0, 0, 0],
        }  # fmt: skip
    assert doc["rd_operations"] == 4  # the counters are not the histogram's to reset

    dd(f"if={m / 'disk0'}", "of=/dev/null", "bs=64k", "count=5", "iflag=direct")
    assert hist_sum(m.stats("disk0"), "rd") == 5

    # a kind's own key wins over "boundaries", and only its histogram starts again
    dd("if=/dev/zero", f"of={m / 'disk0'}", "bs=64k", "count=2", "oflag=direct", "conv=notrunc")
    write_control(path, "boundaries=7,8,9 boundaries-write=1,2")
    doc = m.stats("disk0")
    assert doc["wr_latency_histogram"] == {"boundaries": [1, 2], "bins": [0, 0, 0]}
    assert doc["rd_latency_histogram"]["boundaries"] == [7, 8, 9]
    assert doc["flush_latency_histogram"]["boundaries"] == [7, 8, 9]
    write_control(path, "boundaries-flush=123")
    dd(f"if={m / 'disk0'}", "of=/dev/null", "bs=64k", "count=3", "iflag=direct")
    doc = m.stats("disk0")
    assert doc["flush_latency_histogram"] == {"boundaries": [123], "bins": [0, 0]}
    # no read completes in under 9 ns: all three land in the last bin
    assert doc["rd_latency_histogram"] == {"boundaries": [7, 8, 9], "bins": [0, 0, 0, 3]}

    assert write_control(path, "clear") == "ok"
    doc = m.stats("disk0")
    assert doc["rd_latency_histogram"] == {"boundaries": [7, 8, 9], "bins": [0, 0, 0, 0]}
    assert doc["wr_latency_histogram"]["boundaries"] == [1, 2]
    assert doc["rd_operations"] == 4 + 5 + 3


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("boundaries=300,200", "must increase strictly (200 after 300)"),
        ("boundaries=5,5", "must increase strictly (5 after 5)"),
        ("boundaries-read=0,10", "boundaries-read: 0 is not a positive number"),
        ("boundaries=-1", "'-1' is not a whole number of ns"),
        ("boundaries=1e6", "'1e6' is not a whole number of ns"),
        ("boundaries=10,,20", "'' is not a whole number of ns"),
        ("boundaries=", "give at least one boundary"),
        ("boundaries=" + ",".join(map(str, range(1, MAX_LATENCY_BOUNDARIES + 2))),
         f"at most {MAX_LATENCY_BOUNDARIES} boundaries"),
        ("boundaries=" + "9" * 19, "is not a positive number of ns below 2**63"),
        ("boundaries=" + "9" * 5000, "is not a positive number of ns below 2**63"),
        ("boundaries-trim=1", "unknown key 'boundaries-trim'"),
        ("reset", "'reset' is not key=value"),
    ],
)  # fmt: skip
async def test_a_bad_setting_fails_einval_with_its_reason_and_changes_nothing(
    text: str, reason: str
) -> None:
    export = Export("disk0", MemoryNode(MiB))
    export.stats.rd_bins[2] = 7
    before = export.stats.as_dict()
    with pytest.raises(BlockfsError) as err:
        # boundaries-write is good: nothing is set unless everything is
        await StatsFile(export).write(f"boundaries-write=1,2 {text}\n".encode())
    assert err.value.errno == errno.EINVAL
    assert reason in str(err.value) and "\n" not in str(err.value), str(err.value)
    after = export.stats.as_dict()
    for kind in KINDS:
        key = f"{kind}_latency_histogram"
        assert after[key] == before[key]


def test_a_bad_write_through_the_mount_is_einval_and_the_file_says_why(raw_disk: Any) -> None:
    path = str(stats_path(raw_disk))
    with pytest.raises(BlockfsError) as err:
        write_control(path, "boundaries=3,2")
    assert err.value.errno == errno.EINVAL
    assert str(err.value) == "boundaries: must increase strictly (2 after 3)"
    assert json.loads(Path(path).read_text())["rd_latency_histogram"]["boundaries"] == list(
        DEFAULT_LATENCY_BOUNDARIES
    )


def test_anyone_reads_the_stats_only_the_owner_sets_them(
    shared_dir: Path,
    other_user: Any,
) -> None:
    img = shared_dir / "disk0.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
    mnt = mount_shared(shared_dir, "mnt0", f"disk0={img},format=raw")
    path = mnt / ".control" / "images" / "disk0" / "stats"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.getuid()
    res = as_user(other_user, "cat", str(path))
    assert res.returncode == 0 and json.loads(res.stdout)["device"] == "disk0", res
    # it names no host path: a layer is its file's base name
    assert str(shared_dir) not in res.stdout
    res = as_user(other_user, "sh", "-c", f"echo clear > {path}")
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    assert write_control(str(path), "clear") == "ok"


# -- the bins, on an export whose clock the test sets -----------------------------------------


async def test_a_latency_equal_to_a_boundary_counts_in_the_bin_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU's semantics: bin i holds [boundaries[i-1], boundaries[i])."""
    export = Export("disk0", MemoryNode(MiB))
    export.stats.set_latency_boundaries(KINDS, [100, 200])
    latencies = (0, 99, 100, 199, 200, 10**12)
    # a read takes the time twice: as it starts, and as it ends
    ticks = iter([t for latency in latencies for t in (1000, 1000 + latency)])
    monkeypatch.setattr(blockfs.export, "_now", lambda: next(ticks))
    for _ in latencies:
        await export.read(0, 512)
    assert export.stats.latency_histogram("rd") == {"boundaries": [100, 200], "bins": [2, 2, 2]}
    assert export.stats.rd_total_time_ns == 0 + 99 + 100 + 199 + 200 + 10**12


async def test_failed_requests_are_not_in_the_histogram() -> None:
    disk = MemoryNode(MiB)

    async def fail(op: str, offset: int, length: int) -> None:
        raise BlockfsError("injected", errno=errno.EIO)

    disk.before = fail
    export = Export("disk0", disk)
    with pytest.raises(BlockfsError):
        await export.read(0, 512)
    with pytest.raises(BlockfsError):
        await export.write(0, b"x")
    doc = export.stats.as_dict()
    assert (doc["failed_rd_operations"], doc["failed_wr_operations"]) == (1, 1)
    assert hist_sum(doc, "rd") == hist_sum(doc, "wr") == 0


# -- per-layer counters: where a read of a chain went ------------------------------------------


def test_a_read_only_the_backing_file_holds_moves_the_backing_layer_only(
    mount: Any, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(base)])
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    m = mount(f"disk0={top},format=qcow2")
    disk = str(m / "disk0")

    def layers() -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = m.stats("disk0")["nodes"]
        return nodes

    first = layers()
    assert [(n["node"], n["format"], n["depth"], n["protocol"]) for n in first] == [
        ("top.qcow2", "qcow2", 0, "file"), ("base.qcow2", "qcow2", 1, "file"),
    ]  # fmt: skip
    dd(f"if={disk}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct")
    warm = layers()
    # The first pass also reads the backing file's L2 table; the top has none to read (its
    # L1 table, read at open, is empty), so it does no I/O at all.
    assert warm[0] == first[0]
    assert warm[1]["rd_operations"] - first[1]["rd_operations"] >= 16
    assert warm[1]["rd_bytes"] - first[1]["rd_bytes"] >= MiB

    dd(f"if={disk}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct")
    again = layers()
    assert again[0] == warm[0]
    # metadata cached now: exactly the data, one file read per 64 KiB cluster
    assert delta(again[1], warm[1], "rd_operations", "rd_bytes", "wr_operations") == {
        "rd_operations": 16, "rd_bytes": MiB, "wr_operations": 0,
    }  # fmt: skip

    # A write lands in the top layer (data and metadata); the backing file is left alone.
    dd("if=/dev/zero", f"of={disk}", "bs=64k", "count=1", "seek=32", "oflag=direct",
       "conv=notrunc,fsync")  # fmt: skip
    written = layers()
    assert written[0]["wr_bytes"] - again[0]["wr_bytes"] >= 64 * KiB
    assert written[0]["flush_operations"] > again[0]["flush_operations"]
    assert written[1] == again[1]


def test_each_layer_of_an_ssh_chain_counts_its_own_reads(
    mount: Any, sshd: Any, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(base)])
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    m = mount(f"disk0={url(sshd, top)},format=qcow2")
    text = stats_path(m).read_text()
    assert sshd.host not in text and str(tmp_path) not in text  # anyone may read it
    first = json.loads(text)["nodes"]
    assert [(n["node"], n["depth"], n["protocol"]) for n in first] == [
        ("top.qcow2", 0, "ssh"), ("base.qcow2", 1, "ssh"),
    ]  # fmt: skip
    disk = str(m / "disk0")
    dd(f"if={disk}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct")
    warm = m.stats("disk0")["nodes"]
    dd(f"if={disk}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct")
    again = m.stats("disk0")["nodes"]
    assert again[0] == warm[0] == first[0]
    assert delta(again[1], warm[1], "rd_operations", "rd_bytes") == {
        "rd_operations": 16, "rd_bytes": MiB,
    }  # fmt: skip


def test_layers_without_storage_of_their_own_show_no_counters() -> None:
    base = MemoryNode(MiB)
    entries = chain_io(MemoryNode(MiB, backing=base))
    assert [(e["format"], e["depth"], "rd_bytes" in e) for e in entries] == [
        ("memory", 0, False), ("memory", 1, False),
    ]  # fmt: skip
