"""``blockfs check`` against ``qemu-img check`` (7.2) as the oracle: on the same images both
print the same report (human and JSON, byte for byte once the file names are the same) and
exit with the same status; after ``blockfs check -r leaks|all`` qemu-img sees the image as
after its own repair, and the guest data is unchanged (``qemu-img compare``). A repair killed
at any write leaves an image qemu-img finds no worse, and a second repair completes it.

The images are small and made here with qemu-img and qemu-io, then damaged byte by byte
(refcounts raised or lowered, L2 entries pointed past the end or into metadata, ...). The CLI
runs in this process (``blockfs.cli.main.main``); a few tests run it as a command.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockfs.cli import main as cli_main
from blockfs.nodes.qcow2 import check as qcow2_check
from blockfs.nodes.qcow2.check import Fix, check_qcow2
from conftest import BLOCKFS, SHARED, need_tool, qemu_img, run

MiB = 1024 * 1024
SAMPLES = SHARED / "testdata" / "qemu-sample-images"


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_tool("qemu-img")
    need_tool("qemu-io")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> dict[str, object]:
        report: dict[str, object] = json.loads(self.out)
        return report


def ours(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``blockfs check ARGV`` in this process."""
    rc = cli_main.main(["check", *argv])
    out, err = capsys.readouterr()
    return Result(rc, out, err)


def theirs(*argv: str) -> Result:
    res = subprocess.run(["qemu-img", "check", *argv], capture_output=True, text=True)
    return Result(res.returncode, res.stdout, res.stderr)


def qemu_io(img: Path, *cmds: str, fmt: str = "qcow2", check: bool = True) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    res = subprocess.run([*args, str(img)], capture_output=True, text=True)
    if check:
        assert res.returncode == 0 and "error" not in res.stdout.lower(), res


def same_data(a: Path, b: Path) -> bool:
    return run(["qemu-img", "compare", str(a), str(b)], check=False).returncode == 0


# -- bytes of a qcow2 image ------------------------------------------------------------------


def u64(img: Path, offset: int) -> int:
    with open(img, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
        return value


def poke(img: Path, offset: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)


def poke_u64(img: Path, offset: int, value: int) -> None:
    poke(img, offset, struct.pack(">Q", value))


@dataclass
class Layout:
    cluster_bits: int
    l1_offset: int
    refcount_table: int
    refcount_order: int

    @classmethod
    def of(cls, img: Path) -> Layout:
        head = img.read_bytes()[:104]
        (version,) = struct.unpack_from(">I", head, 4)
        (cb,) = struct.unpack_from(">I", head, 20)
        l1 = struct.unpack_from(">Q", head, 40)[0]
        rt = struct.unpack_from(">Q", head, 48)[0]
        order = struct.unpack_from(">I", head, 96)[0] if version == 3 else 4
        return cls(cb, l1, rt, order)

    def l2(self, img: Path, index: int = 0) -> int:
        return u64(img, self.l1_offset + 8 * index) & 0x00FFFFFFFFFFFE00

    def _where(self, img: Path, cluster: int) -> tuple[int, int, int]:
        """(byte offset, width in bits, bit shift) of cluster's refcount."""
        width = 1 << self.refcount_order
        per = 1 << (self.cluster_bits + 3 - self.refcount_order)
        block = u64(img, self.refcount_table + 8 * (cluster // per)) & ~0x1FF
        bit = (cluster % per) * width
        return block + bit // 8, width, bit % 8

    def refcount(self, img: Path, cluster: int) -> int:
        at, width, shift = self._where(img, cluster)
        with open(img, "rb") as f:
            f.seek(at)
            raw = f.read(max(1, width // 8))
        if width >= 8:
            return int.from_bytes(raw, "big")
        return (raw[0] >> shift) & ((1 << width) - 1)

    def set_refcount(self, img: Path, cluster: int, value: int) -> None:
        at, width, shift = self._where(img, cluster)
        if width >= 8:
            poke(img, at, value.to_bytes(width // 8, "big"))
            return
        with open(img, "rb") as f:
            f.seek(at)
            byte = f.read(1)[0]
        mask = ((1 << width) - 1) << shift
        poke(img, at, bytes([(byte & ~mask) | (value << shift)]))


# -- images -----------------------------------------------------------------------------------

WRITES = ("write -P 1 0 256k", "write -P 2 1M 128k", "write -P 3 3M 64k")


def make_qcow2(
    img: Path,
    *options: str,
    writes: tuple[str, ...] = WRITES,
    snapshot: bool = False,
    size: str = "4M",
) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(img), size)
    if writes:
        qemu_io(img, *writes)
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(img))
        qemu_io(img, "write -P 5 0 64k", "write -P 6 2M 64k")
    return img


def make_compressed(img: Path, *options: str) -> Path:
    raw = img.with_suffix(".raw")
    qemu_img("create", "-q", "-f", "raw", str(raw), "4M")
    qemu_io(raw, "write -P 7 0 512k", "write -P 9 2M 256k", fmt="raw")
    qemu_img("convert", "-c", "-O", "qcow2", *options, str(raw), str(img))
    qemu_io(img, "write -P 3 1M 64k")  # one uncompressed cluster among them
    return img


def _refcount_bits(bits: int) -> Callable[[Path], Path]:
    """An image of ``bits``-bit refcounts (with a snapshot where a refcount can reach 2)."""

    def make(d: Path) -> Path:
        return make_qcow2(d / "x.qcow2", "-o", f"refcount_bits={bits}", snapshot=bits > 1)

    return make


CLEAN: dict[str, Callable[[Path], Path]] = {
    "v2": lambda d: make_qcow2(d / "x.qcow2", "-o", "compat=0.10"),
    "v2-snapshot": lambda d: make_qcow2(d / "x.qcow2", "-o", "compat=0.10", snapshot=True),
    "v3-empty": lambda d: make_qcow2(d / "x.qcow2", writes=()),
    "v3-4k-clusters": lambda d: make_qcow2(d / "x.qcow2", "-o", "cluster_size=4096"),
    "v3-compressed": lambda d: make_compressed(d / "x.qcow2"),
    "v3-snapshots": lambda d: make_qcow2(d / "x.qcow2", snapshot=True),
    "v3-prealloc": lambda d: make_qcow2(d / "x.qcow2", "-o", "preallocation=metadata"),
    **{f"v3-refcount-{bits}": _refcount_bits(bits) for bits in (1, 2, 4, 8, 16, 32, 64)},
}


@pytest.mark.parametrize("kind", sorted(CLEAN))
def test_clean_images_get_qemus_report(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = CLEAN[kind](tmp_path)
    for output in ("human", "json"):
        a = ours(capsys, "--output", output, str(img))
        b = theirs("--output", output, str(img))
        assert (a.rc, a.out) == (b.rc, b.out), (a, b)
        assert a.rc == 0 and a.err == ""


def test_persistent_bitmaps_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make_qcow2(tmp_path / "x.qcow2")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_io(img, "write -P 8 2M 64k")
    a = ours(capsys, "--output", "json", str(img))
    b = theirs("--output", "json", str(img))
    assert (a.rc, a.out) == (b.rc, b.out) == (0, b.out)


# -- damage ------------------------------------------------------------------------------------


def bump(img: Path, clusters: range | list[int], by: int = 1) -> None:
    lay = Layout.of(img)
    for c in clusters:
        lay.set_refcount(img, c, lay.refcount(img, c) + by)


def end_cluster(img: Path) -> int:
    return img.stat().st_size >> Layout.of(img).cluster_bits


def leak_unreferenced(img: Path) -> None:
    """Refcounts of 1 on clusters nothing references (a writer that grew the file and was
    killed), and on one past the file's end (not counted, as in QEMU)."""
    lay = Layout.of(img)
    n = end_cluster(img)
    os.truncate(img, (n + 3) << lay.cluster_bits)
    for c in (n, n + 1, n + 2, n + 5):
        lay.set_refcount(img, c, 1)


def leak_referenced(img: Path) -> None:
    bump(img, [5, 6], by=2)


def refcount_too_low(img: Path) -> None:
    lay = Layout.of(img)
    shared = next(c for c in range(4, end_cluster(img)) if lay.refcount(img, c) == 2)
    lay.set_refcount(img, shared, 1)


def refcount_zero(img: Path) -> None:
    lay = Layout.of(img)
    used = [c for c in range(5, end_cluster(img)) if lay.refcount(img, c) == 1]
    for c in used[:3]:
        lay.set_refcount(img, c, 0)


def l2_past_eof(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 40, (1 << 63) | (1000 << lay.cluster_bits))


def l2_into_l1(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 40, (1 << 63) | lay.l1_offset)


def l2_into_refcount_table(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 40, (1 << 63) | lay.refcount_table)


def l2_duplicate(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 40, u64(img, lay.l2(img)))


def copied_flags_wrong(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img), u64(img, lay.l2(img)) & ~(1 << 63))
    poke_u64(img, lay.l1_offset, u64(img, lay.l1_offset) & ~(1 << 63))


def unaligned_zero_cluster(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 50, (1 << 63) | (5 << lay.cluster_bits) | 0x200 | 1)


def unaligned_data_cluster(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img) + 8 * 50, (1 << 63) | (5 << lay.cluster_bits) | 0x200)


def reserved_bits(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.l2(img), u64(img, lay.l2(img)) | 2)


def refcount_block_outside(img: Path) -> None:
    lay = Layout.of(img)
    poke_u64(img, lay.refcount_table + 8, 200 << lay.cluster_bits)


def corrupt_bit(img: Path) -> None:
    leak_unreferenced(img)
    poke_u64(img, 72, u64(img, 72) | 2)


def compressed_leaks(img: Path) -> None:
    """The cluster holding the compressed data (no COPIED flag speaks of it) counts more."""
    bump(img, [5], by=2)


@dataclass(frozen=True)
class Damage:
    make: Callable[[Path], Path]
    damage: Callable[[Path], None]
    #: the guest sees the same data after the damage (and must after a repair)
    data_intact: bool = True


DAMAGE = {
    "leak-unreferenced": Damage(lambda d: make_qcow2(d / "x.qcow2"), leak_unreferenced),
    "leak-referenced": Damage(lambda d: make_qcow2(d / "x.qcow2"), leak_referenced),
    "leak-compressed": Damage(lambda d: make_compressed(d / "x.qcow2"), compressed_leaks),
    "leak-refcount-2": Damage(
        lambda d: make_qcow2(d / "x.qcow2", "-o", "refcount_bits=2", snapshot=True),
        leak_unreferenced,
    ),
    "leak-refcount-64": Damage(
        lambda d: make_qcow2(d / "x.qcow2", "-o", "refcount_bits=64", snapshot=True),
        leak_referenced,
    ),
    "leak-v2": Damage(
        lambda d: make_qcow2(d / "x.qcow2", "-o", "compat=0.10", snapshot=True),
        leak_referenced,
    ),
    "refcount-too-low": Damage(
        lambda d: make_qcow2(d / "x.qcow2", snapshot=True), refcount_too_low
    ),
    "refcount-zero": Damage(lambda d: make_qcow2(d / "x.qcow2", snapshot=True), refcount_zero),
    "refcount-zero-refcount-1": Damage(
        lambda d: make_qcow2(d / "x.qcow2", "-o", "refcount_bits=1"), refcount_zero
    ),
    "l2-past-eof": Damage(lambda d: make_qcow2(d / "x.qcow2"), l2_past_eof, data_intact=False),
    "l2-into-l1": Damage(lambda d: make_qcow2(d / "x.qcow2"), l2_into_l1, data_intact=False),
    "l2-into-refcount-table": Damage(
        lambda d: make_qcow2(d / "x.qcow2"), l2_into_refcount_table, data_intact=False
    ),
    "l2-duplicate": Damage(lambda d: make_qcow2(d / "x.qcow2"), l2_duplicate, data_intact=False),
    "copied-flags": Damage(lambda d: make_qcow2(d / "x.qcow2"), copied_flags_wrong),
    "unaligned-zero-cluster": Damage(
        lambda d: make_qcow2(d / "x.qcow2"), unaligned_zero_cluster, data_intact=False
    ),
    "unaligned-data-cluster": Damage(
        lambda d: make_qcow2(d / "x.qcow2"), unaligned_data_cluster, data_intact=False
    ),
    "reserved-bits": Damage(lambda d: make_qcow2(d / "x.qcow2"), reserved_bits),
    "refcount-block-outside": Damage(lambda d: make_qcow2(d / "x.qcow2"), refcount_block_outside),
    "corrupt-bit": Damage(lambda d: make_qcow2(d / "x.qcow2"), corrupt_bit),
}

MODES = {"check": (), "leaks": ("-r", "leaks"), "all": ("-r", "all")}


def copies(img: Path, *names: str) -> list[Path]:
    """Copies of ``img`` under the same name, each in a folder of its own."""
    out = []
    for name in names:
        (img.parent / name).mkdir()
        out.append(Path(shutil.copy(img, img.parent / name / img.name)))
    return out


def in_dir(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The file's name, from its folder made the working one (reports name it so)."""
    monkeypatch.chdir(path.parent)
    return path.name


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_reported_and_repaired_as_qemu_does(
    kind: str,
    mode: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = DAMAGE[kind]
    img = spec.make(tmp_path)
    pristine = Path(shutil.copy(img, tmp_path / "pristine.qcow2"))
    spec.damage(img)
    mine, qemus = copies(img, "mine", "qemus")
    name = in_dir(mine, monkeypatch)
    a = ours(capsys, "--output", "json", *MODES[mode], name)
    b = theirs("--output", "json", *MODES[mode], str(qemus))
    b_out = b.out.replace(str(qemus), name)
    assert (a.rc, a.out) == (b.rc, b_out), (a, b)
    assert "Traceback" not in a.err
    if a.rc == 1:
        assert a.err.strip().splitlines()[-1].startswith("blockfs: ")
    if mode == "check":
        return
    after_a = theirs("--output", "json", str(mine))
    after_b = theirs("--output", "json", str(qemus))
    assert (after_a.rc, after_a.out.replace(str(mine), "X")) == (
        after_b.rc,
        after_b.out.replace(str(qemus), "X"),
    )
    if after_b.rc == 0:  # (qemu-img cannot read an image left with misaligned entries)
        assert same_data(mine, qemus)
    if spec.data_intact:
        assert same_data(pristine, mine)


@pytest.mark.parametrize("kind", ["leak-referenced", "refcount-too-low", "refcount-zero"])
def test_human_report_and_findings_are_qemus(
    kind: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = DAMAGE[kind]
    img = spec.make(tmp_path)
    spec.damage(img)
    for mode in ((), ("-r", "all")):
        mine, qemus = copies(img, f"mine{len(mode)}", f"qemus{len(mode)}")
        a = ours(capsys, *mode, in_dir(mine, monkeypatch))
        b = theirs(*mode, str(qemus))
        assert (a.rc, a.out) == (b.rc, b.out)
        assert a.err == b.err  # the findings, line by line


@pytest.mark.parametrize("damage", ["reserved", "unaligned"])
def test_broken_refcount_table_is_rebuilt_where_qemu_gives_up(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refcount table entry with reserved bits set or not cluster aligned: qemu-img 7.2's
    rebuild refuses to put the new block where the old, broken entry points (and fails with
    "Check failed"); here the old entry's cluster is left alone until the switch, so the
    rebuild completes."""
    img = make_qcow2(tmp_path / "x.qcow2", snapshot=True)
    pristine = Path(shutil.copy(img, tmp_path / "pristine.qcow2"))
    lay = Layout.of(img)
    entry = u64(img, lay.refcount_table)
    poke_u64(img, lay.refcount_table, entry | (1 if damage == "reserved" else 0x200))
    before = ours(capsys, "--output", "json", str(img))
    assert before.json() == theirs("--output", "json", str(img)).json()
    assert ours(capsys, "-r", "all", str(img)).rc == 0
    assert theirs(str(img)).rc == 0
    assert same_data(pristine, img)


# -- dirty images: lazy refcounts, a writer killed ---------------------------------------------


def killed_lazy_writer(img: Path, snapshot: bool = False) -> Path:
    make_qcow2(img, "-o", "lazy_refcounts=on", snapshot=snapshot)
    qemu_io(img, "write -P 4 512k 192k", "write -P 5 2M 64k", "abort", check=False)
    assert dirty(img)
    return img


def dirty(img: Path) -> bool:
    flag: bool = json.loads(qemu_img("info", "--output=json", str(img)).stdout)["dirty-flag"]
    return flag


@pytest.mark.parametrize("snapshot", [False, True], ids=["plain", "snapshot"])
def test_dirty_lazy_refcounts_are_rebuilt_and_the_bit_cleared(
    snapshot: bool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = killed_lazy_writer(tmp_path / "x.qcow2", snapshot)
    mine, qemus = copies(img, "mine", "qemus")
    # without the rebuild nothing can be done: both stop, and say why
    a = ours(capsys, "-r", "leaks", str(mine))
    b = theirs("-r", "leaks", str(qemus))
    assert a.rc == b.rc == 1 and a.out == b.out == ""
    assert "ERROR need to rebuild refcount structures" in a.err
    assert a.err.strip().splitlines()[-1].startswith("blockfs: ")
    assert dirty(mine)  # (qemu-img's close clears it, though the refcounts stay wrong)
    name = in_dir(mine, monkeypatch)
    a = ours(capsys, "-r", "all", "--output", "json", name)
    b = theirs("-r", "all", "--output", "json", str(qemus))
    assert (a.rc, a.out) == (b.rc, b.out.replace(str(qemus), name)) == (0, a.out)
    assert "Rebuilding refcount structure" in a.err
    assert not dirty(mine)
    assert theirs(str(mine)).rc == 0
    assert same_data(mine, qemus)


def test_blockfs_writer_killed_leaves_leaks_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blockfs process killed while writing (its reservations and compressed area taken,
    not given back) leaves leaked clusters, which both checks see and -r leaks frees."""
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    script = (
        "import os, sys, trio\n"
        "from blockfs.nodes.registry import open_image\n"
        "async def main():\n"
        "    node = await open_image(sys.argv[1])\n"
        "    await node.write(0, b'\\x11' * 65536)\n"
        "    await node.write(8 << 20, b'\\x22' * 131072)\n"
        "    await node.write_compressed(4 << 20, b'\\x33' * 65536)\n"
        "    os._exit(0)\n"
        "trio.run(main)\n"
    )
    run([sys.executable, "-c", script, str(img)])
    a = ours(capsys, "--output", "json", str(img))
    b = theirs("--output", "json", str(img))
    assert (a.rc, a.out) == (b.rc, b.out)
    assert a.rc == 3 and a.json()["leaks"]
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", str(img), str(expected))
    assert ours(capsys, "-r", "leaks", str(img)).rc == 0
    assert theirs(str(img)).rc == 0
    assert same_data(img, expected)


# -- a repair killed at any write ----------------------------------------------------------------


class _Killed(Exception):
    pass


@pytest.mark.parametrize(
    "kind,before",
    [
        ("leak-unreferenced", 3),
        ("leak-compressed", 3),
        ("refcount-too-low", 2),
        ("refcount-zero", 2),
        ("dirty", 2),
    ],
)
@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
def test_repair_killed_at_any_write_leaves_an_image_no_worse(
    kind: str,
    before: int,
    torn: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kill the repair before its n-th write (or in the middle of it: ``torn``), for every n:
    qemu-img then finds what it found before or less (never a check that cannot complete, never
    a corruption where there were only leaks), and a repair run again finishes the job with
    the guest data unchanged."""
    if kind == "dirty":
        img = killed_lazy_writer(tmp_path / "x.qcow2", snapshot=True)
        pristine = tmp_path / "pristine.raw"
        qemu_img("convert", "-O", "raw", str(img), str(pristine))
    else:
        spec = DAMAGE[kind]
        img = spec.make(tmp_path)
        pristine = Path(shutil.copy(img, tmp_path / "pristine.qcow2"))
        spec.damage(img)
    assert theirs(str(img)).rc == before
    allowed = {0, 3} if before == 3 else {0, 2, 3}
    real_write = qcow2_check._FileIo.write
    kill_at = 0
    while True:
        work = Path(shutil.copy(img, tmp_path / "work.qcow2"))
        writes = 0

        def write(
            self: qcow2_check._FileIo, offset: int, data: bytes, kill_at: int = kill_at
        ) -> None:
            nonlocal writes
            if writes == kill_at:
                if torn and len(data) > 1:
                    real_write(self, offset, data[: len(data) // 2])
                raise _Killed
            writes += 1
            real_write(self, offset, data)

        monkeypatch.setattr(qcow2_check._FileIo, "write", write)
        fd = os.open(work, os.O_RDWR)
        try:
            check_qcow2(fd, str(work), Fix.LEAKS | Fix.ERRORS)
            finished = True
        except _Killed:
            finished = False
        finally:
            os.close(fd)
        monkeypatch.setattr(qcow2_check._FileIo, "write", real_write)
        assert theirs(str(work)).rc in allowed, f"killed before write {kill_at}"
        fd = os.open(work, os.O_RDWR)
        try:
            check_qcow2(fd, str(work), Fix.LEAKS | Fix.ERRORS)
        finally:
            os.close(fd)
        assert theirs(str(work)).rc == 0, f"killed before write {kill_at}"
        assert same_data(pristine, work)
        if finished:
            break
        kill_at += 1
    assert kill_at > 0


# -- VHDX -------------------------------------------------------------------------------------


def bat_offset(img: Path) -> int:
    raw = img.read_bytes()[192 * 1024 : 256 * 1024]
    count = struct.unpack_from("<I", raw, 8)[0]
    bat_guid = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")
    for i in range(count):
        guid, offset, _, _ = struct.unpack_from("<16sQII", raw, 16 + 32 * i)
        if guid == bat_guid:
            return int(offset)
    raise AssertionError("no BAT region")


def make_vhdx(img: Path, *options: str, size: str = "64M") -> Path:
    qemu_img("create", "-q", "-f", "vhdx", *options, str(img), size)
    qemu_io(img, "write -P 1 0 3M", "write -P 2 40M 1M", fmt="vhdx")
    return img


def bat_entry(img: Path, index: int, value: int) -> None:
    poke(img, bat_offset(img) + 8 * index, struct.pack("<Q", value))


VHDX = {
    "dynamic": lambda img: None,
    "past-eof": lambda img: bat_entry(img, 5, (4000 << 20) | 6),
    "end-past-eof": lambda img: bat_entry(img, 6, ((img.stat().st_size >> 20) - 1 << 20) | 6),
    "into-bat": lambda img: bat_entry(img, 7, bat_offset(img) | 6),
    "into-log": lambda img: bat_entry(img, 7, (1 << 20) | 6),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", sorted(VHDX))
def test_vhdx_is_reported_as_qemu_does(
    kind: str,
    mode: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = make_vhdx(tmp_path / "x.vhdx")
    VHDX[kind](img)
    mine, qemus = copies(img, "mine", "qemus")
    name = in_dir(mine, monkeypatch)
    for output in ("json", "human"):
        a = ours(capsys, "--output", output, *MODES[mode], name)
        b = theirs("--output", output, *MODES[mode], str(qemus))
        assert (a.rc, a.out) == (b.rc, b.out.replace(str(qemus), name))
        assert a.err.replace("qemu-img: ", "") == b.err.replace("qemu-img: ", "")


def test_fixed_vhdx_is_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "x.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "subformat=fixed", str(img), "8M")
    a = ours(capsys, "--output", "json", str(img))
    assert (a.rc, a.out) == (0, theirs("--output", "json", str(img)).out)


def test_vhdx_with_4k_sectors_qemu_cannot_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "x.vhdx"
    assert (
        cli_main.main(["create", "-f", "vhdx", "-o", "logical_sector_size=4096", str(img), "8M"])
        == 0
    )
    a = ours(capsys, "--output", "json", str(img))
    assert a.rc == 0 and a.json()["check-errors"] == 0


def sample(name: str, tmp_path: Path) -> Path:
    src = SAMPLES / f"{name}.vhdx.bz2"
    if not src.exists():
        pytest.skip(f"{src} is absent (the shared QEMU sample images are not mounted)")
    out = tmp_path / f"{name}.vhdx"
    size = 0
    with bz2.open(src) as f, open(out, "wb") as dst:
        while chunk := f.read(MiB):
            if chunk.count(0) == len(chunk):
                dst.seek(len(chunk), os.SEEK_CUR)  # sparse: the samples are mostly zeroes
            else:
                dst.write(chunk)
            size += len(chunk)
        dst.truncate(size)
    return out


@pytest.mark.parametrize("name", ["iotest-dynamic-1G", "test-disk2vhd"])
def test_vhdx_samples_are_clean(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    img = sample(name, tmp_path)
    arg = in_dir(img, monkeypatch)
    a = ours(capsys, "--output", "json", arg)
    b = theirs("--output", "json", arg)
    assert (a.rc, a.out) == (b.rc, b.out) == (0, b.out)


@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_vhdx_log_is_replayed_by_a_repair_only(
    repair: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img = sample("iotest-dirtylog-10G-4M", tmp_path)
    mine, qemus = copies(img, "mine", "qemus")
    a = ours(capsys, str(mine))
    assert a.rc == theirs(str(qemus)).rc == 1
    assert a.out == "" and len(a.err.splitlines()) == 1
    assert "blockfs check -r all" in a.err
    for output in ("human", "json"):
        mine, qemus = copies(img, f"mine-{output}", f"qemus-{output}")
        name = in_dir(mine, monkeypatch)
        a = ours(capsys, "--output", output, "-r", repair, name)
        b = theirs("--output", output, "-r", repair, str(qemus))
        assert (a.rc, a.out) == (b.rc, b.out.replace(str(qemus), name))
        assert a.rc == 0
        assert theirs(str(mine)).rc == 0
        assert same_data(mine, qemus)


# -- what is not an image to check --------------------------------------------------------------


def one_line_error(a: Result, rc: int, *words: str) -> None:
    assert a.rc == rc and a.out == ""
    lines = a.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockfs: "), a.err
    for w in words:
        assert w in lines[0]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.qcow2"
    one_line_error(ours(capsys, str(missing)), theirs(str(missing)).rc, "no such file")


def test_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(ours(capsys, str(tmp_path)), theirs(str(tmp_path)).rc, "directory")


def test_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(ours(capsys, str(fifo)), 1, "FIFO")


@pytest.mark.parametrize("kind", ["raw", "garbage", "empty"])
def test_formats_without_checks(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "x.img"
    if kind == "raw":
        qemu_img("create", "-q", "-f", "raw", str(img), "1M")
    else:
        img.write_bytes(os.urandom(10000) if kind == "garbage" else b"")
    b = theirs(str(img))
    assert b.rc == 63
    one_line_error(ours(capsys, str(img)), 63, "does not support checks")
    one_line_error(ours(capsys, "-r", "all", str(img)), 63)


def hostile_l1_size(img: Path) -> None:
    poke(img, 36, struct.pack(">I", 0x7FFFFFFF))


def hostile_refcount_table(img: Path) -> None:
    poke(img, 56, struct.pack(">I", 0x7FFFFFFF))


def hostile_snapshots(img: Path) -> None:
    """Many snapshots whose L1 tables all claim the whole file, over and over."""
    lay = Layout.of(img)
    entry = struct.pack(">QIHHIIQII", lay.l1_offset, 1 << 18, 1, 1, 0, 0, 0, 0, 0) + b"1a"
    entry += bytes(-len(entry) % 8)
    end = img.stat().st_size
    count = 4096
    poke(img, end, entry * count)
    poke(img, 60, struct.pack(">IQ", count, end))


def truncated(img: Path) -> None:
    os.truncate(img, 100)


@pytest.mark.parametrize(
    "damage,words",
    [
        (hostile_l1_size, "L1 table of 2147483647 entries"),
        (hostile_refcount_table, "refcount table of 2147483647 clusters"),
        (hostile_snapshots, "L1 tables claim more than the file holds"),
        (truncated, "truncated"),
    ],
)
def test_hostile_headers_are_one_line_errors(
    damage: Callable[[Path], None], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = make_qcow2(tmp_path / "x.qcow2", writes=("write -P 1 0 3M",), size="64M")
    damage(img)
    before = img.read_bytes()
    one_line_error(ours(capsys, str(img)), 1, words)
    one_line_error(ours(capsys, "-r", "all", str(img)), 1, words)
    assert img.read_bytes() == before


def test_many_l1_entries_naming_one_l2_table_cost_one_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every L1 entry of a 16 GiB disk points to the same L2 table, whose every entry points
    to the same cluster: QEMU walks the table once per entry, this check once (and counts the
    same)."""
    img = make_qcow2(tmp_path / "x.qcow2", writes=("write 0 64k",), size="16G")
    lay = Layout.of(img)
    l1e = u64(img, lay.l1_offset)
    l2 = lay.l2(img)
    poke(img, lay.l1_offset, struct.pack(">Q", l1e) * 32)
    poke(img, l2, struct.pack(">Q", u64(img, l2)) * 8192)
    a = ours(capsys, "--output", "json", str(img))
    b = theirs("--output", "json", str(img))
    assert (a.rc, a.out) == (b.rc, b.out) == (2, b.out)


def test_refused_while_a_writer_has_it_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = make_qcow2(tmp_path / "x.qcow2")
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # qemu-io has the image open (and locked) once it answered a write; a check before
        # that would hold the lock that makes qemu-io's open fail
        proc.stdin.write(b"write -P 1 0 4k\n")
        proc.stdin.flush()
        assert b"wrote" in proc.stdout.readline()
        one_line_error(ours(capsys, str(img)), 1, "writes this image")
        one_line_error(ours(capsys, "-r", "leaks", str(img)), 1, "writes this image")
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


# -- progress, and the command itself ------------------------------------------------------------


def test_progress_goes_to_stderr_and_leaves_the_report_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("blockfs.cli.progress")
    img = make_qcow2(tmp_path / "x.qcow2", snapshot=True)
    leak_referenced(img)
    plain = ours(capsys, "--output", "json", str(Path(shutil.copy(img, tmp_path / "y.qcow2"))))
    a = ours(capsys, "--output", "json", "-p", str(img))
    assert (a.rc, a.out.replace("x.qcow2", "y.qcow2")) == (plain.rc, plain.out)
    assert "Checking" in a.err
    a = ours(capsys, "-p", "-r", "all", str(img))
    assert a.rc == 0 and "Repairing" in a.err


def test_check_is_a_blockfs_command(tmp_path: Path) -> None:
    img = make_qcow2(tmp_path / "x.qcow2")
    leak_unreferenced(img)
    res = run([*BLOCKFS, "check", "--output", "json", str(img)], check=False)
    assert res.returncode == 3, res.stderr
    assert json.loads(res.stdout)["leaks"] == 3
    res = run([*BLOCKFS, "check", str(tmp_path / "missing")], check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(4096))
    res = run([*BLOCKFS, "check", str(raw)], check=False)
    assert res.returncode == 63 and res.stderr.count("\n") == 1
    res = run([*BLOCKFS, "check", "--help"], check=False)
    assert res.returncode == 0 and "-r {leaks,all}" in res.stdout and "example" in res.stdout
    assert stat.S_ISREG(img.stat().st_mode)
