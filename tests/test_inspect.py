"""``blockfs info`` and ``blockfs map`` against qemu-img's on a matrix of images made by qemu-img.

The oracle is qemu-img 7.2 itself: ``info --output json`` must be equal for every key both
report once the ``blockfs`` key (what only blockfs knows) is removed, and ``map --output json``
must be equal byte for byte. VHDX is the documented exception of each: QEMU 7.2 gives VHDX no
``format-specific`` and no block status (it maps every byte as data), so there blockfs's map is
judged by reading the image: every range it calls zero reads as zeroes through qemu-io, and
every data range reads, through the file at the offset it names, what qemu-io reads.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import BLOCKFS, REPO, SHARED, blockfs, qemu_img, run

MiB = 1 << 20
SAMPLES = SHARED / "testdata" / "qemu-sample-images"


def qio(img: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run([*args, str(img)])


def _raw(d: Path) -> Path:
    img = d / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "8M")
    qio(img, "write -P 0x11 0 64k", "write -P 0x22 3M 1M", fmt="raw")
    return img


def _qcow2(*opts: str, writes: tuple[str, ...] = ("write -P 0x33 0 64k", "write -P 0x44 5M 192k"),
           ) -> Callable[[Path], Path]:  # fmt: skip
    def make(d: Path) -> Path:
        img = d / "disk.qcow2"
        args = ["create", "-q", "-f", "qcow2"]
        for o in opts:
            args += ["-o", o]
        qemu_img(*args, str(img), "16M")
        if writes:
            qio(img, *writes)
        return img

    return make


def _compressed(d: Path) -> Path:
    src = _raw(d)
    img = d / "comp.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(img))
    return img


def _snapshots(d: Path) -> Path:
    img = _qcow2()(d)
    qemu_img("snapshot", "-c", "first", str(img))
    qio(img, "write -P 0x55 0 128k")
    qemu_img("snapshot", "-c", "second", str(img))
    return img


def _bitmaps(d: Path) -> Path:
    img = _qcow2()(d)
    qemu_img("bitmap", "--add", str(img), "bm0")
    qemu_img("bitmap", "--add", "-g", "128K", str(img), "bm1")
    qemu_img("bitmap", "--disable", str(img), "bm1")
    return img


def _chain3(d: Path) -> Path:
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    qio(base, "write -P 1 0 4M")
    mid = d / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    qio(mid, "write -P 2 1M 1M", "write -z 3M 64k")
    top = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    qio(top, "write -P 3 1536k 64k", "write -P 4 12M 64k")
    return top


def _raw_base_chain(d: Path) -> Path:
    base = _raw(d)
    top = d / "over-raw.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top), "12M")
    qio(top, "write -P 9 2M 128k")
    return top


IMAGES: dict[str, Callable[[Path], Path]] = {
    "raw": _raw,
    "qcow2-v2": _qcow2("compat=0.10"),
    **{f"qcow2-refcount{b}": _qcow2(f"refcount_bits={b}") for b in (1, 2, 4, 8, 16, 32, 64)},
    "qcow2-4k-clusters": _qcow2("cluster_size=4096"),
    "qcow2-lazy": _qcow2("lazy_refcounts=on"),
    "qcow2-prealloc-metadata": _qcow2("preallocation=metadata", writes=()),
    "qcow2-zero-clusters": _qcow2(writes=("write -P 7 0 1M", "write -z 256k 128k")),
    "qcow2-compressed": _compressed,
    "qcow2-snapshots": _snapshots,
    "qcow2-bitmaps": _bitmaps,
    "qcow2-chain3": _chain3,
    "qcow2-over-raw": _raw_base_chain,
}


def _vhdx(subformat: str, block: str = "1M") -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        img = d / "disk.vhdx"
        qemu_img("create", "-q", "-f", "vhdx", "-o", f"subformat={subformat},block_size={block}",
                 str(img), "24M")  # fmt: skip
        qio(img, "write -P 0x66 0 64k", "write -P 0x77 9M 2M", fmt="vhdx")
        return img

    return make


VHDX: dict[str, Callable[[Path], Path]] = {
    "vhdx-dynamic": _vhdx("dynamic"),
    "vhdx-fixed": _vhdx("fixed"),
    "vhdx-dynamic-8m": _vhdx("dynamic", "8M"),
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tool(tool: str, *args: str, img: Path) -> subprocess.CompletedProcess[str]:
    """``tool`` (qemu-img or blockfs) run in the image's folder with its name as given: both
    name the image as given (``filename``)."""
    cmd = ["qemu-img"] if tool == "qemu" else [*BLOCKFS]
    res = subprocess.run([*cmd, *args, img.name], cwd=img.parent, capture_output=True,
                         text=True, timeout=60, env=_env())  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def _info(tool: str, img: Path, *extra: str) -> object:
    return json.loads(_tool(tool, "info", "--output=json", *extra, img=img).stdout)


def _without_blockfs(doc: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in doc.items() if k != "blockfs"}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_info_and_map_equal_qemu_img(kind: str, tmp_path: Path) -> None:
    img = IMAGES[kind](tmp_path)
    ours = _info("blockfs", img, "--backing-chain")
    theirs = _info("qemu", img, "--backing-chain")
    assert isinstance(ours, list) and isinstance(theirs, list)
    assert [_without_blockfs(d) for d in ours] == theirs
    # one layer: the same as the first of the chain
    assert _without_blockfs(_info("blockfs", img)) == theirs[0]  # type: ignore[arg-type]
    assert all(isinstance(d["blockfs"], dict) for d in ours)

    json_map = _tool("blockfs", "map", "--output=json", img=img).stdout
    assert json_map == _tool("qemu", "map", "--output=json", img=img).stdout
    human = _tool("blockfs", "map", img=img).stdout
    if kind == "qcow2-compressed":  # qemu-img map gives up on them; blockfs names them
        assert "compressed" in human
    else:
        assert human == _tool("qemu", "map", img=img).stdout


def test_human_info_reads_as_qemu_img_s(tmp_path: Path) -> None:
    """The human form: the lines qemu-img prints, for a chain with snapshots and bitmaps."""
    img = _snapshots(tmp_path)
    qemu_img("bitmap", "--add", str(img), "bm0")
    ours = _tool("blockfs", "info", img=img).stdout
    assert ours.rstrip("\n") == _tool("qemu", "info", img=img).stdout.rstrip("\n")


@pytest.mark.parametrize("kind", sorted(VHDX))
def test_vhdx_info_and_map(kind: str, tmp_path: Path) -> None:
    img = VHDX[kind](tmp_path)
    ours = _info("blockfs", img)
    theirs = _info("qemu", img)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    spec = ours.pop("format-specific")
    assert _without_blockfs(ours) == theirs
    assert spec["type"] == "vhdx"
    data = spec["data"]
    assert data["type"] == kind.split("-")[1]
    assert data["block-size"] == (8 if kind.endswith("8m") else 1) * MiB
    assert (data["logical-sector-size"], data["log-state"]) == (512, "clean")
    for key in ("virtual-disk-id", "data-write-guid", "file-write-guid"):
        assert len(data[key]) == 36
    check_map_by_reading(img, "vhdx")


def check_map_by_reading(img: Path, fmt: str) -> None:
    """Every claim of ``blockfs map`` holds when the image is read by qemu-io: zero ranges
    read as zeroes; a data range reads from the file at its offset what qemu-io reads."""
    entries = json.loads(_tool("blockfs", "map", "--output=json", img=img).stdout)
    assert entries[0]["start"] == 0
    for a, b in itertools.pairwise(entries):
        assert a["start"] + a["length"] == b["start"]
    size = json.loads(qemu_img("info", "--output=json", str(img)).stdout)["virtual-size"]
    assert entries[-1]["start"] + entries[-1]["length"] == size
    raw = img.parent / "whole.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", str(img), str(raw))
    guest = raw.read_bytes()
    host = img.read_bytes()
    data_seen = 0
    for e in entries:
        part = guest[e["start"] : e["start"] + e["length"]]
        if e["zero"]:
            assert part.count(0) == len(part), e
        if e["data"] and "offset" in e:
            assert host[e["offset"] : e["offset"] + e["length"]] == part, e
            data_seen += e["length"]
    assert data_seen > 0


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is absent (../shared holds samples)")
@pytest.mark.parametrize("name", ["iotest-dynamic-1G", "test-disk2vhd"])
def test_sample_vhdx_info_and_map(name: str, tmp_path: Path) -> None:
    src = SAMPLES / f"{name}.vhdx.bz2"
    img = tmp_path / f"{name}.vhdx"
    with open(img, "wb") as f:
        subprocess.run(["bzcat", str(src)], stdout=f, check=True)
    ours = _info("blockfs", img)
    theirs = _info("qemu", img)
    assert isinstance(ours, dict)
    ours.pop("format-specific")
    assert _without_blockfs(ours) == theirs
    check_map_by_reading(img, "vhdx")


def test_info_and_map_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "garbage.img").write_bytes(b"QFI\xfb" + bytes(60))
    for args in (["info", "missing.qcow2"], ["map", "missing.qcow2"], ["map", str(tmp_path)],
                 ["info", str(tmp_path / "garbage.img")]):  # fmt: skip
        res = blockfs(*args, check=False)
        assert res.returncode != 0
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
