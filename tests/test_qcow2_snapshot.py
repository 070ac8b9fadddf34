"""Internal snapshots and the image commands (create, snapshot, info), checked against
``qemu-img snapshot``, ``qemu-img check`` and ``qemu-io`` both ways."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from blockfs.errors import UsageError
from blockfs.nodes.qcow2 import Qcow2Node
from blockfs.nodes.qcow2 import snapshot as snaps
from blockfs.nodes.registry import close_chain, open_image
from conftest import blockfs, qemu_img, run

MiB = 1024 * 1024


def qemu_io(img: Path, *cmds: str) -> str:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    res = run([*args, str(img)])
    out = res.stdout + res.stderr
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def check_clean(img: Path) -> None:
    res = qemu_img("check", str(img), check=False)
    assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout + res.stderr


def qemu_snapshots(img: Path) -> list[tuple[str, str]]:
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


async def open_qcow2(img: Path) -> Qcow2Node:
    node = await open_image(str(img))
    assert isinstance(node, Qcow2Node)
    return node


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_qemu_snapshot_applied_by_blockfs(tmp_path: Path, compat: str) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4096", str(img), "4M"
    )
    qemu_io(img, "write -P 0x11 0 1M", "write -P 0x12 3M 8k")
    qemu_img("snapshot", "-c", "q1", str(img))
    qemu_io(img, "write -P 0x22 512k 1M", "write -z 3M 4k")
    node = await open_qcow2(img)
    try:
        assert [s.name for s in node.snapshots] == ["q1"]
        await snaps.apply_snapshot(node, "q1")
        assert await node.read(0, MiB) == b"\x11" * MiB
        assert await node.read(MiB, MiB) == bytes(MiB)
        # writing after the revert copies, the snapshot keeps its data
        await node.write(100, b"\x33" * 5000)
    finally:
        await close_chain(node)
    check_clean(img)
    qemu_io(img, "read -P 0x33 100 5000", "read -P 0x11 5100 1043476", "read -P 0x12 3M 8k")
    qemu_img("snapshot", "-a", "q1", str(img))
    qemu_io(img, "read -P 0x11 0 1M", "read -P 0 1M 2M")
    check_clean(img)


async def test_blockfs_snapshot_applied_by_qemu(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_io(img, "write -P 0x41 0 2M")
    node = await open_qcow2(img)
    try:
        s = await snaps.create_snapshot(node, "before")
        assert s.id == "1"
        # after the snapshot, in-place writes must copy: the L2 table and the clusters are shared
        await node.write(4096, b"\x42" * 70000)
        await node.write_zeroes(MiB, 65536)
        await node.discard(MiB + 65536, 65536)
        assert await node.read(4096, 70000) == b"\x42" * 70000
    finally:
        await close_chain(node)
    check_clean(img)
    assert qemu_snapshots(img) == [("1", "before")]
    qemu_io(img, "read -P 0x42 4096 70000", "read -P 0 1M 128k")
    qemu_img("snapshot", "-a", "before", str(img))
    qemu_io(img, "read -P 0x41 0 2M")
    check_clean(img)


async def test_delete_restores_exclusive_ownership(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_io(img, "write -P 0x51 0 1M")
    node = await open_qcow2(img)
    try:
        await snaps.create_snapshot(node, "a")
        await node.write(0, b"\x52" * 1000)
        await snaps.create_snapshot(node, "b")
        with pytest.raises(UsageError, match="exists"):
            await snaps.create_snapshot(node, "a")
        await snaps.delete_snapshot(node, "a")
        await snaps.delete_snapshot(node, "2")  # by ID
        assert node.snapshots == []
        with pytest.raises(UsageError, match="no snapshot"):
            await snaps.delete_snapshot(node, "a")
    finally:
        await close_chain(node)
    check_clean(img)  # COPIED flags must be back where refcounts are 1 again
    assert qemu_snapshots(img) == []
    qemu_io(img, "read -P 0x52 0 1000", "read -P 0x51 1000 1047576")
    # and the clusters of the deleted snapshots were freed
    res = qemu_img("check", "--output=json", str(img))
    assert json.loads(res.stdout)["allocated-clusters"] == 16


async def test_snapshots_listed_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    qemu_img("snapshot", "-c", "from-qemu", str(img))
    node = await open_qcow2(img)
    try:
        await snaps.create_snapshot(node, "from-blockfs")
        listed = [(d["id"], d["name"]) for d in node.describe()["snapshots"]]  # type: ignore[union-attr]
    finally:
        await close_chain(node)
    assert listed == qemu_snapshots(img) == [("1", "from-qemu"), ("2", "from-blockfs")]
    check_clean(img)


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_create_snapshot_info(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    blockfs("create", "-f", "qcow2", str(base), "10G")
    blockfs("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    blockfs(
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536,compat=0.10,preallocation=metadata",
        str(tmp_path / "pre.qcow2"),
        "64M",
    )
    blockfs("create", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    assert (tmp_path / "r.raw").stat().st_size == MiB
    for img in (base, top, tmp_path / "pre.qcow2"):
        check_clean(img)
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "pre.qcow2")).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"

    blockfs("snapshot", "-c", "before-upgrade", str(top))
    blockfs("snapshot", "-c", "second", str(top))
    listing = blockfs("snapshot", "-l", str(top)).stdout
    assert re.search(r"^1\s+before-upgrade\s", listing, re.MULTILINE)
    assert qemu_snapshots(top) == [("1", "before-upgrade"), ("2", "second")]
    blockfs("snapshot", "-a", "before-upgrade", str(top))
    blockfs("snapshot", "-d", "second", str(top))
    check_clean(top)

    doc = json.loads(blockfs("info", "--output", "json", str(top)).stdout)
    assert doc["format"] == "qcow2" and doc["virtual-size"] == 10 * 1024**3
    assert doc["backing-filename"] == "base.qcow2" and doc["backing-filename-format"] == "qcow2"
    assert [s["name"] for s in doc["snapshots"]] == ["before-upgrade"]
    chain = json.loads(blockfs("info", "--backing-chain", "--output", "json", str(top)).stdout)
    assert [layer["filename"].rsplit("/", 1)[-1] for layer in chain] == ["top.qcow2", "base.qcow2"]
    human = blockfs("info", "--backing-chain", str(top)).stdout
    assert "backing file: base.qcow2" in human and "cluster_size: 65536" in human


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "-f", "vpc", "x.img", "1M"], "cannot create format"),
        (["create", "-o", "bogus=1", "x.qcow2", "1M"], "unknown option"),
        (["create", "x.qcow2", "12Q"], "not a size"),
        (["create", "x.qcow2"], "size is required"),
        (["snapshot", "-a", "nope", "IMG"], "no snapshot 'nope'"),
        (["snapshot", "-l", "missing.qcow2"], "no such file"),
        (["info", "missing.qcow2"], "no such file"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    args = [
        str(img) if a == "IMG" else (str(tmp_path / a) if "." in a and "=" not in a else a)
        for a in args
    ]
    res = blockfs(*args, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stderr.startswith("blockfs: ") and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
