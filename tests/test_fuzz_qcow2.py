"""The mutation fuzzer of qcow2 headers and tables (guarantee G5): a hostile image is refused at
open with one line, or served; never a traceback, a hang, a memory blow-up or a broken CLI.

Seeds are made by qemu-img and qemu-io (v2 and v3, 512 B and 64 KiB clusters, a backing file,
internal snapshots, compressed clusters with zlib and zstd, zero clusters, refcounts of 1 and 64
bits). Hypothesis draws mutants: structural operations (header fields by name, L1/L2 entries,
refcount table and block entries, snapshot table entries and their L1 tables, header
extensions, the backing file name, compressed cluster data; see ``qcow2_mutate.py``) and byte
flips, truncation and extension. Each mutant runs in a forked child under an address-space and
a wall-clock limit (``fuzz_one.py``, which says what a failure is). ``make test`` runs a small
deterministic corpus; ``BLOCKFS_FULL=1`` runs 20,000 mutants.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import qcow2_mutate as qm
from fuzz_one import FuzzServer, Verdict, check_cli_output
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import FULL, blockfs, need_tool, qemu_img, run

#: mutants per test: (normal run, long mode)
STRUCTURAL = 20000 * 3 // 4 if FULL else 120
BYTES = 20000 // 4 if FULL else 80
#: the long mode runs for tens of minutes per test (about 10 mutants a second)
_long = pytest.mark.timeout(4 * 3600 if FULL else 300)

Mutant = tuple[str, list[qm.Op]]


# -- seeds ---------------------------------------------------------------------------------------


def _io(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run([*args, str(img)])


def make_seeds(d: Path) -> dict[str, Path]:
    """The seed images, in ``d`` beside ``base.qcow2`` (the backing file of the overlays)."""
    need_tool("qemu-img")
    need_tool("qemu-io")

    def create(name: str, size: str, *opts: str) -> Path:
        img = d / name
        qemu_img("create", "-q", "-f", "qcow2", *opts, str(img), size)
        return img

    seeds: dict[str, Path] = {}
    base = create("base.qcow2", "4M")
    _io(base, "write -P 0x11 0 1M", "write -P 0x22 2M 64k")

    img = seeds["v3-64k"] = create("v3-64k.qcow2", "4M")
    _io(img, "write -P 0xa1 0 128k", "write -P 0xa2 3M 64k", "write -z 1M 128k")
    _io(img, "write -P 0xa3 2M 64k", "write -z 2M 64k")  # zero flag over an allocated cluster

    img = seeds["v2-64k-snap"] = create("v2-64k-snap.qcow2", "4M", "-o", "compat=0.10")
    _io(img, "write -P 0xb1 0 192k", "write -P 0xb2 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(img))
    _io(img, "write -P 0xb3 64k 64k")
    qemu_img("snapshot", "-c", "s2", str(img))

    img = seeds["v3-512-snap"] = create("v3-512-snap.qcow2", "1M", "-o", "cluster_size=512")
    _io(img, "write -P 0xc1 0 4k", "write -P 0xc2 300k 2k", "write -z 600k 4k")
    qemu_img("snapshot", "-c", "first", str(img))
    _io(img, "write -P 0xc3 1k 1k")

    img = seeds["v3-512-rc1"] = create(
        "v3-512-rc1.qcow2", "1M", "-o", "cluster_size=512,refcount_bits=1"
    )
    _io(img, "write -P 0xd1 0 8k", "write -P 0xd2 512k 1k", "write -z 700k 4k")

    img = seeds["v3-64k-rc64"] = create("v3-64k-rc64.qcow2", "4M", "-o", "refcount_bits=64")
    _io(img, "write -P 0xe1 0 128k")
    qemu_img("snapshot", "-c", "s1", str(img))
    _io(img, "write -P 0xe2 0 64k")

    img = seeds["v3-64k-backing"] = create(
        "v3-64k-backing.qcow2", "4M", "-b", "base.qcow2", "-F", "qcow2"
    )
    _io(img, "write -P 0xf1 64k 64k", "write -z 2M 64k")

    img = seeds["v2-512-backing"] = create(
        "v2-512-backing.qcow2",
        "4M",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
    )
    _io(img, "write -P 0xf2 1k 2k")

    raw = d / "pattern.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    _io(raw, "write -P 0x33 0 256k", "write -P 0x44 1M 64k", fmt="raw")
    for name, opts in (
        ("v3-64k-zlib", "compression_type=zlib"),
        ("v3-512-zlib", "cluster_size=512"),
        ("v3-64k-zstd", "compression_type=zstd"),
    ):
        seeds[name] = d / f"{name}.qcow2"
        qemu_img(
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            str(raw),
            str(seeds[name]),
        )
    return seeds


# -- the harness ---------------------------------------------------------------------------------


class Fuzz:
    """Seeds, their layouts, the fork server and what the runs saw. A plain class: hypothesis
    prints a dataclass argument field by field, seeds included (megabytes)."""

    def __init__(
        self, d: Path, seeds: dict[str, bytes], layouts: dict[str, qm.Layout], server: FuzzServer
    ) -> None:
        self.dir = d
        self.seeds = seeds
        self.layouts = layouts
        self.server = server
        self.kinds: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.runs = 0
        self.seconds = 0.0
        self.slowest = 0.0
        self.peak_rss_kib = 0
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return f"Fuzz({self.dir})"

    def mutant(self, m: Mutant) -> Path:
        name, ops = m
        path = self.dir / "mutant.qcow2"
        path.write_bytes(qm.apply(self.seeds[name], self.layouts[name], ops))
        return path

    def run(self, m: Mutant, seed: int = 0, **extra: object) -> Verdict:
        path = self.mutant(m)
        v = self.server.run(path, rw_copy=self.dir / "mutant.rw.qcow2", seed=seed, **extra)
        self.runs += 1
        self.kinds[v.kind] += 1
        for n in v.notes:
            self.notes[n.split(":")[0] + (": ok" if n.endswith(": ok") else ": error")] += 1
        self.seconds += v.seconds
        self.slowest = max(self.slowest, v.seconds)
        self.peak_rss_kib = max(self.peak_rss_kib, v.maxrss_kib)
        return v

    def check(self, m: Mutant, seed: int = 0, **extra: object) -> Verdict:
        v = self.run(m, seed, **extra)
        assert v.ok, f"mutant {m!r} (seed {seed}): {v.kind}: {v.detail}"
        return v


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    d = tmp_path_factory.mktemp("fuzz")
    paths = make_seeds(d)
    seeds = {n: p.read_bytes() for n, p in paths.items()}
    layouts = {n: qm.Layout.parse(b) for n, b in seeds.items()}
    with FuzzServer() as server:
        f = Fuzz(d, seeds, layouts, server)
        yield f
    wall = time.monotonic() - f.started
    if f.runs:
        print(
            f"\nqcow2 fuzz: {f.runs} mutants in {wall:.1f} s ({f.runs / wall:.1f}/s), "
            f"slowest {f.slowest:.2f} s, peak RSS {f.peak_rss_kib // 1024} MiB; "
            f"verdicts {dict(f.kinds)}; after open {dict(f.notes)}"
        )


# -- strategies ----------------------------------------------------------------------------------

_INTERESTING = sorted(
    {0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 63, 64, 0x1FF, 0x200, 0x201, 0xFFF, 0x1000, 0xFFFF}
    | {0x10000, 0x10200, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 55) - 512}
    | {1 << 55, 1 << 56, 1 << 62, 1 << 63, (1 << 63) - 1, (1 << 64) - 1, (1 << 64) - 512}
)
_FLAGS = (0, qm.COPIED, qm.COMPRESSED, qm.COPIED | 1, 1, qm.COPIED | qm.COMPRESSED)
_DELTAS = (0, 0, 1, 8, 512, -512, 4096, 65536, -65536, 1 << 20)


def values(width: int) -> st.SearchStrategy[object]:
    top = (1 << (8 * width)) - 1
    return st.one_of(
        st.sampled_from([v & top for v in _INTERESTING]),
        st.integers(0, 72),
        st.integers(0, top),
        st.tuples(
            st.just("at"),
            st.sampled_from(qm.ANCHORS),
            st.sampled_from(_DELTAS),
            st.sampled_from(_FLAGS),
        ),
        st.tuples(st.just("orig"), st.sampled_from((-1, 1, -8, 8, 512, -512, 1 << 16, 1 << 32))),
    )


def _header_op(name: str) -> st.SearchStrategy[qm.Op]:
    width = struct.calcsize(qm.HEADER_FIELDS[name][1])
    return st.tuples(st.just("hdr"), st.just(name), values(width))


_BACKING_NAMES = st.one_of(
    st.sampled_from(
        [
            b"",
            b"base.qcow2",
            b"mutant.qcow2",
            b"mutant.rw.qcow2",
            b"missing.qcow2",
            b"\0",
            b"base.qcow2\0tail",
            b"\xff\xfe",
            b"./",
            b"v3-64k.qcow2",
            b"x" * 1023,
        ]
    ),
    st.binary(min_size=0, max_size=48),
)

_index = st.integers(0, 1 << 16)

structural_ops: st.SearchStrategy[qm.Op] = st.one_of(
    st.sampled_from(sorted(qm.HEADER_FIELDS)).flatmap(_header_op),
    st.tuples(st.just("l1"), _index, values(8)),
    st.tuples(st.just("l2"), st.integers(0, 64), _index, values(8)),
    st.tuples(st.just("rt"), _index, values(8)),
    st.tuples(st.just("rb"), st.integers(0, 8), _index, values(8)),
    st.sampled_from(sorted(qm.SNAPSHOT_FIELDS)).flatmap(
        lambda f: st.tuples(
            st.just("snap"),
            st.integers(0, 4),
            st.just(f),
            values(struct.calcsize(qm.SNAPSHOT_FIELDS[f][1] or ">B")),
        )
    ),
    st.tuples(st.just("snapl1"), st.integers(0, 4), _index, values(8)),
    st.tuples(st.just("ext"), st.integers(0, 4), st.sampled_from(("type", "len")), values(4)),
    st.tuples(st.just("backing"), _BACKING_NAMES),
    st.tuples(st.just("cdata"), _index, st.sampled_from(qm.PAYLOADS)),
)

byte_ops: st.SearchStrategy[qm.Op] = st.one_of(
    st.tuples(
        st.just("flip"),
        st.one_of(st.integers(0, 4095), st.integers(0, 1 << 22)),
        st.integers(1, 255),
    ),
    st.tuples(
        st.just("bytes"),
        st.one_of(st.integers(0, 4095), st.integers(0, 1 << 22)),
        st.binary(min_size=1, max_size=16),
    ),
    st.tuples(st.just("truncate"), st.one_of(st.integers(0, 4096), st.integers(0, 1 << 22))),
    st.tuples(st.just("extend"), st.integers(1, 1 << 20), st.integers(0, 255)),
)

SEED_NAMES = (
    "v3-64k",
    "v2-64k-snap",
    "v3-512-snap",
    "v3-512-rc1",
    "v3-64k-rc64",
    "v3-64k-backing",
    "v2-512-backing",
    "v3-64k-zlib",
    "v3-512-zlib",
    "v3-64k-zstd",
)


def mutants(ops: st.SearchStrategy[qm.Op], most: int) -> st.SearchStrategy[Mutant]:
    return st.tuples(st.sampled_from(SEED_NAMES), st.lists(ops, min_size=1, max_size=most))


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the tests -----------------------------------------------------------------------------------


def test_seeds_open_read_write_and_snapshot_cleanly(fuzz: Fuzz) -> None:
    """Unmutated seeds pass every step: the harness really reads, writes and allocates (were
    it broken, every mutant would look 'refused' and the fuzzer would prove nothing)."""
    for name in SEED_NAMES:
        v = fuzz.check((name, []), seed=7, snapshot=name != "v3-512-rc1")
        assert v.kind == "opened", (name, v)
        assert v.notes == ["read: ok", "write: ok"], (name, v.notes)
    v = fuzz.check(("v3-512-rc1", []), snapshot=True)
    assert "refcount_bits of at least 2" in v.notes[-1], v.notes


def test_harness_reports_exceptions_memory_and_time(fuzz: Fuzz) -> None:
    """A stray exception, the address-space limit and the time limit each become a failure
    verdict (the fork server survives them)."""
    path = fuzz.mutant(("v3-64k", []))
    raised = fuzz.server.run(path, probe="raise", cli=False)
    assert raised.kind == "exception" and "RuntimeError" in raised.detail
    hog = fuzz.server.run(path, probe="hog", mem=512 * 1024 * 1024, cli=False)
    assert hog.kind == "memory", hog
    hung = fuzz.server.run(path, probe="hang", timeout=1.0, cli=False)
    assert hung.kind == "timeout" and hung.seconds < 5, hung
    assert fuzz.server.run(path).ok


@_long
@_settings(STRUCTURAL)
@given(m=mutants(structural_ops, 3))
@example(m=("v3-64k", [("hdr", "l1_size", 0xFFFFFFFF)]))
def test_structural_mutants_are_refused_or_served(fuzz: Fuzz, m: Mutant) -> None:
    fuzz.check(m, seed=hash_ops(m))


@_long
@_settings(BYTES)
@given(m=mutants(st.one_of(byte_ops, structural_ops), 4))
@example(m=("v3-64k-backing", [("truncate", 0), ("backing", b"")]))  # the mutator, once
def test_byte_mutants_are_refused_or_served(fuzz: Fuzz, m: Mutant) -> None:
    fuzz.check(m, seed=hash_ops(m))


def hash_ops(m: Mutant) -> int:
    """A seed for the child's random choices, stable across runs (``hash`` of str is not)."""
    return random.Random(repr(m)).randrange(1 << 30)


#: cases the fuzzer found, kept as regressions: (id, mutant, expected) where expected is
#: "refused: WORDS" (refused at open, the message holding WORDS) or "read: WORDS" (opens, and
#: the reads end with a note holding WORDS: "ok", or the one-line error met)
FOUND: list[tuple[str, Mutant, str]] = [
    # 32 KiB of zstd that expand to 1 GiB: the read decompressed all of it (12 s, and under
    # the memory limit a MemoryError turned into "compressed cluster ... is corrupt:")
    ("zstd-bomb", ("v3-64k-zstd", [("cdata", 0, "zstd-bomb")]), "read: ok"),
    # tables pointing into other metadata opened, and the first allocation or in-place write
    # overwrote the L1 table, the refcount table or an L2 table on disk
    (
        "refblock-in-l1",
        ("v3-64k", [("rt", 0, ("at", "l1", 0, 0))]),
        "refused: refcount table entry 0 points into the L1 table",
    ),
    (
        "l2-in-refblock",
        ("v3-512-snap", [("l1", 0, ("at", "rb", 0, qm.COPIED))]),
        "refused: L1 table entry 0 points into a refcount block",
    ),
    (
        "l1-over-rt",
        ("v2-64k-snap", [("hdr", "l1_table_offset", ("at", "rt", 0, 0))]),
        "refused: the refcount table overlaps the L1 table",
    ),
    (
        "data-in-l1",
        ("v3-64k", [("l2", 0, 0, ("at", "l1", 0, qm.COPIED))]),
        "read: L2 table at",
    ),
    (
        "data-in-own-l2",
        ("v3-512-rc1", [("l2", 0, 0, ("at", "l2", 0, qm.COPIED))]),
        "read: L2 table at",
    ),
    ("snapshot-on-1-bit-refcounts", ("v3-512-rc1", []), "read: ok"),
]


@pytest.mark.parametrize(("mutant", "expected"), [c[1:] for c in FOUND], ids=[c[0] for c in FOUND])
def test_found_case_is_refused_or_served(fuzz: Fuzz, mutant: Mutant, expected: str) -> None:
    v = fuzz.check(mutant)
    assert v.seconds < 5 and v.maxrss_kib < 256 * 1024, v
    if expected.startswith("refused: "):
        assert v.kind == "refused" and expected[9:] in v.detail, v
    else:
        step, words = expected.split(": ", 1)
        assert v.kind == "opened", v
        assert any(n.startswith(step + ": ") and words in n for n in v.notes), v


def test_cli_contract_through_a_real_interpreter(fuzz: Fuzz) -> None:
    """The fork server runs ``blockfs info`` as ``python -m`` would; this runs the real thing
    on a few refused and served mutants, so the two cannot drift apart."""
    cases: list[Mutant] = [
        ("v3-64k", []),
        ("v3-64k-backing", []),
        ("v3-64k", [("hdr", "l1_size", 0xFFFFFFFF)]),
        ("v2-64k-snap", [("snap", 0, "id_str_size", 0xFFFF)]),
        ("v3-512-snap", [("truncate", 100)]),
        ("v3-64k-backing", [("backing", b"missing.qcow2")]),
    ]
    for m in cases:
        path = fuzz.mutant(m)
        res = blockfs("info", str(path), check=False, timeout=60)
        problem = check_cli_output(res.returncode, res.stdout, res.stderr)
        assert not problem, (m, problem)
