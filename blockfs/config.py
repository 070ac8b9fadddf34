"""What a mount is asked to do: the images (as the command line named them) and the options.

The CLI parses into these (:mod:`blockfs.imagespec`); the daemon serves them. Plain data,
so that neither has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: how many FUSE requests may be served at once in the event loop (tasks)
MAX_FUSE_TASKS = 64
#: FUSE reader threads (blockfs.fuseloop) when some image has a direct data path
FUSE_THREADS = 2
MAX_FUSE_THREADS = 64


@dataclass(frozen=True)
class ImageSpec:
    name: str
    path: str
    format: str | None = None
    read_only: bool = False
    #: folders whose files a probed image may use as backing files (``backing-dirs=A:B``)
    backing_dirs: tuple[str, ...] = ()
    #: an error-injection filter under the image's format node (``inject=on``; for tests)
    inject: bool = False


@dataclass
class MountConfig:
    mountpoint: str
    images: list[ImageSpec]
    read_only: bool = False
    allow_other: bool = False
    fuse_tasks: int = MAX_FUSE_TASKS
    #: FUSE reader threads (blockfs.fuseloop); None (auto, the default): FUSE_THREADS when
    #: some image has a data path the threads can answer, else 0; 0: pyfuse3's own loop
    fuse_threads: int | None = None
    extra_fuse_options: list[str] = field(default_factory=list)
    #: the mount's source as mount(8) and /proc/mounts show it (mount.fuse.blockfs passes the
    #: fstab line's, so that `mount -a` sees the line mounted); default "blockfs"
    fsname: str = "blockfs"
    #: owner, group and permission bits every image file shows (None: its image file's)
    image_uid: int | None = None
    image_gid: int | None = None
    image_mode: int | None = None
