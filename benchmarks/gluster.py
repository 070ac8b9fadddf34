"""The gluster lines: one raw image on a GlusterFS volume, reached two ways.

* blockfs mounting ``gluster://HOST/VOLUME/disk.raw`` (``format=raw``): libgfapi in the daemon;
* qemu-storage-daemon exporting over FUSE a ``driver=raw`` node over a ``driver=gluster`` node
  (QEMU's gluster driver, libgfapi too).

The glusterd is the tests' fixture (``tests/glusterd.py``: a network namespace of its own joined
by a veth pair, glusterd and its brick inside, everything in a scratch folder), loaded from its
file; the volume is a plain one (one brick on the scratch folder's file system). The image is
written once through GlusterFS's own FUSE client (``mount -t glusterfs``), then both sides read
and write that same file, one after the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Self

from benchmarks.exposures import QsdExport, first_line, load_fixture
from benchmarks.fio import FIO_JOBS, FioJob

#: the tests' glusterd fixture
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "glusterd.py"
SIDES = ("blockfs", "qemu")
VOLUME = "bench"
IMAGE = "disk.raw"
#: the same jobs as the ssh lines: 1 MiB sequential at iodepth 4, 4 KiB random at iodepth 16
GLUSTER_JOBS: tuple[FioJob, ...] = tuple(
    j
    for j in FIO_JOBS
    if j.name in ("seq read 1M qd4", "seq write 1M qd4", "rand read 4k qd16", "rand write 4k qd16")
)


def gluster_specs() -> list[tuple[str, str, str]]:
    """(name, unit, better) of the gluster lines."""
    return [(f"gluster raw {j.name}", j.figure, j.better) for j in GLUSTER_JOBS]


class GlusterUnavailable(RuntimeError):
    """The glusterd could not be started; the message says why (every gluster line is n/a)."""


def _fixture() -> ModuleType:
    return load_fixture(FIXTURE, GlusterUnavailable)


class GlusterSite:
    """A glusterd serving volume ``bench`` with ``disk.raw`` on it: ``size`` bytes of
    pseudo-random data (written through GlusterFS's FUSE client)."""

    def __init__(self, folder: str, size: int) -> None:
        self.folder = Path(folder)
        self.size = size
        self.host = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise GlusterUnavailable("glusterd in a network namespace needs root")
        fixture = _fixture()
        try:
            fixture.need_gluster()
            server = self._stack.enter_context(fixture.GlusterServer())
            server.create_volume(VOLUME)
        except (KeyboardInterrupt, SystemExit):
            self._stack.close()
            raise
        except BaseException as exc:  # pytest's skip (a BaseException) when gluster is missing
            self._stack.close()
            raise GlusterUnavailable(f"glusterd did not start: {first_line(exc)}") from None
        self.host = str(server.host)
        try:
            self._write_image()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _write_image(self) -> None:
        where = Path(tempfile.mkdtemp(dir=self.folder, prefix="gfuse-"))
        mount = ["mount", "-t", "glusterfs", f"{self.host}:/{VOLUME}", str(where)]
        res = subprocess.run(mount, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise GlusterUnavailable(f"mount -t glusterfs: {res.stderr.strip()[:200]}")
        try:
            subprocess.run(
                ["dd", "if=/dev/urandom", f"of={where / IMAGE}", "bs=1M",
                 f"count={self.size >> 20}", "conv=fsync", "status=none"],
                check=True, timeout=600,
            )  # fmt: skip
        finally:
            subprocess.run(["umount", str(where)], capture_output=True, timeout=60)
            shutil.rmtree(where, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def url(self) -> str:
        return f"gluster://{self.host}/{VOLUME}/{IMAGE}"


class QsdGlusterExport(QsdExport):
    """qemu-storage-daemon: ``driver=raw`` over ``driver=gluster``, exported over FUSE as
    :class:`QsdExport` does with a local file."""

    def __init__(self, site: GlusterSite, workdir: str) -> None:
        super().__init__(site.url(), "raw", workdir)
        self.site = site

    def blockdevs(self) -> list[str]:
        node: dict[str, Any] = {
            "driver": "gluster",
            "node-name": "file0",
            "volume": VOLUME,
            "path": f"/{IMAGE}",
            "server": [{"type": "inet", "host": self.site.host, "port": "24007"}],
        }
        return [json.dumps(node), "driver=raw,node-name=fmt0,file=file0"]
