"""The request-loop prototype of benchmarks/rawfuse.py (FUSE spoken directly by threads on
cloned /dev/fuse descriptors) serves a raw image correctly: fio's own verification of 4 KiB
random writes and 1 MiB sequential writes passes through it, and the image file holds what was
written. It is a measuring instrument; this keeps it honest for whoever builds on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, have_fuse, is_mounted, need_tool, run

pytestmark = pytest.mark.skipif(
    not have_fuse() or os.getuid() != 0, reason="needs /dev/fuse and root (mount(2))"
)


def test_threads_on_cloned_fuse_descriptors_serve_the_image(tmp_path: Path) -> None:
    need_tool("fio")
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(1 << 20) * 64)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.rawfuse", str(img), str(mnt), "3"], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "disk").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "rawfuse did not mount"
            time.sleep(0.05)
        assert (mnt / "disk").stat().st_size == 64 << 20
        with open(mnt / "disk", "rb") as f:
            assert f.read(1 << 20) == img.read_bytes()[: 1 << 20]
        for rw, bs, depth, offset in (("randwrite", "4k", 16, "0"), ("write", "1M", 4, "32M")):
            res = run(
                ["fio", "--name=v", f"--filename={mnt / 'disk'}", f"--rw={rw}", f"--bs={bs}",
                 f"--iodepth={depth}", "--ioengine=libaio", "--direct=1", f"--offset={offset}",
                 "--size=32M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"],
                check=False,
                cwd=tmp_path,  # fio's verify state file goes there, not into the checkout
            )  # fmt: skip
            assert res.returncode == 0 and "err= 0" in res.stdout, res.stdout + res.stderr
        with open(mnt / "disk", "rb") as f:
            through = f.read()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        proc.wait(timeout=30)
    assert not is_mounted(mnt)
    assert through == img.read_bytes()
