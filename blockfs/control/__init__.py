"""The control tree under ``MNT/.control``: files a shell can read and write.

    .control/pid                 the daemon's process id (``blockfs umount`` reads it)
    .control/images/NAME/info    JSON: the image and its backing chain
    .control/images/NAME/stats   JSON: QEMU's blockstats counters

The names are a contract with users and scripts; ``fs.py`` only maps inodes to these objects.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from blockfs.control.tree import TextFile, VDir
from blockfs.info import export_info

if TYPE_CHECKING:
    from blockfs.daemon import Daemon
    from blockfs.export import Export

CONTROL_DIR = ".control"


class ControlTree:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        tree = daemon.tree
        self.dir: VDir = tree.mkdirs(tree.root, CONTROL_DIR)
        tree.add(self.dir, TextFile("pid", lambda: f"{os.getpid()}\n"))
        self.images_dir = tree.mkdirs(self.dir, "images")
        for export in daemon.exports.values():
            self.add_image(export)

    def add_image(self, export: Export) -> None:
        tree = self.daemon.tree
        d = tree.mkdirs(self.images_dir, export.name)
        tree.add(d, TextFile("info", lambda: export_info(export.name, export.root, export.read_only)))
        tree.add(d, TextFile("stats", lambda: {"device": export.name, **export.stats.as_dict()}))

    async def aclose(self) -> None:
        """End whatever the control tree started (jobs); nothing yet."""
