"""`python -m benchmarks --quick` runs and reports every line. A smoke check: it never asserts a
speed, only that the suite ran, wrote its JSON and chart, and gave a figure (or a reason) for each
line of the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FULL

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("fio", "qemu-img", "qemu-storage-daemon", "fusermount3")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="FUSE (/dev/fuse) is absent"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason=f"needs {', '.join(TOOLS)} (make setup installs them)",
    ),
]


@pytest.mark.timeout(240)
def test_quick_run_reports_every_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("qemu.qmp")
    from benchmarks.runner import FORMATS, floor_lines, line_specs

    # raw alone by default (the smoke check of every kind of line); both formats in long runs
    formats = FORMATS if FULL else ("raw",)
    # no --chart: a run given --output draws its chart beside its JSON
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    published = (REPO / "benchmarks" / "ratios.png").stat().st_mtime_ns
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--workdir",
            str(tmp_path),
            "--output",
            str(out),
            "--formats",
            ",".join(formats),
            "--no-ssh",  # the ssh lines (about 35 s with --quick) are not part of this smoke check
            "--no-gluster",  # nor the gluster lines (a glusterd, a volume, two sides)
            # a smoke check of every line: short fio runs on a small image unless in long runs
            *([] if FULL else ["--size", "128M", "--runtime", "0.6", "--ramp", "0.2"]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr[-3000:]}"
    assert chart.stat().st_size > 0
    assert (REPO / "benchmarks" / "ratios.png").stat().st_mtime_ns == published
    doc = json.loads(out.read_text())
    for key in ("cpu", "cores", "memory_gib", "kernel", "python", "qemu", "fio", "blockfs"):
        assert doc["machine"][key], key
    results = {r["name"]: r for r in doc["results"]}
    expected = line_specs(formats)
    assert list(results) == [name for name, _, _ in expected]
    for name, unit, better in expected:
        r = results[name]
        assert (r["unit"], r["better"]) == (unit, better), name
        # The C reference side is always implemented; so is blockfs on raw images. Other blockfs
        # lines (qcow2, jobs) may be n/a while those features land, but then they say why.
        if r["qemu"] is None:
            # qemu-storage-daemon refuses to mirror a disk behind its own writable FUSE export
            # (the export holds the resize permission): that one line says so instead.
            assert "during mirror" in name and r.get("notes", {}).get("qemu"), (name, r)
        else:
            assert r["qemu"] is not None, (name, r.get("notes"))
        if name.startswith("raw ") and "backup" not in name:
            assert r["blockfs"] is not None, (name, r.get("notes"))
        if name in floor_lines():  # the thinnest pyfuse3 file system ran these too
            assert r["floor"] is not None and r["ratio_floor"] is not None, (name, r)
        if r["blockfs"] is None:
            assert r.get("notes", {}).get("blockfs"), name
        elif r["qemu"] is not None:
            assert r["ratio"] is not None, name
    # the scratch directory was cleaned up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("blockfs-bench-")]
